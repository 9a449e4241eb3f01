"""The PEFT experiment at a realistic shape: time per step and memory per method and precision.

Setting: ``peft-dpo-sft`` with ``model="llama-100m"`` (a Llama of 105.8 M parameters with a
32 000-token vocabulary, random weights, no download; see ``bilevel_ray/problems/model_presets``):
x = LoRA adapters (rank 8 on q_proj and v_proj, 0.2 M parameters), y = the head lm_head
(32 000 x 768 = 24.6 M parameters, 98 MB in float32). Token ids over the whole vocabulary,
4 preference triples and 4 instruction pairs per step, sequences of 16 + 16 tokens; Adam at
both levels; each method's default K (pbgd_free 1, the others 5).

For each of pbgd_free, pbgd (V-PBGD), alt_pbgd and bome, in fp32 and bf16, a fresh subprocess
builds the problem, then runs one warm-up step and ``--steps`` timed steps on one torch thread:

* ``s/step``: median wall time of the timed steps;
* ``state MB``: bytes of every tensor in the solver state (x, y, optimizer moments, the
  value-function copy and its moments); ``new MB``: those not sharing memory with the model's
  own parameters (with ``in_place=True`` x and y are the model's parameters);
* ``RSS growth MB``: peak resident memory during init and the steps (sampled every 5 ms by a
  thread) minus the resident memory before ``solver.init``: the state plus the activations.

One more run of pbgd_free in fp32 with ``in_place=False`` shows the cost of a second working
copy of x and y (the solver's clones next to the model's parameters).

Targets: PBGD-Free's state bytes at most 0.6 x V-PBGD's (one copy of y against two, each with
its Adam moments), and bf16 no slower than fp32 on the CPU.

Run from the repository root (about 5 minutes on 2 CPU cores)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/peft_scale.py
    .venv/bin/python benchmarks/peft_scale.py --steps 2 --out benchmarks/results/peft_scale.parquet

Text mode (``--text``): the problem on a user's text against what a user would run instead, at
sequence length 256. The sample corpus (``bilevel_ray.text.samples``: its tokenizer and a seeded
random Llama, width 256, 4 layers, 4 heads by default) is written to a temporary folder; its
rows are short (about 15 tokens), so each benchmark row is the sample row preceded by other
sample question/answer pairs as context (a few-shot prompt), added while BOS + prompt +
completion + EOS stays within 256 tokens: every row then holds 240 to 256 tokens and nothing is
truncated (TRL keeps a sequence's start and would cut the completion of a longer one). Batch 4
preference triples and 4 instruction pairs; Adam / AdamW at 1e-4; float32; one torch thread;
each case in a fresh subprocess, with and without gradient checkpointing:

* ``pbgd_free``, ``pbgd``, ``alt_pbgd`` (each at its default K): ``solver.step`` of the
  ``peft-dpo-sft`` text problem (``preference=``, ``instruction=``, ``model=`` the sample
  folder, ``max_length=256``), the solver's default copies of x and y (as ``br.solve`` runs);
* ``trl_dpo``: TRL's ``DPOTrainer.train`` on the same preference rows, the same model with a
  peft ``LoraConfig`` of the same shape (rank 8, alpha 16, q_proj / v_proj, dropout 0), the same
  batch and max_length; its reference log-probabilities come from the adapter-disabled model in
  every step (TRL's default for a LoRA run); ``trl_dpo_pre`` the same with
  ``precompute_ref_log_probs=True`` (one reference pass over the rows before training, as the
  bilevel problem computes and caches them): the stricter baseline, shown beside the targets;
* ``sft_step``: a plain LoRA SFT step by hand (forward of the instruction batch with labels on
  the completion tokens, backward, AdamW step): the cost of one level alone.

Each: the median wall time of ``--steps`` steps after one warm-up step (TRL's: between its
``on_step_end`` callbacks, data loading included), non-pad tokens per step (a bilevel step
consumes its preference and its instruction rows; TRL's its chosen and rejected sequences),
tokens/s; the peak RSS over the RSS after the imports (model, data, trainer or problem, and the
steps: sampled every 5 ms) and the peak growth during the steps alone. Targets: PBGD-Free's
tokens/s at least 1 / 1.5 of TRL's (at most 1.5 x its time per token) and its peak at most 1.2 x
TRL's. TRL is a benchmark-only extra: without it those columns are skipped. Text mode takes about
4 minutes on 2 CPU cores, ``--quick`` (width 64, 2 layers, batch 2) about 1 minute::

    .venv/bin/python benchmarks/peft_scale.py --text
    .venv/bin/python benchmarks/peft_scale.py --text --quick --out peft_scale_text.parquet
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

METHODS = ("pbgd_free", "pbgd", "alt_pbgd", "bome")
PRECISIONS = ("fp32", "bf16")
PROBLEM = {
    "model": "llama-100m",
    "vocab": 32000,
    "batch": 4,
    "prompt_len": 16,
    "response_len": 16,
    "n_pref": 8,
    "n_sft": 8,
    "n_eval": 4,
}
STATE_TARGET = 0.6  # pbgd_free state bytes / pbgd state bytes

SCHEMA = pa.schema(
    [
        pa.field("method", pa.string()),
        pa.field("precision", pa.string()),
        pa.field("in_place", pa.bool_()),
        pa.field("inner_steps", pa.int64()),
        pa.field("s_per_step", pa.float64()),
        pa.field("s_per_step_min", pa.float64()),
        pa.field("state_mb", pa.float64()),
        pa.field("new_state_mb", pa.float64()),
        pa.field("rss_growth_mb", pa.float64()),
        pa.field("rss_before_mb", pa.float64()),
        pa.field("head_params", pa.int64()),
        pa.field("model_params", pa.int64()),
        pa.field("steps", pa.int64()),
        pa.field("torch_version", pa.string()),
    ]
)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakRss:
    """The peak resident memory while active, sampled by a thread."""

    def __init__(self, every_s: float = 0.005):
        self.every_s, self.peak, self._stop = every_s, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_mb())
            time.sleep(self.every_s)

    def __enter__(self) -> PeakRss:
        self.peak = _rss_mb()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mb())


def _tensors(tree: Any) -> list[Any]:
    import torch

    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        return [t for v in tree.values() for t in _tensors(v)]
    if isinstance(tree, (list, tuple)):
        return [t for v in tree for t in _tensors(v)]
    return []


def measure(method: str, precision: str, in_place: bool, steps: int) -> dict[str, Any]:
    """One run in this process (the child): build, init, warm-up, timed steps."""
    import torch

    import bilevel_ray as br
    from bilevel_ray.config import METHOD_OPTIONS
    from bilevel_ray.problems.peft_dpo_sft import peft_dpo_sft

    torch.set_num_threads(1)
    spec = peft_dpo_sft(PROBLEM)
    batches = br.data.as_batches(spec.data, 0)
    options: dict[str, Any] = {"optimizer": "adam", "lr_x": 1e-3, "lr_y": 1e-3}
    if "gamma" in METHOD_OPTIONS[method]:
        options["gamma"] = 10.0
    config = br.SolverConfig(method=method, precision=precision, in_place=in_place, **options)
    solver = config.build(spec.problem)
    model_storages = {p.untyped_storage().data_ptr() for p in spec.problem.model.parameters()}
    before = _rss_mb()
    times = []
    with PeakRss() as peak:
        state = solver.init(spec.x0, spec.y0)
        for i in range(steps + 1):
            batch = next(batches)
            start = time.perf_counter()
            state, metrics = solver.step(state, batch)
            float(metrics["upper/loss"])
            if i:  # the first step is a warm-up
                times.append(time.perf_counter() - start)
    tensors = _tensors(br.state_to_dict(state))
    state_bytes = sum(t.numel() * t.element_size() for t in tensors)
    new_bytes = sum(
        t.numel() * t.element_size()
        for t in tensors
        if t.untyped_storage().data_ptr() not in model_storages
    )
    return {
        "method": method,
        "precision": precision,
        "in_place": in_place,
        "inner_steps": config.option("inner_steps"),
        "s_per_step": statistics.median(times),
        "s_per_step_min": min(times),
        "state_mb": state_bytes / 2**20,
        "new_state_mb": new_bytes / 2**20,
        "rss_growth_mb": peak.peak - before,
        "rss_before_mb": before,
        "head_params": sum(t.numel() for t in spec.y0.values()),
        "model_params": sum(p.numel() for p in spec.problem.model.parameters()),
        "steps": steps,
        "torch_version": torch.__version__,
    }


def run_child(method: str, precision: str, in_place: bool, steps: int) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, __file__, "--child", method, precision, str(int(in_place))]
    done = subprocess.run(
        [*cmd, "--steps", str(steps)], capture_output=True, text=True, env=env, check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"{method} {precision} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(rows: list[dict[str, Any]]) -> bool:
    first = rows[0]
    print(
        f"\nllama-100m: {first['model_params'] / 1e6:.1f} M parameters, head y "
        f"{first['head_params'] / 1e6:.1f} M ({first['head_params'] * 4 / 2**20:.0f} MB in fp32); "
        f"{first['steps']} timed steps after a warm-up, 1 thread"
    )
    print(
        f"{'method':<10} {'prec':<5} {'in_place':>8} {'K':>2} {'s/step':>7} {'min':>6} "
        f"{'state MB':>9} {'new MB':>7} {'RSS growth MB':>14}"
    )
    for r in rows:
        print(
            f"{r['method']:<10} {r['precision']:<5} {r['in_place']!s:>8} "
            f"{r['inner_steps']:>2} {r['s_per_step']:>7.2f} {r['s_per_step_min']:>6.2f} "
            f"{r['state_mb']:>9.0f} {r['new_state_mb']:>7.0f} {r['rss_growth_mb']:>14.0f}"
        )

    def get(method: str, precision: str, in_place: bool = True) -> dict[str, Any]:
        return next(
            r
            for r in rows
            if (r["method"], r["precision"], r["in_place"]) == (method, precision, in_place)
        )

    ok = True
    print("\ntargets:")
    for precision in PRECISIONS:
        free, vpbgd = get("pbgd_free", precision), get("pbgd", precision)
        ratio = free["state_mb"] / vpbgd["state_mb"]
        passed = ratio <= STATE_TARGET
        ok &= passed
        print(
            f"  {precision}: pbgd_free state / pbgd state = {free['state_mb']:.0f} / "
            f"{vpbgd['state_mb']:.0f} MB = {ratio:.2f} (<= {STATE_TARGET}): "
            f"{'PASS' if passed else 'MISS'}; RSS growth {free['rss_growth_mb']:.0f} / "
            f"{vpbgd['rss_growth_mb']:.0f} MB = "
            f"{free['rss_growth_mb'] / vpbgd['rss_growth_mb']:.2f}"
        )
    for method in METHODS:
        fp32, bf16 = get(method, "fp32"), get(method, "bf16")
        ratio = bf16["s_per_step"] / fp32["s_per_step"]
        passed = ratio <= 1.0
        ok &= passed
        print(
            f"  {method}: bf16 / fp32 time per step = {bf16['s_per_step']:.2f} / "
            f"{fp32['s_per_step']:.2f} s = {ratio:.2f} (<= 1.00): {'PASS' if passed else 'MISS'}"
        )
    copies = [r for r in rows if not r["in_place"]]
    if copies:
        one, two = get("pbgd_free", "fp32"), copies[0]
        print(
            f"  one copy of the parameters: pbgd_free fp32 RSS growth {one['rss_growth_mb']:.0f} "
            f"MB with in_place=True against {two['rss_growth_mb']:.0f} MB with the solver's own "
            f"copy (new state {one['new_state_mb']:.0f} against {two['new_state_mb']:.0f} MB)"
        )
    return ok


# ---------------------------------------------------------------------------------------------
# Text mode: the problem on text at sequence length 256, against TRL's DPO step and a plain SFT
# step on the same model and rows.

TEXT_METHODS = ("pbgd_free", "pbgd", "alt_pbgd")
TEXT_LENGTH = 256
TEXT_SIZES = {"hidden": 256, "layers": 4, "heads": 4, "batch": 4, "steps": 3}
TEXT_QUICK = {"hidden": 64, "layers": 2, "heads": 4, "batch": 2, "steps": 2}
TEXT_LR = 1e-4
TEXT_LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "targets": ["q_proj", "v_proj"]}
TIME_TARGET = 1.5  # PBGD-Free's time per token / TRL's, at most
MEMORY_TARGET = 1.2  # PBGD-Free's peak memory / TRL's, at most
EVAL_ROWS = 4  # the problem needs held-out rows; they take no part in a step


def _text_length(tokenizer: Any, prompt: str, completions: list[str]) -> int:
    """Tokens of BOS + prompt + the longest completion + EOS, as both pipelines build them."""
    return max(len(tokenizer(prompt + c, verbose=False)["input_ids"]) for c in completions) + 1


def long_rows(rows: list[dict], tokenizer: Any, length: int, keys: tuple[str, ...]) -> list[dict]:
    """Each row with other rows' question and answer prepended as context (a few-shot prompt),
    added while the sequence stays within ``length`` tokens; a piece that would overflow is
    skipped for a shorter one, so every row ends within a few tokens of ``length``."""
    answer = keys[0]  # "chosen" or "completion": the context shows right answers
    out = []
    for i, row in enumerate(rows):
        context: list[str] = []
        misses = 0
        for j in range(i + 1, i + len(rows)):
            other = rows[j % len(rows)]
            piece = other["prompt"] + other[answer]
            prompt = " ".join([*context, piece, row["prompt"]])
            if _text_length(tokenizer, prompt, [row[k] for k in keys]) <= length:
                context.append(piece)
            else:
                misses += 1
                if misses == 20:
                    break
        out.append({**row, "prompt": " ".join([*context, row["prompt"]])})
    return out


def write_text_data(folder: Path, sizes: dict[str, int], steps: int) -> dict[str, Any]:
    """The sample corpus in ``folder`` and the rows of ~256 tokens built from it."""
    from transformers import AutoTokenizer

    from bilevel_ray.text.samples import write_samples

    count = max(32, sizes["batch"] * (steps + 2)) + EVAL_ROWS
    samples = write_samples(
        folder / "samples",
        rows=max(200, count),
        seed=0,
        hidden=sizes["hidden"],
        layers=sizes["layers"],
        heads=sizes["heads"],
    )
    tokenizer = AutoTokenizer.from_pretrained(str(samples.tokenizer), local_files_only=True)
    files: dict[str, str] = {}
    lengths = []
    for name, source, keys in (
        ("preference", samples.preference, ("chosen", "rejected")),
        ("instruction", samples.instruction, ("completion",)),
    ):
        rows = [json.loads(line) for line in source.read_text().splitlines()][:count]
        rows = long_rows(rows, tokenizer, TEXT_LENGTH, keys)
        lengths += [_text_length(tokenizer, r["prompt"], [r[k] for k in keys]) for r in rows]
        for part, chosen in (("", rows[EVAL_ROWS:]), ("eval_", rows[:EVAL_ROWS])):
            path = folder / f"{part}{name}.jsonl"
            path.write_text("".join(json.dumps(r) + "\n" for r in chosen))
            files[f"{part}{name}"] = str(path)
    return {
        "model": str(samples.model),
        **files,
        "cache_dir": str(folder / "cache"),
        "lengths": (min(lengths), statistics.fmean(lengths), max(lengths)),
    }


def _text_problem(job: dict[str, Any]) -> dict[str, Any]:
    keys = ("model", "preference", "instruction", "eval_preference", "eval_instruction")
    return {
        **{k: job["data"][k] for k in (*keys, "cache_dir")},
        "max_length": TEXT_LENGTH,
        "max_prompt_length": None,  # the rows are built to fit: nothing is cut
        "batch": job["batch"],
        "gradient_checkpointing": job["gc"],
        "lora_rank": TEXT_LORA["r"],
        "lora_alpha": float(TEXT_LORA["lora_alpha"]),
    }


def _lora_config() -> Any:
    import peft

    return peft.LoraConfig(
        r=TEXT_LORA["r"],
        lora_alpha=TEXT_LORA["lora_alpha"],
        lora_dropout=TEXT_LORA["lora_dropout"],
        target_modules=TEXT_LORA["targets"],
        bias="none",
        task_type="CAUSAL_LM",
    )


def _load_model(folder: str) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch.float32)


def text_bilevel(job: dict[str, Any]) -> dict[str, Any]:
    """A bilevel method's steps on the text problem."""
    import torch

    import bilevel_ray as br
    from bilevel_ray.config import METHOD_OPTIONS
    from bilevel_ray.problems.dpo_sft_losses import batch_tokens
    from bilevel_ray.problems.peft_dpo_sft import peft_dpo_sft

    base = _rss_mb()
    times, tokens, pref_tokens, losses = [], [], [], []
    with PeakRss() as total:
        spec = peft_dpo_sft(_text_problem(job))
        options: dict[str, Any] = {"optimizer": "adam", "lr_x": TEXT_LR, "lr_y": TEXT_LR}
        if "gamma" in METHOD_OPTIONS[job["name"]]:
            options["gamma"] = 10.0
        solver = br.SolverConfig(method=job["name"], **options).build(spec.problem)
        batches = br.data.as_batches(spec.data, 0)
        before = _rss_mb()
        with PeakRss() as train:
            state = solver.init(spec.x0, spec.y0)
            for i in range(job["steps"] + 1):
                batch = next(batches)
                start = time.perf_counter()
                state, metrics = solver.step(state, batch)
                losses.append(float(metrics["upper/loss"]))
                if i:  # the first step is a warm-up
                    times.append(time.perf_counter() - start)
                    tokens.append(int(spec.problem.batch_tokens(batch)))
                    pref_tokens.append(int(batch_tokens(batch.upper)))
    config = br.SolverConfig(method=job["name"], **options)
    return {
        "inner_steps": config.option("inner_steps"),
        "times": times,
        "tokens": tokens,
        "pref_tokens": pref_tokens,
        "losses": losses,
        "peak_mb": total.peak - base,
        "train_growth_mb": train.peak - before,
        "model_params": sum(p.numel() for p in spec.problem.model.parameters()),
        "vocab": spec.y0[next(iter(spec.y0))].shape[0],
        "torch_version": torch.__version__,
    }


