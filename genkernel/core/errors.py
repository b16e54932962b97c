"""Errors genkernel raises where silently continuing would be wrong."""


class NonFiniteError(FloatingPointError):
    """A loss or gradient was NaN or infinite. Raised before the optimizer step: the ledger so
    far is kept and consistent with the parameters."""


class LedgerCheckError(RuntimeError):
    """The split of an update into groups did not add up to what the optimizer really did."""
