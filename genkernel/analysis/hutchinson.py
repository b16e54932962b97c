"""Second-order (Itô) term of stochastic Domingos, by Hessian-vector products.

docs/generalization.md, "Stochastic Domingos: the expected output". For plain SGD with step η and
mini-batch gradient covariance Σ_k, a second-order Taylor step of a probe output adds, in
expectation over the batch,

    (η²/2) tr(Σ_k H),      H = ∇²_θ f(x; θ_k),                                          (Itô)

next to the same-order deterministic term (η²/2) ḡᵀ H ḡ. Σ_k is never formed: with the
batch's per-example loss gradients g_n (n = 1..B), their mean ḡ and independent Rademacher signs r_n,

    v = a Σ_n r_n (g_n − ḡ)   has   E_r[v vᵀ] = a² Σ_n (g_n − ḡ)(g_n − ḡ)ᵀ = a² (B − 1) S²_b,      (V)

with S²_b the unbiased sample covariance of the batch's gradients, so E_r[vᵀ H v] = a² (B − 1)
tr(S²_b H) (Hutchinson), and vᵀ H v needs only Hessian-vector products. The scale a is set by how
batches are drawn (the *sampling model*, :func:`ito_scale`): Σ_k, the covariance of the mean of
one batch of B examples from the N training examples (population covariance S², denominator N − 1),
is

- with replacement (B independent uniform draws; also an infinite training set):
  Σ_k = S² (N − 1)/N / B, and E[S²_b] = S² (N − 1)/N, so  a² = 1 / (B (B − 1));
- without replacement (a uniform B-subset, e.g. one batch of an epoch-wise permutation):
  Σ_k = S² / B · (N − B)/N, and E[S²_b] = S², so  a² = (N − B) / (N B (B − 1)).

Either way E_batch E_r[vᵀ H v] = tr(Σ_k H): the estimate is unbiased over batch draws (the tests
check this by Monte Carlo over many batches against :func:`exact_trace_sigma_hessian`). The
earlier choice a = 1/B scales the estimate by (B − 1)/B with replacement and by
(B − 1)/B · N/(N − B) without (0.80 at B = 4, N = 64: low while B² < N, high beyond). A batch of
one example has no spread to estimate Σ_k from (refused), and a full batch drawn without
replacement (B = N) has Σ_k = 0. Within one epoch consecutive batches are not independent (they
exclude each other's examples); the Itô term uses each batch's marginal distribution and does
not model that dependence.

Model conventions shared by every function here:

- `model` is an nn.Module called as model(*inputs); `x` is a Tensor or a tuple of Tensors,
  all with the same leading (batch) dimension M >= 1. The model must treat examples
  independently (e.g. BatchNorm in eval mode) and be deterministic (no active dropout); BatchNorm
  with batch statistics and dropout in training mode are refused (ValueError), as are inputs
  with NaN or infinite entries.
- Each example's output is flattened; it must have one element, or `output_index` picks
  one element of the flattened output. That scalar is f(x_m; θ).
- θ is the set of parameters named by the keys of the given dict (v, per-example gradients,
  mean gradient): a subset of model.named_parameters(). Other parameters and buffers are
  held fixed. Parameters are read with torch.func.functional_call (through
  :func:`genkernel.core.adapter.call_with`), never modified.
- Derivatives are computed in the parameters' dtype (use a float64 model for exact checks);
  returned tensors are float64 on the parameters' device.
- Second derivatives use forward-mode AD, which the fused attention kernels lack
  (scaled_dot_product_attention's flash/efficient backends, nn.MultiheadAttention's fast path):
  every function here runs the model with the math attention backend and the MultiheadAttention
  fast path off (the same values), restoring both afterwards.
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import Mapping, Union

import torch
from torch import Tensor, nn
from torch.func import grad, hessian, jacrev, jvp, vmap

from ..core.adapter import (call_with, check_per_example_safe, draws_between_passes, forward_ad_attention, full_precision,
                             positive_int)

__all__ = [
    "hessian_vector_product",
    "per_probe_hessian_vector_product",
    "hessian_quadratic_form",
    "ito_scale",
    "ito_term_estimate",
    "batch_ito_term",
    "deterministic_second_order_term",
    "exact_trace_sigma_hessian",
]

Inputs = Union[Tensor, tuple]


def _attention_safe(fn):
    """Run ``fn`` under :func:`~genkernel.core.adapter.forward_ad_attention` (module docstring) and in the
    model's own precision (:func:`~genkernel.core.adapter.full_precision`: autocast and TF32 off). Under a
    caller's ``torch.autocast`` (a mixed-precision training or validation step) every derivative was taken in
    bfloat16 and returned as float64 with no sign of it (measured: 5e-3 to 1.1e-2 relative off a float32
    model's own values, 1e-7 without)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        model = args[0] if args else kwargs.get("model")
        with forward_ad_attention(), full_precision(model if isinstance(model, nn.Module) else None):
            return fn(*args, **kwargs)

    return wrapper


# --------------------------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------------------------


def _check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    # BatchNorm with batch statistics makes f(x_m) depend on the other probes of the call (silently
    # wrong per-probe Hessians; in training mode torch.func fails on its running-statistics update),
    # and active dropout (RReLU's slopes, stochastic depth) draws afresh per call: refuse both with the fix.
    try:
        check_per_example_safe(model)
    except ValueError as exc:
        raise ValueError(f"per-probe Hessians of this model would be wrong or would change it: {exc}") \
            from exc


def _as_inputs(x, name: str = "x") -> tuple[tuple[Tensor, ...], int]:
    """Return (inputs as a tuple, batch size M); all tensors share the leading dimension."""
    inputs = (x,) if isinstance(x, Tensor) else x
    if not isinstance(inputs, tuple) or len(inputs) == 0 or not all(
        isinstance(t, Tensor) for t in inputs
    ):
        raise TypeError(
            f"{name} must be a Tensor or a non-empty tuple of Tensors (the model's positional "
            f"inputs), got {type(x).__name__}."
        )
    sizes = {t.shape[0] if t.dim() > 0 else None for t in inputs}
    if None in sizes or len(sizes) != 1:
        raise ValueError(
            f"every tensor in {name} needs the same leading batch dimension, got shapes "
            f"{[tuple(t.shape) for t in inputs]}; add a batch dimension (x.unsqueeze(0))."
        )
    m = sizes.pop()
    if m == 0:
        raise ValueError(f"{name} has an empty batch; pass at least one example.")
    if any(t.is_floating_point() and not bool(torch.isfinite(t).all()) for t in inputs):
        raise ValueError(f"{name} contains NaN or infinite entries; every output derivative would be NaN. "
                         "Clean the inputs first.")
    return tuple(t.detach() for t in inputs), int(m)


def _check_draws(model: nn.Module, inputs: tuple[Tensor, ...], name: str) -> None:
    """Refuse a forward that draws random numbers outside the modules refused by type (F.dropout called with
    training=True, noise injection, a random augmentation): every derivative would be taken at other draws
    (measured: two hessian_quadratic_form calls on one direction gave 4.75 and -0.79 for the same probe)."""
    # an RReLU of one slope (lower == upper) draws in training mode but gives its eval-mode output: not randomness
    fixed = [mod for mod in model.modules() if isinstance(mod, nn.RReLU) and mod.training and mod.lower == mod.upper]
    try:
        for mod in fixed:
            mod.training = False
        found = draws_between_passes(model, inputs)
    finally:
        for mod in fixed:
            mod.training = True
    if found:
        raise ValueError(
            f"{type(model).__name__} draws random numbers in its forward on {name} (F.dropout called with "
            "training=True, noise injection, a random augmentation): its Hessians would change from pass to pass. "
            "Remove the randomness from the forward in this mode (call F.dropout with training=self.training and "
            "model.eval(), or pass the noise as an input)"
        )


def _keys(d, name: str) -> list[str]:
    """Keys of a dict argument, raising TypeError for anything else."""
    if not isinstance(d, Mapping):
        raise TypeError(f"{name} must be a dict name -> Tensor, got {type(d).__name__}.")
    return list(d.keys())


def _params_for(model: nn.Module, keys, name: str) -> dict[str, Tensor]:
    """Current values (detached) of the model parameters named by `keys`."""
    named = dict(model.named_parameters())
    keys = list(keys)
    if not keys:
        raise ValueError(f"{name} is empty; give at least one parameter name.")
    unknown = [k for k in keys if k not in named]
    if unknown:
        raise ValueError(
            f"{name} has keys {unknown[:5]} that are not parameters of the model; use names "
            f"from model.named_parameters(), e.g. {list(named)[:3]}."
        )
    return {k: named[k].detach() for k in keys}


def _direction(v, params: dict[str, Tensor], name: str) -> dict[str, Tensor]:
    """Validate a direction dict name -> Tensor[param shape]; cast to the params' dtype."""
    if not isinstance(v, Mapping):
        raise TypeError(f"{name} must be a dict name -> Tensor, got {type(v).__name__}.")
    out = {}
    for k, p in params.items():
        t = v[k]
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}[{k!r}] must be a Tensor, got {type(t).__name__}.")
        if tuple(t.shape) != tuple(p.shape):
            raise ValueError(
                f"{name}[{k!r}] has shape {tuple(t.shape)} but the parameter has "
                f"{tuple(p.shape)}; pass one tensor per parameter, shaped like it."
            )
        if not torch.isfinite(t).all():
            raise ValueError(f"{name}[{k!r}] contains NaN or infinite entries.")
        out[k] = t.detach().to(device=p.device, dtype=p.dtype)
    return out