def text_trl(job: dict[str, Any]) -> dict[str, Any]:
    """TRL's DPOTrainer on the same preference rows, model shape, LoRA, batch and length."""
    import datasets
    import torch
    import trl
    from transformers import AutoTokenizer, TrainerCallback

    class StepEnds(TrainerCallback):
        def __init__(self) -> None:
            self.marks: list[float] = []

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.marks.append(time.perf_counter())

    data = job["data"]
    rows = [json.loads(line) for line in Path(data["preference"]).read_text().splitlines()]
    base = _rss_mb()
    counts: list[int] = []
    clock = StepEnds()
    with tempfile.TemporaryDirectory() as scratch, PeakRss() as total:
        model = _load_model(data["model"])
        tokenizer = AutoTokenizer.from_pretrained(data["model"], local_files_only=True)
        config = trl.DPOConfig(
            output_dir=scratch,
            max_length=TEXT_LENGTH,
            per_device_train_batch_size=job["batch"],
            gradient_accumulation_steps=1,
            max_steps=job["steps"] + 1,  # the first step is a warm-up
            learning_rate=TEXT_LR,
            lr_scheduler_type="constant",
            beta=0.1,
            gradient_checkpointing=job["gc"],
            bf16=False,
            fp16=False,
            use_cpu=True,
            report_to=[],
            logging_strategy="no",
            save_strategy="no",
            disable_tqdm=True,
            dataloader_num_workers=0,
            seed=0,
            precompute_ref_log_probs=job["name"] == "trl_dpo_pre",
        )
        trainer = trl.DPOTrainer(
            model=model,
            args=config,
            train_dataset=datasets.Dataset.from_list(rows),
            processing_class=tokenizer,
            peft_config=_lora_config(),
            callbacks=[clock],
        )
        collate = trainer.data_collator

        def counting(examples: list[dict]) -> dict:
            out = collate(examples)
            counts.append(int(out["attention_mask"].sum()))
            return out

        trainer.data_collator = counting
        before = _rss_mb()
        with PeakRss() as train:
            result = trainer.train()
    marks = clock.marks
    return {
        "inner_steps": 0,
        "times": [b - a for a, b in itertools.pairwise(marks)],
        "tokens": counts[1 : len(marks)],  # the batches of the timed steps
        "pref_tokens": counts[1 : len(marks)],
        "losses": [float(result.training_loss)],
        "peak_mb": total.peak - base,
        "train_growth_mb": train.peak - before,
        "model_params": sum(p.numel() for p in model.parameters()),
        "vocab": model.get_output_embeddings().weight.shape[0],
        "torch_version": torch.__version__,
        "trl_version": trl.__version__,
    }


