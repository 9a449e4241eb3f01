"""Every solver in ``br.SOLVERS`` on two problems, under the same wall-clock budget per run.

Problems, each with its factory's ``defaults`` (the same optimizer and step sizes for every
method) plus each method's own knobs from ``METHOD_OPTIONS``:

* ``representation`` (the paper's NLSY79 experiment, digest §3.4): x = an MLP feature extractor
  21-200-200, y = a linear head; f = MSE on group 0, g = MSE on group 1; batches of 500 per group;
  Adam at both levels, lr_x = lr_y = 1e-3; gamma = 10. ``--data`` names the processed NLSY79 CSV,
  otherwise the factory's synthetic data of the same shape is used. Metric: test MSE (group 0).
* ``hyperclean`` (data hyper-cleaning on scikit-learn's digits, 40% corrupted labels, linear
  classifier, full batch): Adam, lr_x = 0.1, lr_y = 0.01; gamma = 10. Metric: test CE.
  Its f reaches x only through y*(x), so PBGD-Free's x step is zero and ``br.solve`` refuses it;
  the run records PBGD-Free as not applicable with that refusal's reason.

Method knobs: pbgd_free K = 1; pbgd, alt_pbgd, f2sa, bome K = 5 (bome eta 0.5, f2sa no multiplier
growth); implicit_cg K = 20 inner steps and 10 CG iterations. Adam eps: the library default (1e-8)
unless ``--adam-eps`` (the paper used 1e-3).

Protocol: each (problem, method, seed) runs in a fresh subprocess on ``--threads`` torch threads
(default 1). The seed sets the problem (split, initialisation, synthetic data) and the batch order,
identically for every method. The solver is stepped directly (``SolverConfig.build`` and the
problem's data stream) for ``--seconds`` of step time; every ``seconds / --evals`` (and at
``evals // 2`` log-spaced times before that, where the early progress is) the clock stops and the
held-out test loss is computed (``evaluate(..., with_gap=False)``), giving curves of the test
metric against step time and against steps. The order of the methods rotates with the seed.

Reported per (problem, method): steps done, final test metric (mean ± std over seeds), time to
target, peak memory. The target is per problem and seed: ``--target-factor`` (1.05) x the best
final test metric of any method on that seed, computed after all runs; the time to target is the
step time of the first evaluation at or below it (resolution ``seconds / evals`` after the first
interval), or "not reached". Looser targets (1.25, 1.5, 2 x) and process CPU time (less
sensitive to other load on the machine) are shown for context. Memory: the bytes of the tensors
in the solver state (x, y, optimizer moments, the methods' extra copies such as PBGD's
value-function head), and the growth of the resident set's high-water mark during training over
the mark reset after building the problem (VmHWM, reset through /proc/self/clear_refs;
``ru_maxrss`` is recorded too, but in a child started by exec it keeps the parent's peak, so it
cannot show a small run's own growth).

Acceptance (the issue): on representation, PBGD-Free reaches the target test MSE at least 2x
sooner in wall time than pbgd (5 inner steps) and implicit_cg, at equal or better final MSE.

Run from the repository root (defaults: 20 s per run, seeds 0 1 2, both problems: about 13
minutes)::

    .venv/bin/python benchmarks/compare_methods.py
    .venv/bin/python benchmarks/compare_methods.py --data nlsy79-processed.csv \\
        --problems representation --out benchmarks/results/compare_methods_nlsy.parquet
    .venv/bin/python benchmarks/compare_methods.py \\
        --report benchmarks/results/compare_methods.parquet   # summary and PNG of saved runs
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import resource
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from isolated_runs import reset_peak, run_child, status_mib

import bilevel_ray as br
from bilevel_ray.config import METHOD_OPTIONS, SolverConfig
from bilevel_ray.data import as_batches
from bilevel_ray.errors import ConfigError
from bilevel_ray.evaluation import evaluate
from bilevel_ray.problem import check_losses, check_params, check_problem
from bilevel_ray.problems import BUILTIN_PROBLEMS, heldout_accuracy
from bilevel_ray.runtime.local.checkpoint import tensor_bytes

PROBLEMS = {"representation": "test MSE", "hyperclean": "test CE"}
METHODS = list(br.SOLVERS)
MIN_SEEDS = 3
SPEEDUP_TARGET = 2.0
REFERENCES = ("pbgd", "implicit_cg")  # what PBGD-Free's time to target is compared with
FACTORS = (1.05, 1.25, 1.5, 2.0)  # looser targets, x the best final, reported for context

SCHEMA = pa.schema(
    [
        pa.field("problem", pa.string()),
        pa.field("data", pa.string()),
        pa.field("method", pa.string()),
        pa.field("seed", pa.int64()),
        pa.field("status", pa.string()),
        pa.field("reason", pa.string()),
        pa.field("settings", pa.string()),
        pa.field("steps", pa.int64()),
        pa.field("train_s", pa.float64()),
        pa.field("train_cpu_s", pa.float64()),
        pa.field("ms_per_step", pa.float64()),
        pa.field("start_metric", pa.float64()),
        pa.field("final_metric", pa.float64()),
        pa.field("final_accuracy", pa.float64()),
        pa.field("target", pa.float64()),
        pa.field("time_to_target_s", pa.float64()),
        pa.field("cpu_to_target_s", pa.float64()),
        pa.field("steps_to_target", pa.int64()),
        pa.field("state_bytes", pa.int64()),
        pa.field("extra_state_bytes", pa.int64()),
        pa.field("peak_rss_growth_mib", pa.float64()),
        pa.field("ru_maxrss_growth_mib", pa.float64()),
        pa.field("peak_reset", pa.bool_()),
        pa.field("curve_s", pa.list_(pa.float64())),
        pa.field("curve_cpu_s", pa.list_(pa.float64())),
        pa.field("curve_step", pa.list_(pa.int64())),
        pa.field("curve_metric", pa.list_(pa.float64())),
        pa.field("seconds", pa.float64()),
        pa.field("evals", pa.int64()),
        pa.field("threads", pa.int64()),
        pa.field("torch_version", pa.string()),
    ]
)


# ---------------------------------------------------------------------------------------------
# One run, in its own process.


def _ru_maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def build_spec(problem: str, seed: int, data: str | None) -> br.ProblemSpec:
    config: dict[str, Any] = {"seed": seed}
    if problem == "representation" and data is not None:
        config["data"] = data
    return BUILTIN_PROBLEMS[problem](config)


def method_settings(method: str, spec: br.ProblemSpec, adam_eps: float | None) -> dict[str, Any]:
    """The method's knobs, overridden by the problem's defaults that apply to it (not ``steps``:
    the budget is wall time)."""
    applicable = SolverConfig.applicable(method, spec.defaults)
    settings = {**METHOD_OPTIONS[method], **applicable}
    settings.pop("steps", None)
    settings["eps"] = SolverConfig.eps if adam_eps is None else adam_eps
    return settings


def eval_times(seconds: float, evals: int) -> list[float]:
    """``evals`` evenly spaced step times, plus ``evals // 2`` log-spaced ones before the first:
    on real data the test loss can bottom out within the first interval."""
    first = seconds / evals
    early = np.geomspace(first / 20, first, evals // 2 + 1)[:-1] if evals > 1 else []
    return sorted({*map(float, early), *(first * k for k in range(1, evals + 1))})


def run_one(
    problem: str,
    method: str,
    seed: int,
    seconds: float,
    evals: int,
    data: str | None,
    threads: int,
    adam_eps: float | None,
) -> dict[str, Any]:
    """Train for ``seconds`` of step time, evaluating every ``seconds / evals`` off the clock."""
    torch.set_num_threads(threads)
    spec = build_spec(problem, seed, data)
    settings = method_settings(method, spec, adam_eps)
    row: dict[str, Any] = {
        "problem": problem,
        "method": method,
        "seed": seed,
        "settings": json.dumps(settings, sort_keys=True),
    }
    solver = SolverConfig(method=method, **settings).build(spec.problem)
    torch.manual_seed(seed)  # as br.solve does: the seeded RNG covers the data stream
    batches = as_batches(spec.data, seed)
    first = next(batches)
    # The validation br.solve runs before step 0: it refuses PBGD-Free where f does not reach x.
    try:
        check_problem(spec.problem)
        check_params(spec.x0, spec.y0)
        check_losses(spec.problem, spec.x0, spec.y0, first, upper_needs_x=method == "pbgd_free")
    except ConfigError as err:
        return {**row, "status": "not applicable", "reason": str(err)}
    state = solver.init(spec.x0, spec.y0)

    def test_metric() -> float:
        scores = evaluate(spec.problem, state.x, state.y, spec.eval_data, with_gap=False)
        return scores["eval/upper_loss"]

    curve_s, curve_cpu, curve_step, curve_metric = [0.0], [0.0], [0], [test_metric()]
    gc.collect()
    reset = reset_peak()
    base_hwm, base_ru = status_mib("VmRSS" if reset else "VmHWM"), _ru_maxrss_mib()
    status, reason, steps, train_s, train_cpu = "ok", "", 0, 0.0, 0.0
    pending = [first]
    for boundary in eval_times(seconds, evals):
        if train_s >= boundary:
            continue  # the last step ran past this evaluation time
        wall0, cpu0 = time.perf_counter(), time.process_time()
        try:
            while train_s + time.perf_counter() - wall0 < boundary:
                batch = pending.pop() if pending else next(batches)
                state, _ = solver.step(state, batch)
                steps += 1
        except Exception as err:  # a solver failing mid-run is a result to report, not a crash
            status, reason = "failed", f"{type(err).__name__}: {err}"
        train_s += time.perf_counter() - wall0
        train_cpu += time.process_time() - cpu0
        if status != "ok":
            break
        curve_s.append(train_s)
        curve_cpu.append(train_cpu)
        curve_step.append(steps)
        curve_metric.append(test_metric())
        if not math.isfinite(curve_metric[-1]):
            status, reason = "diverged", f"non-finite test metric at step {steps}"
            break
    hwm, ru = status_mib("VmHWM"), _ru_maxrss_mib()
    accuracy = heldout_accuracy(spec, state.y) if problem == "hyperclean" else math.nan
    extra = {
        "extra": state.extra,
        "opt": {k: v for k, v in state.opt.items() if k not in ("x", "y")},
    }
    return {
        **row,
        "status": status,
        "reason": reason,
        "steps": steps,
        "train_s": train_s,
        "train_cpu_s": train_cpu,
        "ms_per_step": 1e3 * train_s / max(steps, 1),
        "start_metric": curve_metric[0],
        "final_metric": curve_metric[-1],
        "final_accuracy": accuracy,
        "state_bytes": tensor_bytes(br.state_to_dict(state)),
        "extra_state_bytes": tensor_bytes(extra),
        "peak_rss_growth_mib": max(hwm - base_hwm, 0.0),
        "ru_maxrss_growth_mib": max(ru - base_ru, 0.0),
        "peak_reset": reset,
        "curve_s": curve_s,
        "curve_cpu_s": curve_cpu,
        "curve_step": curve_step,
        "curve_metric": curve_metric,
    }


# ---------------------------------------------------------------------------------------------
# The driver: every run in a fresh subprocess, then targets, the table, ratios, files.


def spawn(problem: str, method: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    job = {
        "problem": problem,
        "method": method,
        "seed": seed,
        "seconds": args.seconds,
        "evals": args.evals,
        "data": None if args.data is None else str(args.data),
        "threads": args.threads,
        "adam_eps": args.adam_eps,
    }
    return run_child(__file__, job, args.seconds * 4 + 300, f"{problem} {method} seed {seed}")


def _first(run: dict, threshold: float, axis: str) -> float | None:
    """``axis`` (a curve) at the run's first evaluation at or below ``threshold``, else None."""
    hit = next((i for i, m in enumerate(run["curve_metric"]) if m <= threshold), None)
    return None if hit is None else run[axis][hit]


