"""Token ids and completion masks of a preference set and an instruction set, as TRL builds them.

A sequence is its prompt's ids then its completion's ids; ``mask[i, t]`` is True exactly where
token t of row i is a completion token (prompt tokens and padding are False), and the losses
sum log p(ids[:, t] | ids[:, :t]) over those positions.

* Standard rows (strings): the prompt is the tokenizer's start tokens (a BOS when it adds one)
  then the prompt text; the completion is its text then the EOS. A plain-text row (prompt ``""``)
  is the start tokens then the text, all of it scored.
* Conversational rows (lists of ``{"role", "content"}`` messages): the prompt is the chat
  template of the prompt messages with the generation prompt; the completion is what the
  template of prompt + completion messages adds after it.

Truncation, as TRL does it: the prompt keeps its last ``max_prompt_length`` tokens, then the
sequence keeps its first ``max_length`` tokens (a completion loses its end). A row whose prompt
alone fills ``max_length`` is dropped. Nothing here prints: :class:`Truncation` says what was
cut, for the caller to show.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from bilevel_ray.errors import ConfigError
from bilevel_ray.text.truncation import Cutter, Truncation

if TYPE_CHECKING:
    from torch import Tensor

    from bilevel_ray.text.formats import InstructionRow, PreferenceRow

__all__ = [
    "Truncation",
    "ensure_pad",
    "load_tokenizer",
    "tokenize_instructions",
    "tokenize_preferences",
]

KINDS = ("standard", "conversational")
# Rows per call to the tokenizer: one batched call is fast (the Rust tokenizer runs it in
# parallel), and chunks bound the memory of the Python lists it returns.
CHUNK = 8192


def load_tokenizer(path: str, what: str) -> Any:
    """The tokenizer saved in the folder ``path`` (never downloaded); ``what`` names the setting
    that gave it, for the error message."""
    fix = (
        "give a folder that holds tokenizer.json and/or tokenizer_config.json, such as one written "
        "by tokenizer.save_pretrained(folder)"
    )
    folder = Path(path).expanduser()
    if not folder.is_dir():
        state = "is not a folder" if folder.exists() else "does not exist"
        raise ConfigError(f"{what}={str(path)!r}: the tokenizer folder {state}; {fix}")
    try:
        import transformers
    except ImportError:
        raise ConfigError(
            f"{what}={str(path)!r}: loading a tokenizer needs the transformers package; "
            "pip install transformers"
        ) from None
    try:
        return transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:
        reason = " ".join(str(e).split())[:300]
        raise ConfigError(
            f"{what}={str(path)!r}: no tokenizer could be loaded from this folder "
            f"({type(e).__name__}: {reason}); {fix}"
        ) from e


def ensure_pad(tokenizer: Any) -> str | None:
    """Give a tokenizer without a pad token its EOS (else its UNK) token as the pad token; the
    one-line message says which, or None when it had a pad token already."""
    if tokenizer.pad_token is not None:
        return None
    for name in ("eos", "unk"):
        token = getattr(tokenizer, f"{name}_token", None)
        if token is not None:
            tokenizer.pad_token = token
            return (
                f"the tokenizer has no pad token: using its {name} token {token!r} "
                f"(id {tokenizer.pad_token_id}) for padding; padded positions are never scored"
            )
    raise ConfigError(
        f"tokenizer {_folder(tokenizer)!r} has no pad, eos or unk token to pad with; set one "
        "(tokenizer.pad_token = '<pad>', adding the token if it is new) and save the tokenizer "
        "again with tokenizer.save_pretrained(folder)"
    )


def tokenize_preferences(
    rows: Sequence[PreferenceRow],
    kind: str,
    tokenizer: Any,
    max_length: int,
    max_prompt_length: int | None,
    *,
    what: str = "the preference set",
) -> tuple[dict[str, Tensor], Truncation]:
    """``{"chosen", "chosen_mask", "rejected", "rejected_mask"}``: int64 ids and bool completion
    masks, [n, L] each, right-padded with the pad id to one L (the longest sequence kept), with
    the chosen and the rejected completion after the same prompt; and what was cut."""
    _check(rows, kind, tokenizer, max_length, max_prompt_length, what)
    prompts = [r.prompt for r in rows]
    prompt_ids = _prompt_ids(prompts, kind, tokenizer, what)
    chosen_ids, rejected_ids = (
        _completion_ids(prompts, prompt_ids, completions, kind, tokenizer, what)
        for completions in ([r.chosen for r in rows], [r.rejected for r in rows])
    )
    cut = Cutter(max_length, max_prompt_length)
    kept, chosen, rejected = [], [], []
    for i, prompt in enumerate(prompt_ids):
        prompt = cut.prompt(i, prompt, chosen_ids[i], rejected_ids[i])
        if prompt is None:
            continue
        kept.append(i)
        chosen.append(cut.sequence(prompt, chosen_ids[i]))
        rejected.append(cut.sequence(prompt, rejected_ids[i]))
    report = cut.report(len(rows), 2 * len(kept), what)
    length = max(len(s) for s, _ in chosen + rejected)
    pad = _pad_id(tokenizer)
    ids, mask = _pack(chosen, length, pad)
    rejected_ids_t, rejected_mask = _pack(rejected, length, pad)
    out = {"chosen": ids, "chosen_mask": mask, "rejected": rejected_ids_t}
    out["rejected_mask"] = rejected_mask
    return out, report


def tokenize_instructions(
    rows: Sequence[InstructionRow],
    kind: str,
    tokenizer: Any,
    max_length: int,
    max_prompt_length: int | None,
    *,
    what: str = "the instruction set",
) -> tuple[dict[str, Tensor], Truncation]:
    """``{"ids", "mask"}``: int64 ids and bool completion masks, [n, L], right-padded with the
    pad id to the longest sequence kept; and what was cut."""
    _check(rows, kind, tokenizer, max_length, max_prompt_length, what)
    prompts = [r.prompt for r in rows]
    prompt_ids = _prompt_ids(prompts, kind, tokenizer, what)
    completion_ids = _completion_ids(
        prompts, prompt_ids, [r.completion for r in rows], kind, tokenizer, what
    )
    cut = Cutter(max_length, max_prompt_length)
    sequences = []
    for i, prompt in enumerate(prompt_ids):
        prompt = cut.prompt(i, prompt, completion_ids[i])
        if prompt is not None:
            sequences.append(cut.sequence(prompt, completion_ids[i]))
    report = cut.report(len(rows), len(sequences), what)
    ids, mask = _pack(sequences, max(len(s) for s, _ in sequences), _pad_id(tokenizer))
    return {"ids": ids, "mask": mask}, report


def _check(
    rows: Sequence[Any],
    kind: str,
    tokenizer: Any,
    max_length: int,
    max_prompt_length: int | None,
    what: str,
) -> None:
    if kind not in KINDS:
        raise ConfigError(f"{what}: kind={kind!r} is not one of {KINDS}; give one of them")
    if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 2:
        raise ConfigError(
            f"max_length={max_length!r}: must be an integer >= 2 (a start or prompt token and "
            "one completion token); give the longest sequence in tokens, such as max_length=512"
        )
    if max_prompt_length is not None and (
        not isinstance(max_prompt_length, int)
        or isinstance(max_prompt_length, bool)
        or max_prompt_length < 1
    ):
        raise ConfigError(
            f"max_prompt_length={max_prompt_length!r}: must be an integer >= 1 or None (prompts "
            "kept whole); give the longest prompt in tokens, such as max_prompt_length=128"
        )
    if len(rows) == 0:
        raise ConfigError(f"{what} has no rows; give at least one row")
    if kind == "conversational" and getattr(tokenizer, "chat_template", None) is None:
        raise ConfigError(
            f"{what} is conversational (lists of role/content messages) but tokenizer "
            f"{_folder(tokenizer)!r} has no chat template to turn messages into tokens; give a "
            "tokenizer that has one, set tokenizer.chat_template (a Jinja template) and save it, "
            "or give the data as prompt/completion strings (prompt/chosen/rejected for a "
            "preference set)"
        )


def _prompt_ids(prompts: list[Any], kind: str, tokenizer: Any, what: str) -> list[list[int]]:
    """Token ids of each row's prompt (see the module's docstring)."""
    if kind == "standard":
        start = _start_ids(tokenizer)
        return [start + ids for ids in _encode(tokenizer, prompts)]
    return _chat(tokenizer, prompts, what, add_generation_prompt=True)


def _completion_ids(
    prompts: list[Any],
    prompt_ids: list[list[int]],
    completions: list[Any],
    kind: str,
    tokenizer: Any,
    what: str,
) -> list[list[int]]:
    """Token ids of each row's completion after its prompt (see the module's docstring)."""
    if kind == "standard":
        end = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
        return [ids + end for ids in _encode(tokenizer, completions)]
    full_ids = _chat(tokenizer, [p + c for p, c in zip(prompts, completions)], what)
    completion_ids = []
    for i, (prompt, full) in enumerate(zip(prompt_ids, full_ids)):
        if full[: len(prompt)] != prompt:
            raise ConfigError(
                f"{what}: row {i}: the chat template of tokenizer {_folder(tokenizer)!r} "
                "does not render the prompt messages with the generation prompt as the start of "
                "the whole conversation, so the completion's tokens cannot be told apart; give a "
                "tokenizer whose chat template is prefix-consistent (the usual case), or give "
                "the data as prompt/completion strings"
            )
        completion_ids.append(full[len(prompt) :])
    return completion_ids


def _encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Ids of each text without special tokens, in batched calls."""

    def call(part: list[str]) -> list[list[int]]:
        out = tokenizer(
            part, add_special_tokens=False, return_attention_mask=False, return_token_type_ids=False
        )
        return out["input_ids"]

    return _chunked(call, texts)