def text_sft(job: dict[str, Any]) -> dict[str, Any]:
    """A plain LoRA SFT step by hand on the instruction rows: one level's cost."""
    import peft
    import torch
    from transformers import AutoTokenizer

    data = job["data"]
    rows = [json.loads(line) for line in Path(data["instruction"]).read_text().splitlines()]
    base = _rss_mb()
    times, tokens, losses = [], [], []
    with PeakRss() as total:
        tokenizer = AutoTokenizer.from_pretrained(data["model"], local_files_only=True)
        model = peft.get_peft_model(_load_model(data["model"]), _lora_config())
        if job["gc"]:
            kwargs = {"use_reentrant": False}
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        model.train()  # transformers checkpoints only in training mode; the model has no dropout
        batches = []
        for i in range(0, len(rows) - job["batch"] + 1, job["batch"]):
            ids, labels = [], []
            for row in rows[i : i + job["batch"]]:
                prompt = tokenizer(row["prompt"])["input_ids"]
                completion = tokenizer(row["completion"], add_special_tokens=False)["input_ids"]
                completion = [*completion, tokenizer.eos_token_id]
                ids.append(prompt + completion)
                labels.append([-100] * len(prompt) + completion)
            width = max(map(len, ids))
            pad = tokenizer.pad_token_id
            batches.append(
                {
                    "input_ids": torch.tensor([r + [pad] * (width - len(r)) for r in ids]),
                    "attention_mask": torch.tensor(
                        [[1] * len(r) + [0] * (width - len(r)) for r in ids]
                    ),
                    "labels": torch.tensor([r + [-100] * (width - len(r)) for r in labels]),
                }
            )
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=TEXT_LR)
        before = _rss_mb()
        with PeakRss() as train:
            for i in range(job["steps"] + 1):
                batch = batches[i % len(batches)]
                start = time.perf_counter()
                loss = model(**batch).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(float(loss))
                if i:
                    times.append(time.perf_counter() - start)
                    tokens.append(int(batch["attention_mask"].sum()))
    return {
        "inner_steps": 0,
        "times": times,
        "tokens": tokens,
        "pref_tokens": [0] * len(tokens),
        "losses": losses,
        "peak_mb": total.peak - base,
        "train_growth_mb": train.peak - before,
        "model_params": sum(p.numel() for p in model.parameters()),
        "vocab": model.get_output_embeddings().weight.shape[0],
        "torch_version": torch.__version__,
    }