def _per_example(grads, params: dict[str, Tensor], name: str) -> tuple[dict[str, Tensor], int]:
    """Validate per-example gradients name -> Tensor[B, *param shape]; return float64, B."""
    if not isinstance(grads, Mapping):
        raise TypeError(
            f"{name} must be a dict name -> Tensor[B, ...], got {type(grads).__name__}."
        )
    out, sizes = {}, set()
    for k, p in params.items():
        t = grads[k]
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}[{k!r}] must be a Tensor, got {type(t).__name__}.")
        if t.dim() != p.dim() + 1 or tuple(t.shape[1:]) != tuple(p.shape):
            raise ValueError(
                f"{name}[{k!r}] has shape {tuple(t.shape)}; expected [B, *{tuple(p.shape)}] "
                "(one gradient per batch example, stacked on dim 0)."
            )
        if not torch.isfinite(t).all():
            raise ValueError(f"{name}[{k!r}] contains NaN or infinite entries.")
        sizes.add(int(t.shape[0]))
        out[k] = t.detach().to(device=p.device, dtype=torch.float64)
    if len(sizes) != 1:
        raise ValueError(f"{name} tensors disagree on the batch size B: {sorted(sizes)}.")
    b = sizes.pop()
    if b == 0:
        raise ValueError(f"{name} has an empty batch (B = 0).")
    return out, b


