"""``br.export``: a finished ``peft-dpo-sft`` run's trained model in peft's own format, loadable
without bilevel_ray (``bilevel-ray export RUN_DIR --out DIR``).

The run's model is rebuilt from its ``run.json`` (the model alone, no data), its final x (the
LoRA adapters) and y (the output head) from ``result.pt`` are put in place, and ``DIR`` gets:

* ``adapter_config.json``, ``adapter_model.safetensors``: x, written by peft's
  ``save_pretrained`` (``PeftModel.from_pretrained`` reads them); ``base_model_name_or_path``
  names the base model's folder;
* ``head.safetensors``: y, the trained head (``weight``, and ``bias`` if it has one), in the
  run's dtype. The problem unties the head from the input embeddings, which stay frozen: the
  head is not in the adapter, and a tied base model must be untied before it is put in place;
* ``base_model/``: the base model with its initial weights, when the run built it from a config
  (``model`` None, a preset or a dict), since it exists nowhere else; a run on a model folder
  names that folder instead;
* the tokenizer's files, when the run had one (text data);
* ``export.json`` (where it came from, what each file holds) and ``README.md`` (the lines that
  load it).

Everything is written into a temporary folder beside ``DIR``, renamed to ``DIR`` at the end: a
failure leaves no half export.

The run folder is checked against its manifest first (``run.json`` and ``result.pt`` as the run
wrote them, the record unedited; :func:`~bilevel_ray.records.folder_check.check_folder`): an
edited file is refused by name, since the export would carry the edit (a ``lora_alpha`` the
adapter was not trained with) under the run's name. A folder without a manifest is exported
with a one-line note rather than refused: runs from before manifests have none, and everything
export takes from it is checked on reading (a built-in problem only, tensors only, shapes).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Any

import torch

from bilevel_ray.atomic_files import atomic_text
from bilevel_ray.errors import ConfigError
from bilevel_ray.registry import BUILTIN_FACTORIES
from bilevel_ray.runtime.local.output_files import check_output_path
from bilevel_ray.runtime.local.run_folder import read_result, read_run
from bilevel_ray.text.quiet import no_progress_bars

__all__ = ["EXPORT_FILE", "README_FILE", "export"]

PROBLEM = "peft-dpo-sft"
EXPORT_FILE = "export.json"
README_FILE = "README.md"
HEAD_FILE = "head.safetensors"
BASE_FOLDER = "base_model"


def export(run_dir: str | os.PathLike[str], out: str | os.PathLike[str]) -> Path:
    """Write the trained LoRA adapter (peft's format), the trained head, the tokenizer (if
    any), the base model (when the run built it from a config), ``export.json`` and
    ``README.md`` of the ``peft-dpo-sft`` run in ``run_dir`` into the new folder ``out``.
    Returns ``out``."""
    folder = Path(run_dir)
    record, config = _exportable_run(folder)
    out = _check_out(out)
    model, head_name, tokenizer, c = _rebuild(folder, config)
    x0 = {n: p for n, p in model.named_parameters() if re.search("lora_", n)}
    head = model.get_output_embeddings()
    y0 = {f"{head_name}.{n}": p for n, p in head.named_parameters()}
    x, y = read_result(folder, x0, y0, "export", then="export")

    final = out.parent.resolve() / out.name  # where the files end up (the paths they name)
    built = not _is_folder(c["model"])
    base = final / BASE_FOLDER if built else Path(c["model"]).resolve()
    initial = {n: p.detach().clone() for n, p in y0.items()} if built else {}
    with torch.no_grad():  # x and y into the model, by name
        for name, value in {**x, **y}.items():
            model.get_parameter(name).copy_(value)

    base_model = model.get_base_model()
    base_head = next(n for n, m in base_model.named_modules() if m is head)
    tensors = {n[len(head_name) + 1 :]: v.detach().contiguous().cpu() for n, v in y.items()}
    dtype = str(c["dtype"]).removeprefix("torch.")
    lines = load_lines(
        base,
        final,
        base_head,
        sorted(tensors),
        dtype,
        tokenizer is not None,
    )
    files = {
        "adapter_config.json": "x: the LoRA adapters' settings (peft)",
        "adapter_model.safetensors": "x: the trained LoRA adapters (peft)",
        HEAD_FILE: f"y: the trained head ({', '.join(sorted(tensors))}), {dtype}",
    }
    summary = {
        "run": str(folder.resolve()),
        "problem": PROBLEM,
        "problem_config": config,
        "method": record.get("method"),
        "switched_at_step": record.get("switched_at_step"),
        "steps": record.get("steps"),
        "seed": record.get("seed"),
        "held_out": record.get("held_out"),
        "dtype": dtype,
        "head": {"file": HEAD_FILE, "tensors": {k: f"{base_head}.{k}" for k in sorted(tensors)}},
        "base_model": str(base),
        "base_model_in_export": built,
        "tokenizer": tokenizer is not None,
        "load": lines,
    }

    def write(into: Path) -> None:
        from safetensors.torch import save_file

        # The folder the base model is found in, for AutoPeftModelForCausalLM; the embeddings
        # are frozen (not trained), so peft need not save them (its "auto" check would look the
        # base model up, on the Hub if the folder is not there yet).
        model.peft_config[model.active_adapter].base_model_name_or_path = str(base)
        with no_progress_bars():
            model.save_pretrained(str(into), save_embedding_layers=False)
            save_file(tensors, str(into / HEAD_FILE), metadata={"format": "pt"})
            if tokenizer is not None:
                before = set(os.listdir(into))
                tokenizer.save_pretrained(str(into))
                for name in sorted(set(os.listdir(into)) - before):
                    files[name] = "the run's tokenizer (AutoTokenizer.from_pretrained(DIR))"
            if built:
                # The base is the model the run started from: its frozen weights never moved,
                # the head goes back to its initial value, and unload() takes the LoRA layers
                # out without merging them (after the adapter is saved: unload changes the
                # model). disable_adapter() would only bypass them in forward: the saved
                # weights would still hold the LoRA layers.
                with torch.no_grad():
                    for name, value in initial.items():
                        model.get_parameter(name).copy_(value)
                model.unload().save_pretrained(str(into / BASE_FOLDER))
                files[BASE_FOLDER] = "the base model the run built, with its initial weights"
        files[EXPORT_FILE] = "where this came from and what each file holds"
        files[README_FILE] = "how to load it"
        text = json.dumps({**summary, "files": files}, indent=2, default=str) + "\n"
        atomic_text(into / EXPORT_FILE, text)
        atomic_text(into / README_FILE, _readme(folder, record, c, summary, files, built))

    _write_folder(out, write)
    return out


def _exportable_run(folder: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The run record of a finished ``peft-dpo-sft`` run in ``folder`` and its problem
    settings; anything else refused, with the way out."""
    record = read_run(folder, "export")
    problem = record["problem"]
    if problem not in (PROBLEM, BUILTIN_FACTORIES[PROBLEM]):
        raise ConfigError(
            f"export {str(folder)!r}: export writes the LoRA adapter and head of the "
            f"language-model problem {PROBLEM!r}; this run's problem is {problem!r}: its x and "
            f"y are in {str(folder / 'result.pt')!r} (torch.load(path, weights_only=True))"
        )
    if not os.path.lexists(folder / "result.pt"):
        raise ConfigError(
            f"export {str(folder)!r} holds no result.pt: the run did not finish (a run writes "
            "it at its end); resume it, then export"
        )
    config = record.get("problem_config") or {}
    if not isinstance(config, dict):
        raise ConfigError(
            f"export {str(folder)!r}: its run.json's problem_config is a "
            f"{type(config).__name__}, not the dict of the problem's settings: the file was not "
            "written by bilevel_ray or was altered; rerun the run"
        )
    return record, config


