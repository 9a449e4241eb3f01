"""The two levels' losses of the ``peft-dpo-sft`` problem, from a model's logits.

For a causal LM pi and a sequence s whose response tokens are marked by a mask, log pi(s) sums
log pi(s_t | s_<t) over the response positions t (:func:`sequence_logprob`). Then::

    f(x, y) = -mean log sigmoid( beta * [ (log pi(chosen) - log pi_ref(chosen))
                                          - (log pi(rejected) - log pi_ref(rejected)) ] )   (DPO)
    g(x, y) = -sum log pi(response tokens) / number of response tokens                     (SFT)

A preference batch holds ``chosen``, ``rejected`` (token ids), their masks and ``ref_chosen``,
``ref_rejected`` = log pi_ref of each, computed once from the initial model by
:func:`with_reference`; an instruction batch holds ``ids`` and ``mask``. The ``*_from_logits``
forms take logits already computed (the head path of the structured problem); :func:`dpo_loss`
and :func:`sft_loss` run a whole model (the module problem's losses).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "REFERENCE_CHUNK",
    "dpo_from_logits",
    "dpo_loss",
    "on_device",
    "preference_ids",
    "sequence_logprob",
    "sft_from_logits",
    "sft_loss",
    "with_reference",
]

REFERENCE_CHUNK = 256  # sequences per forward pass when the reference log-probabilities are made


def sequence_logprob(logits: Tensor, ids: Tensor, mask: Tensor) -> Tensor:
    """[n] sums of log pi(ids[:, t] | ids[:, :t]) over the positions t where ``mask`` is True."""
    logits = logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32))
    nll = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
    return -(nll * mask[:, 1:]).sum(-1)


def preference_ids(b: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """(ids, mask) of the chosen then the rejected sequences: one batch of 2n, one forward."""
    return torch.cat([b["chosen"], b["rejected"]]), torch.cat(
        [b["chosen_mask"], b["rejected_mask"]]
    )


def dpo_from_logits(logits: Tensor, b: dict[str, Tensor], beta: float) -> Tensor:
    """f from the logits of the chosen then the rejected sequences (one batch of 2n)."""
    ids, mask = preference_ids(b)
    logp = sequence_logprob(logits, ids, mask)
    n = len(b["chosen"])
    margin = (logp[:n] - b["ref_chosen"]) - (logp[n:] - b["ref_rejected"])
    return -F.logsigmoid(beta * margin).mean()


def sft_from_logits(logits: Tensor, b: dict[str, Tensor]) -> Tensor:
    """g from the logits of the instruction sequences."""
    ids, mask = b["ids"], b["mask"]
    return -sequence_logprob(logits, ids, mask).sum() / mask[:, 1:].sum()


def on_device(batch: dict[str, Tensor], device: Any) -> dict[str, Tensor]:
    """``batch`` with every tensor on ``device`` (the data stays on the CPU between steps)."""
    return {k: v.to(device) for k, v in batch.items()}


def dpo_loss(forward: Any, batch: dict[str, Tensor], beta: float, device: Any = None) -> Tensor:
    """f: the DPO loss of a preference batch, chosen and rejected in one forward pass."""
    b = on_device(batch, device)
    return dpo_from_logits(forward(input_ids=preference_ids(b)[0]).logits, b, beta)


def sft_loss(forward: Any, batch: dict[str, Tensor], device: Any = None) -> Tensor:
    """g: the mean token NLL over the response tokens of an instruction batch."""
    b = on_device(batch, device)
    return sft_from_logits(forward(input_ids=b["ids"]).logits, b)


@torch.no_grad()
def with_reference(model: nn.Module, data: dict[str, Tensor]) -> dict[str, Tensor]:
    """``data`` plus the initial model's log-probabilities of its chosen and rejected responses
    (pi_ref of the DPO loss), computed in chunks, stored on the CPU with the data."""
    device = next(model.parameters()).device
    out = dict(data)
    for key in ("chosen", "rejected"):
        parts = []
        chunks = zip(data[key].split(REFERENCE_CHUNK), data[f"{key}_mask"].split(REFERENCE_CHUNK))
        for ids, mask in chunks:
            ids, mask = ids.to(device), mask.to(device)
            parts.append(sequence_logprob(model(input_ids=ids).logits, ids, mask).cpu())
        out[f"ref_{key}"] = torch.cat(parts)
    return out
