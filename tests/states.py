"""Bit-for-bit comparison of nested states (a trainer's or an analyzer's ``state_dict()``), for the tests that check a
run resumed, retried or trained in pieces against the straight run."""

from __future__ import annotations

import math
from typing import Any

import torch


def state_differences(a: Any, b: Any, where: str = "state") -> list[str]:
    """Every place where two nested states differ: tensors bit for bit (dtype, shape and values; NaN equal to NaN, as
    an analyzer's report holds NaN where a measure is undefined), dicts by keys, lists and tuples by length, the rest
    by ``==``. ``[]`` when they are the same."""
    if isinstance(a, torch.Tensor):
        same = isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and (
            torch.equal(a, b) or (a.is_floating_point() and bool(((a == b) | (a.isnan() & b.isnan())).all())))
        return [] if same else [where]
    if isinstance(a, float) and math.isnan(a):
        return [] if isinstance(b, float) and math.isnan(b) else [where]
    if isinstance(a, dict):
        if not isinstance(b, dict) or a.keys() != b.keys():
            return [where]
        return [d for k in a for d in state_differences(a[k], b[k], f"{where}.{k}")]
    if isinstance(a, (list, tuple)):
        if not isinstance(b, (list, tuple)) or len(a) != len(b):
            return [where]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in state_differences(x, y, f"{where}[{i}]")]
    return [] if a == b else [where]
