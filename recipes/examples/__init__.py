"""Training scripts people already run, with a genkernel analyzer attached.

Each module keeps its upstream flow (the diffusers example scripts); the lines that attach the
analyzer are marked ``# genkernel``. Run them from the repository root, e.g.::

    python -m recipes.examples.train_unconditional --train_data_dir DIR --output_dir OUT
"""
