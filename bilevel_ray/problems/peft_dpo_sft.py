"""Bilevel LLM fine-tuning: LoRA on DPO over the output head on SFT (the paper's main experiment,
digest §3.3 and §5).

One causal language model, its parameters split into two groups and the rest frozen:
x = the LoRA adapters (rank r, alpha, dropout 0, on ``q_proj`` and ``v_proj``), y = the output
head (``lm_head``, untied from the input embeddings so that it is its own tensor)::

    f(x, y) = -mean log sigmoid( beta * [ (log pi(chosen) - log pi_ref(chosen))
                                          - (log pi(rejected) - log pi_ref(rejected)) ] )   (DPO)
    g(x, y) = mean over response tokens of -log pi(token | tokens before it)              (SFT)

log pi(s) sums the model's token log-probabilities over the response tokens of s; beta = 0.1.
The reference model pi_ref is the initial model: LoRA's B factors start at zero, so the initial
adapted model *is* the base model, and its log-probabilities of the preference data are computed
once here and stored with the data (``ref_chosen``, ``ref_rejected``): no second model is kept,
and f = log 2 at the start (every DPO margin is 0).

By default the model is a small Llama built from a config (no download); ``model`` names a local
Hugging Face checkpoint instead (loaded with ``local_files_only=True``). The data is generated
(:mod:`bilevel_ray.problems.preference_data`): token ids below ``vocab``, which must not exceed
the model's vocabulary. ``eval_data`` holds a held-out preference set and a held-out instruction
set. Needs ``pip install 'bilevel_ray[peft]'`` (transformers and peft).
"""

from __future__ import annotations

import math
import warnings
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bilevel_ray.data import BilevelBatch, minibatches
from bilevel_ray.errors import ConfigError
from bilevel_ray.problem import ProblemSpec, factory_config, module_problem
from bilevel_ray.problems.preference_data import instruction_data, preference_data

__all__ = ["DEFAULTS", "dpo_loss", "peft_dpo_sft", "sequence_logprob", "sft_loss"]

NAME = "peft-dpo-sft"
DEFAULTS: dict[str, Any] = {
    "seed": 0,  # model initialisation and data
    "model": None,  # a local checkpoint directory; None builds the small Llama below
    "vocab": 64,  # generated token ids are below this (and the built model's vocabulary)
    "hidden": 32,  # built model only: width, layers, attention heads (MLP width 4 * hidden)
    "layers": 2,
    "heads": 4,
    "lora_rank": 8,
    "lora_alpha": 16.0,
    "lora_targets": ("q_proj", "v_proj"),  # a list, or names separated by commas
    "beta": 0.1,  # DPO's inverse temperature
    "batch": 32,  # preference and instruction samples per step
    "n_pref": 4096,  # training preference triples (the paper: 4800)
    "n_sft": 4096,  # training instruction pairs (the paper: 4800)
    "n_eval": 512,  # held-out samples of each set
    "prompt_len": 6,
    "response_len": 6,
    "topics": 4,  # classes of the data rule (preference_data)
    "dtype": "float32",
}
_COUNTS = {  # integer settings and their minimum
    "seed": 0,
    "vocab": 2,
    "hidden": 2,
    "layers": 1,
    "heads": 1,
    "lora_rank": 1,
    "batch": 1,
    "n_pref": 1,
    "n_sft": 1,
    "n_eval": 1,
    "prompt_len": 1,
    "response_len": 1,
    "topics": 2,
}


def sequence_logprob(logits: Tensor, ids: Tensor, mask: Tensor) -> Tensor:
    """[n] sums of log pi(ids[:, t] | ids[:, :t]) over the positions t where ``mask`` is True."""
    logits = logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32))
    nll = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
    return -(nll * mask[:, 1:]).sum(-1)


