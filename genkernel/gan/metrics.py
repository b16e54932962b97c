"""Numbers the GAN analyzer reports: coupling matrices, paired intervals, alignment, mode coverage.

All functions are pure (tensors in, tensors or floats out) and float64.
"""

from __future__ import annotations

import math

import torch


def coupling_matrix(shares: torch.Tensor, probe_groups: torch.Tensor, num_groups: int) -> torch.Tensor:
    """``[G, G]``: row a is the mean over probes in group a of their per-group ``shares [M, G]``.

    Rows of groups without probes are NaN. With traffic shares rows sum to 1; with net shares they
    sum to 1 minus the rest and residual shares.
    """
    out = torch.full((num_groups, num_groups), float("nan"), dtype=torch.float64)
    for a in range(num_groups):
        rows = shares[probe_groups == a]
        rows = rows[torch.isfinite(rows).all(dim=1)]
        if rows.shape[0]:
            out[a] = rows.to(torch.float64).mean(dim=0)
    return out


def own_share(shares: torch.Tensor, probe_groups: torch.Tensor) -> torch.Tensor:
    """``[M]`` each probe's share from its own group, shares[m, group(m)]."""
    return shares.gather(1, probe_groups.view(-1, 1).to(torch.long)).squeeze(1).to(torch.float64)


def mean_interval(values: torch.Tensor, z: float = 1.96) -> dict[str, float]:
    """Mean and normal interval mean ± z·se over the finite entries of ``values`` (paired differences)."""
    v = values.to(torch.float64)
    v = v[torch.isfinite(v)]
    n = int(v.numel())
    if n == 0:
        return {"mean": float("nan"), "low": float("nan"), "high": float("nan"), "n": 0}
    m = float(v.mean())
    se = float(v.std(unbiased=True) / math.sqrt(n)) if n > 1 else 0.0
    return {"mean": m, "low": m - z * se, "high": m + z * se, "n": n}


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``[M]`` cosine between rows of ``a`` and ``b`` (flattened per row); NaN where either is zero."""
    a = a.reshape(a.shape[0], -1).to(torch.float64)
    b = b.reshape(b.shape[0], -1).to(torch.float64)
    den = a.norm(dim=1) * b.norm(dim=1)
    return torch.where(den > 0, (a * b).sum(dim=1) / den.clamp_min(1e-300), torch.full_like(den, float("nan")))


def mode_coverage(samples: torch.Tensor, centers: torch.Tensor, std: float, sigmas: float = 3.0) -> dict[str, float]:
    """Mode coverage of 2-D samples: modes with at least one sample within ``sigmas``·std, and the
    share of samples within ``sigmas``·std of some mode ("high quality"). Both matter: a diffuse
    generator can hit every mode with few samples on any."""
    d = torch.cdist(samples.to(torch.float64).reshape(samples.shape[0], -1), centers.to(torch.float64))
    near = d <= sigmas * std
    hit = near.any(dim=0)
    return {
        "modes_hit": int(hit.sum()),
        "num_modes": int(centers.shape[0]),
        "quality_share": float(near.any(dim=1).to(torch.float64).mean()),
        "mode_counts": near.sum(dim=0).tolist(),
    }


__all__ = ["coupling_matrix", "own_share", "mean_interval", "cosine", "mode_coverage", "push_field"]


def push_field(loss_fn, samples: torch.Tensor) -> torch.Tensor:
    """``[N, ...]`` the discriminator's push −w = −∇_x ℓ_G(D(x)) at arbitrary samples (e.g. a grid).

    ``loss_fn`` is the generator loss ``loss_fn(samples, None) -> [N]``; evaluate D in eval mode
    (:func:`genkernel.gan.frozen`) so nothing about training changes.
    """
    with torch.enable_grad():
        x = samples.detach().clone().requires_grad_(True)
        (w,) = torch.autograd.grad(loss_fn(x, None).sum(), x)
    return -w.detach()