def _check_lr(lr) -> float:
    if isinstance(lr, Tensor) and lr.numel() == 1:
        lr = float(lr)
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real):
        raise TypeError(f"lr must be a real number, got {type(lr).__name__}.")
    lr = float(lr)  # numpy scalars (np.float32 from a config or a sweep) included
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}.")
    return float(lr)


def _check_output_index(output_index) -> None:
    if output_index is not None and (
        isinstance(output_index, bool) or not isinstance(output_index, numbers.Integral)
    ):
        raise TypeError(f"output_index must be an int or None, got {type(output_index).__name__}.")


def _scalar_outputs(model, params, inputs, m: int, output_index) -> Tensor:
    """f(x_m; θ) for every example m, Tensor[M] (differentiable in `params`)."""
    out = call_with(model, params, inputs)
    if not isinstance(out, Tensor):
        raise TypeError(
            f"the model returned {type(out).__name__}; it must return one Tensor [M, ...]. "
            "Wrap it so that it returns the output to analyse."
        )
    if out.dim() == 0 or out.shape[0] != m:
        raise ValueError(
            f"the model output has shape {tuple(out.shape)}; expected a leading batch "
            f"dimension M = {m}."
        )
    flat = out.reshape(m, -1)
    if output_index is None:
        if flat.shape[1] != 1:
            raise ValueError(
                f"each example's output has {flat.shape[1]} elements; pass output_index to "
                "choose the scalar f(x) (an index into the flattened per-example output)."
            )
        return flat[:, 0]
    if not -flat.shape[1] <= output_index < flat.shape[1]:
        raise ValueError(
            f"output_index={output_index} is out of range for {flat.shape[1]} output elements."
        )
    return flat[:, output_index]


def _f64(d: dict[str, Tensor]) -> dict[str, Tensor]:
    # detached: parameters outside θ still require grad, and results must not hold their graph
    return {k: t.detach().to(torch.float64) for k, t in d.items()}


