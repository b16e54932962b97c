"""The paper's analyses on top of the core: spectra and the null space of the path-kernel operator,
the Hutchinson estimate of the Itô term and the stochastic Domingos decomposition, kernel
statistics, kernel neighbours, optimizer-weighted kernels and embeddings of tangent features.

Each module is imported on its own (``from genkernel.analysis.spectral import ...``); none is
needed to keep a ledger.
"""