def dpo_loss(forward: Any, batch: dict[str, Tensor], beta: float, device: Any = None) -> Tensor:
    """f: the DPO loss of a preference batch, chosen and rejected in one forward pass."""
    b = {k: v.to(device) for k, v in batch.items()}
    ids = torch.cat([b["chosen"], b["rejected"]])
    mask = torch.cat([b["chosen_mask"], b["rejected_mask"]])
    logp = sequence_logprob(forward(input_ids=ids).logits, ids, mask)
    n = len(b["chosen"])
    margin = (logp[:n] - b["ref_chosen"]) - (logp[n:] - b["ref_rejected"])
    return -F.logsigmoid(beta * margin).mean()


def sft_loss(forward: Any, batch: dict[str, Tensor], device: Any = None) -> Tensor:
    """g: the mean token NLL over the response tokens of an instruction batch."""
    ids, mask = batch["ids"].to(device), batch["mask"].to(device)
    return -sequence_logprob(forward(input_ids=ids).logits, ids, mask).sum() / mask[:, 1:].sum()


def peft_dpo_sft(config: dict[str, Any] | None = None) -> ProblemSpec:
    """The problem, x0 (LoRA), y0 (head), minibatches of ``batch`` preference and ``batch``
    instruction samples per step, and held-out ``eval_data``. Settings: :data:`DEFAULTS`."""
    c = factory_config(NAME, config, DEFAULTS)
    _check(c)
    transformers, peft = _libraries()
    device = torch.device(c["device"] or "cpu")
    with torch.random.fork_rng(devices=[]):  # the model's initialisation leaves torch's RNG alone
        torch.manual_seed(c["seed"])
        model = _base_model(c, transformers)
        model = _with_lora(model, c, peft)
    # eval(): no dropout, so f and g are functions of (x, y, batch) alone.
    model = model.to(device=device, dtype=c["dtype"]).eval()
    head = model.get_output_embeddings()
    head_name = next(name for name, module in model.named_modules() if module is head)
    problem, x0, y0 = module_problem(
        model,
        x="lora_",
        y=[f"{head_name}.{p}" for p, _ in head.named_parameters()],
        upper_loss=partial(dpo_loss, beta=float(c["beta"]), device=device),
        lower_loss=partial(sft_loss, device=device),
    )

    gen = torch.Generator().manual_seed(c["seed"])
    shape = (c["vocab"], c["topics"], c["prompt_len"], c["response_len"], gen)
    pref, pref_eval = (
        _with_reference(model, preference_data(n, *shape)) for n in (c["n_pref"], c["n_eval"])
    )
    sft, sft_eval = (instruction_data(n, *shape) for n in (c["n_sft"], c["n_eval"]))
    return ProblemSpec(
        problem,
        x0,
        y0,
        minibatches(pref, sft, c["batch"]),
        defaults={"steps": 2000, "optimizer": "adam", "lr_x": 3e-3, "lr_y": 3e-3, "gamma": 10.0},
        eval_data=BilevelBatch(pref_eval, sft_eval),
    )