# --------------------------------------------------------------------------------------------
# Hessian-vector products
# --------------------------------------------------------------------------------------------


@_attention_safe
def hessian_vector_product(model: nn.Module, x: Inputs, v: Mapping[str, Tensor], *,
                           output_index: int | None = None) -> dict[str, Tensor]:
    """H v with H = ∇²_θ Σ_m f(x_m; θ), the Hessian of the output summed over the batch.

    For a single example (M = 1) this is ∇²_θ f(x; θ) v. For one HVP per probe use
    :func:`per_probe_hessian_vector_product`.

    Args:
        model: the network (see module docstring for conventions).
        x: Tensor[M, ...] or tuple of them.
        v: dict name -> Tensor[param shape]; its keys choose θ.
        output_index: element of the flattened per-example output, or None for scalar outputs.

    Returns:
        dict name -> Tensor[param shape] float64, the HVP.

    Algorithm:
        1. s(θ) = Σ_m f(x_m; θ) through functional_call.
        2. Forward-over-reverse: jvp of grad(s) at θ along v gives H v.
    """
    _check_model(model)
    _check_output_index(output_index)
    inputs, m = _as_inputs(x)
    _check_draws(model, inputs, "x")
    params = _params_for(model, _keys(v, "v"), "v")
    vv = _direction(v, params, "v")

    # 1. summed scalar output
    def total(p):
        return _scalar_outputs(model, p, inputs, m, output_index).sum()

    # 2. forward-over-reverse
    _, hv = jvp(grad(total), (params,), (vv,))
    return _f64(hv)


@_attention_safe
def per_probe_hessian_vector_product(model: nn.Module, probe_x: Inputs,
                                     v: Mapping[str, Tensor], *,
                                     output_index: int | None = None) -> dict[str, Tensor]:
    """H_m v for every probe, H_m = ∇²_θ f(x_m; θ).

    Args:
        model, output_index: as in :func:`hessian_vector_product`.
        probe_x: Tensor[M, ...] or tuple of them, M probes.
        v: dict name -> Tensor[param shape], the same direction for every probe.

    Returns:
        dict name -> Tensor[M, *param shape] float64; entry m is H_m v.

    Algorithm:
        1. F(θ) = [f(x_1; θ), ..., f(x_M; θ)].
        2. jacrev(F) is the per-probe gradient [M, P]; its jvp along v is [H_m v]_m.
    """
    _check_model(model)
    _check_output_index(output_index)
    inputs, m = _as_inputs(probe_x, "probe_x")
    _check_draws(model, inputs, "probe_x")
    params = _params_for(model, _keys(v, "v"), "v")
    vv = _direction(v, params, "v")

    def outputs(p):
        return _scalar_outputs(model, p, inputs, m, output_index)

    _, hv = jvp(jacrev(outputs), (params,), (vv,))
    return _f64(hv)


@_attention_safe
def hessian_quadratic_form(model: nn.Module, probe_x: Inputs, v: Mapping[str, Tensor], *,
                           output_index: int | None = None) -> Tensor:
    """vᵀ H_m v for every probe, H_m = ∇²_θ f(x_m; θ).

    Args:
        model, output_index: as in :func:`hessian_vector_product`.
        probe_x: Tensor[M, ...] or tuple of them.
        v: dict name -> Tensor[param shape].

    Returns:
        Tensor[M] float64.

    Algorithm:
        1. The second directional derivative d²/dt² f(x_m; θ + t v) at t = 0 equals vᵀ H_m v;
           compute it as a jvp of a jvp (forward over forward), all probes in one pass.
    """
    _check_model(model)
    _check_output_index(output_index)
    inputs, m = _as_inputs(probe_x, "probe_x")
    _check_draws(model, inputs, "probe_x")
    params = _params_for(model, _keys(v, "v"), "v")
    vv = _direction(v, params, "v")
    return _quad_form_fn(model, params, inputs, m, output_index)(vv).detach().to(torch.float64)


def _quad_form_fn(model, params, inputs, m, output_index):
    """Return v -> [vᵀ H_m v]_m (forward over forward), in the params' dtype."""

    def outputs(p):
        return _scalar_outputs(model, p, inputs, m, output_index)

    def quad(v):
        def first(p):
            return jvp(outputs, (p,), (v,))[1]

        return jvp(first, (params,), (v,))[1]

    return quad


