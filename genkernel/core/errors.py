"""Errors genkernel raises where silently continuing would be wrong."""


class NonFiniteError(FloatingPointError):
    """A loss or gradient was NaN or infinite. Raised before the optimizer step: the ledger so
    far is kept and consistent with the parameters."""


class SkippedStep(NonFiniteError):
    """A GradScaler found inf or NaN in a step's scaled gradients (a float16 forward's overflow) and
    lowered its scale: the step is skipped, nothing updated, as mixed-precision training skips it; the
    next step runs at the lower scale. The built-in trainers take it in their stride (counted in
    ``skipped_steps``) and draw the next batch."""


class LedgerCheckError(RuntimeError):
    """The split of an update into groups did not add up to what the optimizer really did."""
