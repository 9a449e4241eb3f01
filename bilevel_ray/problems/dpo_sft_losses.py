"""The two levels' losses of the ``peft-dpo-sft`` problem, from a model's logits.

For a causal LM pi and a sequence s whose response tokens are marked by a mask, log pi(s) sums
log pi(s_t | s_<t) over the response positions t (:func:`sequence_logprob`). Then::

    f(x, y) = -mean log sigmoid( beta * [ (log pi(chosen) - log pi_ref(chosen))
                                          - (log pi(rejected) - log pi_ref(rejected)) ] )   (DPO)
    g(x, y) = -sum log pi(response tokens) / number of response tokens                     (SFT)

A preference batch holds ``chosen``, ``rejected`` (token ids), their masks and ``ref_chosen``,
``ref_rejected`` = log pi_ref of each, computed once from the initial model by
:func:`with_reference`; an instruction batch holds ``ids`` and ``mask``. Sequences are right
padded: a batch is cut to its longest row (:func:`trimmed`) before the model sees it, and since
attention is causal the padding after a row's last scored token cannot change any loss. The
``*_from_logits``
forms take logits already computed (the head path of the structured problem); :func:`dpo_loss`
and :func:`sft_loss` run a whole model (the module problem's losses).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "REFERENCE_BYTES",
    "batch_tokens",
    "dpo_from_logits",
    "dpo_from_logprob",
    "dpo_loss",
    "head_logprob",
    "on_device",
    "preference_ids",
    "preference_metrics",
    "sequence_logprob",
    "sft_from_logits",
    "sft_from_logprob",
    "sft_loss",
    "trimmed",
    "with_reference",
]

# The reference pass holds one chunk's logits (with the copies the log-probabilities make): its
# sequences per forward are sized so that they take about this many bytes (a 128k vocabulary at
# 1024 tokens is 0.5 GB a sequence in float32; a fixed count would not fit).
REFERENCE_BYTES = 2**30


def sequence_logprob(logits: Tensor, ids: Tensor, mask: Tensor) -> Tensor:
    """[n] sums of log pi(ids[:, t] | ids[:, :t]) over the positions t where ``mask`` is True."""
    logits = logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32))
    nll = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
    return -(nll * mask[:, 1:]).sum(-1)


def _scored_length(mask: Tensor) -> int:
    """1 + the last column where any row scores a token (0 for no scored token)."""
    columns = mask.any(0).nonzero()
    return int(columns.max()) + 1 if len(columns) else 0


def trimmed(b: dict[str, Tensor]) -> dict[str, Tensor]:
    """A batch cut to its longest row: the columns after the last scored token of every row
    (right padding) are dropped; chosen and rejected keep one length (they share a forward)."""
    if "chosen" in b:
        keep = max(_scored_length(b["chosen_mask"]), _scored_length(b["rejected_mask"]))
        names = ("chosen", "chosen_mask", "rejected", "rejected_mask")
    else:
        keep, names = _scored_length(b["mask"]), ("ids", "mask")
    if keep == b[names[0]].shape[1]:
        return b
    return {**b, **{k: b[k][:, :keep] for k in names}}


def batch_tokens(b: dict[str, Tensor]) -> Tensor:
    """The tokens a batch holds, padding left out: each row up to its last scored token (a
    completion ends its row). A 0-d tensor on the batch's device: read without a sync."""
    masks = (b["chosen_mask"], b["rejected_mask"]) if "chosen" in b else (b["mask"],)
    total = torch.zeros((), dtype=torch.int64, device=masks[0].device)
    for mask in masks:
        last = mask.shape[1] - mask.flip(1).int().argmax(1)  # 1 + the last scored column
        total = total + (last * mask.any(1)).sum()
    return total


