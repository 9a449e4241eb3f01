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
   it), 20 steps.

It prints one table and exits 0 only if every figure was measured (1 if one is missing, 2 on
a machine without CUDA, which it refuses before any work).

    .venv/bin/python benchmarks/gpu_check.py
    .venv/bin/python benchmarks/gpu_check.py --steps 10 --out benchmarks/results/gpu_check.parquet
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
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


def check(steps: int) -> list[dict[str, Any]]:
    import torch

    import bilevel_ray as br
    from bilevel_ray.problems.peft_dpo_sft import peft_dpo_sft
    from bilevel_ray.tree import to_device

    rows: list[dict[str, Any]] = []

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
    for precision in ("fp32", "bf16"):
        ratio = value("time", "pbgd_free", precision) / value("time", "plain_step", precision)
        print(f"pbgd_free / plain step, {precision}: {ratio:.2f}x")
    free, vpbgd = value("memory", "pbgd_free", "bf16"), value("memory", "pbgd", "bf16")
    print(f"peak memory pbgd_free / pbgd: {free / vpbgd:.2f}")
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
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print(
            "gpu_check: no CUDA device (torch.cuda.is_available() is False, torch "
            f"{torch.__version__}); run it on a machine with a GPU and a CUDA build of torch",
            file=sys.stderr,
        )
        return 2
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}", flush=True)
    started = time.perf_counter()
    rows = check(args.steps)
    ok = report(rows)
    import pyarrow as pa
    import pyarrow.parquet as pq

    args.out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), args.out)
    print(f"wrote {args.out} ({time.perf_counter() - started:.0f} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
