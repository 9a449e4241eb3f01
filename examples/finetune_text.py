"""Fine-tune a language model on your own text files, from the files to an exported adapter.

The ``peft-dpo-sft`` problem: x = LoRA adapters trained on DPO over a preference set (upper
level), y = the output head trained on SFT over an instruction set (lower level), solved with
PBGD-Free. This script writes the sample files (``bilevel-ray text-samples``: a preference set,
an instruction set, a tokenizer and a small random Llama, no download), solves, prints the
held-out metrics, exports the adapter and the head in peft's format, loads them back with
transformers and peft alone, and generates an answer to one question. The sample model is
small and random: its answer shows the path works, not a fluent model.

Run (needs ``pip install 'bilevel_ray[peft]'``; about a minute on 2 CPUs)::

    python examples/finetune_text.py
    python examples/finetune_text.py --steps 2000 --out runs/finetune
    python examples/finetune_text.py --data data/text          # a text-samples folder
    python examples/finetune_text.py --model path/to/Llama-3.2-3B \
        --preference pref.jsonl --instruction sft.jsonl \
        --config dtype=bfloat16 --config batch=8 --config max_length=512 --steps 500

With ``--model``, ``--preference`` and ``--instruction`` it runs on a local checkpoint folder and
your files (JSON Lines, JSON, Parquet, CSV or a ``datasets`` folder; see the guide's section
"Your model and your data"). ``--config KEY=VALUE`` sets any of the problem's settings.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import torch

import bilevel_ray as br
from bilevel_ray.problems.peft_dpo_sft import peft_dpo_sft
from bilevel_ray.text.formats import instruction_rows
from bilevel_ray.text.read import read_rows
from bilevel_ray.text.samples import write_samples


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data", type=Path, help="a text-samples folder to use (default: write one)"
    )
    parser.add_argument("--model", type=Path, help="a local checkpoint folder (with its tokenizer)")
    parser.add_argument("--preference", type=Path, help="the preference file (DPO, upper level)")
    parser.add_argument("--instruction", type=Path, help="the instruction file (SFT, lower level)")
    parser.add_argument("--rows", type=int, default=600, help="rows per sample set (default 600)")
    parser.add_argument("--steps", type=int, default=600, help="PBGD-Free steps (default 600)")
    parser.add_argument("--seed", type=int, default=0, help="the data split, model and run seed")
    parser.add_argument(
        "--out", type=Path, help="a new or empty folder for everything (default: a new temp one)"
    )
    parser.add_argument("--question", help="what to ask (default: the first instruction row's)")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument(
        "--threads",
        type=int,
        help="torch.set_num_threads (default: 1 for the small sample model, else torch's own)",
    )
    parser.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a problem setting, e.g. --config dtype=bfloat16 (VALUE read as JSON, else a string)",
    )
    return parser.parse_args()


def output_folder(out: Path | None) -> Path:
    if out is None:
        return Path(tempfile.mkdtemp(prefix="finetune_text-"))
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SystemExit(f"--out {out}: give a new or empty folder")
    out.mkdir(parents=True, exist_ok=True)
    return out


def data_files(args: argparse.Namespace, out: Path) -> dict[str, Path]:
    """The model folder and the two data files: the sample files (written into ``out/data``,
    or the ``--data`` folder), each replaced by ``--model``, ``--preference``, ``--instruction``."""
    given = {k: getattr(args, k) for k in ("model", "preference", "instruction")}
    if all(given.values()):
        return given
    if args.data is not None:
        folder = args.data
    else:
        folder = write_samples(out / "data", rows=args.rows, seed=args.seed).folder
        print(f"wrote the sample files to {folder}")
    samples = {
        "model": folder / "model",
        "preference": folder / "preference.jsonl",
        "instruction": folder / "instruction.jsonl",
    }
    return {k: v if v is not None else samples[k] for k, v in given.items()}


def problem_config(files: dict[str, Path], pairs: list[str], seed: int) -> dict[str, Any]:
    config: dict[str, Any] = {k: str(v) for k, v in files.items()}
    config["seed"] = seed
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep:
            raise SystemExit(f"--config {pair!r}: expected KEY=VALUE, e.g. --config lora_rank=16")
        try:
            config[key] = json.loads(raw)
        except json.JSONDecodeError:
            config[key] = raw
    return config


def write_run(folder: Path, config: dict[str, Any], result: br.SolveResult, seed: int) -> None:
    """The run's folder as ``bilevel-ray solve --out`` writes it: what br.export reads."""
    folder.mkdir(parents=True)
    torch.save({"x": result.x, "y": result.y}, folder / "result.pt")
    record = {
        "command": "solve",
        "problem": "peft-dpo-sft",
        "problem_config": config,
        "seed": seed,
        "steps": result.state.step,
        "method": result.config["method"],
        "switched_at_step": None,
        "settings": result.config,
        "held_out": result.held_out,
    }
    (folder / "run.json").write_text(json.dumps(record, indent=2, default=str) + "\n")