def _chat(tokenizer: Any, conversations: list[Any], what: str, **kwargs: Any) -> list[list[int]]:
    """Ids of each conversation through the chat template, in batched calls. A template that
    fails (many refuse roles out of order, or an empty prompt) is refused naming the row."""

    def call(part: list[Any]) -> list[list[int]]:
        # transformers 5 returns a BatchEncoding unless return_dict=False; both are handled.
        out = tokenizer.apply_chat_template(part, tokenize=True, return_dict=False, **kwargs)
        if not isinstance(out, list):
            out = out["input_ids"]
        return [list(ids) for ids in out]

    out: list[list[int]] = []
    for start in range(0, len(conversations), CHUNK):
        part = list(conversations[start : start + CHUNK])
        try:
            out.extend(call(part))
        except Exception as e:
            _refuse_template(tokenizer, call, part, start, e, what)
    return out


def _refuse_template(
    tokenizer: Any,
    call: Callable[[list[Any]], list[list[int]]],
    part: list[Any],
    start: int,
    error: Exception,
    what: str,
) -> None:
    """Raise the ConfigError naming the first row of ``part`` the chat template fails on."""
    row = start
    for offset, conversation in enumerate(part):
        try:
            call([conversation])
        except Exception as e:
            row, error = start + offset, e
            break
    reason = " ".join(str(error).split())[:300]
    raise ConfigError(
        f"{what}: row {row}: the chat template of tokenizer {_folder(tokenizer)!r} fails on this "
        f"conversation ({type(error).__name__}: {reason}); fix or skip the row, give a tokenizer "
        "whose chat template accepts it, or give the data as prompt/completion strings"
    ) from error


