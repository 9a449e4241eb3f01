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
"""

from __future__ import annotations

import math
import pickle
import re
import warnings
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
from bilevel_ray.problems.limits import (
    MAX_SEED,
    SEED_RANGE,
    Limit,
    integer_problem,
    memory_problem,
    shown,
)
from bilevel_ray.problems.model_presets import PRESETS, llama_config, parameter_count
from bilevel_ray.problems.preference_data import instruction_data, preference_data
from bilevel_ray.tree import Params

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

NAME = "peft-dpo-sft"
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
REFERENCE_CHUNK = 256  # sequences per forward pass when the reference log-probabilities are made


def sequence_logprob(logits: Tensor, ids: Tensor, mask: Tensor) -> Tensor:
    """[n] sums of log pi(ids[:, t] | ids[:, :t]) over the positions t where ``mask`` is True."""
    logits = logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32))
    nll = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
    return -(nll * mask[:, 1:]).sum(-1)


def _preference_ids(b: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    return torch.cat([b["chosen"], b["rejected"]]), torch.cat(
        [b["chosen_mask"], b["rejected_mask"]]
    )


def dpo_from_logits(logits: Tensor, b: dict[str, Tensor], beta: float) -> Tensor:
    """f from the logits of the chosen then the rejected sequences (one batch of 2n)."""
    ids, mask = _preference_ids(b)
    logp = sequence_logprob(logits, ids, mask)
    n = len(b["chosen"])
    margin = (logp[:n] - b["ref_chosen"]) - (logp[n:] - b["ref_rejected"])
    return -F.logsigmoid(beta * margin).mean()


def sft_from_logits(logits: Tensor, b: dict[str, Tensor]) -> Tensor:
    """g from the logits of the instruction sequences."""
    ids, mask = b["ids"], b["mask"]
    return -sequence_logprob(logits, ids, mask).sum() / mask[:, 1:].sum()


def _on(batch: dict[str, Tensor], device: Any) -> dict[str, Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def dpo_loss(forward: Any, batch: dict[str, Tensor], beta: float, device: Any = None) -> Tensor:
    """f: the DPO loss of a preference batch, chosen and rejected in one forward pass."""
    b = _on(batch, device)
    return dpo_from_logits(forward(input_ids=_preference_ids(b)[0]).logits, b, beta)


def sft_loss(forward: Any, batch: dict[str, Tensor], device: Any = None) -> Tensor:
    """g: the mean token NLL over the response tokens of an instruction batch."""
    b = _on(batch, device)
    return sft_from_logits(forward(input_ids=b["ids"]).logits, b)


class PeftDpoSft:
    """The problem with its structure declared: features(x) = the decoder's last hidden
    states (functional call of the decoder with the LoRA x), head_loss(y) = the loss of the
    logits ``F.linear(h, y)``. ``upper_loss`` / ``lower_loss`` are the whole model's (the
    module problem's), equal by construction."""

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
        b = _on(batch, self.device)
        ids = _preference_ids(b)[0] if level == "upper" else b["ids"]
        cut = len(self.prefix)
        params = {**self._frozen, **{k[cut:]: v for k, v in x.items()}}
        out = torch.func.functional_call(
            self.decoder, params, (), {"input_ids": ids, "use_cache": False}, strict=True
        )
        return out.last_hidden_state

    def head_loss(self, y: Params, features: Tensor, batch: Any, level: str) -> Tensor:
        b = _on(batch, self.device)
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
    if (
        decoder is None
        or not prefix
        or set(dict(model.get_output_embeddings().named_parameters()))
        - {
            "weight",
            "bias",
        }
    ):
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
        _with_reference(model, preference_data(n, *shape)) for n in (c["n_pref"], c["n_eval"])
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
_SMALLER_MODEL = "choose a smaller model (fewer layers; a smaller hidden, vocab or MLP size)"


def _data_bytes(c: dict[str, Any]) -> int:
    """About the bytes of the generated data (int64 ids and bool masks; a preference sample
    holds a chosen and a rejected sequence) and of one chunk of the reference pass's float32
    logits (with the copies the log-probabilities make)."""
    length = c["prompt_len"] + c["response_len"]
    sequences = 2 * (c["n_pref"] + c["n_eval"]) + c["n_sft"] + c["n_eval"]
    logits = 3 * 4 * min(REFERENCE_CHUNK, c["n_pref"]) * length * c["vocab"]
    return 9 * sequences * length + logits


