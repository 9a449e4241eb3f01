"""The model of the ``peft-dpo-sft`` problem: a causal LM with an untied head and LoRA adapters.

``model`` (a setting of the problem) picks the base model pi: ``None`` builds the tiny Llama
of the ``vocab`` / ``hidden`` / ``layers`` / ``heads`` settings, a preset name or a dict of
``LlamaConfig`` fields (:mod:`~bilevel_ray.problems.model_presets`) builds that shape with
random weights, and a local directory loads a saved Hugging Face causal LM (no download). A
built model is refused before a single weight is allocated when its weights (float32, then a
copy in ``dtype``) cannot fit in this machine's memory; a loaded one whose weights file holds
objects other than tensors is refused unread (unpickling it could run code).

The head is untied from the input embeddings (y = the head alone; a tied head would move the
frozen embeddings with it), and :func:`with_lora` wraps the model with LoRA adapters (x) of rank
r and scale alpha / r on ``lora_targets``. transformers and peft are imported only when a model
is built (:func:`libraries`), so the rest of bilevel_ray does not need them.
"""

from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bilevel_ray.errors import ConfigError
from bilevel_ray.problems.limits import memory_problem
from bilevel_ray.problems.model_presets import PRESETS, llama_config, parameter_count
from bilevel_ray.problems.text_sets import say
from bilevel_ray.text.quiet import no_progress_bars

__all__ = ["NAME", "adapted_model", "base_model", "libraries", "with_lora"]

NAME = "peft-dpo-sft"  # the problem these models are built for: every error names it
_SMALLER_MODEL = "choose a smaller model (fewer layers; a smaller hidden, vocab or MLP size)"


def libraries() -> tuple[Any, Any]:
    """(transformers, peft), or a ConfigError naming the extra that installs them."""
    try:
        import peft
        import transformers
    except ImportError as err:
        raise ConfigError(
            f"problem {NAME!r} needs transformers and peft ({err}); install them with "
            "pip install 'bilevel_ray[peft]'"
        ) from None
    return transformers, peft


def adapted_model(
    c: dict[str, Any], transformers: Any, peft: Any, notes: list[str] | None = None
) -> nn.Module:
    """The model the problem trains: :func:`base_model` with ``c["attention"]``, wrapped with
    LoRA (:func:`with_lora`), cast to ``c["dtype"]`` on ``c["device"]``, in eval mode (no
    dropout: f and g are functions of (x, y, batch) alone) except where a setting asks for it:
    ``lora_dropout`` > 0 switches the adapters' dropout on, and ``gradient_checkpointing``
    switches each decoder layer's recomputation on (transformers runs it in training mode
    only; the layers' own dropout stays off). ``notes``: as :func:`base_model`'s."""
    model = base_model(c, transformers, notes)
    if hasattr(model, "set_attn_implementation"):
        try:
            model.set_attn_implementation(c["attention"])
        except (ValueError, ImportError) as err:
            raise ConfigError(
                f"problem {NAME!r}: attention={c['attention']!r} is not available for this "
                f"model ({err}); use attention='eager'"
            ) from None
    model = with_lora(model, c, peft)
    device = torch.device(c["device"] or "cpu")
    model = model.to(device=device, dtype=c["dtype"]).eval()
    if c["gradient_checkpointing"]:
        base = model.get_base_model()
        enable = getattr(base, "activation_checkpointing_enable", None)
        kwargs = {"use_reentrant": False}  # the solvers take gradients with torch.autograd.grad
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            if enable is not None:
                enable(activation_checkpointing_kwargs=kwargs)
            else:
                base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        for module in model.modules():
            if getattr(module, "gradient_checkpointing", False):
                module.training = True  # this module alone: its children keep eval mode
                module._gradient_checkpointing_func = _replay_as_called
    if c["lora_dropout"]:
        for name, module in model.named_modules():
            if "lora_dropout" in name and isinstance(module, nn.Dropout):
                module.train()
    return model


def _replay_as_called(function: Any, *args: Any) -> Any:
    """Checkpoint one decoder layer so that the backward pass replays it with the parameters it
    was called with. The solvers call the model through ``torch.func.functional_call`` with x
    and y in place of its own weights, and the backward pass runs after that call has put the
    weights back: a plain checkpoint would recompute the layer with the weights, not with x.
    ``function`` is transformers' ``partial(forward, layer, **kwargs)``."""
    layer = function.args[0]
    params = dict(layer.named_parameters())  # inside functional_call: the tensors given for x

    def replay(*inputs: Any) -> Any:
        with torch.nn.utils.stateless._reparametrize_module(layer, params):
            return function(*inputs)

    return torch.utils.checkpoint.checkpoint(replay, *args, use_reentrant=False)


