"""Stochastic Domingos: the expected output change over random batch orders, decomposed
(docs/generalization.md, "Stochastic Domingos: the expected output").

For plain SGD (step η) from a fixed θ_0, each of R seeds draws its own batch order; per seed and
probe x the recorded quantities, summed over the K steps, are

- ``change``: f(x; θ_K) − f(x; θ_0) (fresh forward passes);
- ``first_order``: the left-point ledger Σ_k J(x; θ_k) Δ_k (contributions plus rest);
- ``ito``: Σ_k (η²/2) tr(Σ_k H_k(x)), the Itô term, by the Hutchinson estimator of
  :func:`genkernel.analysis.hutchinson.ito_term_estimate` from the batch's per-example gradients,
  scaled for the sampling model used here: each batch is a uniform B-subset of the N training
  examples drawn *without replacement* (consecutive batches of an epoch-wise permutation, whose
  last N mod B examples are dropped), so
  a² = (N − B) / (N B (B − 1)) and the estimate is unbiased over batch draws (a full batch, B = N,
  has no Itô term);
- ``deterministic``: Σ_k (η²/2) ḡ_kᵀ H_k(x) ḡ_k with ḡ_k = ∇L(θ_k) the *full training-set*
  gradient (with the batch mean it would count the batch noise a second time: the batch mean's
  second moment is ḡḡᵀ + Σ_k);
- ``realized_second_order``: Σ_k ½ Δ_kᵀ H_k(x) Δ_k = Σ_k (η²/2) ĝ_kᵀ H_k ĝ_k with the batch
  gradient ĝ_k, whose expectation over batches is deterministic + Itô.

Averaged over seeds: E[change] ≈ E[first_order] + E[deterministic] + E[ito] up to third order
in η. :meth:`ExpectedOutputDecomposition.shares` reports each term as a share of the mean change,
⟨mean term, mean change⟩ / ‖mean change‖² over probes, with jackknife Student-t intervals over seeds.
"""

from __future__ import annotations

import copy
import math
import numbers
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import scipy.stats
import torch
from torch import nn

from ..core.adapter import check_per_example_safe, trainable_parameters
from .hutchinson import deterministic_second_order_term, ito_term_estimate
from ..core.engine.gradients import group_gradients
from ..core.tracking.tracker import PathKernelTracker
from ..stats import bootstrap_interval

__all__ = ["ExpectedOutputDecomposition", "expected_output_decomposition"]

TERMS = ("change", "first_order", "deterministic", "ito", "realized_second_order")
SIGN_STREAM = 0x51676E73  # tags the Hutchinson sign stream apart from the batch-order stream of any seed


def sign_seed(seed: int) -> int:
    """The seed of replicate ``seed``'s Hutchinson sign stream: a hash of (seed, SIGN_STREAM), so
    that it is no other replicate's batch-order seed (``seed + 1`` was the next replicate's)."""
    return int(np.random.SeedSequence([int(seed) % 2**64, SIGN_STREAM]).generate_state(1, np.uint64)[0])


