"""A small text data set, tokenizer and Llama made on this machine, for trying LLM fine-tuning.

``bilevel-ray text-samples DIR`` (or :func:`write_samples`) writes, with no download:

* a preference set and an instruction set in words: questions about a fixed table of 43 fruits,
  vegetables and animals, each with a colour, a size, a kind (fruit, vegetable or animal) and a
  taste (plants) or a sound (animals). The rule a small model can learn: a question asks one
  attribute of one item; the right answer states the table's value ("What colour is a banana?"
  -> "A banana is yellow."); a rejected answer has the same wording and a wrong value of the same
  attribute ("A banana is purple."). Questions and answers are drawn from several templates with
  ``random.Random(seed)``; the two sets ask differently worded questions (the question pool is
  split between them) about the same facts.
* each set in every format the text readers accept: ``preference.jsonl`` (``prompt``,
  ``chosen``, ``rejected``: the standard format, responses starting with a space because the
  prompt and a response are joined as they are), ``preference_chat.jsonl`` (the same rows as
  conversations: lists of ``{"role", "content"}`` messages), ``preference.parquet``;
  ``instruction.jsonl`` (``prompt``, ``completion``), ``instruction_messages.jsonl``
  (``messages``: user then assistant), ``instruction.csv``.
* ``tokenizer/``: a byte-level BPE tokenizer trained on the table's text, with ``<s>`` added in
  front, ``</s>`` ending each chat turn and a chat template (``<|user|>``, ``<|assistant|>``,
  ``<|system|>`` markers) whose generation prompt is a prefix of the rendered conversation.
* ``model/``: a Llama of random weights (seeded; its head tied to the input embeddings, as in
  Llama-3.2) sized to that tokenizer, saved with the tokenizer as a checkpoint folder is.

The command it prints next trains on these files; the same command works with a real checkpoint
folder and real data files in any of these formats.
"""

from __future__ import annotations

import csv
import json
import random
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bilevel_ray.atomic_files import atomic_text, atomic_write
from bilevel_ray.errors import ConfigError
from bilevel_ray.text.quiet import no_progress_bars
from bilevel_ray.text.sample_rows import (
    corpus,
    draw_rows,
    instruction_messages,
    preference_chat,
)

__all__ = ["MAX_ROWS", "MIN_ROWS", "SampleFiles", "write_samples", "written_lines"]

MIN_ROWS = 20
MAX_ROWS = 1_000_000
MARKER = "samples.json"  # lists what write_samples wrote: the folder may then be overwritten
# The marker's author: a fixed name, not __name__ (which a module run as a script changes).
WRITER = "bilevel_ray.text.samples"
MAX_POSITIONS = 256  # the model's context; every sample conversation is far shorter
VOCAB_TARGET = 1000  # BPE stops earlier: merges end once every word of the table is one token
# The sample model is for trying the pipeline out: a width, a depth and a size no such model
# needs (16384 x 64 is a 275-billion-parameter model: memory runs out while it is made).
MAX_HIDDEN = 4096
MAX_LAYERS = 64
MAX_PARAMETERS = 100_000_000  # 400 MB in float32: seconds to make and save on a CPU
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>")
# Every turn is "<|role|>content</s>" after one <s>; the generation prompt is the next turn's
# marker, so a prompt rendered with it is a prefix of the prompt rendered with its answer.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role'] + ': use system, user or assistant') }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + eos_token }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
FILES = {
    "preference": "preference.jsonl",
    "instruction": "instruction.jsonl",
    "preference_chat": "preference_chat.jsonl",
    "instruction_messages": "instruction_messages.jsonl",
    "preference_parquet": "preference.parquet",
    "instruction_csv": "instruction.csv",
    "tokenizer": "tokenizer",
    "model": "model",
}


@dataclass(frozen=True)
class SampleFiles:
    """What :func:`write_samples` wrote: the paths and how many rows each set holds."""

    folder: Path
    preference: Path
    instruction: Path
    preference_chat: Path
    instruction_messages: Path
    preference_parquet: Path
    instruction_csv: Path
    tokenizer: Path
    model: Path
    preference_rows: int
    instruction_rows: int

    def solve_command(self, *, steps: int = 200, out: str = "runs/text") -> str:
        """The command line that fine-tunes the sample model on the sample sets."""
        return shlex.join(
            [
                "bilevel-ray",
                "solve",
                "peft-dpo-sft",
                "--config",
                f"model={self.model}",
                "--config",
                f"preference={self.preference}",
                "--config",
                f"instruction={self.instruction}",
                "--steps",
                str(steps),
                "--out",
                out,
            ]
        )