def _fits(config: Any, c: dict[str, Any]) -> None:
    """Refuse a model shape whose weights cannot fit in this machine's memory, before a single
    one is allocated (the model is built on the CPU in float32, then cast to ``dtype``)."""
    count = parameter_count(config)
    if count is None:
        return  # a field that is not a positive integer: transformers names it
    size = torch.empty((), dtype=c["dtype"]).element_size()
    what = "the built model" if c["model"] is None else f"model={c['model']!r}"
    problem = memory_problem(
        NAME, count * (4 + size), f"{what} ({count:,} parameters)", _SMALLER_MODEL
    )
    if problem:
        raise ConfigError(problem)


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
    length = c["prompt_len"] + c["response_len"]
    if c["model"] is None:
        config = llama_config(
            {
                "vocab_size": c["vocab"],
                "hidden_size": c["hidden"],
                "intermediate_size": 4 * c["hidden"],
                "num_hidden_layers": c["layers"],
                "num_attention_heads": c["heads"],
                "num_key_value_heads": c["heads"],
                "max_position_embeddings": max(64, length),
            },
            transformers,
        )
        _fits(config, c)
        return transformers.LlamaForCausalLM(config)
    if isinstance(c["model"], dict) or c["model"] in PRESETS:
        fields = PRESETS[c["model"]] if isinstance(c["model"], str) else dict(c["model"])
        try:
            config = llama_config(fields, transformers)
            config.max_position_embeddings = max(config.max_position_embeddings, length)
        except Exception as err:  # transformers' validators raise their own error types
            raise ConfigError(
                f"problem {NAME!r}: model={c['model']!r} is not a valid Llama config: {err}"
            ) from None
        _fits(config, c)  # outside the try: its own ConfigError is not an invalid config
        try:
            model = transformers.LlamaForCausalLM(config)
        except Exception as err:
            raise ConfigError(
                f"problem {NAME!r}: model={c['model']!r} is not a valid Llama config: {err}"
            ) from None
    else:
        model = _load_checkpoint(c["model"], transformers)
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


def _load_checkpoint(folder: Any, transformers: Any) -> nn.Module:
    """A saved causal LM from ``folder``, no download; a weights file that holds objects other
    than tensors is refused, never loaded (unpickling it could run code)."""
    files = ", ".join(sorted(p.name for p in Path(folder).glob("*.bin"))) or "its weights file"
    try:
        return transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as err:
        raise ConfigError(f"problem {NAME!r}: cannot load model={folder!r}: {err}") from None
    except pickle.UnpicklingError as err:
        if "Weights only load failed" not in str(err):
            raise _damaged(folder, files, err) from None
        # torch.load(weights_only=True) refused the file. Its own text advises weights_only=False,
        # which would run whatever the file holds: say what it means, and the safe ways out.
        found = re.search(r"GLOBAL (\S+)", str(err))
        what = f" (it names {found.group(1)})" if found else ""
        raise ConfigError(
            f"problem {NAME!r}: model={folder!r}: {files} holds objects other than tensors"
            f"{what}, so it was not loaded: unpickling it could run code. Give a model saved as "
            "safetensors (model.save_pretrained(dir) writes model.safetensors), or re-save the "
            "weights as a plain state dict: torch.save(model.state_dict(), 'pytorch_model.bin')"
        ) from None
    except (RuntimeError, EOFError) as err:  # torch's reader on a truncated or corrupted file
        raise _damaged(folder, files, err) from None


def _damaged(folder: Any, files: str, err: BaseException) -> ConfigError:
    # The first line of torch's reason, unless it is advice to load without weights_only.
    reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
    reason = type(err).__name__ if "weights_only" in reason else reason
    return ConfigError(
        f"problem {NAME!r}: cannot load model={folder!r}: {files} cannot be read ({reason}); it "
        "is truncated or corrupted: save the model again with model.save_pretrained(dir)"
    )


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
        chunks = zip(data[key].split(REFERENCE_CHUNK), data[f"{key}_mask"].split(REFERENCE_CHUNK))
        for ids, mask in chunks:
            ids, mask = ids.to(device), mask.to(device)
            parts.append(sequence_logprob(model(input_ids=ids).logits, ids, mask).cpu())
        out[f"ref_{key}"] = torch.cat(parts)
    return out