def _best_final(rows: list[dict], problem: str, seed: int) -> float:
    finals = [
        r["final_metric"]
        for r in rows
        if r["problem"] == problem and r["seed"] == seed and r["status"] == "ok"
    ]
    return min(finals) if finals else math.nan


def add_targets(rows: list[dict[str, Any]], factor: float) -> None:
    """Per problem and seed: target = factor x the best final metric of any completed run."""
    for row in rows:
        row["target"] = factor * _best_final(rows, row["problem"], row["seed"])
        if row["status"] == "ok":
            row["time_to_target_s"] = _first(row, row["target"], "curve_s")
            row["cpu_to_target_s"] = _first(row, row["target"], "curve_cpu_s")
            row["steps_to_target"] = _first(row, row["target"], "curve_step")


def _mean_std(values: list[float], digits: int = 4) -> str:
    if not values:
        return "-"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.{digits}f} ± {spread:.{digits}f}"


def _runs(rows: list[dict], problem: str, method: str) -> list[dict]:
    return sorted(
        (r for r in rows if r["problem"] == problem and r["method"] == method),
        key=lambda r: r["seed"],
    )


def report_problem(rows: list[dict], problem: str, args: argparse.Namespace) -> None:
    metric = PROBLEMS[problem]
    runs = [r for r in rows if r["problem"] == problem]
    targets = {r["seed"]: r["target"] for r in runs}
    starts = [r["start_metric"] for r in runs if r["status"] == "ok"]
    print(
        f"\n== {problem} ({runs[0]['data']}): {metric}, {args.seconds:g} s of step time per run, "
        f"seeds {args.seeds}; at the start {_mean_std(starts)}"
    )
    print(
        f"   target per seed = {args.target_factor:g} x best final: "
        + ", ".join(f"seed {s}: {t:.4f}" for s, t in sorted(targets.items()))
    )
    acc = problem == "hyperclean"
    print(
        f"{'method':<12} {'steps':>6} {'ms/step':>8} {'final ' + metric:>19} "
        f"{'time to target s':>22} {'steps to tgt':>12} {'state KiB':>9} {'extra KiB':>9} "
        f"{'peak +MiB':>9}" + (f" {'test acc':>8}" if acc else "")
    )
    for method in METHODS:
        done = _runs(rows, problem, method)
        ok = [r for r in done if r["status"] == "ok"]
        if not ok:
            reasons = {r["status"]: r["reason"] for r in done}
            for status, reason in reasons.items():
                print(f"{method:<12} {status}: {reason}")
            continue
        reached = [r for r in ok if r.get("time_to_target_s") is not None]
        when = _mean_std([r["time_to_target_s"] for r in reached], 2) if reached else "not reached"
        when += f" ({len(reached)}/{len(ok)})"
        to_step = statistics.fmean(r["steps_to_target"] for r in reached) if reached else math.nan
        line = (
            f"{method:<12} {statistics.fmean(r['steps'] for r in ok):>6.0f} "
            f"{statistics.fmean(r['ms_per_step'] for r in ok):>8.2f} "
            f"{_mean_std([r['final_metric'] for r in ok]):>19} {when:>22} {to_step:>12.0f} "
            f"{statistics.fmean(r['state_bytes'] for r in ok) / 1024:>9.1f} "
            f"{statistics.fmean(r['extra_state_bytes'] for r in ok) / 1024:>9.1f} "
            f"{statistics.fmean(r['peak_rss_growth_mib'] for r in ok):>9.1f}"
        )
        if acc:
            line += f" {statistics.fmean(r['final_accuracy'] for r in ok):>8.4f}"
        print(line)
        for r in done:
            if r["status"] != "ok":
                print(f"{'':<12} seed {r['seed']} {r['status']}: {r['reason']}")
    report_factors(rows, problem, sorted({args.target_factor, *FACTORS}))
    if not all(r["peak_reset"] for r in runs if r["status"] == "ok"):
        print("   note: the peak could not be reset; peak growth is over the build peak")


