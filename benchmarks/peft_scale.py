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
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/peft_scale.parquet"))
    parser.add_argument("--child", nargs=3, metavar=("METHOD", "PRECISION", "IN_PLACE"))
    args = parser.parse_args()
    if args.steps < 1:
        parser.error("need --steps >= 1")
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
