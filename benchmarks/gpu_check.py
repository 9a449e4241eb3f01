"""The GPU check: one command, under 5 minutes on one GPU, for the figures a CPU cannot give.

On the realistic PEFT shape (``peft-dpo-sft`` with ``model="llama-100m"``: 105.8 M parameters,
a 32 000-token head y of 24.6 M; 16 preference triples and 16 instruction pairs of 64 + 64
tokens per step; Adam at both levels), on ``cuda:0``:

1. step time of PBGD-Free (K = 1) against ONE plain step (``torch.optim.Adam`` on the LoRA
   adapters and the head together: forward of the whole model on the preference batch, DPO
   loss, backward, step) in fp32 and in bf16 (``torch.autocast``; float32 parameters);
   medians over ``--steps`` steps after two warm-up steps, ``torch.cuda.synchronize`` around
   each;
2. peak GPU memory (``torch.cuda.max_memory_allocated``) of one step of every method in
   ``br.SOLVERS`` at its default K, in bf16, from the same model in memory, with
   ``in_place=True`` (the state is the model's own parameters);
3. a 1-worker ``br.train(..., use_gpu=True)`` of the tiny PEFT problem (a Ray Train worker
   group on the GPU: the worker's device, the batches moved to it, the checkpoint written from
   it), 20 steps;
4. the text path: the ``peft-dpo-sft`` problem on text (the local sample corpus of
   ``bilevel_ray.text.samples``, its tokenizer and a seeded random Llama of width 512, 8 layers;
   rows of about 256 tokens built as ``benchmarks/peft_scale.py --text`` builds them; batch 16)
   with ``dtype="bfloat16"`` and ``gradient_checkpointing=True`` on the GPU: ``--text-steps``
   PBGD-Free steps, every loss finite, the median step time, tokens per second (non-pad
   preference and instruction tokens) and the peak GPU memory; then, where the library has
   ``bilevel_ray.runtime.local.export``, a run of the same problem written with
   ``bilevel-ray solve --out`` and exported (peft's adapter files and the head), the export's
   time (skipped, and said so, where export does not exist).

It prints one table and exits 0 only if every figure was measured (1 if one is missing, 2 on
a machine without CUDA, which it refuses before any work). ``--text-only`` runs part 4 alone;
``--device cpu --quick`` rehearses it on the CPU at a small size (no GPU figure is measured).

    .venv/bin/python benchmarks/gpu_check.py
    .venv/bin/python benchmarks/gpu_check.py --steps 10 --out benchmarks/results/gpu_check.parquet
    .venv/bin/python benchmarks/gpu_check.py --device cpu --quick
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from importlib.util import find_spec
from pathlib import Path
from typing import Any

PROBLEM = {
    "model": "llama-100m",
    "vocab": 32000,
    "batch": 16,
    "prompt_len": 64,
    "response_len": 64,
    "n_pref": 64,
    "n_sft": 64,
    "n_eval": 16,
}
LR = 1e-4
# The text check's model and batch; the rows hold about 256 tokens (peft_scale's text rows).
TEXT = {"hidden": 512, "layers": 8, "heads": 8, "batch": 16, "steps": 20}
TEXT_QUICK = {"hidden": 64, "layers": 2, "heads": 4, "batch": 2, "steps": 3}


def _timed(step: Callable[[], Any], steps: int) -> float:
    import torch

    for _ in range(2):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def plain_step(spec: Any, batch: Any, precision: str) -> Callable[[], None]:
    """One Adam step of x and y together on f, by hand (the model's own parameters)."""
    import torch

    from bilevel_ray.problems.peft_dpo_sft import dpo_loss

    model = spec.problem.model
    names = set(spec.x0) | set(spec.y0)
    params = [p for n, p in model.named_parameters() if n in names]
    for n, p in model.named_parameters():
        p.requires_grad_(n in names)
    opt = torch.optim.Adam(params, lr=LR)
    dtype = {"fp32": None, "bf16": torch.bfloat16}[precision]

    def run() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = dpo_loss(model, batch.upper, beta=0.1, device="cuda")
        loss.backward()
        opt.step()

    return run


def solver_step(spec: Any, batch: Any, method: str, precision: str) -> Callable[[], None]:
    import bilevel_ray as br
    from bilevel_ray.config import METHOD_OPTIONS

    options: dict[str, Any] = {"optimizer": "adam", "lr_x": LR, "lr_y": LR}
    if "gamma" in METHOD_OPTIONS[method]:
        options["gamma"] = 10.0
    config = br.SolverConfig(method=method, precision=precision, in_place=True, **options)
    solver = config.build(spec.problem)
    state = [solver.init(spec.x0, spec.y0)]

    def run() -> None:
        state[0], _ = solver.step(state[0], batch)

    return run


Record = Callable[[str, str, str, Callable[[], float], str], None]


def recorder(rows: list[dict[str, Any]]) -> Record:
    """``record(part, name, precision, value, unit)``: measure ``value()`` into ``rows``; a
    failure is printed and recorded as NaN (a missing figure), and the check goes on."""

    def record(part: str, name: str, precision: str, value: Callable[[], float], unit: str):
        try:
            got = value()
        except Exception:  # a missing figure is reported, the check goes on
            traceback.print_exc()
            got = math.nan
        rows.append(
            {"part": part, "name": name, "precision": precision, "value": got, "unit": unit}
        )
        print(f"  {part:<8} {name:<12} {precision:<5} {got:10.4g} {unit}", flush=True)

    return record


def check(steps: int) -> list[dict[str, Any]]:
    import torch

    import bilevel_ray as br
    from bilevel_ray.problems.peft_dpo_sft import peft_dpo_sft
    from bilevel_ray.tree import to_device

    rows: list[dict[str, Any]] = []
    record = recorder(rows)

    spec = peft_dpo_sft({**PROBLEM, "device": "cuda"})
    batch = to_device(next(br.data.as_batches(spec.data, 0)), "cuda")
    for precision in ("fp32", "bf16"):
        record(
            "time",
            "plain_step",
            precision,
            lambda p=precision: _timed(plain_step(spec, batch, p), steps),
            "s",
        )
        record(
            "time",
            "pbgd_free",
            precision,
            lambda p=precision: _timed(solver_step(spec, batch, "pbgd_free", p), steps),
            "s",
        )
    for method in br.SOLVERS:
        fresh = peft_dpo_sft({**PROBLEM, "device": "cuda"})

        def peak(method: str = method, fresh: Any = fresh) -> float:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            solver_step(fresh, batch, method, "bf16")()
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / 2**20

        record("memory", method, "bf16", peak, "MiB")
        del fresh
        torch.cuda.empty_cache()

    def train() -> float:
        with tempfile.TemporaryDirectory() as folder:
            start = time.perf_counter()
            res = br.train(
                "peft-dpo-sft",
                problem_config={"n_pref": 256, "n_sft": 256, "n_eval": 64},
                steps=20,
                num_workers=1,
                use_gpu=True,
                storage_path=folder,
                name="gpu-check",
                report_every=10,
            )
            losses = res.history["upper/loss"].to_pylist()
            if not losses or not all(math.isfinite(v) for v in losses):
                raise RuntimeError(f"br.train on the GPU logged no finite losses: {losses}")
            return time.perf_counter() - start

    record("train", "1 worker gpu", "fp32", train, "s")
    return rows


def text_check(sizes: dict[str, int], device: str, rows: list[dict[str, Any]]) -> None:
    """Part 4: the text problem in bf16 with gradient checkpointing on ``device``; its export."""
    import torch

    # The text rows of ~256 tokens are peft_scale's (this folder is on sys.path when run).
    from peft_scale import TEXT_LENGTH, write_text_data

    import bilevel_ray as br
    from bilevel_ray.problems.peft_dpo_sft import peft_dpo_sft

    record = recorder(rows)
    cuda = device == "cuda"
    with tempfile.TemporaryDirectory() as scratch:
        data = write_text_data(Path(scratch), sizes, sizes["steps"])
        config = {
            k: data[k]
            for k in ("model", "preference", "instruction", "eval_preference", "eval_instruction")
        }
        config.update(
            cache_dir=data["cache_dir"],
            max_length=TEXT_LENGTH,
            max_prompt_length=None,
            batch=sizes["batch"],
            dtype="bfloat16",
            gradient_checkpointing=True,
            device=device,
        )
        spec = peft_dpo_sft(config)
        options = {"optimizer": "adam", "lr_x": LR, "lr_y": LR, "gamma": 10.0}
        solver = br.SolverConfig(method="pbgd_free", **options).build(spec.problem)
        batches = br.data.as_batches(spec.data, 0)
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        measured: dict[str, float] = {}

        def steps() -> float:
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            state = solver.init(spec.x0, spec.y0)
            times, tokens, losses = [], [], []
            for i in range(sizes["steps"] + 1):
                batch = next(batches)
                sync()
                start = time.perf_counter()
                state, metrics = solver.step(state, batch)
                losses += [float(metrics["upper/loss"]), float(metrics["lower/loss"])]
                sync()
                if i:  # the first step is a warm-up
                    times.append(time.perf_counter() - start)
                    tokens.append(int(spec.problem.batch_tokens(batch)))
            if not all(math.isfinite(v) for v in losses):
                raise RuntimeError(f"non-finite losses in bf16: {losses}")
            measured["tokens/s"] = statistics.fmean(tokens) / statistics.median(times)
            if cuda:
                measured["peak"] = torch.cuda.max_memory_allocated() / 2**20
            return statistics.median(times)

        record("text", "pbgd_free", "bf16gc", steps, "s")
        record("text", "tokens/s", "bf16gc", lambda: measured["tokens/s"], "tok/s")
        if cuda:
            record("text", "peak memory", "bf16gc", lambda: measured["peak"], "MiB")
        if find_spec("bilevel_ray.runtime.local.export") is None:
            print("  text     export: bilevel_ray.runtime.local.export does not exist; skipped")
            return

        def export() -> float:
            from bilevel_ray.cli import main as cli

            start = time.perf_counter()
            run, out = Path(scratch) / "run", Path(scratch) / "export"
            argv = ["solve", "peft-dpo-sft", "--steps", str(sizes["steps"]), "--out", str(run)]
            argv += ["--quiet", "--set", f"lr_x={LR}", "--set", f"lr_y={LR}"]
            # Values as JSON (true, null, numbers); paths and names stay plain strings.
            argv += [
                f"--config={k}={v if isinstance(v, str) else json.dumps(v)}"
                for k, v in config.items()
            ]
            said = io.StringIO()
            with contextlib.redirect_stdout(said):  # the run's own summary: shown on failure
                code = cli(argv)
            if code != 0:
                raise RuntimeError(f"bilevel-ray {' '.join(argv)} failed:\n{said.getvalue()}")
            br.export(run, out)
            wanted = {"adapter_config.json", "adapter_model.safetensors", "head.safetensors"}
            missing = wanted - {p.name for p in out.iterdir()}
            if missing:
                raise RuntimeError(f"the export lacks {sorted(missing)}")
            return time.perf_counter() - start

        record("text", "solve+export", "bf16gc", export, "s")


def report(rows: list[dict[str, Any]]) -> bool:
    def value(part: str, name: str, precision: str) -> float:
        return next(
            r["value"]
            for r in rows
            if (r["part"], r["name"], r["precision"]) == (part, name, precision)
        )

    print("\nGPU check (median step times, peak memory of one step)")
    print(f"{'part':<8} {'name':<14} {'precision':<9} {'value':>10} {'unit':<4}")
    for r in rows:
        print(
            f"{r['part']:<8} {r['name']:<14} {r['precision']:<9} {r['value']:>10.4g} {r['unit']:<4}"
        )
    parts = {r["part"] for r in rows}
    if "time" in parts:
        for precision in ("fp32", "bf16"):
            ratio = value("time", "pbgd_free", precision) / value("time", "plain_step", precision)
            print(f"pbgd_free / plain step, {precision}: {ratio:.2f}x")
    if "memory" in parts:
        free, vpbgd = value("memory", "pbgd_free", "bf16"), value("memory", "pbgd", "bf16")
        print(f"peak memory pbgd_free / pbgd: {free / vpbgd:.2f}")
    if any(r["part"] == "text" and r["name"] == "pbgd_free" for r in rows):
        print(
            f"text, bf16 + gradient checkpointing: {value('text', 'pbgd_free', 'bf16gc'):.3g} "
            f"s/step, {value('text', 'tokens/s', 'bf16gc'):.0f} tokens/s"
        )
    missing = [
        f"{r['part']}/{r['name']}/{r['precision']}" for r in rows if not math.isfinite(r["value"])
    ]
    if missing:
        print(f"MISSING figures: {', '.join(missing)}")
    return not missing


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps (after 2 warm-ups)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu_check.parquet"))
    parser.add_argument("--text-steps", type=int, help="text check steps (default 20)")
    parser.add_argument("--text-only", action="store_true", help="run the text check alone")
    parser.add_argument(
        "--device",
        choices=("cuda", "cpu"),
        default="cuda",
        help="cpu: rehearse the text check on the CPU (implies --text-only)",
    )
    parser.add_argument("--quick", action="store_true", help="the text check at a small size")
    args = parser.parse_args()
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            "gpu_check: no CUDA device (torch.cuda.is_available() is False, torch "
            f"{torch.__version__}); run it on a machine with a GPU and a CUDA build of torch "
            "(--device cpu --quick rehearses the text check on the CPU)",
            file=sys.stderr,
        )
        return 2
    where = torch.cuda.get_device_name(0) if args.device == "cuda" else "the CPU (rehearsal)"
    print(f"torch {torch.__version__}, {where}", flush=True)
    sizes = dict(TEXT_QUICK if args.quick else TEXT)
    if args.text_steps is not None:
        sizes["steps"] = args.text_steps
    started = time.perf_counter()
    rows = [] if args.text_only or args.device == "cpu" else check(args.steps)
    try:
        text_check(sizes, args.device, rows)
    except Exception:  # the text problem could not be built: its figures are missing
        traceback.print_exc()
        rows.append(
            {"part": "text", "name": "build", "precision": "bf16gc", "value": math.nan, "unit": ""}
        )
    ok = report(rows)
    import pyarrow as pa
    import pyarrow.parquet as pq

    args.out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), args.out)
    print(f"wrote {args.out} ({time.perf_counter() - started:.0f} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