def write_samples(
    folder: str | Path,
    *,
    rows: int = 600,
    seed: int = 0,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
) -> SampleFiles:
    """Write ``rows`` preference and ``rows`` instruction rows (in every format), a tokenizer
    trained on the table's text and a Llama of ``layers`` layers, width ``hidden`` and ``heads``
    heads into ``folder``: a new or empty folder, or one holding an earlier output of this
    function (it is replaced). The same ``seed`` writes the same files."""
    _check_settings(rows=rows, seed=seed, hidden=hidden, layers=layers, heads=heads)
    folder = Path(folder).expanduser()
    replaced = _replaced(folder)
    _check_libraries()
    _remove(replaced)
    folder.mkdir(parents=True, exist_ok=True)
    files = SampleFiles(
        folder=folder,
        **{field: folder / name for field, name in FILES.items()},
        preference_rows=rows,
        instruction_rows=rows,
    )
    # The marker first: an output cut short by an error can still be overwritten by a rerun.
    marker = {"written_by": WRITER, "files": sorted(FILES.values()), "rows": rows, "seed": seed}
    atomic_text(folder / MARKER, json.dumps(marker, indent=2) + "\n")

    preference, instruction = draw_rows(rows, random.Random(seed))
    _write_jsonl(files.preference, preference)
    _write_jsonl(files.instruction, instruction)
    _write_jsonl(files.preference_chat, (preference_chat(row) for row in preference))
    _write_jsonl(files.instruction_messages, (instruction_messages(row) for row in instruction))
    _write_parquet(files.preference_parquet, preference)
    _write_csv(files.instruction_csv, instruction)

    tokenizer = _train_tokenizer()
    _write_model(tokenizer, files, seed=seed, hidden=hidden, layers=layers, heads=heads)
    return files


