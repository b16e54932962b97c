"""The experiments, one module each, run as ``python -m recipes.experiments.<name> [--quick]``
(all of them: ``python -m recipes``); shared code lives in :mod:`recipes.common`."""