def text_measure(job: dict[str, Any]) -> dict[str, Any]:
    """One text case in this process (the child); its timings, tokens and memory."""
    import torch

    torch.set_num_threads(1)
    # Every module a case loads is imported before its baseline RSS: imports are not memory
    # use (TRL and transformers import their trainers lazily, bilevel_ray its text readers).
    import datasets  # noqa: F401
    import peft  # noqa: F401
    import pyarrow.parquet  # noqa: F401
    import transformers

    import bilevel_ray.problems.peft_dpo_sft
    import bilevel_ray.text.cache
    import bilevel_ray.text.tokenize  # noqa: F401

    for name in ("AutoModelForCausalLM", "AutoTokenizer", "TrainerCallback"):
        getattr(transformers, name)
    if job["kind"] == "trl":
        import trl

        for name in ("DPOConfig", "DPOTrainer"):
            getattr(trl, name)

    measure_case = {"bilevel": text_bilevel, "trl": text_trl, "sft": text_sft}[job["kind"]]
    got = measure_case(job)
    seconds = statistics.median(got["times"])
    per_step = statistics.fmean(got["tokens"])
    return {
        "kind": job["kind"],
        "name": job["name"],
        "gradient_checkpointing": job["gc"],
        "inner_steps": got["inner_steps"],
        "s_per_step": seconds,
        "s_per_step_min": min(got["times"]),
        "tokens_per_step": per_step,
        "pref_tokens_per_step": statistics.fmean(got["pref_tokens"]),
        "tokens_per_s": per_step / seconds,
        "peak_mb": got["peak_mb"],
        "train_growth_mb": got["train_growth_mb"],
        "losses_finite": all(math.isfinite(v) for v in got["losses"]),
        "model_params": got["model_params"],
        "vocab": got["vocab"],
        "batch": job["batch"],
        "steps": job["steps"],
        "torch_version": got["torch_version"],
        "trl_version": got.get("trl_version", ""),
    }