def _chunked(call: Callable[[list[Any]], list[list[int]]], items: list[Any]) -> list[list[int]]:
    out: list[list[int]] = []
    for start in range(0, len(items), CHUNK):
        out.extend(call(list(items[start : start + CHUNK])))
    return out


def _start_ids(tokenizer: Any) -> list[int]:
    """The special tokens the tokenizer puts before a text (a BOS, or none): those before the
    text's own ids in a probe text tokenized with special tokens. Tokens put after it (an EOS
    some tokenizers append) are left out, since a prompt is followed by its completion."""
    probe = "a"
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    special = tokenizer(probe)["input_ids"]
    for at in range(len(special) - len(plain) + 1):
        if special[at : at + len(plain)] == plain:
            return list(special[:at])
    return []


def _pack(sequences: list[tuple[list[int], int]], length: int, pad: int) -> tuple[Tensor, Tensor]:
    """([n, length] int64 ids right-padded with ``pad``, [n, length] bool completion mask)."""
    ids = np.full((len(sequences), length), pad, dtype=np.int64)
    ends = np.empty(len(sequences), dtype=np.int64)
    starts = np.empty(len(sequences), dtype=np.int64)
    for i, (sequence, start) in enumerate(sequences):
        ids[i, : len(sequence)] = sequence
        ends[i], starts[i] = len(sequence), start
    position = np.arange(length)
    mask = (position >= starts[:, None]) & (position < ends[:, None])
    return torch.from_numpy(ids), torch.from_numpy(mask)


def _pad_id(tokenizer: Any) -> int:
    """The pad id; without one (see :func:`ensure_pad`) the EOS id, else 0: padded positions
    are masked and after every real token, so their value changes no score."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    return 0


def _folder(tokenizer: Any) -> str:
    return str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)
