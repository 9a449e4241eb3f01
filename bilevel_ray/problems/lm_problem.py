"""The ``peft-dpo-sft`` problem's objects: the loss pair on a LoRA-wrapped causal LM, with the
numbers a practitioner reads.

:class:`PeftDpoSft` declares the structure the solvers use (features(x) = the decoder's last
hidden states, head_loss(y, h) = f or g of the logits ``h W_y^T``), so a lower-level solve at a
fixed x runs the backbone once; :class:`WholeModel` is the plain module problem, for a model
whose head is not one linear map (:func:`structured` picks). Both give the held-out metrics
(:meth:`~LanguageModelMetrics.eval_metrics`: DPO's reward accuracy and margin, SFT loss and
perplexity) and count a step's tokens (:meth:`~LanguageModelMetrics.batch_tokens`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from bilevel_ray.problems.dpo_sft_losses import (
    batch_tokens,
    dpo_from_logprob,
    head_logprob,
    on_device,
    preference_ids,
    preference_metrics,
    reference_chunk,
    sequence_logprob,
    sft_from_logprob,
)
from bilevel_ray.tree import Params

__all__ = ["LanguageModelMetrics", "PeftDpoSft", "WholeModel", "structured"]


class LanguageModelMetrics:
    """What a practitioner reads, on held-out rows (:meth:`eval_metrics`), and the tokens a
    step's batches hold (:meth:`batch_tokens`, for tokens per second)."""

    inner: Any
    beta: float
    device: Any

    @torch.no_grad()
    def eval_metrics(self, x: Params, y: Params, eval_batch: Any) -> dict[str, float]:
        """DPO's reward accuracy and mean reward margin on the held-out preferences
        (:func:`~bilevel_ray.problems.dpo_sft_losses.preference_metrics`), and the SFT loss on
        the held-out instructions (mean NLL per completion token) with its perplexity exp(loss);
        in chunks the size of the reference pass's."""
        forward = self.inner._forward(x, y)
        pref, sft = eval_batch.upper, eval_batch.lower
        vocab = y[next(iter(y))].shape[0]
        chunk = reference_chunk(pref["chosen"].shape[1], vocab)
        correct = margin = 0.0
        for start in range(0, len(pref["chosen"]), chunk):
            part = on_device({k: v[start : start + chunk] for k, v in pref.items()}, self.device)
            logits = forward(input_ids=preference_ids(part)[0], use_cache=False).logits
            got = preference_metrics(logits, part, self.beta)
            n = len(part["chosen"])
            correct += got["reward_accuracy"] * n
            margin += got["reward_margin"] * n
        nll = tokens = 0.0
        for start in range(0, len(sft["ids"]), chunk):
            part = on_device({k: v[start : start + chunk] for k, v in sft.items()}, self.device)
            logits = forward(input_ids=part["ids"], use_cache=False).logits
            logp = sequence_logprob(logits, part["ids"], part["mask"])
            nll -= float(logp.double().sum())
            tokens += float(part["mask"][:, 1:].sum())
        total = len(pref["chosen"])
        loss = nll / max(tokens, 1.0)
        return {
            "reward_accuracy": correct / total,
            "reward_margin": margin / total,
            "sft_loss": loss,
            "sft_perplexity": math.exp(min(loss, 700.0)),
        }

    def batch_tokens(self, batch: Any) -> Tensor:
        """The tokens (padding left out) of one step's preference and instruction batches."""
        return batch_tokens(batch.upper) + batch_tokens(batch.lower)


class WholeModel(LanguageModelMetrics):
    """The module problem (whole-model path) with the metrics: a model whose head is not one
    linear map."""

    def __init__(self, inner: Any, beta: float, device: Any):
        self.inner, self.beta, self.device = inner, beta, device
        self.model, self.frozen = inner.model, inner.frozen

    def upper_loss(self, x: Params, y: Params, batch: Any) -> Tensor:
        return self.inner.upper_loss(x, y, batch)

    def lower_loss(self, x: Params, y: Params, batch: Any) -> Tensor:
        return self.inner.lower_loss(x, y, batch)


class PeftDpoSft(LanguageModelMetrics):
    """The problem with its structure declared: features(x) = h, the decoder's last hidden
    states (functional call of the decoder with the LoRA x), and head_loss(y, h) = f or g of the
    logits ``h W_y^T (+ b_y)`` (:mod:`~bilevel_ray.problems.dpo_sft_losses`). ``upper_loss`` /
    ``lower_loss`` are the whole model's (the module problem's), equal by construction."""

    def __init__(
        self, inner: Any, decoder: nn.Module, prefix: str, head_name: str, beta: float, device: Any
    ):
        self.inner, self.decoder, self.prefix = inner, decoder, prefix
        self.head_name, self.beta, self.device = head_name, beta, device
        self.model, self.frozen = inner.model, inner.frozen
        cut = len(prefix)
        self._frozen = {k[cut:]: v for k, v in inner.frozen.items() if k.startswith(prefix)}

    def upper_loss(self, x: Params, y: Params, batch: Any) -> Tensor:
        return self.inner.upper_loss(x, y, batch)

    def lower_loss(self, x: Params, y: Params, batch: Any) -> Tensor:
        return self.inner.lower_loss(x, y, batch)

    def features(self, x: Params, batch: Any, level: str) -> Tensor:
        b = on_device(batch, self.device)
        ids = preference_ids(b)[0] if level == "upper" else b["ids"]
        cut = len(self.prefix)
        params = {**self._frozen, **{k[cut:]: v for k, v in x.items()}}
        out = torch.func.functional_call(
            self.decoder, params, (), {"input_ids": ids, "use_cache": False}, strict=True
        )
        return out.last_hidden_state

    def head_loss(self, y: Params, features: Tensor, batch: Any, level: str) -> Tensor:
        b = on_device(batch, self.device)
        ids, mask = preference_ids(b) if level == "upper" else (b["ids"], b["mask"])
        weight, bias = y[f"{self.head_name}.weight"], y.get(f"{self.head_name}.bias")
        logp = head_logprob(features, weight, bias, ids, mask)
        if level == "upper":
            return dpo_from_logprob(logp, b, self.beta)
        return sft_from_logprob(logp, b)


def structured(
    inner: Any, model: nn.Module, head_name: str, c: dict[str, Any], device: Any, check: Any
) -> Any:
    """``inner`` with its structure declared where the decoder is found (and, for a
    checkpoint, where the features path reproduces the whole model's losses on ``check``)."""
    base = model.get_base_model()
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    prefix = next((n for n, m in model.named_modules() if m is decoder), None)
    # head_loss applies the head as F.linear(h, weight, bias): a head with other parameters
    # (a norm, a second layer) is not that map, so such a model keeps the whole-model path.
    head_params = set(dict(model.get_output_embeddings().named_parameters()))
    whole = WholeModel(inner, float(c["beta"]), device)
    if decoder is None or not prefix or head_params - {"weight", "bias"}:
        return whole
    problem = PeftDpoSft(inner, decoder, prefix + ".", head_name, float(c["beta"]), device)
    if check is not None:
        x, y, batch = check
        with torch.no_grad():
            whole_loss = problem.upper_loss(x, y, batch)
            split = problem.head_loss(y, problem.features(x, batch, "upper"), batch, "upper")
        if not torch.allclose(whole_loss, split, rtol=1e-4, atol=1e-6):
            return whole
    return problem