def run_text_child(job: dict[str, Any]) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, __file__, "--text-child", json.dumps(job)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"{job['name']} gc={job['gc']} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def text_report(rows: list[dict[str, Any]], data: dict[str, Any], sizes: dict[str, int]) -> bool:
    first = rows[0]
    low, mean, high = data["lengths"]
    print(
        f"\ntext: sample Llama width {sizes['hidden']}, {sizes['layers']} layers "
        f"({first['model_params'] / 1e6:.2f} M parameters, vocabulary {first['vocab']}); rows of "
        f"{low} to {high} tokens (mean {mean:.0f}, max_length {TEXT_LENGTH}); batch "
        f"{sizes['batch']}; {sizes['steps']} timed steps after a warm-up, 1 thread, float32"
    )
    print(
        f"{'case':<11} {'gc':<4} {'K':>2} {'s/step':>7} {'min':>6} {'tokens/step':>11} "
        f"{'tokens/s':>9} {'peak MB':>8} {'train +MB':>9} {'finite':>6}"
    )
    for r in rows:
        print(
            f"{r['name']:<11} {'on' if r['gradient_checkpointing'] else 'off':<4} "
            f"{r['inner_steps'] or '':>2} {r['s_per_step']:>7.3f} {r['s_per_step_min']:>6.3f} "
            f"{r['tokens_per_step']:>11.0f} {r['tokens_per_s']:>9.0f} {r['peak_mb']:>8.0f} "
            f"{r['train_growth_mb']:>9.0f} {r['losses_finite']!s:>6}"
        )
    print(
        "  (peak MB: the peak RSS over the RSS after the imports, model, data and steps "
        "included; train +MB: the peak growth during the steps)"
    )

    def get(name: str, gc: bool) -> dict[str, Any] | None:
        return next(
            (r for r in rows if (r["name"], r["gradient_checkpointing"]) == (name, gc)), None
        )

    ok = all(r["losses_finite"] for r in rows)
    print("\nratios (same batch, length and model; measured side by side in this run):")
    for gc in (False, True):
        sft_row = get("sft_step", gc)
        label = "gc on " if gc else "gc off"
        for method in TEXT_METHODS:
            r = get(method, gc)
            if r is None:
                continue
            if sft_row is not None:
                print(
                    f"  {label} {method:<9} step time / plain SFT step "
                    f"{r['s_per_step'] / sft_row['s_per_step']:.2f}x"
                )
            for baseline, what in (("trl_dpo", "TRL DPO step"), ("trl_dpo_pre", "TRL precomp.")):
                trl_row = get(baseline, gc)
                if trl_row is None:
                    continue
                speed = r["tokens_per_s"] / trl_row["tokens_per_s"]
                memory = r["peak_mb"] / trl_row["peak_mb"]
                step = r["s_per_step"] / trl_row["s_per_step"]
                line = (
                    f"  {label} {method:<9} vs {what}: tokens/s {speed:.2f}x (s/step "
                    f"{step:.2f}x), peak memory {memory:.2f}x, train growth "
                    f"{r['train_growth_mb'] / max(trl_row['train_growth_mb'], 1.0):.2f}x"
                )
                if method == "pbgd_free" and baseline == "trl_dpo":
                    fast, small = speed >= 1 / TIME_TARGET, memory <= MEMORY_TARGET
                    ok &= fast and small
                    line += (
                        f"\n  {'':<6} targets: tokens/s >= {1 / TIME_TARGET:.2f}x TRL's "
                        f"{'PASS' if fast else 'MISS'}; peak <= {MEMORY_TARGET}x TRL's "
                        f"{'PASS' if small else 'MISS'}"
                    )
                print(line)
    free_off, free_on = get("pbgd_free", False), get("pbgd_free", True)
    if free_off and free_on:
        slower = free_on["s_per_step"] / free_off["s_per_step"]
        print(
            f"  pbgd_free gradient checkpointing on / off: time {slower:.2f}x, train growth "
            f"{free_on['train_growth_mb']:.0f} / {free_off['train_growth_mb']:.0f} MB"
        )
    return ok


