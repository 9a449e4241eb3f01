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

The data is generated (below) unless ``preference=PATH`` and ``instruction=PATH`` name a user's
text files (:mod:`~bilevel_ray.problems.text_sets`): then the tokenizer is the model folder's
(or ``tokenizer=DIR``), sequences are right padded and each batch is cut to its longest row,
and the tokenized sets and the reference log-probabilities are cached on disk. A tied head
(Llama-3.2 ties ``lm_head`` to the input embeddings) is untied: y is a copy of the head that
trains on its own while the input embeddings stay frozen. ``lora_dropout``,
``gradient_checkpointing`` (activations of each decoder layer recomputed in the backward pass)
and ``attention`` (PyTorch's SDPA by default) are settings; ``dtype="bfloat16"`` runs in bf16.

The problem declares its structure (:class:`~bilevel_ray.problem.FeatureProblem`): the features
of x are the decoder's last hidden states h (the LoRA-adapted backbone), and the head y maps
them to logits ``h W_y^T``; so the solvers run the backbone once per step and level and only the
head in their inner loops. For a checkpoint directory the two paths are compared once at build
time, and the structure is declared only if they agree. The data is generated
(:mod:`bilevel_ray.problems.preference_data`): token ids below ``vocab``, which must not exceed
the model's vocabulary. ``eval_data`` holds a held-out preference set and a held-out instruction
set. Needs ``pip install 'bilevel_ray[peft]'`` (transformers and peft).

Here: the settings and their checks, and the factory. The problem objects (structure, held-out
metrics, token counts) are in :mod:`~bilevel_ray.problems.lm_problem`, the losses in
:mod:`~bilevel_ray.problems.dpo_sft_losses`, the model's building and loading in
:mod:`~bilevel_ray.problems.llama_model`, the text data in
:mod:`~bilevel_ray.problems.text_sets`.
"""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bilevel_ray.data import BilevelBatch, minibatches
from bilevel_ray.errors import ConfigError
from bilevel_ray.inputs import declare_inputs
from bilevel_ray.module_problems import module_problem
from bilevel_ray.problem import ProblemSpec, factory_config
from bilevel_ray.problems.dpo_sft_losses import (
    dpo_from_logits,
    dpo_loss,
    reference_chunk,
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
from bilevel_ray.problems.llama_model import NAME, adapted_model, libraries
from bilevel_ray.problems.lm_problem import PeftDpoSft, structured
from bilevel_ray.problems.model_presets import PRESETS
from bilevel_ray.problems.preference_data import instruction_data, preference_data
from bilevel_ray.problems.text_sets import (
    TEXT_DEFAULTS,
    TEXT_FILES,
    check_text,
    say,
    text_sets,
    uses_text,
    with_cached_reference,
)

# The losses and the model have their own modules; the loss functions stay importable from here
# (in __all__), where they were first defined.
__all__ = [
    "DEFAULTS",
    "LIMITS",
    "PeftDpoSft",
    "dpo_from_logits",
    "dpo_loss",
    "peft_dpo_sft",
    "peft_model",
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
    "lora_dropout": 0.0,  # > 0 makes f and g random (dropout on the adapters' input)
    "gradient_checkpointing": False,  # recompute each decoder layer's activations in backward
    "attention": "sdpa",  # PyTorch's scaled_dot_product_attention; "eager" for the plain path
    "beta": 0.1,  # DPO's inverse temperature
    "batch": 32,  # preference and instruction samples per step
    "n_pref": 4096,  # training preference triples (the paper: 4800)
    "n_sft": 4096,  # training instruction pairs (the paper: 4800)
    "n_eval": 512,  # held-out samples of each set
    "prompt_len": 6,
    "response_len": 6,
    "topics": 4,  # classes of the data rule (preference_data)
    "dtype": "float32",
    **TEXT_DEFAULTS,
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


def peft_model(
    config: dict[str, Any] | None = None, notes: list[str] | None = None
) -> tuple[nn.Module, str, Any, dict]:
    """The problem's model as the factory builds it, without its data: (the LoRA-wrapped
    model, the head's module name, the tokenizer or None, the settings after defaults). What
    ``br.export`` rebuilds a run's adapter on. ``notes``: where the lines about the model's
    handling go, for the caller to print (None: printed once the model is checked)."""
    held: list[str] = [] if notes is None else notes
    c = factory_config(NAME, config, DEFAULTS)
    _check(c)
    if isinstance(c["model"], (str, Path)) and Path(c["model"]).is_dir():
        # A checkpoint of many GB: the run's manifest describes it by name, size and time.
        declare_inputs(c["model"], by_content=False)
    transformers, peft = libraries()
    tokenizer = _text_tokenizer(c) if uses_text(c) else None
    with torch.random.fork_rng(devices=[]):  # the model's initialisation leaves torch's RNG alone
        torch.manual_seed(c["seed"])
        model = adapted_model(c, transformers, peft, held)
    if tokenizer is not None:
        rows = model.get_input_embeddings().weight.shape[0]
        if len(tokenizer) > rows:
            raise ConfigError(
                f"problem {NAME!r}: the model's vocabulary holds {rows} tokens, fewer than the "
                f"tokenizer's {len(tokenizer)}: token ids past {rows - 1} have no embedding. Give "
                "the tokenizer the model was trained with (tokenizer=DIR), or resize the "
                "model's embeddings (model.resize_token_embeddings(len(tokenizer))) and save it"
            )
    head = model.get_output_embeddings()
    head_name = next(name for name, module in model.named_modules() if module is head)
    if notes is None:
        for line in held:
            say(line)
    return model, head_name, tokenizer, c


def _text_tokenizer(c: dict[str, Any]) -> Any:
    """The tokenizer of text data (``tokenizer=DIR`` or the model folder's), with a pad token;
    a built model is sized to it."""
    from bilevel_ray.text.tokenize import ensure_pad, load_tokenizer

    folder = c["tokenizer"] if c["tokenizer"] is not None else c["model"]
    tokenizer = load_tokenizer(str(folder), "tokenizer" if c["tokenizer"] else "model")
    chosen = ensure_pad(tokenizer)
    if chosen:
        say(chosen)
    if c["model"] is None:
        c["vocab"] = len(tokenizer)  # the built tiny Llama holds exactly the tokenizer's tokens
    return tokenizer


def peft_dpo_sft(config: dict[str, Any] | None = None) -> ProblemSpec:
    """The problem, x0 (LoRA), y0 (head), minibatches of ``batch`` preference and ``batch``
    instruction samples per step, and held-out ``eval_data``. Settings: :data:`DEFAULTS`."""
    notes: list[str] = []  # said once the data is read and checked: not before an error
    model, head_name, tokenizer, c = peft_model(config, notes)
    device = torch.device(c["device"] or "cpu")
    inner, x0, y0 = module_problem(
        model,
        x="lora_",
        y=[f"{head_name}.{p}" for p, _ in model.get_output_embeddings().named_parameters()],
        upper_loss=partial(dpo_loss, beta=float(c["beta"]), device=device),
        lower_loss=partial(sft_loss, device=device),
        copy=False,  # x0, y0 share the model's memory; in_place=True makes them the state
    )
    if tokenizer is not None:
        sets = text_sets(c, tokenizer)
        pref, pref_eval = (
            with_cached_reference(model, data, sets.keys[key], c)
            for data, key in ((sets.pref, "preference/train"), (sets.pref_eval, "preference/eval"))
        )
        # g weighs rows by the training set's mean response length (sft_from_logits).
        scale = 1.0 / float(sets.sft["mask"][:, 1:].sum(1).double().mean())
        sft, sft_eval = (
            {**part, "token_scale": torch.full((len(part["ids"]),), scale, dtype=torch.float64)}
            for part in (sets.sft, sets.sft_eval)
        )
        if c["batch"] > min(len(pref["chosen"]), len(sft["ids"])):
            raise ConfigError(
                f"problem {NAME!r}: batch={c['batch']} exceeds the {len(pref['chosen'])} "
                f"training preference rows or the {len(sft['ids'])} instruction rows; use a "
                f"batch of at most {min(len(pref['chosen']), len(sft['ids']))}"
            )
    else:
        gen = torch.Generator().manual_seed(c["seed"])
        shape = (c["vocab"], c["topics"], c["prompt_len"], c["response_len"], gen)
        pref, pref_eval = (
            with_reference(model, preference_data(n, *shape)) for n in (c["n_pref"], c["n_eval"])
        )
        sft, sft_eval = (instruction_data(n, *shape) for n in (c["n_sft"], c["n_eval"]))
    check = None
    if isinstance(c["model"], (str, Path)) and c["model"] not in PRESETS:
        check = (x0, y0, {k: v[:2] for k, v in pref.items()})
    problem = structured(inner, model, head_name, c, device, check)
    for line in notes:
        say(line)
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
    problems += check_text(c)
    problems += _data_file_problems(c)
    dropout = c["lora_dropout"]
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        problems.append(f"problem {NAME!r}: lora_dropout={shown(dropout)}: must be in [0, 1)")
    if not isinstance(c["gradient_checkpointing"], bool):
        problems.append(
            f"problem {NAME!r}: gradient_checkpointing={c['gradient_checkpointing']!r}: must be "
            "true or false"
        )
    if c["attention"] not in ("sdpa", "eager"):
        problems.append(
            f"problem {NAME!r}: attention={c['attention']!r}: must be 'sdpa' (PyTorch's "
            "scaled_dot_product_attention) or 'eager'"
        )
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
    if uses_text(c):
        return  # the files' rows size the data: checked where they are read
    problem = memory_problem(NAME, _data_bytes(c), "the generated data", _SMALLER_DATA)
    if problem:
        raise ConfigError(problem)
    if c["batch"] > min(c["n_pref"], c["n_sft"]):
        raise ConfigError(
            f"problem {NAME!r}: batch={c['batch']} exceeds n_pref={c['n_pref']} or "
            f"n_sft={c['n_sft']}; use a batch of at most {min(c['n_pref'], c['n_sft'])}"
        )


def _data_file_problems(c: dict[str, Any]) -> list[str]:
    """The text files that are no regular file of bounded size (a FIFO, /dev/zero), named
    before anything opens them: the cache hashes a file before it is read."""
    from bilevel_ray.text.read import check_data_file

    problems: list[str] = []
    for key in TEXT_FILES:
        value = c[key]
        if isinstance(value, (str, Path)) and Path(value).exists():  # else check_text's
            try:
                check_data_file(value, f"problem {NAME!r}: {key}={str(value)!r}")
            except ConfigError as err:
                problems += err.problems
    return problems


_SMALLER_DATA = "lower n_pref, n_sft, n_eval, prompt_len, response_len or vocab"


def _data_bytes(c: dict[str, Any]) -> int:
    """About the bytes of the generated data (int64 ids and bool masks; a preference sample
    holds a chosen and a rejected sequence) and of one chunk of the reference pass's float32
    logits (with the copies the log-probabilities make)."""
    length = c["prompt_len"] + c["response_len"]
    sequences = 2 * (c["n_pref"] + c["n_eval"]) + c["n_sft"] + c["n_eval"]
    logits = 3 * 4 * min(reference_chunk(length, c["vocab"]), c["n_pref"]) * length * c["vocab"]
    return 9 * sequences * length + logits