# --------------------------------------------------------------------------------------------
# Itô term and the deterministic second-order term
# --------------------------------------------------------------------------------------------


SAMPLINGS = ("with_replacement", "without_replacement")


def ito_scale(batch_size: int, *, sampling: str = "with_replacement", population: int | None = None) -> float:
    """a², the squared scale of the Hutchinson direction v = a Σ_n r_n (g_n − ḡ) (module docstring, (V)).

    Args:
        batch_size: B >= 2 examples in the batch (B = 1 only for a full batch without replacement).
        sampling: "with_replacement" (B independent uniform draws, or an infinite training set) or
            "without_replacement" (a uniform B-subset of the N training examples, e.g. one batch of
            an epoch-wise permutation).
        population: N, the number of training examples (needed without replacement).

    Returns:
        1 / (B (B − 1)) with replacement; (N − B) / (N B (B − 1)) without (0 when B = N).
    """
    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}.")
    b = positive_int(batch_size, "batch_size")
    if sampling == "without_replacement":
        if population is not None and (isinstance(population, bool) or not isinstance(population, numbers.Integral)):
            raise TypeError(f"population must be an int N (the number of training examples), got "
                            f"{type(population).__name__} {population!r}.")
        if population is None or population < b:
            raise ValueError(
                f"sampling without replacement needs population = N >= B = {b} (the number of training examples), "
                f"got {population!r}."
            )
        if population == b:
            return 0.0  # the batch is the training set: no sampling noise
        if b < 2:
            raise ValueError("a batch of one example has no spread to estimate the gradient covariance from; use B >= 2.")
        population = int(population)
        return (population - b) / (population * b * (b - 1))
    if population is not None:
        raise ValueError("population is for sampling='without_replacement' (with replacement it does not enter).")
    if b < 2:
        raise ValueError("a batch of one example has no spread to estimate the gradient covariance from; use B >= 2.")
    return 1.0 / (b * (b - 1))