def _check(c: dict[str, Any]) -> None:
    problems = []
    for key, low in _COUNTS.items():
        value = c[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            problems.append(f"problem {NAME!r}: {key}={value!r} must be an integer >= {low}")
    for key in ("lora_alpha", "beta"):
        value = c[key]
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not 0 < value < math.inf
        ):
            problems.append(f"problem {NAME!r}: {key}={value!r} must be a finite number > 0")
    targets = c["lora_targets"]
    if isinstance(targets, str):
        c["lora_targets"] = targets = tuple(t.strip() for t in targets.split(",") if t.strip())
    if (
        not isinstance(targets, (list, tuple))
        or not targets
        or not all(isinstance(t, str) for t in targets)
    ):
        problems.append(
            f"problem {NAME!r}: lora_targets={targets!r} must name module(s) to adapt, "
            "e.g. ['q_proj', 'v_proj'] or 'query_key_value'"
        )
    if c["model"] is not None and not Path(c["model"]).is_dir():
        problems.append(
            f"problem {NAME!r}: model={c['model']!r} is not a local directory; give the path of a "
            "saved Hugging Face causal LM (it is loaded with local_files_only=True)"
        )
    if problems:
        raise ConfigError(problems)
    if c["model"] is None and (c["hidden"] % c["heads"] or (c["hidden"] // c["heads"]) % 2):
        raise ConfigError(
            f"problem {NAME!r}: hidden={c['hidden']} must be heads={c['heads']} times an even "
            "head size (rotary position embeddings rotate pairs of features), e.g. hidden=32"
        )
    if c["vocab"] < c["topics"]:
        raise ConfigError(
            f"problem {NAME!r}: vocab={c['vocab']} is smaller than topics={c['topics']}: every "
            "topic needs a token; raise vocab or lower topics"
        )
    if c["batch"] > min(c["n_pref"], c["n_sft"]):
        raise ConfigError(
            f"problem {NAME!r}: batch={c['batch']} exceeds n_pref={c['n_pref']} or "
            f"n_sft={c['n_sft']}; use a batch of at most {min(c['n_pref'], c['n_sft'])}"
        )


def _libraries() -> tuple[Any, Any]:
    try:
        import peft
        import transformers
    except ImportError as err:
        raise ConfigError(
            f"problem {NAME!r} needs transformers and peft ({err}); install them with "
            "pip install 'bilevel_ray[peft]'"
        ) from None
    return transformers, peft


def _base_model(c: dict[str, Any], transformers: Any) -> nn.Module:
    if c["model"] is None:
        config = transformers.LlamaConfig(
            vocab_size=c["vocab"],
            hidden_size=c["hidden"],
            intermediate_size=4 * c["hidden"],
            num_hidden_layers=c["layers"],
            num_attention_heads=c["heads"],
            num_key_value_heads=c["heads"],
            max_position_embeddings=max(64, c["prompt_len"] + c["response_len"]),
            tie_word_embeddings=False,
        )
        return transformers.LlamaForCausalLM(config)
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(c["model"], local_files_only=True)
    except (OSError, ValueError) as err:
        raise ConfigError(f"problem {NAME!r}: cannot load model={c['model']!r}: {err}") from None
    size = model.get_input_embeddings().weight.shape[0]
    if c["vocab"] > size:
        raise ConfigError(
            f"problem {NAME!r}: vocab={c['vocab']} exceeds the model's vocabulary of {size} "
            "tokens; the generated token ids must be below it"
        )
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    if head.weight is embeddings.weight:
        # y is the head alone: a tied head would move the input embeddings (frozen) with it.
        head.weight = nn.Parameter(embeddings.weight.detach().clone())
    model.config.tie_word_embeddings = False
    return model


def _with_lora(model: nn.Module, c: dict[str, Any], peft: Any) -> nn.Module:
    lora = peft.LoraConfig(
        r=c["lora_rank"],
        lora_alpha=c["lora_alpha"],
        lora_dropout=0.0,
        target_modules=list(c["lora_targets"]),
        bias="none",
    )
    try:
        with warnings.catch_warnings():  # peft calls a transformers API that v5 deprecates
            warnings.filterwarnings("ignore", ".*gradient_checkpointing.*", FutureWarning)
            return peft.get_peft_model(model, lora)
    except ValueError as err:  # peft's message names the targets it did not find
        raise ConfigError(
            f"problem {NAME!r}: lora_targets={list(c['lora_targets'])!r} cannot be adapted "
            f"({err}); name linear layers of the model, e.g. q_proj, v_proj for Llama"
        ) from None


@torch.no_grad()
def _with_reference(model: nn.Module, data: dict[str, Tensor]) -> dict[str, Tensor]:
    """``data`` plus the initial model's log-probabilities of its chosen and rejected responses
    (pi_ref of the DPO loss), computed in chunks, stored on the CPU with the data."""
    device = next(model.parameters()).device
    out = dict(data)
    for key in ("chosen", "rejected"):
        parts = []
        for ids, mask in zip(data[key].split(256), data[f"{key}_mask"].split(256)):
            ids, mask = ids.to(device), mask.to(device)
            parts.append(sequence_logprob(model(input_ids=ids).logits, ids, mask).cpu())
        out[f"ref_{key}"] = torch.cat(parts)
    return out