@dataclass
class ExpectedOutputDecomposition:
    """Per-seed terms of the stochastic-Domingos decomposition, each ``Tensor[R, M]`` float64
    (R seeds of batch order, M probes); see the module docstring for their definitions.

    ``ito_stderr [R, M]`` is the Hutchinson standard error of ``ito`` (steps' errors added in
    quadrature); ``ledger_residual [R, M]`` the tracker's residual (change − first_order, i.e.
    what the left-point ledger leaves: second and higher order).
    """

    change: torch.Tensor
    first_order: torch.Tensor
    deterministic: torch.Tensor
    ito: torch.Tensor
    realized_second_order: torch.Tensor
    ito_stderr: torch.Tensor
    ledger_residual: torch.Tensor
    seeds: list[int]

    def mean(self, term: str) -> torch.Tensor:
        """``[M]`` mean over seeds of ``term`` (one of the five terms or ``"remainder"``)."""
        return self._per_seed(term).mean(dim=0)

    def _per_seed(self, term: str) -> torch.Tensor:
        if term == "remainder":
            return self.change - self.first_order - self.deterministic - self.ito
        if term not in TERMS:
            raise ValueError(f"term must be one of {TERMS + ('remainder',)}, got {term!r}")
        return getattr(self, term)

    def shares(self, *, n_boot: int = 1000, seed: int = 0, confidence: float = 0.95, method: str = "jackknife-t") -> dict[str, dict]:
        """Each term's share of the mean change, ⟨E[term], E[change]⟩ / ‖E[change]‖², with an
        interval over seeds (the independent replicates).

        Args:
            method: "jackknife-t" (default): the leave-one-seed-out jackknife standard error with
                Student t quantiles on R − 1 degrees of freedom (right at the few seeds a run has,
                where a percentile bootstrap over seeds is too narrow); "percentile": the
                percentile bootstrap over seeds (:func:`genkernel.stats.bootstrap_interval`, ``n_boot``
                resamples from ``seed``). NaN ends with a single seed, and, with a ``"why"``, where the seeds
                give no spread: the terms a value reads differ between seeds by rounding alone (a full batch),
                or its leave-one-seed-out values are equal up to rounding (the standard error is unknown,
                not 0, as :func:`genkernel.stats.mean_interval` reads values without spread).

        Returns:
            ``{term: {"share": float, "interval": (lo, hi), "method", "n"[, "why"]}}`` for first_order,
            deterministic, ito, realized_second_order and remainder (change − first_order −
            deterministic − ito), plus ``second_order_gap_ratio``: ‖E[change − first_order −
            deterministic − ito]‖ / ‖E[change − first_order]‖ (below 1: the second-order terms
            explain part of what the first-order ledger leaves).
        """
        if method not in ("jackknife-t", "percentile"):
            raise ValueError(f"method must be 'jackknife-t' or 'percentile', got {method!r}")
        # checked for both methods: the jackknife-t interval took any number (95 gave NaN ends, 1.0
        # infinite ones, a negative value an inverted interval), silently
        if isinstance(confidence, bool) or not isinstance(confidence, numbers.Real) or not 0 < confidence < 1:
            raise ValueError(f"confidence must be a number in (0, 1), e.g. 0.95, got {confidence!r}")
        r = self.change.shape[0]
        stacks = {t: self._per_seed(t).numpy() for t in TERMS + ("remainder",)}
        eps = float(np.finfo(np.float64).eps)

        def rounding_only(values: np.ndarray) -> bool:
            """True when the ``[R, ...]`` per-seed ``values`` differ by rounding alone (64 R eps of their largest)."""
            values = np.asarray(values, dtype=np.float64).reshape(r, -1)
            if not np.isfinite(values).all():
                return False
            return bool(np.abs(values - values[0]).max(initial=0.0) <= 64 * r * eps * np.abs(values).max(initial=0.0))

        def share(idx, term):
            d = stacks["change"][idx].mean(0)
            return float(np.dot(stacks[term][idx].mean(0), d) / np.dot(d, d))

        def gap_ratio(idx):
            first_gap = (stacks["change"][idx] - stacks["first_order"][idx]).mean(0)
            return float(np.linalg.norm(stacks["remainder"][idx].mean(0)) / np.linalg.norm(first_gap))

        def no_spread(fn, reads) -> str | None:
            """Why the seeds give ``fn`` no spread to judge it by (None when they do): the seeds' terms that ``fn``
            reads are the same up to rounding (a full batch, B = N: every batch order takes the same steps), or its
            leave-one-seed-out values are (e.g. an Itô term that is exactly 0 in every seed). As
            :func:`genkernel.stats.mean_interval` refuses values without spread and the kernel locality's jackknife
            refuses pseudo-values that differ by rounding alone: the standard error is then unknown, not 0, and a
            zero-width (or rounding-width) interval claimed the share with no uncertainty."""
            if r < 2:
                return None
            if all(rounding_only(stacks[name]) for name in reads):
                return (f"the {r} seeds' {', '.join(reads)} differ by rounding alone (every batch order took the same "
                        f"steps, e.g. a full batch): they are one replicate, not {r}, and give no spread")
            leave_out = np.array([fn(np.delete(np.arange(r), i)) for i in range(r)])
            if np.isfinite(leave_out).all() and rounding_only(leave_out):
                return (f"its {r} leave-one-seed-out values are equal up to rounding ({leave_out[0]!r}): no spread over "
                        "the seeds to judge it by (the standard error is unknown, not 0)")
            return None

        def summarize(fn, reads):
            why = no_spread(fn, reads)
            if method == "percentile":
                interval = bootstrap_interval(np.arange(r), lambda idx: fn(idx.astype(int)), confidence=confidence,
                                              resamples=n_boot, seed=seed, method="percentile")
                out = {"share": interval.estimate, "interval": (interval.low, interval.high), "method": interval.method,
                       "n": r}
            else:
                estimate = fn(np.arange(r))
                out = {"share": estimate, "interval": (math.nan, math.nan), "method": "jackknife-t", "n": r}
                if r >= 2 and why is None:
                    leave_out = np.array([fn(np.delete(np.arange(r), i)) for i in range(r)])
                    se = math.sqrt((r - 1) / r * float(((leave_out - leave_out.mean()) ** 2).sum()))
                    half = float(scipy.stats.t.ppf(0.5 + confidence / 2, r - 1)) * se
                    out["interval"] = (estimate - half, estimate + half)
            if why is not None:
                out.update(interval=(math.nan, math.nan), why=why)
            return out

        parts = ("change", "first_order", "deterministic", "ito")  # what the remainder and the gap ratio read
        out = {t: summarize(lambda i, t=t: share(i, t), parts if t == "remainder" else ("change", t))
               for t in ("first_order", "deterministic", "ito", "realized_second_order", "remainder")}
        out["second_order_gap_ratio"] = summarize(gap_ratio, parts)
        return out