def load_export(adapter: Path) -> tuple[Any, Any]:
    """The trained model and its tokenizer, with transformers and peft alone (the lines of the
    export's README.md): the base model, the trained head in place of its own, the adapter."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    logging.disable_progress_bar()
    summary = json.loads((adapter / "export.json").read_text())
    dtype = getattr(torch, summary["dtype"])
    base = AutoModelForCausalLM.from_pretrained(summary["base_model"], dtype=dtype)
    head = load_file(str(adapter / "head.safetensors"))
    for name, value in head.items():  # the head's own tensor: a tied head is untied here
        setattr(base.get_output_embeddings(), name, torch.nn.Parameter(value))
    base.config.tie_word_embeddings = False
    model = PeftModel.from_pretrained(base, str(adapter))
    return model.eval(), AutoTokenizer.from_pretrained(str(adapter))


def first_instruction(path: Path) -> tuple[Any, Any]:
    """The prompt and completion of the instruction file's first row (a string each, or lists
    of chat messages)."""
    rows, _, _ = instruction_rows(read_rows(path, "instruction"), "instruction")
    return rows[0].prompt, rows[0].completion


def answer(model: Any, tokenizer: Any, prompt: Any, max_new_tokens: int) -> str:
    """Greedy generation after ``prompt``, encoded as the problem encodes a training prompt: the
    chat template with its generation prompt for messages, else the text with the start
    tokens."""
    if isinstance(prompt, list):
        ids = tokenizer.apply_chat_template(
            prompt, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
    else:
        ids = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            **ids,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


def shown(text: Any) -> str:
    if isinstance(text, list):  # chat messages: their contents
        return " | ".join(f"{m['role']}: {m['content']}" for m in text)
    return text.strip()


def main() -> None:
    args = parse_args()
    threads = 1 if args.threads is None and args.model is None else args.threads
    if threads is not None:
        torch.set_num_threads(threads)
    out = output_folder(args.out)
    files = data_files(args, out)
    config = problem_config(files, args.config, args.seed)
    try:
        spec = peft_dpo_sft(config)
        result = br.solve(spec, method="pbgd_free", steps=args.steps, seed=args.seed, progress=True)
    except br.ConfigError as err:
        raise SystemExit(f"error: {err}") from None
    last = result.history.to_pylist()[-1]
    print(f"pbgd_free: {last['step']} steps in {last['time/elapsed_s']:.1f} s")
    m = result.held_out
    print(f"held-out reward accuracy: {m['eval/reward_accuracy']:.3f}")
    print(f"held-out reward margin:   {m['eval/reward_margin']:.4f}")
    print(f"held-out SFT loss:        {m['eval/sft_loss']:.4f}")
    print(f"held-out SFT perplexity:  {m['eval/sft_perplexity']:.3f}")

    run = out / "run"
    write_run(run, config, result, args.seed)
    adapter = br.export(run, out / "adapter")
    print(f"exported the adapter and the head to {adapter} (loading lines: {adapter}/README.md)")

    model, tokenizer = load_export(adapter)
    if args.question is not None:
        prompt, reference = args.question, None
    else:
        prompt, reference = first_instruction(files["instruction"])
    print(f"question: {shown(prompt)}")
    print(f"answer:   {answer(model, tokenizer, prompt, args.max_new_tokens).strip()}")
    if reference is not None:
        print(f"(the file's completion: {shown(reference)})")


if __name__ == "__main__":
    main()