def text_main(args: argparse.Namespace) -> None:
    sizes = dict(TEXT_QUICK if args.quick else TEXT_SIZES)
    if args.steps_given:
        sizes["steps"] = args.steps
    started = time.perf_counter()
    try:
        import trl

        have_trl = True
        print(f"TRL {trl.__version__}")
    except ImportError as err:
        have_trl = False
        print(f"TRL is not installed ({err}): the TRL DPO columns are skipped")
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        data = write_text_data(Path(scratch), sizes, sizes["steps"])
        # Tokenize and compute the reference once here: each case reads them from the cache.
        from bilevel_ray.problems.peft_dpo_sft import peft_dpo_sft

        peft_dpo_sft(_text_problem({"data": data, "batch": sizes["batch"], "gc": False}))
        cases = [("bilevel", m) for m in TEXT_METHODS] + [("sft", "sft_step")]
        if have_trl:
            cases += [("trl", "trl_dpo"), ("trl", "trl_dpo_pre")]
        for gc in (False, True):
            for kind, name in cases:
                job = {"kind": kind, "name": name, "gc": gc, "data": data}
                job.update(batch=sizes["batch"], steps=sizes["steps"])
                row = run_text_child(job)
                print(
                    f"  {name} gc={'on' if gc else 'off'}: {row['s_per_step']:.3f} s/step, "
                    f"{row['tokens_per_s']:.0f} tokens/s, peak {row['peak_mb']:.0f} MB",
                    flush=True,
                )
                rows.append(row)
    ok = text_report(rows, data, sizes)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows), args.out)
        print(f"\nwrote {args.out}")
    print(f"\n({time.perf_counter() - started:.0f} s)")
    if not ok:
        print("some targets were missed (see above)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, help="timed steps after one warm-up (default 2)")
    parser.add_argument("--out", type=Path, help="Parquet file of the rows")
    parser.add_argument("--text", action="store_true", help="text mode: length 256, against TRL")
    parser.add_argument("--quick", action="store_true", help="text mode at small sizes")
    parser.add_argument("--child", nargs=3, metavar=("METHOD", "PRECISION", "IN_PLACE"))
    parser.add_argument("--text-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.steps_given = args.steps is not None
    if args.steps is None:
        args.steps = 2
    if args.steps < 1:
        parser.error("need --steps >= 1")
    if args.quick and not args.text:
        parser.error("--quick applies to --text")
    if args.text_child:
        print(json.dumps(text_measure(json.loads(args.text_child))))
        return
    if args.text:
        text_main(args)
        return
    if args.out is None:
        args.out = Path("benchmarks/results/peft_scale.parquet")
    if args.child:
        method, precision, in_place = args.child
        print(json.dumps(measure(method, precision, bool(int(in_place)), args.steps)))
        return
    started = time.perf_counter()
    rows = []
    runs = [(m, p, True) for m in METHODS for p in PRECISIONS] + [("pbgd_free", "fp32", False)]
    for method, precision, in_place in runs:
        row = run_child(method, precision, in_place, args.steps)
        print(
            f"  {method} {precision} in_place={in_place}: {row['s_per_step']:.2f} s/step, "
            f"RSS growth {row['rss_growth_mb']:.0f} MB",
            flush=True,
        )
        rows.append(row)
    ok = report(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), args.out)
    print(f"\nwrote {args.out} ({time.perf_counter() - started:.0f} s)")
    if not ok:
        print("some targets were missed (see above)")


if __name__ == "__main__":
    main()