def expected_output_decomposition(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    probes: torch.Tensor,
    *,
    lr: float,
    batch_size: int,
    steps: int,
    seeds: Sequence[int],
    hutchinson_samples: int = 8,
) -> ExpectedOutputDecomposition:
    """Train copies of ``model`` with plain SGD over ``len(seeds)`` batch orders and record the
    decomposition of the probes' output change (module docstring).

    Args:
        model: the network at θ_0 with one scalar output per example (copied per seed; not trained).
        inputs: ``[N, ...]`` training inputs; targets: ``[N, ...]``.
        loss_fn: per-example loss ``(outputs, targets) -> [B]``.
        probes: ``[M, ...]`` inputs x at which the output is followed.
        lr: SGD step η; batch_size: B >= 2, or N (batches drawn without replacement within each epoch:
            the Itô term's sampling model, :func:`genkernel.analysis.hutchinson.ito_scale`; when B does
            not divide N, an epoch's last N mod B examples are dropped, so every batch is a uniform
            B-subset);
        steps: K optimizer steps per seed.
        seeds: one batch order (and Hutchinson sign stream) per seed: distinct ints, each an
            independent replicate of the intervals over seeds (:meth:`ExpectedOutputDecomposition.shares`).
        hutchinson_samples: Rademacher draws S ≥ 2 per step.

    Returns:
        :class:`ExpectedOutputDecomposition`.

    Raises:
        ValueError: bad counts or step size; repeated seeds; inputs, targets or probes without
            rows or with unequal numbers of training rows; a model whose examples are coupled or
            randomized (BatchNorm with batch statistics, active dropout, RReLU in training mode:
            the per-example gradients and the Hessians are undefined; put them in eval mode); a
            model with more than one output per example (wrap it to return the scalar to follow).
        TypeError: a model that is no nn.Module; seeds that are not ints.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for name, value in (("inputs", inputs), ("probes", probes)):
        if not isinstance(value, torch.Tensor) or value.dim() == 0 or value.shape[0] == 0:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"{name} must be a Tensor [rows, ...] with at least one row, got {shape}")
    n = inputs.shape[0]
    if isinstance(targets, torch.Tensor) and (targets.dim() == 0 or targets.shape[0] != n):
        raise ValueError(
            f"targets need one row per training input: inputs have N = {n} rows, targets have shape "
            f"{tuple(targets.shape)}")
    try:
        check_per_example_safe(model)
    except ValueError as exc:
        raise ValueError(f"expected_output_decomposition needs per-example gradients and Hessians: {exc}") from exc
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or not 1 <= batch_size <= n:
        raise ValueError(f"batch_size must be an int in [1, N={n}], got {batch_size!r}")
    if batch_size == 1 and n > 1:
        raise ValueError(
            "batch_size=1: a batch of one example has no spread to estimate the Itô term's gradient covariance "
            "from (genkernel.analysis.hutchinson.ito_scale); use batch_size >= 2")
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1 or len(seeds) < 1:
        raise ValueError(f"need an int steps >= 1 and at least one seed, got steps={steps!r}, seeds={list(seeds)}")
    seeds = list(seeds)
    # Each seed is one independent replicate, the unit of every interval over seeds (shares): a float seed
    # was truncated (0.5 and 0.7 both ran seed 0) and a repeated seed repeated its replicate exactly, so the
    # intervals counted one run twice, silently too narrow.
    bad = [s for s in seeds if isinstance(s, bool) or not isinstance(s, numbers.Integral)
           and not (isinstance(s, torch.Tensor) and s.numel() == 1 and not s.is_floating_point()
                    and not s.is_complex() and s.dtype != torch.bool)]
    if bad:
        raise TypeError(f"seeds must be ints, got {bad[:3]}")
    seeds = [int(s) for s in seeds]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct (each is an independent replicate of the intervals over seeds), "
                         f"got repeats in {seeds}")
    if not all(-2**63 <= s < 2**64 for s in seeds):
        raise ValueError(f"seeds must lie in [-2**63, 2**64) (torch.Generator seeds), got {seeds}")
    if isinstance(lr, bool) or not (isinstance(lr, numbers.Real) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    if isinstance(hutchinson_samples, bool) or not isinstance(hutchinson_samples, numbers.Integral) \
            or hutchinson_samples < 2:
        raise ValueError(f"hutchinson_samples must be an int >= 2 (for a standard error), got {hutchinson_samples!r}")
    batch_size, steps = int(batch_size), int(steps)
    with torch.no_grad():  # on a copy: the model itself is never run or trained here
        out = copy.deepcopy(model)(probes[:1])
    if not isinstance(out, torch.Tensor) or out.numel() != 1:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(
            f"the model's output for one probe is {shape}; the decomposition follows one scalar output per "
            "example. Wrap the model so that it returns that scalar (e.g. one output column), and give "
            "loss_fn the matching targets.")
    rows: dict[str, list[torch.Tensor]] = {k: [] for k in TERMS + ("ito_var", "ledger_residual")}
    for seed in seeds:
        net = copy.deepcopy(model)
        optimizer = torch.optim.SGD(net.parameters(), lr=lr)
        # 1. The exact ledger with the left-point rule: its contributions are J(x; θ_k) Δ_k.
        tracker = PathKernelTracker(net, optimizer, loss_fn, probes, num_groups=1, quadrature="left")
        params = trainable_parameters(net)
        gen = torch.Generator().manual_seed(int(seed))
        signs = torch.Generator().manual_seed(sign_seed(seed))  # on the CPU: the same signs on any device
        m = probes.shape[0]
        acc = {k: torch.zeros(m, dtype=torch.float64) for k in ("deterministic", "ito", "ito_var", "realized_second_order")}
        order = torch.empty(0, dtype=torch.long)
        for _ in range(steps):
            if order.numel() < batch_size:
                # A new epoch: drop the incomplete rest of the last one (as DataLoader's drop_last). Joining it
                # to the next permutation could put one example in a batch twice, and such a batch is no
                # uniform B-subset: its noise differs from the sampling model the Itô term is scaled for.
                order = torch.randperm(n, generator=gen)
            idx, order = order[:batch_size], order[batch_size:]
            xb, yb = inputs[idx], targets[idx]
            # 2. Per-example gradients g_n of the batch at θ_k, and the full training-set gradient.
            per_example, _ = group_gradients(
                net, params, (xb,), yb, loss_fn, torch.eye(batch_size, dtype=torch.float64)
            )
            # a trainable parameter the outputs do not reach has gradient 0 (as in group_gradients), not an error
            full = torch.autograd.grad(loss_fn(net(inputs), targets).mean(), list(params.values()), allow_unused=True,
                                       materialize_grads=True)
            full = dict(zip(params, full))
            batch_mean = {k: g.mean(dim=0) for k, g in per_example.items()}
            # 3. Itô term (Hutchinson), deterministic and realized second-order terms at θ_k.
            ito, se = ito_term_estimate(net, probes, per_example, lr, num_samples=hutchinson_samples, generator=signs,
                                        sampling="without_replacement", population=n)
            acc["ito"] += ito.cpu()
            acc["ito_var"] += se.cpu() ** 2
            acc["deterministic"] += deterministic_second_order_term(net, probes, full, lr).cpu()
            acc["realized_second_order"] += deterministic_second_order_term(net, probes, batch_mean, lr).cpu()
            # 4. The real SGD step, recorded in the ledger.
            tracker.step(xb, yb, torch.zeros(batch_size, dtype=torch.long))
        ledger = tracker.ledger
        rows["change"].append(ledger.delta[:, 0].cpu())
        rows["first_order"].append((ledger.contributions.sum(dim=1) + ledger.rest)[:, 0].cpu())
        rows["ledger_residual"].append(ledger.residual[:, 0].cpu())
        for k, v in acc.items():
            rows[k].append(v)
    stack = {k: torch.stack(v) for k, v in rows.items()}
    return ExpectedOutputDecomposition(
        change=stack["change"], first_order=stack["first_order"], deterministic=stack["deterministic"],
        ito=stack["ito"], realized_second_order=stack["realized_second_order"],
        ito_stderr=stack["ito_var"].sqrt(), ledger_residual=stack["ledger_residual"], seeds=seeds,
    )