def preference_ids(b: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """(ids, mask) of the chosen then the rejected sequences: one batch of 2n, one forward."""
    return torch.cat([b["chosen"], b["rejected"]]), torch.cat(
        [b["chosen_mask"], b["rejected_mask"]]
    )


def dpo_from_logits(logits: Tensor, b: dict[str, Tensor], beta: float) -> Tensor:
    """f from the logits of the chosen then the rejected sequences (one batch of 2n)."""
    ids, mask = preference_ids(b)
    return dpo_from_logprob(sequence_logprob(logits, ids, mask), b, beta)


def dpo_from_logprob(logp: Tensor, b: dict[str, Tensor], beta: float) -> Tensor:
    """f from log pi of the chosen then the rejected responses ([2n])."""
    n = len(b["chosen"])
    margin = (logp[:n] - b["ref_chosen"]) - (logp[n:] - b["ref_rejected"])
    return -F.logsigmoid(beta * margin).mean()


def head_logprob(
    features: Tensor, weight: Tensor, bias: Tensor | None, ids: Tensor, mask: Tensor
) -> Tensor:
    """[n] log pi of the scored tokens from the decoder's last hidden states ``features`` and
    the head (``weight``, ``bias``): the head is applied at the scored positions only (a
    prompt's and the padding's logits are never used: a third of the positions on short
    answers, and at a 128k vocabulary the logits of every position are the step's largest
    tensor). Equal to :func:`sequence_logprob` of the head's logits up to rounding."""
    scored = mask[:, 1:]  # position t predicts token t + 1
    logits = F.linear(features[:, :-1][scored], weight, bias)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    nll = F.cross_entropy(logits, ids[:, 1:][scored], reduction="none")
    rows = scored.nonzero()[:, 0]
    return -torch.zeros(len(ids), dtype=nll.dtype, device=nll.device).index_add(0, rows, nll)


def sft_from_logits(logits: Tensor, b: dict[str, Tensor]) -> Tensor:
    """g from the logits of the instruction sequences: the batch's NLL per response token; or,
    when the batch carries ``token_scale`` (rows of unequal length: 1 / the training set's mean
    response tokens per row), the mean over rows of a row's NLL times it. The second is the
    same estimate of the per-token NLL, and a mean over rows, so data-parallel ranks that each
    average their slice reproduce one worker's batch exactly (a per-batch token count would
    weight the ranks unequally)."""
    return sft_from_logprob(sequence_logprob(logits, b["ids"], b["mask"]), b)


def sft_from_logprob(logp: Tensor, b: dict[str, Tensor]) -> Tensor:
    """g from log pi of the instruction responses ([n]), weighted as :func:`sft_from_logits`."""
    if "token_scale" in b:
        return -(logp * b["token_scale"].to(logp.dtype)).mean()
    return -logp.sum() / b["mask"][:, 1:].sum()


def on_device(batch: dict[str, Tensor], device: Any) -> dict[str, Tensor]:
    """``batch`` cut to its longest row (:func:`trimmed`) with every tensor on ``device`` (the
    data stays on the CPU between steps)."""
    return {k: v.to(device) for k, v in trimmed(batch).items()}


def preference_metrics(logits: Tensor, b: dict[str, Tensor], beta: float) -> dict[str, float]:
    """DPO's implicit rewards r = beta (log pi - log pi_ref) of the chosen and the rejected
    responses: the reward accuracy (the share of pairs with r_chosen > r_rejected) and the mean
    reward margin r_chosen - r_rejected."""
    ids, mask = preference_ids(b)
    logp = sequence_logprob(logits, ids, mask)
    n = len(b["chosen"])
    margin = beta * ((logp[:n] - b["ref_chosen"]) - (logp[n:] - b["ref_rejected"]))
    return {
        "reward_accuracy": float((margin > 0).double().mean()),
        "reward_margin": float(margin.double().mean()),
    }


def dpo_loss(forward: Any, batch: dict[str, Tensor], beta: float, device: Any = None) -> Tensor:
    """f: the DPO loss of a preference batch, chosen and rejected in one forward pass."""
    b = on_device(batch, device)
    return dpo_from_logits(forward(input_ids=preference_ids(b)[0], use_cache=False).logits, b, beta)


def sft_loss(forward: Any, batch: dict[str, Tensor], device: Any = None) -> Tensor:
    """g: the mean token NLL over the response tokens of an instruction batch."""
    b = on_device(batch, device)
    return sft_from_logits(forward(input_ids=b["ids"], use_cache=False).logits, b)


@torch.no_grad()
def with_reference(model: nn.Module, data: dict[str, Tensor]) -> dict[str, Tensor]:
    """``data`` plus the initial model's log-probabilities of its chosen and rejected responses
    (pi_ref of the DPO loss), computed in chunks, stored on the CPU with the data."""
    device = next(model.parameters()).device
    vocab = model.get_output_embeddings().weight.shape[0]
    out = dict(data)
    for key in ("chosen", "rejected"):
        ids_all, mask_all = data[key], data[f"{key}_mask"]
        chunk = reference_chunk(ids_all.shape[1], vocab)
        parts = []
        for ids, mask in zip(ids_all.split(chunk), mask_all.split(chunk)):
            cut = trimmed({"ids": ids, "mask": mask})
            ids, mask = cut["ids"].to(device), cut["mask"].to(device)
            parts.append(
                sequence_logprob(model(input_ids=ids, use_cache=False).logits, ids, mask).cpu()
            )
        out[f"ref_{key}"] = torch.cat(parts)
    return out


def reference_chunk(length: int, vocab: int) -> int:
    """Sequences per forward of the reference pass: about :data:`REFERENCE_BYTES` of float32
    logits and their copies (3 of them), at least one sequence."""
    return max(1, REFERENCE_BYTES // (3 * 4 * max(length, 1) * max(vocab, 1)))
