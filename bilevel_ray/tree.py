"""Parameters as ``dict[str, Tensor]`` and the few operations the solvers need on them.

Example:
    >>> import torch
    >>> a = {"w": torch.tensor([1.0, 2.0])}
    >>> float(vdot(a, a))
    5.0
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = [
    "Params",
    "add_scaled",
    "clone",
    "cuda_devices",
    "leaves",
    "sub",
    "to_device",
    "vdot",
    "zeros_like",
]

Params = dict[str, Tensor]
"""A named group of tensors: one level's variables (x or y), gradients or optimizer moments."""


def cuda_devices(*groups: Params) -> list[int]:
    """The CUDA devices the groups' tensors live on (a run forks their RNGs with the CPU's)."""
    return sorted({t.device.index or 0 for g in groups for t in g.values() if t.is_cuda})


def clone(p: Params) -> Params:
    """A detached copy that owns its memory."""
    return {k: v.detach().clone() for k, v in p.items()}


def leaves(p: Params) -> Params:
    """Detached views (no copy) that require grad: the inputs of one gradient evaluation, with no
    history reaching back into the state."""
    return {k: v.detach().requires_grad_(True) for k, v in p.items()}


def zeros_like(p: Params) -> Params:
    return {k: torch.zeros_like(v) for k, v in p.items()}


def sub(a: Params, b: Params) -> Params:
    """a - b, key by key."""
    return dict(zip(a, torch._foreach_sub(list(a.values()), [b[k] for k in a])))


def add_scaled(a: Params, b: Params, scale: float) -> Params:
    """a + scale * b, key by key (a new dict; the inputs are not modified)."""
    return dict(zip(a, torch._foreach_add(list(a.values()), [b[k] for k in a], alpha=scale)))


def vdot(a: Params, b: Params) -> Tensor:
    """Inner product <a, b> summed over all keys, as a 0-d tensor (no host sync)."""
    device = next(iter(a.values())).device
    return torch.stack([torch.dot(a[k].reshape(-1), b[k].reshape(-1)).to(device) for k in a]).sum()


def to_device(tree: Any, device: torch.device | str | None) -> Any:
    """Every tensor of a nested dict / list / tuple / NamedTuple moved to ``device``."""
    if isinstance(tree, Tensor):
        return tree.to(device)
    if isinstance(tree, dict):
        return {k: to_device(v, device) for k, v in tree.items()}
    if hasattr(tree, "_fields"):
        return type(tree)(*(to_device(v, device) for v in tree))
    if isinstance(tree, (list, tuple)):
        return type(tree)(to_device(v, device) for v in tree)
    return tree