def _speedup(free: list[tuple], other: list[tuple]) -> tuple[str, bool]:
    """Other's mean time to target over PBGD-Free's, from (time or None, time spent) per seed;
    a run that never reached the target counts with the time it spent, making the ratio a lower
    bound (shown with >=)."""
    if any(t is None for t, _ in free):
        return "n/a (PBGD-Free did not reach it on every seed)", False
    times = [spent if t is None else t for t, spent in other]
    ratio = statistics.fmean(times) / statistics.fmean(t for t, _ in free)
    per_seed = ", ".join(
        (">=" if o is None else "") + f"{t / f:.2f}"
        for (f, _), (o, _), t in zip(free, other, times)
    )
    bound = ">=" if any(t is None for t, _ in other) else ""
    return f"{bound}{ratio:.2f}x (per seed {per_seed})", ratio >= SPEEDUP_TARGET


def report_factors(rows: list[dict], problem: str, factors: list[float]) -> None:
    """Time for each method to reach looser targets: how the ranking depends on the target."""
    print(
        "   step time s to reach factor x best final (mean over the seeds that reached it, "
        "reached/seeds):"
    )
    print(f"   {'method':<12}" + "".join(f"{f'{f:g}x':>16}" for f in factors))
    for method in METHODS:
        ok = [r for r in _runs(rows, problem, method) if r["status"] == "ok"]
        if not ok:
            continue
        cells = []
        for factor in factors:
            times = [
                _first(r, factor * _best_final(rows, problem, r["seed"]), "curve_s") for r in ok
            ]
            hit = [t for t in times if t is not None]
            mean = f"{statistics.fmean(hit):.2f}" if hit else "-"
            cells.append(f"{mean} ({len(hit)}/{len(ok)})")
        print(f"   {method:<12}" + "".join(f"{c:>16}" for c in cells))


