"""Data-parallel reductions over ``torch.distributed`` (no Ray): the ``grad_reduce`` of workers.

Every gradient of one level is averaged across ranks with ONE collective: the tensors are
flattened into a single buffer, all-reduced (sum), divided by the world size and split back. A
per-tensor all-reduce would cost one round trip per parameter tensor.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from bilevel_ray.tree import Params

__all__ = ["allreduce_mean", "allreduce_mean_tensor", "broadcast_from_rank0"]


def allreduce_mean(grads: Params) -> Params:
    """The mean over ranks of each tensor of ``grads``, in one coalesced all-reduce (one per
    dtype and device when a level mixes them)."""
    groups: dict[tuple[torch.dtype, torch.device], list[str]] = {}
    for key, value in grads.items():
        groups.setdefault((value.dtype, value.device), []).append(key)
    out: Params = {}
    for keys in groups.values():
        flat = allreduce_mean_tensor(torch.cat([grads[k].reshape(-1) for k in keys]))
        start = 0
        for key in keys:
            n = grads[key].numel()
            out[key] = flat[start : start + n].view_as(grads[key])
            start += n
    return {key: out[key] for key in grads}


def allreduce_mean_tensor(tensor: Tensor) -> Tensor:
    """The mean over ranks of one tensor (returned; the argument may be reused as the buffer)."""
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.div_(dist.get_world_size())


def broadcast_from_rank0(params: Params) -> None:
    """Overwrite every rank's tensors with rank 0's, in place."""
    for value in params.values():
        dist.broadcast(value, src=0)
