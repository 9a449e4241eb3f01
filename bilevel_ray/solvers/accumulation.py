"""Gradient accumulation: one step's batches split into k micro-batches.

With ``grad_accumulation = k`` every gradient a solver takes in a step is the sum over k
micro-batches of the mean-scaled gradients. For a loss that is a mean over its batch's samples,
``L(B) = (1/|B|) sum_{s in B} l(s)``, and a split B = B_1 + ... + B_k::

    grad L(B) = sum_i (|B_i| / |B|) grad L(B_i)

exactly, so k micro-batches give the gradient of the whole batch while the activations of only
one micro-batch are held at a time. The upper and the lower batch are split on their own (each
with its own weights |B_i| / |B|), and the sum is reduced (all-reduced across workers) once,
after the last micro-batch.

A count that does not divide the batch splits it as evenly as possible
(``torch.tensor_split``: the first ``|B| mod k`` micro-batches have one sample more), and the
weights keep the sum exact; a count larger than the batch is refused, as are batches without a
sample dimension (deterministic problems). A loss that is a mean over tokens rather than
samples is weighted by samples here: exact when every sample has the same number of scored
tokens (as in the built-in PEFT problem), approximate otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from bilevel_ray.errors import ConfigError

__all__ = ["check_accumulation", "split_batch"]


def check_accumulation(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(
            f"grad_accumulation={value!r}: must be an integer >= 1 (the number of micro-batches "
            "each step's batch is split into; 1 processes it whole)"
        )
    return value


def _tensors(part: Any) -> list[Tensor]:
    if isinstance(part, Tensor):
        return [part]
    if isinstance(part, Mapping):
        return [t for v in part.values() for t in _tensors(v)]
    if isinstance(part, (list, tuple)):
        return [t for v in part for t in _tensors(v)]
    return []


def _take(part: Any, start: int, stop: int) -> Any:
    if isinstance(part, Tensor):
        return part[start:stop]
    if isinstance(part, Mapping):
        return {k: _take(v, start, stop) for k, v in part.items()}
    if isinstance(part, (list, tuple)):
        items = [_take(v, start, stop) for v in part]
        return type(part)(*items) if hasattr(part, "_fields") else type(part)(items)
    return part


def split_batch(part: Any, k: int, level: str) -> list[tuple[Any, float]]:
    """``k`` micro-batches of one level's batch and their weights ``|B_i| / |B|`` (summing to
    1). The batch is a tensor or a dict / list / tuple / NamedTuple of tensors (nested or not)
    sharing a leading sample dimension; other leaves are passed to every micro-batch."""
    if k == 1:
        return [(part, 1.0)]
    tensors = [t for t in _tensors(part) if t.dim() > 0]
    if not tensors:
        raise ConfigError(
            f"grad_accumulation={k}: the {level} batch is {type(part).__name__}, with no tensor "
            "of samples to split; use grad_accumulation=1 for a problem without data"
        )
    sizes = sorted({t.shape[0] for t in tensors})
    if len(sizes) > 1:
        raise ConfigError(
            f"grad_accumulation={k}: the {level} batch's tensors have different numbers of "
            f"samples {sizes}; every tensor of a batch needs the same leading dimension to be "
            "split into micro-batches"
        )
    n = sizes[0]
    if k > n:
        raise ConfigError(
            f"grad_accumulation={k} exceeds the {n} samples of the {level} batch: each "
            f"micro-batch needs a sample; use grad_accumulation <= {n}"
        )
    bounds = torch.tensor_split(torch.arange(n), k)
    out = []
    for idx in bounds:
        start, stop = int(idx[0]), int(idx[-1]) + 1
        out.append((_take(part, start, stop), (stop - start) / n))
    return out