def base_model(c: dict[str, Any], transformers: Any, notes: list[str] | None = None) -> nn.Module:
    """The base model pi of the settings ``c``, its head untied from the input embeddings. A
    preset, a config dict or a checkpoint must hold at least ``vocab`` tokens (the generated
    token ids are below it); the built tiny Llama holds exactly ``vocab``. ``notes``: where the
    lines about its handling go, for the caller to print once its inputs are known good (None:
    printed now)."""
    if c["model"] is None:
        return _tiny_llama(c, transformers)  # untied by its config, ``vocab`` tokens by its shape
    if isinstance(c["model"], dict) or c["model"] in PRESETS:
        model = _configured_llama(c, transformers)
    else:
        _check_folder(c["model"], c, transformers)
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
        if c["model"] is not None:
            line = (
                "the model ties its output head to its input embeddings: the head is untied "
                f"(a copy, {tuple(head.weight.shape)}), trained as y; the input embeddings "
                "stay frozen (export writes the trained head beside the adapter)"
            )
            if notes is None:
                say(line)
            else:
                notes.append(line)
    model.config.tie_word_embeddings = False
    return model


def _tiny_llama(c: dict[str, Any], transformers: Any) -> nn.Module:
    """The Llama of the ``vocab`` / ``hidden`` / ``layers`` / ``heads`` settings (MLP width
    4 * hidden), with positions for at least 64 tokens."""
    config = llama_config(
        {
            "vocab_size": c["vocab"],
            "hidden_size": c["hidden"],
            "intermediate_size": 4 * c["hidden"],
            "num_hidden_layers": c["layers"],
            "num_attention_heads": c["heads"],
            "num_key_value_heads": c["heads"],
            "max_position_embeddings": max(64, c["prompt_len"] + c["response_len"]),
        },
        transformers,
    )
    _fits(config, c)
    return transformers.LlamaForCausalLM(config)


def _configured_llama(c: dict[str, Any], transformers: Any) -> nn.Module:
    """A Llama of a preset's fields or of the dict ``model``, with random weights and positions
    for the generated sequences."""
    length = c["prompt_len"] + c["response_len"]
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
        return transformers.LlamaForCausalLM(config)
    except Exception as err:
        raise ConfigError(
            f"problem {NAME!r}: model={c['model']!r} is not a valid Llama config: {err}"
        ) from None


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


def _check_folder(folder: Any, c: dict[str, Any], transformers: Any) -> None:
    """Before a model folder is built: its config's shape must fit in memory (as a config dict's
    must), and each safetensors file's header length (its first 8 bytes, little-endian) must
    lie within the file (a planted 2**56 would otherwise be allocated)."""
    try:
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as err:
        raise ConfigError(f"problem {NAME!r}: cannot load model={folder!r}: {err}") from None
    _fits(config, c)
    for weights in sorted(Path(folder).glob("*.safetensors")):
        size = weights.stat().st_size
        with open(weights, "rb") as handle:
            head = handle.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < length <= size - 8:
            raise ConfigError(
                f"problem {NAME!r}: model={folder!r}: {weights.name} is not a safetensors file "
                f"(its header says {length:,} bytes, the file has {size:,}); it is truncated or "
                "corrupted: save the model again with model.save_pretrained(dir)"
            )


def _load_checkpoint(folder: Any, transformers: Any) -> nn.Module:
    """A saved causal LM from ``folder``, no download; a weights file that holds objects other
    than tensors is refused, never loaded (unpickling it could run code)."""
    files = ", ".join(sorted(p.name for p in Path(folder).glob("*.bin"))) or "its weights file"
    try:
        with no_progress_bars():
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


def with_lora(model: nn.Module, c: dict[str, Any], peft: Any) -> nn.Module:
    """``model`` with LoRA adapters W + (alpha / r) B A on ``lora_targets`` (B = 0: the
    adapted model starts as the base model), dropout ``lora_dropout`` and no bias terms."""
    lora = peft.LoraConfig(
        r=c["lora_rank"],
        lora_alpha=c["lora_alpha"],
        lora_dropout=float(c.get("lora_dropout", 0.0)),
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