def report_ratios(rows: list[dict], args: argparse.Namespace) -> None:
    problem = "representation"
    free = [r for r in _runs(rows, problem, "pbgd_free") if r["status"] == "ok"]
    if not free:
        return
    print(
        f"\n{problem}: time to target of each reference / PBGD-Free's (the speedup of PBGD-Free; "
        "'cpu' = process CPU time, less sensitive to other load on the machine; looser targets "
        "for context):"
    )
    verdicts = []
    for other_name in REFERENCES:
        other = [r for r in _runs(rows, problem, other_name) if r["status"] == "ok"]
        if len(other) != len(free):
            print(f"  vs {other_name:<12} n/a ({other_name} did not complete on every seed)")
            verdicts.append((other_name, False, False, False))
            continue
        wall, fast = _speedup(
            [(r["time_to_target_s"], r["train_s"]) for r in free],
            [(r["time_to_target_s"], r["train_s"]) for r in other],
        )
        cpu, _ = _speedup(
            [(r["cpu_to_target_s"], r["train_cpu_s"]) for r in free],
            [(r["cpu_to_target_s"], r["train_cpu_s"]) for r in other],
        )
        print(f"  vs {other_name:<12} {args.target_factor:g}x wall {wall}")
        print(f"     {'':<12} {args.target_factor:g}x cpu  {cpu}")
        for factor in FACTORS:
            if factor == args.target_factor:
                continue
            looser = [
                [
                    (
                        _first(r, factor * _best_final(rows, problem, r["seed"]), "curve_s"),
                        r["train_s"],
                    )
                    for r in runs
                ]
                for runs in (free, other)
            ]
            print(f"     {'':<12} {factor:g}x wall {_speedup(*looser)[0]}")
        f_final = statistics.fmean(r["final_metric"] for r in free)
        o_final = statistics.fmean(r["final_metric"] for r in other)
        print(
            f"     {'':<12} final test MSE pbgd_free {f_final:.4f} vs {o_final:.4f} "
            f"(ratio {f_final / o_final:.3f})"
        )
        spread = max(statistics.stdev(r["final_metric"] for r in runs) for runs in (free, other))
        verdicts.append((other_name, fast, f_final <= o_final, f_final - o_final <= spread))
    print(
        f"\nacceptance: PBGD-Free reaches the target >= {SPEEDUP_TARGET:g}x sooner in wall time "
        "than pbgd and implicit_cg, at equal or better final MSE (mean over seeds)"
    )
    for other_name, fast, better, close in verdicts:
        note = (
            "" if better else f" (worse by {'less' if close else 'more'} than one std over seeds)"
        )
        print(
            f"  vs {other_name:<12} speed {'PASS' if fast else 'MISS'}, final MSE "
            f"{'PASS' if better else 'MISS'}{note}"
        )
    if len(args.seeds) < MIN_SEEDS:
        print(f"  FLAG: {len(args.seeds)} seed(s), fewer than {MIN_SEEDS}")