def load_lines(
    base: Path, out: Path, head: str, tensors: list[str], dtype: str, tokenizer: bool
) -> list[str]:
    """The Python lines that load the export in ``out`` with transformers and peft alone: the
    base model, the trained head in place of its own (untied), then the adapter."""
    simple = all(p.isidentifier() for p in head.split("."))
    module = f"base.{head}" if simple else "base.get_output_embeddings()"
    lines = [
        "import torch",
        "from peft import PeftModel",
        "from safetensors.torch import load_file",
        "from transformers import AutoModelForCausalLM" + (", AutoTokenizer" if tokenizer else ""),
        f"base = AutoModelForCausalLM.from_pretrained({str(base)!r}, dtype=torch.{dtype})",
        f"head = load_file({str(out / HEAD_FILE)!r})",
    ]
    lines += [f'{module}.{t} = torch.nn.Parameter(head["{t}"])' for t in tensors]
    lines += [
        "base.config.tie_word_embeddings = False  # the head is its own tensor",
        f"model = PeftModel.from_pretrained(base, {str(out)!r})",
    ]
    if tokenizer:
        lines.append(f"tokenizer = AutoTokenizer.from_pretrained({str(out)!r})")
    return lines


def _readme(
    folder: Path,
    record: dict[str, Any],
    c: dict[str, Any],
    summary: dict[str, Any],
    files: dict[str, str],
    built: bool,
) -> str:
    steps, method = record.get("steps"), record.get("method")
    targets = ", ".join(c["lora_targets"])
    listed = "\n".join(
        f"- `{name}{'/' if name == BASE_FOLDER else ''}`: {what}" for name, what in files.items()
    )
    where = (
        f"`{BASE_FOLDER}/` holds the base model: the run built it from a config, so it exists "
        "nowhere else. Its head is the initial one, which the trained head replaces."
        if built
        else f"The base model is the folder the run used: `{summary['base_model']}`."
    )
    tokenizer = (
        "The run's tokenizer is saved here."
        if summary["tokenizer"]
        else "The run trained on generated token ids: there is no tokenizer."
    )
    code = "\n".join(summary["load"])
    return f"""# LoRA adapter and head of a `{PROBLEM}` run

Exported by bilevel_ray from the run `{folder.resolve()}` ({method}, {steps} steps).

The run trained two groups of parameters of one causal language model, the rest frozen:

- x: the LoRA adapters (rank {c["lora_rank"]}, alpha {c["lora_alpha"]:g}, on {targets}), in
  peft's format;
- y: the output head, trained as its own tensor, separately from the input embeddings, which
  stayed frozen. The adapter alone, without this head, is not the trained model.

{listed}

{where} {tokenizer}

## Load

```python
{code}
```

`model` is the trained model, in eval mode and {summary["dtype"]}; `model.generate(...)` works
as for any transformers model. The head goes in before the adapter: a base model that ties
its head to the input embeddings (Llama-3.2 does) is untied by giving the head its own
tensor, and `tie_word_embeddings = False` keeps it untied. `AutoPeftModelForCausalLM` would
load the base model and the adapter but not the trained head. If you move this folder, change
the paths above.
"""


