"""Brute-force references the engine tests share, written apart from genkernel (one example and one output at a
time through plain ``torch.autograd.grad``), and the small models they share."""

from __future__ import annotations

import torch
from torch import nn


def brute_jacobian(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``[n, d, P]``: every example alone, eval mode, one autograd.grad per output over the trainable parameters in
    ``named_parameters`` order; a parameter the output does not reach (or an output with no graph) gives zeros."""
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(x.shape[0]):
        out = model(x[i : i + 1]).reshape(-1)
        grads = []
        for o in range(out.numel()):
            gs = (torch.autograd.grad(out[o], params, retain_graph=True, allow_unused=True) if out.requires_grad
                  else [None] * len(params))
            grads.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(gs, params)]))
        rows.append(torch.stack(grads))
    return torch.stack(rows)


class Saturated(nn.Module):
    """Linear(3, 4) -> tanh -> Linear(4, 2): large inputs saturate the tanh (output gradients of 0 times activations
    that overflow their products in float32)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))
