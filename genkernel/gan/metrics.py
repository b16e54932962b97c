"""Numbers the GAN analyzer reports besides the ledgers: alignment cosines, mode coverage, the push field.

Coupling matrices and own-group shares are read from the ledgers by :mod:`genkernel.core.grouping`.

All functions are pure (tensors in, tensors or floats out) and float64.
"""

from __future__ import annotations


import torch


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


__all__ = ["cosine", "mode_coverage", "push_field"]


def push_field(loss_fn, samples: torch.Tensor) -> torch.Tensor:
    """``[N, ...]`` the discriminator's push −w = −∇_x ℓ_G(D(x)) at arbitrary samples (e.g. a grid).

    ``loss_fn`` is the generator loss ``loss_fn(samples, None) -> [N]``. D runs in its current mode;
    when ``loss_fn`` has a ``.discriminator`` (a :class:`~genkernel.gan.GeneratorLoss`) its buffers
    (running statistics, spectral norm's u, v) are written back after, so nothing about training
    changes (``with frozen(D, modes="eval")`` evaluates it in eval mode instead).
    """
    from .passes import preserved

    with torch.enable_grad(), preserved(getattr(loss_fn, "discriminator", None)):
        x = samples.detach().clone().requires_grad_(True)
        (w,) = torch.autograd.grad(loss_fn(x, None).sum(), x)
    return -w.detach()