def _check_settings(*, rows: int, seed: int, hidden: int, layers: int, heads: int) -> None:
    problems = []

    def whole(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    if not whole(rows) or not MIN_ROWS <= rows <= MAX_ROWS:
        problems.append(
            f"rows={rows!r}: must be a whole number from {MIN_ROWS} to {MAX_ROWS} (rows per set); "
            "pass --rows 600 (the default) or another count in that range"
        )
    if not whole(seed) or not 0 <= seed < 2**32:
        problems.append(
            f"seed={seed!r}: must be a whole number from 0 to {2**32 - 1}; pass --seed 0"
        )
    for name, value, most in (
        ("hidden", hidden, MAX_HIDDEN),
        ("layers", layers, MAX_LAYERS),
        ("heads", heads, MAX_HIDDEN // 2),
    ):
        if not whole(value) or value < 1:
            problems.append(f"{name}={value!r}: must be a whole number >= 1; pass e.g. {name}=2")
        elif value > most:
            shown = value if value < 10**30 else f"<an integer of {value.bit_length()} bits>"
            problems.append(
                f"{name}={shown}: too large; must be a whole number from 1 to {most} (a small "
                f"sample model); pass e.g. --{name} {dict(hidden=64, layers=2, heads=4)[name]}"
            )
    if not problems and parameter_count(hidden, layers) > MAX_PARAMETERS:
        problems.append(
            f"hidden={hidden}, layers={layers}: a model of about "
            f"{parameter_count(hidden, layers):,} parameters, more than the "
            f"{MAX_PARAMETERS:,} a sample model may have; pass a smaller --hidden or --layers "
            "(e.g. --hidden 128 --layers 4)"
        )
    if whole(hidden) and whole(heads) and heads >= 1 and hidden % (2 * heads):
        problems.append(
            f"hidden={hidden}, heads={heads}: hidden must be a multiple of 2 * heads (each head "
            "gets hidden / heads dimensions, an even number for the rotary position code); "
            f"pass e.g. hidden={heads * 16}"
        )
    if problems:
        raise ConfigError(problems)


def parameter_count(hidden: int, layers: int) -> int:
    """About how many parameters the sample Llama has: per layer four attention matrices and
    three MLP ones of width 4 * hidden, and the (tied) embedding of the vocabulary."""
    return layers * (4 * hidden**2 + 3 * 4 * hidden**2 + 2 * hidden) + VOCAB_TARGET * hidden


def _check_libraries() -> None:
    """Refuse before writing anything when the tokenizer or the model cannot be made."""
    from importlib.util import find_spec

    missing = [name for name in ("tokenizers", "transformers") if find_spec(name) is None]
    if missing:
        raise ConfigError(
            f"write_samples: needs {' and '.join(missing)} to make the tokenizer and the model; "
            "install them with pip install 'bilevel_ray[peft]'"
        )


def _replaced(folder: Path) -> list[Path]:
    """What writing into ``folder`` replaces: nothing for a new or empty folder, everything in
    it when it holds only an earlier output of :func:`write_samples`; anything else is refused
    (the output would mix with others' files)."""
    if folder.exists() and not folder.is_dir():
        raise ConfigError(
            f"folder {folder}: is a file, not a folder; pass the name of a new or empty folder"
        )
    present = sorted(folder.iterdir()) if folder.exists() else []
    if not present:
        return []
    ours = _earlier_output(folder)
    foreign = [p.name for p in present if ours is None or p.name not in ours]
    if foreign:
        more = f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
        shown = ", ".join(foreign[:5]) + more
        raise ConfigError(
            f"folder {folder}: holds files that write_samples did not write ({shown}); it writes "
            f"only into a new or empty folder or over its own earlier output (listed in its "
            f"{MARKER}); pass a new folder name, or remove those files"
        )
    return present


def _remove(paths: list[Path]) -> None:
    for path in paths:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def _earlier_output(folder: Path) -> set[str] | None:
    """The names an earlier :func:`write_samples` wrote into ``folder`` (its marker included), or
    None when the folder holds no readable marker of it."""
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("written_by") != WRITER:
        return None
    names = marker.get("files")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        return None
    # Only this function's own names: a hand-edited marker cannot make it delete other files.
    return ({*names} & {*FILES.values()}) | {MARKER}


def _write_jsonl(path: Path, rows: Any) -> None:
    atomic_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def _write_parquet(path: Path, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    atomic_write(path, lambda tmp: pq.write_table(pa.Table.from_pylist(rows), tmp))


def _write_csv(path: Path, rows: list[dict]) -> None:
    def write(tmp: Path) -> None:
        with tmp.open("w", encoding="utf-8", newline="") as out:
            writer = csv.DictWriter(out, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(path, write)


def _train_tokenizer() -> Any:
    """A byte-level BPE tokenizer trained on :func:`_corpus`: any text encodes (through its
    bytes) and decodes back exactly; ``<s>`` is added in front of each encoded text."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_TARGET,
        special_tokens=list(SPECIAL_TOKENS),
        # All 256 bytes, not only those of the table: a user's text then never needs <unk>.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus(), trainer)
    bos = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    wrapped = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>"],
        model_max_length=MAX_POSITIONS,
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def _write_model(
    tokenizer: Any, files: SampleFiles, *, seed: int, hidden: int, layers: int, heads: int
) -> None:
    """Save the tokenizer, then a seeded random Llama sized to it (with the tokenizer again,
    as a checkpoint folder holds its own)."""
    import torch
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=True,  # as Llama-3.2: the problem must untie the head it trains
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    # The caller's random state is left as it was: only this model's init uses the seed.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.LlamaForCausalLM(config)
    with no_progress_bars():
        tokenizer.save_pretrained(files.tokenizer)
        model.save_pretrained(files.model)
        tokenizer.save_pretrained(files.model)


def written_lines(files: SampleFiles, layers: int, hidden: int) -> list[str]:
    """One line per file :func:`write_samples` wrote, then the command that fine-tunes on
    them (what ``bilevel-ray text-samples`` prints)."""
    n_pref, n_inst = files.preference_rows, files.instruction_rows
    lines = [
        (files.preference, f"{n_pref} preference rows: prompt, chosen, rejected"),
        (files.instruction, f"{n_inst} instruction rows: prompt, completion"),
        (files.preference_chat, f"{n_pref} preference rows as chat messages"),
        (files.instruction_messages, f"{n_inst} instruction rows as chat messages"),
        (files.preference_parquet, f"{n_pref} preference rows"),
        (files.instruction_csv, f"{n_inst} instruction rows"),
        (files.tokenizer, "the tokenizer, with a chat template"),
        (files.model, f"a random Llama of {layers} layers, width {hidden}, with the tokenizer"),
    ]
    return [f"wrote {path}: {what}" for path, what in lines] + [f"next: {files.solve_command()}"]
