"""Recipes: experiments, benchmarks and examples; run as `python -m recipes.<sub>.<name>` (every
experiment: `python -m recipes`)."""