def _rebuild(folder: Path, config: dict[str, Any]) -> tuple[Any, str, Any, dict[str, Any]]:
    """The run's model as its factory built it (on the CPU, no data)."""
    from bilevel_ray.problems.peft_dpo_sft import peft_model

    try:
        return peft_model({**config, "device": "cpu"})
    except ConfigError as err:
        raise ConfigError(
            [
                f"export {str(folder)!r}: the run's model cannot be rebuilt from its run.json "
                f"({p}); export rebuilds the model the run trained: a model folder must still "
                "be where the run found it"
                for p in err.problems
            ]
        ) from None


def _is_folder(model: Any) -> bool:
    from bilevel_ray.problems.model_presets import PRESETS

    return isinstance(model, (str, os.PathLike)) and model not in PRESETS


def _check_out(out: str | os.PathLike[str]) -> Path:
    """``out``: a new folder, or an empty one (never a link: the rename would not follow it)."""
    path = check_output_path(out, "export --out", is_file=False)
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise ConfigError(
            f"export --out {str(path)!r} is a file or a link, not a folder; give a new folder "
            "(export creates it)"
        )
    if path.is_dir() and any(path.iterdir()):
        raise ConfigError(
            f"export --out {str(path)!r} exists and is not empty: export writes a new folder "
            "and never mixes its files with others; give a new or empty folder"
        )
    return path


def _write_folder(out: Path, write: Any) -> None:
    """``write(tmp)`` into a fresh folder beside ``out``, then rename it to ``out``."""
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = parent / f".{out.name[:80]}.{secrets.token_hex(6)}.tmp"
        tmp.mkdir()  # exclusive: never a folder someone else made
    except OSError as err:
        raise ConfigError(
            f"export --out {str(out)!r} cannot be created ({err.strerror}); choose another folder"
        ) from None
    try:
        write(tmp)
        if out.is_dir():
            out.rmdir()  # empty (checked): rename replaces only what is not there
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
