"""The ``peft-dpo-sft`` problem's data from a user's files: a preference set (DPO, the upper
level) and an instruction set (SFT, the lower level), read, tokenized and cached.

``preference=PATH`` and ``instruction=PATH`` name the files (JSON Lines, Parquet, CSV or a
``datasets`` folder; :mod:`bilevel_ray.text.read`) in the formats TRL users hold
(:mod:`bilevel_ray.text.formats`). Held-out rows come from ``eval_preference`` /
``eval_instruction`` files, or else a reproducible ``eval_fraction`` of each file (split by the
problem's ``seed``). The tokenizer is the model folder's, or ``tokenizer=DIR``
(:mod:`bilevel_ray.text.tokenize`): prompts are cut from the left to ``max_prompt_length``,
sequences from the right to ``max_length``, and what was cut or skipped is printed.

Tokenize once: each tokenized set, and the reference model's log-probabilities of the
preference sets, are stored in ``cache_dir`` (:mod:`bilevel_ray.text.cache`) under a
fingerprint of the data files' bytes, the tokenizer, the settings that shape the tokens and, for
the reference, the base model (a folder's files by name, size and modification time; a built
model by its shape and seed) and its dtype; so a sweep's trials, a resumed run and the workers
of a ``train`` read them instead of redoing them.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from bilevel_ray.errors import ConfigError
from bilevel_ray.inputs import declare_inputs
from bilevel_ray.problems.limits import Limit, integer_problem, shown

__all__ = [
    "TEXT_DEFAULTS",
    "TEXT_LIMITS",
    "TextSets",
    "check_text",
    "model_fingerprint",
    "say",
    "text_sets",
    "uses_text",
]

NAME = "peft-dpo-sft"
# Bumped when the tokenized layout changes, so that an older cache is never read as this one.
FORMAT_VERSION = 1

TEXT_DEFAULTS: dict[str, Any] = {
    "preference": None,  # a preference file (prompt/chosen/rejected); None: generated token ids
    "instruction": None,  # an instruction file (prompt/completion, messages or text)
    "eval_preference": None,  # held-out files; None: eval_fraction of each training file
    "eval_instruction": None,
    "eval_fraction": 0.1,
    "tokenizer": None,  # a tokenizer folder; None: the model folder's own
    "max_length": 1024,  # tokens of prompt + completion (TRL's DPOConfig default)
    "max_prompt_length": 512,  # tokens of the prompt, cut from the left; None: no cut
    "cache_dir": None,  # None: $BILEVEL_RAY_CACHE, else ~/.cache/bilevel_ray
}
TEXT_FILES = ("preference", "instruction", "eval_preference", "eval_instruction")
TEXT_LIMITS = {
    "max_length": Limit(2, 2**20, 1024, "tokens; the model's positions bound it too"),
}


def uses_text(c: dict[str, Any]) -> bool:
    """Whether the settings name text files (else the problem generates token ids)."""
    return c["preference"] is not None or c["instruction"] is not None


def check_text(c: dict[str, Any]) -> list[str]:
    """Every problem with the text settings, before anything is read."""
    problems: list[str] = []
    if not uses_text(c):
        given = [k for k in ("eval_preference", "eval_instruction", "tokenizer") if c[k]]
        if given:
            problems.append(
                f"problem {NAME!r}: {', '.join(given)} given without preference= and "
                "instruction=: text settings need both data files"
            )
        return problems
    for key in ("preference", "instruction"):
        if c[key] is None:
            problems.append(
                f"problem {NAME!r}: {key}= is missing: text data needs both files, e.g. "
                "--config preference=pref.jsonl --config instruction=sft.jsonl"
            )
    for key in ("preference", "instruction", "eval_preference", "eval_instruction", "tokenizer"):
        value = c[key]
        if value is None:
            continue
        if not isinstance(value, (str, Path)) or not Path(value).exists():
            problems.append(
                f"problem {NAME!r}: {key}={value!r} does not exist; give the path of a "
                + ("tokenizer folder" if key == "tokenizer" else "data file or datasets folder")
            )
    fraction = c["eval_fraction"]
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        problems.append(
            f"problem {NAME!r}: eval_fraction={shown(fraction)}: must be a number in (0, 1), "
            "the share of each file held out, e.g. 0.1"
        )
    problems += [p for p in [integer_problem(NAME, "max_length", c["max_length"], TEXT_LIMITS[
        "max_length"])] if p]  # fmt: skip
    prompt = c["max_prompt_length"]
    if prompt is not None:
        bad = isinstance(prompt, bool) or not isinstance(prompt, int) or prompt < 1
        if bad or (isinstance(c["max_length"], int) and prompt >= c["max_length"]):
            problems.append(
                f"problem {NAME!r}: max_prompt_length={shown(prompt)}: must be an integer in "
                f"[1, max_length - 1] (max_length={shown(c['max_length'])}), or None for no cut"
            )
    model = c["model"]
    if c["tokenizer"] is None and not (isinstance(model, (str, Path)) and Path(model).is_dir()):
        problems.append(
            f"problem {NAME!r}: text data needs a tokenizer: give model=DIR (a checkpoint "
            "folder with its tokenizer) or tokenizer=DIR"
        )
    if c["cache_dir"] is not None and not isinstance(c["cache_dir"], (str, Path)):
        problems.append(f"problem {NAME!r}: cache_dir={c['cache_dir']!r} must be a folder path")
    return problems


@dataclass
class TextSets:
    """The tokenized sets (tensors as :mod:`~bilevel_ray.problems.dpo_sft_losses` takes them)."""

    pref: dict[str, Tensor]
    pref_eval: dict[str, Tensor]
    sft: dict[str, Tensor]
    sft_eval: dict[str, Tensor]
    keys: dict[str, str]  # the cache key of each set


def say(line: str) -> None:
    """Print a line of the data's handling once: in the driver, not again in each Ray worker
    (the driver builds the problem first and prints the same lines). Ray is looked up, not
    imported: a problem does not depend on it."""
    ray = sys.modules.get("ray")
    in_worker = ray is not None and ray.is_initialized()
    if in_worker and ray.get_runtime_context().worker.mode == ray.WORKER_MODE:
        return
    print(f"[{NAME}] {line}", file=sys.stderr, flush=True)


def text_sets(c: dict[str, Any], tokenizer: Any) -> TextSets:
    """The four tokenized sets of the settings ``c``, from the cache where they are there."""
    from bilevel_ray.text.cache import (
        cached_tensors,
        default_cache_dir,
        file_fingerprint,
        fingerprint,
        tokenizer_fingerprint,
    )

    # The run's manifest hashes the data files; a tokenizer folder by its files' names, sizes
    # and times (the tokenized sets' own fingerprint covers what it does to the text).
    declare_inputs(*(c[k] for k in TEXT_FILES if c[k] is not None))
    if c["tokenizer"] is not None:
        declare_inputs(c["tokenizer"], by_content=False)
    cache = Path(c["cache_dir"]) if c["cache_dir"] is not None else default_cache_dir()
    shape = (c["max_length"], c["max_prompt_length"])
    tokens = tokenizer_fingerprint(tokenizer)
    out: dict[str, dict[str, Tensor]] = {}
    keys: dict[str, str] = {}
    for level in ("preference", "instruction"):
        held = c[f"eval_{level}"]
        split = None if held is not None else (float(c["eval_fraction"]), int(c["seed"]))
        sources = [file_fingerprint(c[level]), file_fingerprint(held) if held else None]
        key = fingerprint(FORMAT_VERSION, level, sources, split, tokens, shape)
        made: dict[str, dict[str, Tensor]] = {}

        def build(part: str, level: str = level, held: Any = held, made: dict = made) -> Any:
            if not made:
                made.update(_tokenized(c, level, held, tokenizer))
            return made[part]

        for part in ("train", "eval"):
            keys[f"{level}/{part}"] = f"{level}-{part}-{key}"
            out[f"{level}/{part}"], hit = cached_tensors(
                cache, keys[f"{level}/{part}"], _bind(build, part), f"{level}={c[level]}"
            )
            if hit and part == "train":
                stored = cache / f"{keys[f'{level}/train']}.parquet"
                say(f"{level}: tokenized rows read from the cache {stored}")
    return TextSets(
        out["preference/train"],
        out["preference/eval"],
        out["instruction/train"],
        out["instruction/eval"],
        keys,
    )


def _bind(build: Callable[[str], Any], part: str) -> Callable[[], Any]:
    return lambda: build(part)


def _tokenized(c: dict[str, Any], level: str, held: Any, tokenizer: Any) -> dict[str, Any]:
    """Read, check and tokenize one level's rows (and its held-out rows), printing what was
    skipped or cut."""
    from bilevel_ray.text.formats import instruction_rows, preference_rows, split_rows
    from bilevel_ray.text.read import read_rows
    from bilevel_ray.text.tokenize import tokenize_instructions, tokenize_preferences

    rows_of = preference_rows if level == "preference" else instruction_rows
    tokenize = tokenize_preferences if level == "preference" else tokenize_instructions
    source = f"{level}={c[level]}"
    rows, kind, handling = rows_of(read_rows(c[level], source), source)
    for line in handling.lines():
        say(line)
    if held is None:
        train, held_rows = split_rows(rows, float(c["eval_fraction"]), int(c["seed"]))
        held_source, held_kind = f"{source} (held-out {c['eval_fraction']:g})", kind
    else:
        held_source = f"eval_{level}={held}"
        held_rows, held_kind, held_handling = rows_of(read_rows(held, held_source), held_source)
        for line in held_handling.lines():
            say(line)
        train = rows
    parts = {}
    for part, part_rows, part_kind, part_source in (
        ("train", train, kind, source),
        ("eval", held_rows, held_kind, held_source),
    ):
        parts[part], cut = tokenize(
            part_rows, part_kind, tokenizer, c["max_length"], c["max_prompt_length"]
        )
        for line in cut.lines(part_source):
            say(line)
    sizes = {part: len(next(iter(t.values()))) for part, t in parts.items()}
    say(f"{level}: {sizes['train']} training and {sizes['eval']} held-out rows tokenized")
    return parts


def model_fingerprint(c: dict[str, Any]) -> str:
    """What the reference log-probabilities depend on besides the data: the base model (a
    folder's files by name, size and modification time, not their bytes: a 6 GB checkpoint is
    not read again at every start; a built model by its shape and seed) and its dtype."""
    from bilevel_ray.text.cache import fingerprint

    model = c["model"]
    if isinstance(model, (str, Path)) and Path(model).is_dir():
        folder = Path(model)
        files = sorted(
            (str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns)
            for p in folder.rglob("*")
            if p.is_file()
        )
        described: Any = ["folder", str(folder.resolve()), files]
    else:
        shape = {k: c[k] for k in ("vocab", "hidden", "layers", "heads", "seed")}
        described = ["built", model, shape]
    return fingerprint(described, str(c["dtype"]), str(c.get("attention")))


def with_cached_reference(
    model: nn.Module, data: dict[str, Tensor], key: str, c: dict[str, Any]
) -> dict[str, Tensor]:
    """``data`` plus ``ref_chosen`` / ``ref_rejected`` (pi_ref's log-probabilities, the initial
    model's), read from the cache when this data, model and dtype made them before."""
    from bilevel_ray.problems.dpo_sft_losses import with_reference
    from bilevel_ray.text.cache import cached_tensors, default_cache_dir, fingerprint

    cache = Path(c["cache_dir"]) if c["cache_dir"] is not None else default_cache_dir()
    device = next(model.parameters()).device.type
    name = f"reference-{fingerprint(key, model_fingerprint(c), device)}"

    def build() -> dict[str, Tensor]:
        made = with_reference(model, data)
        return {k: made[k] for k in ("ref_chosen", "ref_rejected")}

    reference, _ = cached_tensors(cache, name, build, "the reference log-probabilities")
    if not all(math.isfinite(float(v.abs().max())) for v in reference.values() if v.numel()):
        raise ConfigError(
            f"problem {NAME!r}: the reference model's log-probabilities of the preference rows "
            "are not finite: the model overflows in this dtype; use dtype=float32"
        )
    return {**data, **reference}
