"""Bytes of parameter-sized arrays, counted over each parameter's own dtype.

A model's parameters need not share one dtype: float32 norm layers in a bfloat16 model, a float64 head on a
float32 trunk, a LoRA adapter in another dtype than its base. Every count here is exact on such a model and equal
to the single-dtype rule (numel × the item size) on one whose parameters share a dtype, where the tracker, its
engines and the cost estimate took the first parameter's item size for all of them before (on a float64 MLP whose
first Linear was float32, the estimate's training step was half its size, 2.1 MB for 4.25 MB).

- :func:`parameter_bytes`: Σ numel × item size, for arrays shaped like the parameters, each in its parameter's
  dtype (gradients, optimizer state, copies of θ, tangents);
- :func:`value_bytes`: bytes per parameter value, weighted by the values (``parameter_bytes / numel``): for counts
  that are per value but not shaped like one parameter (activations, factors, a chunk's rows), an ``int`` where
  it is a whole number (every single-dtype model), else a ``float``;
- :func:`joined_itemsize`: the item size of the parameters' values joined into one tensor (``torch.cat`` of
  their flattened blocks promotes to :func:`torch.promote_types` of their dtypes);
- :func:`trains_float32`: whether any parameter is float32 (what a float32 parameter's rounding sample needs,
  :mod:`~genkernel.core.tracking.rounding`, taken for every parameter when one is).

Imports only torch: the cost estimate and the engines both read it.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Union

import torch

Parameters = Union[Mapping[str, torch.Tensor], Iterable[torch.Tensor]]


def _tensors(params: Parameters) -> list[torch.Tensor]:
    return list(params.values()) if isinstance(params, Mapping) else list(params)


def parameter_bytes(params: Parameters) -> int:
    """Σ numel × item size of ``params`` (a dict or an iterable of tensors): the bytes of one array shaped like
    each of them, in its own dtype."""
    return sum(p.numel() * p.element_size() for p in _tensors(params))


def value_bytes(params: Parameters, default: int = 4) -> int | float:
    """Bytes per value of ``params``, weighted by their values: ``parameter_bytes / numel`` (``default`` without
    any value). A whole number is returned as an ``int`` (always so where the parameters share a dtype: that
    dtype's item size), else a ``float``."""
    tensors = _tensors(params)
    num = sum(p.numel() for p in tensors)
    if num == 0:
        # (no value to weigh: the first parameter's dtype if any, as a zero-size model's arrays have one)
        return tensors[0].element_size() if tensors else default
    total = parameter_bytes(tensors)
    return total // num if total % num == 0 else total / num


def joined_itemsize(params: Parameters, default: int = 4) -> int:
    """Item size of the parameters' values in one tensor (``torch.cat`` of their blocks, a Jacobian's
    concatenation): their dtypes promoted together (float32 with float64: 8; bfloat16 with float16: 4)."""
    tensors = _tensors(params)
    return torch.empty((), dtype=joined_dtype(tensors)).element_size() if tensors else default


def joined_dtype(params: Parameters) -> torch.dtype:
    """The dtype :func:`joined_itemsize` counts: the parameters' dtypes promoted together."""
    tensors = _tensors(params)
    if not tensors:
        raise ValueError("joined_dtype needs at least one parameter")
    dtype = tensors[0].dtype
    for p in tensors[1:]:
        dtype = torch.promote_types(dtype, p.dtype)
    return dtype


def trains_float32(params: Parameters) -> bool:
    """Whether any of ``params`` is float32: a float32 step's gradient check samples its own rounding
    (:mod:`~genkernel.core.tracking.rounding`), for every parameter, where one is."""
    return any(p.dtype == torch.float32 for p in _tensors(params))


__all__ = ["joined_dtype", "joined_itemsize", "parameter_bytes", "trains_float32", "value_bytes"]