def summarize(rows: list[dict], problems: list[str], args: argparse.Namespace) -> None:
    """Targets (added to ``rows``), the table per problem, PBGD-Free's ratios."""
    add_targets(rows, args.target_factor)
    for problem in problems:
        report_problem(rows, problem, args)
    if "representation" in problems:
        report_ratios(rows, args)


def mean_curve(runs: list[dict], axis: str, grid: np.ndarray) -> np.ndarray:
    """The seeds' curves interpolated on ``grid`` and averaged (NaN past a run's last point)."""
    curves = []
    for r in runs:
        xs, ys = np.asarray(r[axis], float), np.asarray(r["curve_metric"], float)
        curves.append(np.where(grid <= xs[-1], np.interp(grid, xs, ys), np.nan))
    return np.mean(curves, axis=0)


def plot(rows: list[dict], problems: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(problems), figsize=(6 * len(problems), 8), squeeze=False)
    for col, problem in enumerate(problems):
        runs = [r for r in rows if r["problem"] == problem]
        target = statistics.fmean(r["target"] for r in runs)
        for row, (axis, label) in enumerate((("curve_s", "step time (s)"), ("curve_step", "step"))):
            ax = axes[row][col]
            for method in METHODS:
                ok = [r for r in _runs(rows, problem, method) if r["status"] == "ok"]
                if not ok:
                    continue
                end = min(r[axis][-1] for r in ok)
                # Dense near 0 too: the early evaluations are log-spaced.
                grid = np.union1d(np.linspace(0.0, end, 200), np.geomspace(end / 2000, end, 100))
                ax.plot(
                    grid,
                    mean_curve(ok, axis, grid),
                    label=method,
                    color=f"C{METHODS.index(method)}",
                )
            ax.axhline(target, color="gray", linestyle="--", linewidth=0.8, label="target (mean)")
            ax.set_yscale("log")
            ax.set_xlabel(label)
            ax.set_ylabel(PROBLEMS[problem] + " (mean over seeds)")
            ax.set_title(f"{problem} ({runs[0]['data']})")
            # Log-like axes: on real data every method bottoms out within the first second.
            ax.set_xscale("symlog", linthresh=10 if row else runs[0]["seconds"] / 200)
            ax.set_xlim(left=0)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="step time per run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--evals", type=int, default=50, help="test evaluations per run")
    parser.add_argument("--problems", nargs="+", choices=list(PROBLEMS), default=list(PROBLEMS))
    parser.add_argument("--data", type=Path, help="processed NLSY79 CSV for representation")
    parser.add_argument("--target-factor", type=float, default=1.05)
    parser.add_argument("--adam-eps", type=float, help="Adam eps (default: the library's)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument(
        "--out", type=Path, default=Path("benchmarks/results/compare_methods.parquet")
    )
    parser.add_argument(
        "--report",
        type=Path,
        metavar="PARQUET",
        help="print the summary and redraw the PNG of saved runs (this script's Parquet) instead",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        print(json.dumps(run_one(**json.loads(args.worker))))
        return
    if args.report is not None:
        rows = pq.read_table(args.report).to_pylist()
        args.seconds, args.seeds = rows[0]["seconds"], sorted({r["seed"] for r in rows})
        problems = list(dict.fromkeys(r["problem"] for r in rows))
        summarize(rows, problems, args)
        plot(rows, problems, args.report.with_suffix(".png"))
        print(f"\nwrote {args.report.with_suffix('.png')}")
        return
    if args.seconds <= 0 or args.evals < 1 or args.threads < 1 or args.target_factor < 1:
        parser.error("need --seconds > 0, --evals >= 1, --threads >= 1, --target-factor >= 1")
    if args.data is not None and not args.data.is_file():
        parser.error(f"--data {str(args.data)!r} is not a file")

    data_name = "synthetic" if args.data is None else args.data.name
    print(
        f"torch {torch.__version__}, {args.threads} thread(s); {args.seconds:g} s of step time "
        f"per run, {args.evals} evaluations, seeds {args.seeds}; representation data: {data_name}"
    )
    started = time.perf_counter()
    rows = []
    for problem in args.problems:
        for i, seed in enumerate(args.seeds):
            shift = i % len(METHODS)
            for method in METHODS[shift:] + METHODS[:shift]:
                run = spawn(problem, method, seed, args)
                run["data"] = data_name if problem == "representation" else "digits"
                detail = (
                    f"{run['steps']:>6} steps, {PROBLEMS[problem]} {run['final_metric']:.4f}"
                    if run["status"] == "ok"
                    else f"{run['status']}: {run['reason'][:100]}"
                )
                print(f"  {problem} seed {seed} {method:<12} {detail}", flush=True)
                rows.append(run)
    summarize(rows, args.problems, args)

    common = {
        "seconds": args.seconds,
        "evals": args.evals,
        "threads": args.threads,
        "torch_version": torch.__version__,
    }
    rows = [{**r, **common} for r in rows]
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, args.out)
    png = args.out.with_suffix(".png")
    plot(rows, args.problems, png)
    print(f"\nwrote {args.out} and {png} ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
