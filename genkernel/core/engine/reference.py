"""The torch.func reference: per-example Jacobians and the kernels between them.

Every fast path of the engine is tested against these. A Jacobian here is ``[m, d, P]``: m
examples, d flattened outputs, P parameters (the columns of ``params`` in order).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable

import torch
import torch.utils._pytree as pytree
from torch import nn
from torch.func import jacrev, vmap

from ..adapter import checkpointing_error, functional_model


def per_example(fn: Callable, in_dims: tuple) -> Callable:
    """``vmap(fn, in_dims)``, or, for a model some layer of which has no batching rule (PReLU's
    one-parameter form, recurrent layers' fused kernels), the same results one example at a time.

    The batched result is checked on its first example against ``fn`` of that example alone: a
    batching rule can confuse the examples' dimension with another of the same size and return
    wrong values without an error (measured, torch 2.14: ``vmap(jacrev(f))`` through ``F.prelu``
    gave per-example Jacobians 0.4-0.9 off, relative, whenever the batch size equaled the number
    of outputs, and raised for other batch sizes). The fallback is exact and slower; it is taken
    once per call with a warning that names the cause, never silently.

    "Alone" is ``fn`` on the example unbatched, or, where that raises, ``vmap(fn)`` over a batch of
    that one example: on CUDA (torch 2.11, inside a UNet's backward) ``jacrev`` of one example
    raised "NYI: querying is_contiguous inside of vmap" while the batched call ran. A batch of one
    cannot confuse its examples, so it still tells a wrong batched result apart."""
    batched = vmap(fn, in_dims=in_dims)

    def run(*args: Any):
        # in_dims apply to every tensor of an argument (a tuple of inputs), as in vmap
        size = next(pytree.tree_leaves(a)[0].shape[d] for a, d in zip(args, in_dims) if d is not None)

        def example(i: int) -> tuple:
            return tuple(a if d is None else pytree.tree_map(lambda t: t.select(d, i), a) for a, d in zip(args, in_dims))

        def alone(i: int) -> Any:
            try:
                return fn(*example(i))
            except RuntimeError as error:
                one = tuple(a if d is None else pytree.tree_map(lambda t: t.narrow(d, i, 1), a) for a, d in zip(args, in_dims))
                try:
                    return pytree.tree_map(lambda t: t[0], batched(*one))
                except RuntimeError:
                    raise error from None

        try:
            out = batched(*args)
        except RuntimeError as error:
            clear = checkpointing_error(error) or _untransformable_error(error)  # one example at a time fails too
            if clear is not None:
                raise clear from error
            why = f"torch.func.vmap cannot batch this model over examples ({str(error).splitlines()[0][:200]})"
        else:
            if size < 2 or _agrees(pytree.tree_map(lambda t: t[0], out), alone(0)):
                return out
            why = ("torch.func.vmap gave the first example other values than a pass of that example alone (a batching "
                   "rule that confuses the examples' dimension with another of the same size)")
        warnings.warn(f"{why}; genkernel computes per-example quantities one example at a time instead (exact, slower)",
                      RuntimeWarning, stacklevel=3)
        outs = [alone(i) for i in range(size)]
        return pytree.tree_map(lambda *xs: torch.stack(xs), *outs)

    return run


def _untransformable_error(error: BaseException) -> ValueError | None:
    """The clear error for a forward that calls a ``torch.autograd.Function`` without
    ``setup_context`` (``torch.utils.checkpoint(..., use_reentrant=True)`` is one), which no
    torch.func transform can run, batched or one example at a time; None for any other error.
    (Unchecked, the one-example-at-a-time fallback ran, warned that vmap could not batch the
    model, and then raised torch's own message, which names neither checkpointing nor a remedy.)"""
    if "setup_context" not in str(error):
        return None
    return ValueError(
        "the model's forward calls a torch.autograd.Function without a setup_context staticmethod, which "
        "torch.func (per-example gradients, Jacobians) cannot differentiate; torch.utils.checkpoint with "
        "use_reentrant=True is one: call it with use_reentrant=False, or skip the checkpoint when the module's "
        f"gradient_checkpointing attribute is False (torch: {str(error).splitlines()[0][:200]})"
    )


class RootSumSquares:
    """sqrt(Σ ‖t‖²) over the tensors :meth:`add` is given, kept as ``scale`` · sqrt(``sumsq``): the largest finite
    magnitude seen and the sum of squares relative to it. Formed directly in float64, the squares overflow for
    entries past about 1.3e154 (a norm of inf, and ``inf <= rtol * inf`` accepted any difference) and underflow
    below about 1.5e-154 (a norm of 0, and ``0 <= rtol * 0`` accepted any difference too); :func:`in_common_scale`
    compares several such norms without forming them. An infinity or a NaN among the entries makes ``sumsq``
    inf or NaN, as the plain norm would be."""

    def __init__(self) -> None:
        self.scale, self.sumsq = 0.0, 0.0

    def add(self, t: torch.Tensor, times: float = 1.0) -> None:
        """Add ‖t · times‖ (``times``: the scale :func:`scaled_alike` divided ``t`` by; positive)."""
        t = t.detach().double()
        m = _finite_max(t)
        m = torch.where(m > 0, m, torch.ones_like(m))  # (only zeros, or infinities and NaNs: their squares as they are)
        m, s = torch.stack([m, (t / m).square().sum()]).tolist()  # (one read of the device)
        m *= times
        if s == 0:
            return
        if m > self.scale:
            self.sumsq = (self.sumsq * (self.scale / m) ** 2 if self.sumsq else 0.0) + s
            self.scale = m
        else:
            self.sumsq += s * (m / self.scale) ** 2


def norm_of(t: torch.Tensor) -> float:
    """‖t‖ (float64) as a float that neither overflows nor underflows where the norm itself is in range: the plain
    norm where it lies safely inside float64's range (the common case: one pass), else formed through
    :class:`RootSumSquares` (squares of entries past about 1.3e154 gave inf, and a check of a gap against
    ``rtol * inf`` passed any gap; entries below about 1.5e-154 gave 0). An infinity or a NaN among the entries
    gives inf or NaN, as the plain norm."""
    plain = float(torch.linalg.vector_norm(t.detach(), dtype=torch.float64))
    if math.isnan(plain) or 1e-140 < plain < 1e140 or plain == 0.0 and not bool(t.any()):
        return plain
    total = RootSumSquares()
    total.add(t)
    return total.scale * math.sqrt(total.sumsq) if total.sumsq else 0.0


def in_common_scale(*norms: RootSumSquares) -> tuple[list[float], float]:
    """(the norms, each divided by one common scale S; S): ratios and sums of the values are those of the norms
    themselves (a relative comparison, ``gap <= rtol * size``, reads the same), and no value overflows or
    underflows; an absolute threshold ``a`` reads ``a / S``. S is the largest of their scales (1 for all zeros)."""
    scale = max((n.scale for n in norms), default=0.0) or 1.0
    return [(n.scale / scale) * math.sqrt(n.sumsq) if n.sumsq else 0.0 for n in norms], scale


def scaled_alike(*tensors: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], float]:
    """(float64 copies of ``tensors`` divided by their common largest finite magnitude, that magnitude; 1 where it is
    0): norms and differences formed from the copies neither overflow nor underflow (see :class:`RootSumSquares`),
    with the same ratios as the originals'; infinities and NaNs stay."""
    doubles = [t.detach().double() for t in tensors]
    scale = float(torch.stack([_finite_max(t) for t in doubles]).max()) if doubles else 0.0
    return (tuple(doubles), 1.0) if scale == 0 else (tuple(t / scale for t in doubles), scale)


def largest_finite(tensors) -> float:
    """The largest finite magnitude among the entries of ``tensors`` (an iterable of tensors), 1.0 where there is
    none or it is 0: a common scale to divide them by before forming products (``scaled_alike``'s, without its
    copies)."""
    return max((finite_peak(t.detach()) for t in tensors), default=0.0) or 1.0


def finite_peak(t: torch.Tensor) -> float:
    """The largest finite magnitude among ``t``'s entries (0.0 for none), read without a copy of ``t`` where every
    entry is finite (its minimum and maximum); where an infinity or a NaN is among them, through ``|t|``."""
    if t.numel() == 0:
        return 0.0
    if not t.is_floating_point():
        return float(t.abs().max())
    low, high = torch.aminmax(t)
    peak = float(torch.maximum(-low, high))
    return peak if math.isfinite(peak) else float(_finite_max(t))


def _finite_max(t: torch.Tensor) -> torch.Tensor:
    """The largest finite magnitude among ``t``'s entries, a 0-dim tensor on its device (0 for none)."""
    if t.numel() == 0:
        return t.new_zeros(())
    return torch.where(t.isfinite(), t.abs(), t.new_zeros(())).max()


def _agrees(batched: Any, alone: Any) -> bool:
    """Whether two results (pytrees of tensors) agree up to rounding: relative to their norm, over all
    floating leaves together, 1e-3 where any leaf is coarser than float64, else 1e-5 (a confused
    dimension is 0.1-0.9 off). The tolerance was the last leaf's, 1e-8 once a float64 leaf came: a
    float32 body under a float64 head (its leaves float32, or float64 leaves carrying float32 rounding,
    1e-7) was taken for a batching-rule error, and every Jacobian was formed one example at a time
    (48x slower on a 3-layer MLP at 128 examples), with a warning naming a fault that was not there."""
    gap, size = RootSumSquares(), RootSumSquares()  # (squares formed directly overflow past 1.3e154: inf <= inf)
    rtol = 1e-5
    for a, b in zip(pytree.tree_leaves(batched), pytree.tree_leaves(alone)):
        if not isinstance(a, torch.Tensor) or not a.is_floating_point():
            continue
        if a.shape != b.shape:
            return False
        rtol = rtol if a.dtype == torch.float64 else 1e-3
        (a, b), scale = scaled_alike(a, b)
        gap.add(a - b, scale)
        size.add(b, scale)
    (gap_norm, size_norm), _ = in_common_scale(gap, size)
    return gap_norm <= rtol * size_norm


def per_example_jacobian(model: nn.Module, params: dict[str, torch.Tensor], fixed: dict[str, torch.Tensor] | None = None,
                         outputs: slice | None = None):
    """``jac(*inputs) -> Tensor[m, d, P]``: per-example Jacobians of a chunk of inputs with
    respect to ``params``; ``fixed`` holds values for other parameters (default: the module's).
    ``outputs``: only those rows (``[m, outputs.stop - outputs.start, P]``): jacrev's backward
    holds the gradients of the whole graph once per row it forms at once."""
    forward = functional_model(model, fixed)

    def single(p: dict[str, torch.Tensor], *x: torch.Tensor) -> torch.Tensor:
        out = forward(p, tuple(t.unsqueeze(0) for t in x))[0]
        return out if outputs is None else out[outputs]

    jac_single = jacrev(single)

    def jac(*inputs: torch.Tensor) -> torch.Tensor:
        in_dims = (None,) + (0,) * len(inputs)
        blocks = per_example(jac_single, in_dims)(params, *inputs)
        m = inputs[0].shape[0]
        return torch.cat([blocks[name].reshape(m, blocks[name].shape[1], -1) for name in params], dim=2)

    return jac


def batch_jacobian(model: nn.Module, params: dict[str, torch.Tensor], fixed: dict[str, torch.Tensor] | None = None):
    """``jac(*inputs) -> Tensor[m, d, P]``: the Jacobians of a batch's outputs with respect to ``params``, the batch run
    as one forward (:func:`per_example_jacobian` runs each input alone). The two agree where the examples are
    independent; where an example's output depends on the others of its batch (BatchNorm without running statistics
    normalizes with the batch's statistics in eval mode too) each row here is the batch's own, the one
    ``f(batch)`` moves by."""
    forward = functional_model(model, fixed)

    def jac(*inputs: torch.Tensor) -> torch.Tensor:
        m = inputs[0].shape[0]
        blocks = jacrev(lambda p: forward(p, inputs))(params)  # {name: [m, d, *shape]}
        return torch.cat([blocks[name].reshape(m, blocks[name].shape[1], -1) for name in params], dim=2)

    return jac


def split_columns(jac: torch.Tensor, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Views of a Jacobian ``[m, d, P]`` whose columns run over ``params`` in order: ``{name: [m, d, numel]}``."""
    out, offset = {}, 0
    for name, p in params.items():
        out[name] = jac[:, :, offset : offset + p.numel()]
        offset += p.numel()
    return out


def jacobian_pair_kernel(j1: torch.Tensor, j2: torch.Tensor, reduce: str) -> torch.Tensor:
    """Kernel between per-example Jacobians ``[m, d, P]`` and ``[n, d, P]``: ``[m, n]`` (trace)
    or ``[m, n, d, d]`` (``reduce="none"``)."""
    return torch.einsum("mdp,ndp->mn", j1, j2) if reduce == "trace" else torch.einsum("mdp,nep->mnde", j1, j2)


def jacobian_self_kernel(j: torch.Tensor, reduce: str) -> torch.Tensor:
    """Diagonal of :func:`jacobian_pair_kernel` for ``[m, d, P]``: ``[m]`` or ``[m, d]``."""
    return (j * j).sum(dim=(1, 2)) if reduce == "trace" else (j * j).sum(dim=2)


__all__ = ["jacobian_pair_kernel", "jacobian_self_kernel", "per_example", "per_example_jacobian", "split_columns"]