@_attention_safe
def ito_term_estimate(model: nn.Module, probe_x: Inputs,
                      per_example_grads: Mapping[str, Tensor], lr: float, *,
                      num_samples: int, generator: torch.Generator,
                      sampling: str = "with_replacement", population: int | None = None,
                      output_index: int | None = None,
                      chunk_size: int | None = None) -> tuple[Tensor, Tensor]:
    """Hutchinson estimate of the Itô term (η²/2) tr(Σ_k H_m) for every probe.

    Args:
        model, output_index: as in :func:`hessian_vector_product`.
        probe_x: Tensor[M, ...] or tuple of them, M probes with one scalar output each.
        per_example_grads: dict name -> Tensor[B, *param shape], the batch's per-example loss
            gradients g_n at θ_k (their keys choose θ). For a loss with per-example
            coefficients, pass the gradients of the per-example losses ℓ_n.
        lr: the SGD step size η > 0.
        num_samples: number S >= 2 of Rademacher draws.
        generator: torch.Generator drawing the signs (on the device it belongs to); results
            are reproducible for a given seed and do not depend on chunk_size.
        sampling, population: how the batch was drawn (:func:`ito_scale`): with replacement
            (default; or an infinite training set), or without replacement from ``population``
            = N training examples. It sets the scale a² of (V) that makes the estimate unbiased.
        chunk_size: draws evaluated together under torch.func.vmap (per-call overhead
            dominates small models, so larger is faster); memory grows as chunk_size x P for
            the directions plus chunk_size x M forward activations. None (default) takes
            min(num_samples, max(1, 2**25 // P)), about 256 MB of float64 directions.
            1 evaluates one draw at a time without vmap (for ops lacking batching rules).

    Returns:
        (mean, stderr), each Tensor[M] float64: the average of (η²/2) v_sᵀ H_m v_s over the
        S draws and its standard error std_s / sqrt(S) over the signs. Its expectation over the
        signs is :func:`batch_ito_term`; over the signs and the batch draw, (η²/2) tr(Σ_k H_m)
        (:func:`exact_trace_sigma_hessian`). Where every draw gives the same direction up to
        its sign (r_s = ±r_1: at B = 2 in one call of 2^(S-1), since v is then 0 or ±2a d_1),
        the draws' spread is 0 whatever the signs' is, and the standard error is the exact one,
        sqrt(Var_r / S) with Var_r[vᵀ H_m v] = 4 Σ_{n<n'} (a² d_nᵀ H_m d_n')² (B(B − 1)
        quadratic forms); 0 only where the term has no sign noise.

    Note:
        The signs' expectation is B quadratic forms (:func:`batch_ito_term`); when S would be
        comparable to B, computing those directly is cheaper and has no sign noise.

    Algorithm:
        1. Centre the gradients, d_n = g_n − ḡ (float64); a² from the sampling model.
        2. Draw signs r ∈ {−1, +1}^{S×B} from `generator`.
        3. v_s = a Σ_n r_{s,n} d_n                                                          (V)
        4. q_{s,m} = v_sᵀ H_m v_s by forward-over-forward directional derivatives, in chunks.
        5. t = (η²/2) q; mean over s and standard error std(ddof=1)/sqrt(S).        (Itô)
           (Where every draw gives one direction up to its sign: the signs' exact std.)
    """
    _check_model(model)
    _check_output_index(output_index)
    eta = _check_lr(lr)
    if isinstance(num_samples, bool) or not isinstance(num_samples, numbers.Integral) or num_samples < 2:
        raise ValueError(f"num_samples must be an int >= 2 (for a standard error), got "
                         f"{num_samples!r}.")
    if not isinstance(generator, torch.Generator):
        raise TypeError(
            f"generator must be a torch.Generator (e.g. torch.Generator().manual_seed(0)), "
            f"got {type(generator).__name__}."
        )
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be an int >= 1 or None, got {chunk_size!r}.")
    num_samples = int(num_samples)
    chunk_size = None if chunk_size is None else int(chunk_size)
    inputs, m = _as_inputs(probe_x, "probe_x")
    _check_draws(model, inputs, "probe_x")
    params = _params_for(
        model, _keys(per_example_grads, "per_example_grads"),
        "per_example_grads")
    g, b = _per_example(per_example_grads, params, "per_example_grads")
    a = math.sqrt(ito_scale(b, sampling=sampling, population=population))
    if chunk_size is None:
        p_total = sum(p.numel() for p in params.values())
        chunk_size = min(num_samples, max(1, 2**25 // p_total))
    # 1. centre
    d = {k: t - t.mean(dim=0, keepdim=True) for k, t in g.items()}
    # 2. Rademacher signs, all draws at once (S x B is small)
    # Drawn where the generator lives (a CPU generator gives the same signs for a model on any
    # device), used where the gradients are.
    device = next(iter(d.values())).device
    signs = torch.randint(0, 2, (num_samples, b), generator=generator,
                          device=generator.device).to(device=device, dtype=torch.float64) * 2.0 - 1.0
    quad = _quad_form_fn(model, params, inputs, m, output_index)
    batched = vmap(quad) if chunk_size > 1 else None

    def forms(weights: Tensor) -> Tensor:
        """[vᵀ H_m v]: ``[K, M]`` float64 for the K directions v = a Σ_n weights_{·,n} d_n, chunk_size at a time."""
        values = []
        for start in range(0, weights.shape[0], chunk_size):
            r = weights[start:start + chunk_size]
            # 3. v_s = a Σ_n r_{s,n} d_n, cast to the parameters' dtype
            vs = {}
            for k, t in d.items():
                r_k = r.to(t.device)
                vs[k] = (a * torch.tensordot(r_k, t, dims=([1], [0]))).to(params[k].dtype)
            # 4. quadratic forms
            if batched is None:
                values.append(quad({k: t[0] for k, t in vs.items()})[None])
            else:
                try:
                    values.append(batched(vs))
                except RuntimeError as exc:
                    if "vmap" not in str(exc) and "batching rule" not in str(exc):
                        raise
                    raise RuntimeError(f"an operation of the model has no vmap batching rule ({exc}); pass "
                                       "chunk_size=1 to evaluate one Rademacher draw at a time without vmap (the same "
                                       "values).") from exc
        return torch.cat(values, dim=0).detach().to(torch.float64)

    q = forms(signs)  # [S, M]
    # 5. scale, mean, standard error
    terms = 0.5 * eta**2 * q
    stderr = terms.std(dim=0, correction=1) / math.sqrt(num_samples)
    one_direction = bool(((signs == signs[:1]).all(dim=1) | (signs == -signs[:1]).all(dim=1)).all())
    if one_direction and a > 0:
        # Every draw gave the same direction up to its sign (r_s = ±r_1), so every draw the same value and a sample
        # spread of exactly 0, whatever the signs' true spread: at B = 2 (v is 0 or ±2a d_1, half of the draws each)
        # one call of 2^(S-1) (1 in 128 at S = 8), at B = 3 one in 4^(S-1). The spread over the signs is known
        # exactly (pairs of distinct r_n r_n' are uncorrelated): Var_r[vᵀHv] = 4 Σ_{n<n'} (a² d_nᵀ H d_n')², the
        # bilinear forms by polarization, 2 quadratic forms per pair (B small wherever the event is likely).
        stderr = _exact_sign_stderr(forms, b, signs.device) * (0.5 * eta**2) / math.sqrt(num_samples)
    return terms.mean(dim=0), stderr


def _exact_sign_stderr(forms, b: int, device) -> Tensor:
    """sqrt(Var_r[vᵀ H_m v]) over Rademacher signs r for v = a Σ_n r_n d_n: ``[M]`` float64, from
    ``forms(weights [K, B]) -> [K, M]`` (quadratic forms of a Σ_n weights_{k,n} d_n), as
    sqrt(4 Σ_{n<n'} β_{nn'}²) with β_{nn'} = a² d_nᵀ H_m d_n' = (q(e_n + e_n') − q(e_n − e_n')) / 4."""
    pairs = [(i, j) for i in range(b) for j in range(i + 1, b)]
    weights = torch.zeros((2 * len(pairs), b), dtype=torch.float64, device=device)
    for k, (i, j) in enumerate(pairs):
        weights[2 * k, i] = weights[2 * k, j] = weights[2 * k + 1, i] = 1.0
        weights[2 * k + 1, j] = -1.0
    q = forms(weights)
    beta = (q[0::2] - q[1::2]) / 4  # [pairs, M]
    return (4 * beta.square().sum(dim=0)).sqrt()


@_attention_safe
def batch_ito_term(model: nn.Module, probe_x: Inputs, per_example_grads: Mapping[str, Tensor], lr: float, *,
                   sampling: str = "with_replacement", population: int | None = None,
                   output_index: int | None = None) -> Tensor:
    """The Hutchinson estimate's expectation over the signs for one batch, without sign noise:
    (η²/2) a² Σ_n (g_n − ḡ)ᵀ H_m (g_n − ḡ) (B quadratic forms).

    Its expectation over batch draws is the Itô term (η²/2) tr(Σ_k H_m) of the sampling model
    (:func:`ito_scale`). Arguments as :func:`ito_term_estimate`. Returns Tensor[M] float64.
    """
    _check_model(model)
    _check_output_index(output_index)
    eta = _check_lr(lr)
    inputs, m = _as_inputs(probe_x, "probe_x")
    _check_draws(model, inputs, "probe_x")
    params = _params_for(model, _keys(per_example_grads, "per_example_grads"), "per_example_grads")
    g, b = _per_example(per_example_grads, params, "per_example_grads")
    a2 = ito_scale(b, sampling=sampling, population=population)
    quad = _quad_form_fn(model, params, inputs, m, output_index)
    total = torch.zeros(m, dtype=torch.float64, device=next(iter(params.values())).device)
    if a2 == 0.0:
        return total
    mean = {k: t.mean(dim=0) for k, t in g.items()}
    for n in range(b):
        total += quad({k: (g[k][n] - mean[k]).to(params[k].dtype) for k in params}).detach().to(torch.float64)
    return 0.5 * eta**2 * a2 * total


@_attention_safe
def deterministic_second_order_term(model: nn.Module, probe_x: Inputs,
                                    mean_grad: Mapping[str, Tensor], lr: float, *,
                                    output_index: int | None = None) -> Tensor:
    """The deterministic second-order term (η²/2) ḡᵀ H_m ḡ for every probe.

    Args:
        model, output_index: as in :func:`hessian_vector_product`.
        probe_x: Tensor[M, ...] or tuple of them.
        mean_grad: dict name -> Tensor[param shape], the batch-mean loss gradient ḡ.
        lr: the SGD step size η > 0.

    Returns:
        Tensor[M] float64.

    Algorithm:
        1. q_m = ḡᵀ H_m ḡ by forward-over-forward directional derivatives.
        2. Multiply by η²/2.
    """
    _check_model(model)
    _check_output_index(output_index)
    eta = _check_lr(lr)
    inputs, m = _as_inputs(probe_x, "probe_x")
    _check_draws(model, inputs, "probe_x")
    params = _params_for(model, _keys(mean_grad, "mean_grad"),
                         "mean_grad")
    gbar = _direction(mean_grad, params, "mean_grad")
    q = _quad_form_fn(model, params, inputs, m, output_index)(gbar).detach().to(torch.float64)
    return 0.5 * eta**2 * q



@_attention_safe
def exact_trace_sigma_hessian(model: nn.Module, probe_x: Inputs,
                              per_example_grads: Mapping[str, Tensor], lr: float, *,
                              batch_size: int | None = None, sampling: str = "with_replacement",
                              output_index: int | None = None,
                              max_params: int = 4096) -> Tensor:
    """Exact Itô term (η²/2) tr(Σ H_m) of a batch of ``batch_size`` examples drawn from the
    examples whose gradients are given, forming H_m and Σ as matrices. For tests and small models.

    Args:
        model, output_index: as in :func:`hessian_vector_product`.
        probe_x: Tensor[M, ...] or tuple of them.
        per_example_grads: dict name -> Tensor[N, *param shape]: the gradients of *every*
            example a batch may be drawn from (the training set at θ_k; keys choose θ).
        lr: the SGD step size η > 0.
        batch_size: B (default N: a batch as large as the set).
        sampling: "with_replacement" (default) or "without_replacement" (:func:`ito_scale`):
            Σ is the covariance of the mean of one such batch,
            with replacement σ²/B, without (N − B)/(N − 1) · σ²/B, where σ² = Dᵀ D / N is the
            covariance of the N gradients (D their centred rows).
        max_params: refuse models with more than this many parameters in θ (H is P x P per
            probe); use :func:`ito_term_estimate` for those.

    Returns:
        Tensor[M] float64.

    Algorithm:
        1. Flatten θ (keys in dict order) to a vector of length P.
        2. H = torch.func.hessian of θ ↦ [f(x_m; θ)]_m, shape [M, P, P].
        3. D[n] = g_n − ḡ flattened, σ² = Dᵀ D / N, Σ from the sampling model.
        4. (η²/2) Σ_{ij} Σ[i, j] H_m[i, j]                                                (Itô)
    """
    _check_model(model)
    _check_output_index(output_index)
    eta = _check_lr(lr)
    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}.")
    inputs, m = _as_inputs(probe_x, "probe_x")
    _check_draws(model, inputs, "probe_x")
    params = _params_for(
        model, _keys(per_example_grads, "per_example_grads"),
        "per_example_grads")
    g, n = _per_example(per_example_grads, params, "per_example_grads")
    b = n if batch_size is None else batch_size
    if isinstance(b, bool) or not isinstance(b, numbers.Integral) or not 1 <= b <= (
            n if sampling == "without_replacement" else b):
        raise ValueError(f"batch_size must be an int in [1, N={n}] (without replacement) or >= 1, got {batch_size!r}.")
    b = int(b)
    # 1. flatten
    names = list(params)
    shapes = [params[k].shape for k in names]
    sizes = [params[k].numel() for k in names]
    p_total = sum(sizes)
    if p_total > max_params:
        raise ValueError(
            f"θ has {p_total} parameters > max_params={max_params}; the explicit Hessian would "
            "be too large. Use ito_term_estimate, or raise max_params."
        )
    flat0 = torch.cat([params[k].reshape(-1) for k in names])

    def outputs_flat(flat):
        pieces = torch.split(flat, sizes)
        p = {k: piece.reshape(s) for k, piece, s in zip(names, pieces, shapes)}
        return _scalar_outputs(model, p, inputs, m, output_index)

    # 2. explicit Hessians
    h = hessian(outputs_flat)(flat0).detach().to(torch.float64)  # [M, P, P]
    # 3. covariance of one batch mean
    dmat = torch.cat([g[k].reshape(n, -1) for k in names], dim=1)
    dmat = dmat - dmat.mean(dim=0, keepdim=True)
    sigma = dmat.T @ dmat / (n * b)
    if sampling == "without_replacement":
        sigma = sigma * ((n - b) / (n - 1) if n > 1 else 0.0)
    # 4. trace
    return 0.5 * eta**2 * torch.einsum("ij,mij->m", sigma.to(h.device), h)
