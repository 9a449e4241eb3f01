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

By default the model is a tiny Llama built from a config (no download); ``model`` picks another
shape (:mod:`bilevel_ray.problems.model_presets`): the preset ``"llama-100m"`` (105.8 M
parameters, a 32 000-token vocabulary: the head y alone is 24.6 M parameters), a dict of
``LlamaConfig`` fields, or a local Hugging Face checkpoint directory (loaded with
``local_files_only=True``).

The problem declares its structure (:class:`~bilevel_ray.problem.FeatureProblem`): the features
of x are the decoder's last hidden states h (the LoRA-adapted backbone), and the head y maps
them to logits ``h W_y^T``; so the solvers run the backbone once per step and level and only the
head in their inner loops. For a checkpoint directory the two paths are compared once at build
time, and the structure is declared only if they agree. The data is generated
(:mod:`bilevel_ray.problems.preference_data`): token ids below ``vocab``, which must not exceed
the model's vocabulary. ``eval_data`` holds a held-out preference set and a held-out instruction
set. Needs ``pip install 'bilevel_ray[peft]'`` (transformers and peft).

Here: the settings and their checks, the structured problem and the factory. The losses are in
:mod:`~bilevel_ray.problems.dpo_sft_losses`, the model's building and loading in
:mod:`~bilevel_ray.problems.llama_model`.
"""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bilevel_ray.data import BilevelBatch, minibatches
from bilevel_ray.errors import ConfigError
from bilevel_ray.module_problems import module_problem
from bilevel_ray.problem import ProblemSpec, factory_config
from bilevel_ray.problems.dpo_sft_losses import (
    REFERENCE_CHUNK,
    dpo_from_logits,
    dpo_loss,
    on_device,
    preference_ids,
    sequence_logprob,
    sft_from_logits,
    sft_loss,
    with_reference,
)
from bilevel_ray.problems.limits import (
    MAX_SEED,
    SEED_RANGE,
    Limit,
    integer_problem,
    memory_problem,
    shown,
)
from bilevel_ray.problems.llama_model import NAME, base_model, libraries, with_lora
from bilevel_ray.problems.model_presets import PRESETS
from bilevel_ray.problems.preference_data import instruction_data, preference_data
from bilevel_ray.tree import Params

# The losses and the model have their own modules; the loss functions stay importable from here
# (in __all__), where they were first defined.
__all__ = [
    "DEFAULTS",
    "LIMITS",
    "PeftDpoSft",
    "dpo_from_logits",
    "dpo_loss",
    "peft_dpo_sft",
    "sequence_logprob",
    "sft_from_logits",
    "sft_loss",
]

DEFAULTS: dict[str, Any] = {
    "seed": 0,  # model initialisation and data
    # None: the tiny Llama below; a preset name ("llama-100m"), a dict of LlamaConfig fields, or
    # a local checkpoint directory
    "model": None,
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
# Integer settings and their ranges. The caps are far past any use of generated data (the
# paper: 4800 samples of a few hundred tokens; the largest released vocabularies hold ~256k
# tokens); what the sizes allocate together is checked against the memory (_fits).
LIMITS = {
    "seed": Limit(0, MAX_SEED, 0, SEED_RANGE),
    "vocab": Limit(2, 2**20, 64, "token ids; the largest tokenizers hold about 256k"),
    "hidden": Limit(2, 2**16, 32, "the built model's width"),
    "layers": Limit(1, 1024, 2, "the built model's decoder layers"),
    "heads": Limit(1, 2**12, 4, "attention heads"),
    "lora_rank": Limit(1, 2**16, 8, "LoRA's rank; past the model's width it adds nothing"),
    "batch": Limit(1, 10**8, 32, "samples per step"),
    "n_pref": Limit(1, 10**8, 4096, "generated samples, held in memory"),
    "n_sft": Limit(1, 10**8, 4096, "generated samples, held in memory"),
    "n_eval": Limit(1, 10**8, 512, "generated samples, held in memory"),
    "prompt_len": Limit(1, 2**15, 6, "tokens; the model's positions grow with it"),
    "response_len": Limit(1, 2**15, 6, "tokens; the model's positions grow with it"),
    "topics": Limit(2, 2**20, 4, "classes of the data rule, at most vocab"),
}


class PeftDpoSft:
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
        logits = F.linear(features, y[f"{self.head_name}.weight"], y.get(f"{self.head_name}.bias"))
        if level == "upper":
            return dpo_from_logits(logits, b, self.beta)
        return sft_from_logits(logits, b)


def _structured(
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
    if decoder is None or not prefix or head_params - {"weight", "bias"}:
        return inner
    problem = PeftDpoSft(inner, decoder, prefix + ".", head_name, float(c["beta"]), device)
    if check is not None:
        x, y, batch = check
        with torch.no_grad():
            whole = problem.upper_loss(x, y, batch)
            split = problem.head_loss(y, problem.features(x, batch, "upper"), batch, "upper")
        if not torch.allclose(whole, split, rtol=1e-4, atol=1e-6):
            return inner
    return problem


def peft_dpo_sft(config: dict[str, Any] | None = None) -> ProblemSpec:
    """The problem, x0 (LoRA), y0 (head), minibatches of ``batch`` preference and ``batch``
    instruction samples per step, and held-out ``eval_data``. Settings: :data:`DEFAULTS`."""
    c = factory_config(NAME, config, DEFAULTS)
    _check(c)
    transformers, peft = libraries()
    device = torch.device(c["device"] or "cpu")
    with torch.random.fork_rng(devices=[]):  # the model's initialisation leaves torch's RNG alone
        torch.manual_seed(c["seed"])
        model = base_model(c, transformers)
        model = with_lora(model, c, peft)
    # eval(): no dropout, so f and g are functions of (x, y, batch) alone.
    model = model.to(device=device, dtype=c["dtype"]).eval()
    head = model.get_output_embeddings()
    head_name = next(name for name, module in model.named_modules() if module is head)
    inner, x0, y0 = module_problem(
        model,
        x="lora_",
        y=[f"{head_name}.{p}" for p, _ in head.named_parameters()],
        upper_loss=partial(dpo_loss, beta=float(c["beta"]), device=device),
        lower_loss=partial(sft_loss, device=device),
        copy=False,  # x0, y0 share the model's memory; in_place=True makes them the state
    )

    gen = torch.Generator().manual_seed(c["seed"])
    shape = (c["vocab"], c["topics"], c["prompt_len"], c["response_len"], gen)
    pref, pref_eval = (
        with_reference(model, preference_data(n, *shape)) for n in (c["n_pref"], c["n_eval"])
    )
    check = None
    if isinstance(c["model"], (str, Path)) and c["model"] not in PRESETS:
        check = (x0, y0, {k: v[:2] for k, v in pref.items()})
    problem = _structured(inner, model, head_name, c, device, check)
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
    problems = [integer_problem(NAME, key, c[key], limit) for key, limit in LIMITS.items()]
    problems = [p for p in problems if p is not None]
    for key in ("lora_alpha", "beta"):
        value = c[key]
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or (isinstance(value, int) and value >= 2**63)  # float() of it would overflow
            or not 0 < value < math.inf
        ):
            problems.append(f"problem {NAME!r}: {key}={shown(value)}: must be a finite number > 0")
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
    model = c["model"]
    if isinstance(model, dict):
        if not all(isinstance(k, str) for k in model):
            problems.append(
                f"problem {NAME!r}: model={model!r}: a model config is a dict of LlamaConfig "
                "fields such as {'hidden_size': 256, 'num_hidden_layers': 4}"
            )
    elif model is not None and model not in PRESETS and not Path(model).is_dir():
        problems.append(
            f"problem {NAME!r}: model={model!r} is neither a preset ({', '.join(PRESETS)}), a "
            "dict of LlamaConfig fields, nor a local directory; give the path of a saved Hugging "
            "Face causal LM (it is loaded with local_files_only=True)"
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
    problem = memory_problem(NAME, _data_bytes(c), "the generated data", _SMALLER_DATA)
    if problem:
        raise ConfigError(problem)
    if c["batch"] > min(c["n_pref"], c["n_sft"]):
        raise ConfigError(
            f"problem {NAME!r}: batch={c['batch']} exceeds n_pref={c['n_pref']} or "
            f"n_sft={c['n_sft']}; use a batch of at most {min(c['n_pref'], c['n_sft'])}"
        )


_SMALLER_DATA = "lower n_pref, n_sft, n_eval, prompt_len, response_len or vocab"


def _data_bytes(c: dict[str, Any]) -> int:
    """About the bytes of the generated data (int64 ids and bool masks; a preference sample
    holds a chosen and a rejected sequence) and of one chunk of the reference pass's float32
    logits (with the copies the log-probabilities make)."""
    length = c["prompt_len"] + c["response_len"]
    sequences = 2 * (c["n_pref"] + c["n_eval"]) + c["n_sft"] + c["n_eval"]
    logits = 3 * 4 * min(REFERENCE_CHUNK, c["n_pref"]) * length * c["vocab"]
    return 9 * sequences * length + logits
