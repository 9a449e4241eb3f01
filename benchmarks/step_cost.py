"""Cost of one bilevel step, relative to one plain training step, and the overhead of ``br.solve``.

Setting (representation learning): x = an MLP feature extractor
Linear(21, 200)-ReLU-Linear(200, 200)-ReLU, y = a linear head Linear(200, 1); the upper loss f is
the MSE on a group-0 batch of 500 samples, the lower loss g the MSE on a group-1 batch of 500
samples (synthetic float32 data, fixed seed); Adam at both levels (lr 1e-3); gamma = 10.

The problem is a ``br.split_module_problem`` (x = extractor, y = head): it declares its
structure, so the solvers compute the extractor's features once per step and level and run only
the head in their inner loops (``bilevel_ray.solvers.compute``).

Part 1 times ``solver.step(state, batch)`` of every solver in ``br.SOLVERS`` at K = 1 and at
K = 5 (``inner_steps``; implicit_cg with its default 10 CG iterations) against

* ONE plain single-level training step on the same model and upper batch
  (``torch.optim.Adam``: zero_grad, forward of extractor + head, MSE, backward, step), and
* a hand-written torch loop of the same update at the same K that shares the features the same
  way (the extractor's outputs computed once per step with autograd, detached for the head's
  inner steps; ``torch.optim.Adam`` per variable; the same iterates, checked first).

Part 2 times PBGD-Free through ``br.solve`` (``br.full_batch`` data, ``report_every=10``) against a
hand-written torch loop of the same update (two ``torch.optim.Adam``: a head step on f / gamma + g,
then an extractor step on f at the updated head; the features computed once per step and
reused, as the solver does). ``br.solve`` has a fixed start-up cost (validation, one evaluation
of each loss); it is removed by timing runs of two lengths: per-step cost = (T(long) - T(short))
/ (long - short), taken per round.

Method: after a warm-up round, every round times a block of steps of each candidate in turn (the
order rotates from round to round to cancel drift). Part 1's ratios use each candidate's
fastest round (``--estimator min``: on a shared machine other processes only add time, and the
medians of a 2-core VM at load 5 varied by 2x between runs); the table also shows the range. Torch
runs on ``--threads`` intra-op threads (default 1: on a 2-core VM, 2 threads gave occasional
blocks 10-30 x slower than the median, 1 thread did not).

Targets: ``pbgd_free <= 1.45 x plain step`` at K = 1 (one extractor forward per level and
step, one extractor backward; a hand-written loop of that shape measured 1.46 x / 1.34 x),
every method at K > 1 ``<= 1.10 x`` the hand-written loop that shares the features, and
``br.solve <= 1.10 x the hand-written loop`` per step.

Run from the repository root (about 3 minutes on 2 CPU cores)::

    .venv/bin/python benchmarks/step_cost.py
    .venv/bin/python benchmarks/step_cost.py --rounds 20 --steps-per-block 20 --threads 1 \\
        --out benchmarks/results/step_cost.parquet
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import Tensor, nn

import bilevel_ray as br
from bilevel_ray.config import METHOD_OPTIONS
from bilevel_ray.linear_solve import solve_cg
from bilevel_ray.tree import Params

IN_FEATURES, HIDDEN, SAMPLES = 21, 200, 500
LR, GAMMA, SEED = 1e-3, 10.0, 0
PBGD_FREE_TARGET = 1.45  # x the plain step, K = 1
HAND_TARGET = 1.10  # x the hand-written loop sharing the features, K > 1
SOLVE_TARGET = 1.10  # x the hand-written loop (br.solve)
INNER = (1, 5)
# On a shared machine other processes only ever add time to a round: the fastest round is the
# best estimate of a step's own cost ("min", the default); "median" is the other choice.
ESTIMATORS = {"min": min, "median": statistics.median}
CG_STEPS = METHOD_OPTIONS["implicit_cg"]["cg_steps"]

Batch = tuple[Tensor, Tensor]
Candidate = Callable[[int], None]  # runs that many steps

SCHEMA = pa.schema(
    [
        pa.field("part", pa.string()),
        pa.field("candidate", pa.string()),
        pa.field("inner_steps", pa.int64()),
        pa.field("ms_per_step", pa.float64()),
        pa.field("ms_per_step_min", pa.float64()),
        pa.field("ms_per_step_max", pa.float64()),
        pa.field("hand_ms_per_step", pa.float64()),
        pa.field("plain_ms_per_step", pa.float64()),
        pa.field("ratio_plain", pa.float64()),
        pa.field("ratio_hand", pa.float64()),
        pa.field("reference", pa.string()),
        pa.field("ratio", pa.float64()),
        pa.field("target", pa.float64()),
        pa.field("passed", pa.bool_()),
        pa.field("startup_ms", pa.float64()),
        pa.field("whole_run_ms", pa.float64()),
        pa.field("steps_per_block", pa.int64()),
        pa.field("rounds", pa.int64()),
        pa.field("threads", pa.int64()),
        pa.field("torch_version", pa.string()),
    ]
)


def make_data() -> tuple[Batch, Batch]:
    """Group 0 (upper) and group 1 (lower): 500 samples each, related targets, shifted group 1."""
    gen = torch.Generator().manual_seed(SEED)
    w = torch.randn(IN_FEATURES, generator=gen) / IN_FEATURES**0.5

    def group(shift: float) -> Batch:
        features = torch.randn(SAMPLES, IN_FEATURES, generator=gen)
        noise = 0.1 * torch.randn(SAMPLES, generator=gen)
        return features, torch.tanh(features @ w + shift) + noise

    return group(0.0), group(0.5)


def make_models() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(SEED)
    extractor = nn.Sequential(
        nn.Linear(IN_FEATURES, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU()
    )
    return extractor, nn.Linear(HIDDEN, 1)


def mse(x_forward: Callable[..., Tensor], y_forward: Callable[..., Tensor], batch: Batch) -> Tensor:
    features, target = batch
    return ((y_forward(x_forward(features)).squeeze(-1) - target) ** 2).mean()


def solver_options(method: str, inner_steps: int | None = None) -> dict[str, Any]:
    """Adam at both levels, gamma = 10 where the method has one, the given (else the default)
    inner_steps."""
    options: dict[str, Any] = {"inner_steps": inner_steps or METHOD_OPTIONS[method]["inner_steps"]}
    if "gamma" in METHOD_OPTIONS[method]:
        options["gamma"] = GAMMA
    return {"optimizer": "adam", "lr_x": LR, "lr_y": LR, **options}


# ---------------------------------------------------------------------------------------------
# Candidates: closures that run n steps, keeping their state between calls.


def plain_step(extractor: nn.Module, head: nn.Module, upper: Batch) -> Candidate:
    extractor, head = copy.deepcopy(extractor), copy.deepcopy(head)
    opt = torch.optim.Adam([*extractor.parameters(), *head.parameters()], lr=LR)
    features, target = upper

    def run(n: int) -> None:
        for _ in range(n):
            opt.zero_grad()
            loss = ((head(extractor(features)).squeeze(-1) - target) ** 2).mean()
            loss.backward()
            opt.step()

    return run


def solver_step(
    method: str, problem: Any, x0: Params, y0: Params, batch: br.BilevelBatch, inner: int
) -> Candidate:
    solver = br.SolverConfig(method=method, **solver_options(method, inner)).build(problem)
    state = [solver.init(x0, y0)]

    def run(n: int) -> None:
        s = state[0]
        for _ in range(n):
            s, _ = solver.step(s, batch)
        state[0] = s

    return run


def solve_run(
    problem: Any, x0: Params, y0: Params, upper: Batch, lower: Batch, steps: int
) -> br.SolveResult:
    return br.solve(
        problem,
        x0,
        y0,
        method="pbgd_free",
        steps=steps,
        data=br.full_batch(upper, lower),
        report_every=10,
        **solver_options("pbgd_free"),
    )


def hand_loop(
    extractor: nn.Module, head: nn.Module, upper: Batch, lower: Batch, steps: int
) -> tuple[nn.Module, nn.Module]:
    """PBGD-Free (K = 1) written by hand; returns the trained copies of the modules."""
    extractor, head = copy.deepcopy(extractor), copy.deepcopy(head)
    ext_params = list(extractor.parameters())
    opt_head = torch.optim.Adam(head.parameters(), lr=LR)
    opt_ext = torch.optim.Adam(ext_params, lr=LR)
    (xu, tu), (xl, tl) = upper, lower
    for _ in range(steps):
        feat_u = extractor(xu)  # once per step, with autograd (the x step backpropagates it)
        with torch.no_grad():  # the head step treats the lower features as constants
            feat_l = extractor(xl)
        opt_head.zero_grad()
        f = ((head(feat_u.detach()).squeeze(-1) - tu) ** 2).mean()
        g = ((head(feat_l).squeeze(-1) - tl) ** 2).mean()
        (f / GAMMA + g).backward()
        opt_head.step()
        opt_ext.zero_grad()
        f = ((head(feat_u).squeeze(-1) - tu) ** 2).mean()
        f.backward(inputs=ext_params)
        opt_ext.step()
    return extractor, head


class HandLoop:
    """One method's step written by hand in torch, features shared as the solver shares them.

    ``run(n)`` takes n steps; ``params()`` returns the iterates under the solver's names."""

    def __init__(self, method: str, inner: int, s: Setup):
        self.method, self.inner = method, inner
        self.ext, self.head = copy.deepcopy(s.extractor), copy.deepcopy(s.head)
        self.xp, self.yp = list(self.ext.parameters()), list(self.head.parameters())
        self.opt_x = torch.optim.Adam(self.xp, lr=LR)
        self.opt_y = torch.optim.Adam(self.yp, lr=LR)
        self.copy = self.opt_c = None
        if method in ("pbgd", "alt_pbgd", "f2sa", "bome"):  # the value-function copy of y
            self.copy = copy.deepcopy(s.head)
            self.opt_c = torch.optim.Adam(self.copy.parameters(), lr=LR)
        self.upper, self.lower = s.upper, s.lower

    @staticmethod
    def _apply(opt: torch.optim.Optimizer, params: list[Tensor], grads: Any) -> None:
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()

    def _descend(self, opt: Any, head: nn.Module, loss: Callable[[nn.Module], Tensor]) -> None:
        params = list(head.parameters())
        for _ in range(self.inner):
            self._apply(opt, params, torch.autograd.grad(loss(head), params))

    def run(self, n: int) -> None:
        for _ in range(n):
            self._step()

    def _step(self) -> None:
        (xu, tu), (xl, tl) = self.upper, self.lower
        head, copy_, m = self.head, self.copy, self.method

        def loss(h: nn.Module, feats: Tensor, target: Tensor) -> Tensor:
            return ((h(feats).squeeze(-1) - target) ** 2).mean()

        feat_u = self.ext(xu)  # features once per step, with autograd
        if m == "pbgd_free":
            with torch.no_grad():
                feat_l = self.ext(xl)
        else:
            feat_l = self.ext(xl)
        du, dl = feat_u.detach(), feat_l.detach()
        if m == "pbgd_free":
            self._descend(self.opt_y, head, lambda h: loss(h, du, tu) / GAMMA + loss(h, dl, tl))
            self._apply(self.opt_x, self.xp, torch.autograd.grad(loss(head, feat_u, tu), self.xp))
        elif m in ("alt_pbgd", "f2sa"):
            self._descend(self.opt_c, copy_, lambda h: loss(h, dl, tl))
            self._descend(self.opt_y, head, lambda h: loss(h, du, tu) / GAMMA + loss(h, dl, tl))
            penalty = loss(head, feat_u, tu) + GAMMA * (
                loss(head, feat_l, tl) - loss(copy_, feat_l, tl)
            )
            self._apply(self.opt_x, self.xp, torch.autograd.grad(penalty, self.xp))
        elif m == "pbgd":
            self._descend(self.opt_c, copy_, lambda h: loss(h, dl, tl))
            penalty = loss(head, feat_u, tu) + GAMMA * (
                loss(head, feat_l, tl) - loss(copy_, feat_l, tl)
            )
            grads = torch.autograd.grad(penalty, self.xp + self.yp)
            k = len(self.xp)
            self._apply(self.opt_x, self.xp, grads[:k])
            self._apply(self.opt_y, self.yp, [g / GAMMA for g in grads[k:]])
        elif m == "bome":
            self._descend(self.opt_c, copy_, lambda h: loss(h, dl, tl))
            both = self.xp + self.yp
            gf = torch.autograd.grad(loss(head, feat_u, tu), both)
            gq = torch.autograd.grad(loss(head, feat_l, tl) - loss(copy_, feat_l, tl), both)
            q_sq = sum((q * q).sum() for q in gq)
            inner = sum((f * q).sum() for f, q in zip(gf, gq))
            lam = torch.clamp((0.5 * q_sq - inner) / q_sq, min=0) if q_sq > 0 else 0.0
            step = [f + lam * q for f, q in zip(gf, gq)]
            k = len(self.xp)
            self._apply(self.opt_x, self.xp, step[:k])
            self._apply(self.opt_y, self.yp, step[k:])
        else:  # implicit_cg
            self._descend(self.opt_y, head, lambda h: loss(h, dl, tl))
            grads = torch.autograd.grad(loss(head, feat_u, tu), self.xp + self.yp)
            k = len(self.xp)
            g_y = torch.autograd.grad(loss(head, feat_l, tl), self.yp, create_graph=True)
            names = [f"w{i}" for i in range(len(self.yp))]

            def hvp(v: Params) -> Params:
                out = torch.autograd.grad(g_y, self.yp, list(v.values()), retain_graph=True)
                return dict(zip(names, out))

            v = solve_cg(hvp, dict(zip(names, grads[k:])), maxiter=CG_STEPS)
            cross = torch.autograd.grad(g_y, self.xp, list(v.values()))
            self._apply(self.opt_x, self.xp, [a - b for a, b in zip(grads[:k], cross)])

    def params(self) -> Params:
        out = {"upper." + k: v for k, v in self.ext.state_dict().items()}
        out.update({"lower." + k: v for k, v in self.head.state_dict().items()})
        return out


# ---------------------------------------------------------------------------------------------
# Interleaved timing.


def time_rounds(
    candidates: dict[str, Candidate], rounds: int, block: int
) -> dict[str, list[float]]:
    """Seconds per call of ``run(block)`` for each candidate and round; one untimed warm-up round.

    The order of the candidates rotates by one every round.
    """
    names = list(candidates)
    for name in names:
        candidates[name](block)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            gc.collect()
            start = time.perf_counter()
            candidates[name](block)
            times[name].append(time.perf_counter() - start)
    return times


@dataclass(frozen=True)
class Setup:
    extractor: nn.Module
    head: nn.Module
    upper: Batch
    lower: Batch
    problem: Any
    x0: Params
    y0: Params


def make_setup() -> Setup:
    extractor, head = make_models()
    upper, lower = make_data()
    problem, x0, y0 = br.split_module_problem(extractor, head, upper_loss=mse, lower_loss=mse)
    return Setup(extractor, head, upper, lower, problem, x0, y0)


def check_hand_loops(s: Setup, steps: int = 3) -> float:
    """The largest difference between a hand loop's iterates and its solver's after ``steps``
    steps, over every method and K (the hand loops must be the same updates)."""
    batch = br.BilevelBatch(s.upper, s.lower)
    worst = 0.0
    for method in br.SOLVERS:
        for inner in INNER:
            config = br.SolverConfig(method=method, **solver_options(method, inner))
            solver = config.build(s.problem)
            state = solver.init(s.x0, s.y0)
            for _ in range(steps):
                state, _ = solver.step(state, batch)
            hand = HandLoop(method, inner, s)
            hand.run(steps)
            by_hand = hand.params()
            diff = max(
                float((v - by_hand[k]).abs().max()) for k, v in {**state.x, **state.y}.items()
            )
            worst = max(worst, diff)
            if diff > 1e-4:
                raise SystemExit(f"the hand loop of {method} K={inner} differs by {diff:.2e}")
    return worst


def part1(args: argparse.Namespace, s: Setup) -> list[dict[str, Any]]:
    """Per-step time of every solver at each K, of its hand loop and of the plain step."""
    print(f"max |solver - hand loop| after 3 steps, every method and K: {check_hand_loops(s):.2e}")
    batch = br.BilevelBatch(s.upper, s.lower)
    candidates = {"plain_step": plain_step(s.extractor, s.head, s.upper)}
    for method in br.SOLVERS:
        for inner in INNER:
            candidates[f"{method}/{inner}"] = solver_step(
                method, s.problem, s.x0, s.y0, batch, inner
            )
            candidates[f"hand:{method}/{inner}"] = HandLoop(method, inner, s).run
    times = time_rounds(candidates, args.rounds, args.steps_per_block)
    per_step = {k: [t / args.steps_per_block for t in v] for k, v in times.items()}
    median = {k: ESTIMATORS[args.estimator](v) for k, v in per_step.items()}
    plain = median["plain_step"]
    rows = []
    for name, values in per_step.items():
        if name.startswith("hand:") or name == "plain_step":
            continue
        method, inner = name.split("/")
        k = int(inner)
        hand = median[f"hand:{name}"]
        ratio_plain, ratio_hand = median[name] / plain, median[name] / hand
        target, ratio, reference = None, ratio_hand, "hand_loop"
        if method == "pbgd_free" and k == 1:
            target, ratio, reference = PBGD_FREE_TARGET, ratio_plain, "plain_step"
        elif k > 1:
            target = HAND_TARGET
        rows.append(
            {
                "part": "step_cost",
                "candidate": method,
                "inner_steps": k,
                "ms_per_step": 1e3 * median[name],
                "ms_per_step_min": 1e3 * min(values),
                "ms_per_step_max": 1e3 * max(values),
                "hand_ms_per_step": 1e3 * hand,
                "plain_ms_per_step": 1e3 * plain,
                "ratio_plain": ratio_plain,
                "ratio_hand": ratio_hand,
                "reference": reference,
                "ratio": ratio,
                "target": target,
                "passed": None if target is None else ratio <= target,
                "steps_per_block": args.steps_per_block,
            }
        )
    return rows


def part2(args: argparse.Namespace, s: Setup) -> list[dict[str, Any]]:
    """br.solve against the hand loop, per step (two run lengths) and as whole long runs."""
    long, short = args.solve_steps, args.solve_steps // 4

    def solve(steps: int) -> br.SolveResult:
        return solve_run(s.problem, s.x0, s.y0, s.upper, s.lower, steps)

    def hand(steps: int) -> tuple[nn.Module, nn.Module]:
        return hand_loop(s.extractor, s.head, s.upper, s.lower, steps)

    # The hand loop must be the same update: compare the iterates after a short run.
    res = solve(short)
    ext, hd = hand(short)
    by_hand = {"upper." + k: v for k, v in ext.state_dict().items()}
    by_hand.update({"lower." + k: v for k, v in hd.state_dict().items()})
    diff = max(float((v - by_hand[k]).abs().max()) for k, v in {**res.x, **res.y}.items())
    print(f"max |br.solve - hand loop| after {short} steps: {diff:.2e}")
    if diff > 1e-4:
        raise SystemExit("the hand-written loop does not reproduce br.solve's update")

    candidates: dict[str, Candidate] = {}
    for steps in (short, long):
        candidates[f"solve/{steps}"] = lambda _, n=steps: solve(n)
        candidates[f"hand/{steps}"] = lambda _, n=steps: hand(n)
    times = time_rounds(candidates, args.rounds, 1)

    rows, per_step = [], {}
    for name in ("solve", "hand"):
        t_short, t_long = times[f"{name}/{short}"], times[f"{name}/{long}"]
        slopes = [(b - a) / (long - short) for a, b in zip(t_short, t_long)]
        step = per_step[name] = statistics.median(slopes)
        startup = statistics.median(t_short) - short * step
        rows.append(
            {
                "part": "solve_overhead",
                "candidate": "br.solve" if name == "solve" else "hand_loop",
                "inner_steps": 1,
                "ms_per_step": 1e3 * step,
                "ms_per_step_min": 1e3 * min(slopes),
                "ms_per_step_max": 1e3 * max(slopes),
                "startup_ms": 1e3 * startup,
                "whole_run_ms": 1e3 * statistics.median(t_long),
                "steps_per_block": long,
            }
        )
    ratio = per_step["solve"] / per_step["hand"]
    rows[0].update(
        reference="hand_loop", ratio=ratio, target=SOLVE_TARGET, passed=ratio <= SOLVE_TARGET
    )
    rows[1].update(reference="hand_loop", ratio=1.0)
    return rows


def report(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    first = next(r for r in rows if r["part"] == "step_cost")
    print()
    print(f"plain step: {first['plain_ms_per_step']:.3f} ms ({args.estimator} over rounds)")
    print(
        f"{'method':<12} {'K':>2} {'ms/step':>9} {'min':>8} {'max':>8} {'hand ms':>8} "
        f"{'x plain':>8} {'x hand':>7}  target"
    )
    for row in rows:
        if row["part"] != "step_cost":
            continue
        mark = ""
        if row["target"] is not None:
            verdict = "PASS" if row["passed"] else "MISS"
            mark = f"  {row['target']:.2f}x {row['reference']}: {verdict}"
        print(
            f"{row['candidate']:<12} {row['inner_steps']:>2} {row['ms_per_step']:>9.3f} "
            f"{row['ms_per_step_min']:>8.3f} {row['ms_per_step_max']:>8.3f} "
            f"{row['hand_ms_per_step']:>8.3f} {row['ratio_plain']:>7.2f}x "
            f"{row['ratio_hand']:>6.2f}x{mark}"
        )
    solve, hand = (r for r in rows if r["part"] == "solve_overhead")
    print()
    print(
        f"PBGD-Free, br.solve vs hand-written loop (per step from runs of two lengths, "
        f"{args.solve_steps // 4} and {args.solve_steps} steps):"
    )
    for row in (solve, hand):
        print(
            f"  {row['candidate']:<10} {row['ms_per_step']:.3f} ms/step "
            f"[{row['ms_per_step_min']:.3f}, {row['ms_per_step_max']:.3f}], "
            f"start-up {row['startup_ms']:.1f} ms, whole {args.solve_steps}-step run "
            f"{row['whole_run_ms']:.1f} ms"
        )
    whole = solve["whole_run_ms"] / hand["whole_run_ms"]
    print(
        f"  ratio solve / hand: {solve['ratio']:.3f} per step, {whole:.3f} for whole "
        f"{args.solve_steps}-step runs (start-up included)"
    )
    free = next(r for r in rows if r["candidate"] == "pbgd_free" and r["inner_steps"] == 1)
    many = [r for r in rows if r["part"] == "step_cost" and r["inner_steps"] > 1]
    worst = max(many, key=lambda r: r["ratio_hand"])
    print()
    print("targets:")
    print(
        f"  pbgd_free K=1 <= {PBGD_FREE_TARGET:.2f}x plain step:   {free['ratio']:.2f}x  "
        f"{'PASS' if free['passed'] else 'MISS'}"
    )
    print(
        f"  every method K>1 <= {HAND_TARGET:.2f}x hand loop: worst {worst['candidate']} "
        f"{worst['ratio_hand']:.2f}x  {'PASS' if all(r['passed'] for r in many) else 'MISS'}"
    )
    print(
        f"  br.solve overhead <= {SOLVE_TARGET:.2f}x hand loop: {solve['ratio']:.2f}x  "
        f"{'PASS' if solve['passed'] else 'MISS'}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10, help="timed rounds (after a warm-up)")
    parser.add_argument(
        "--steps-per-block", type=int, default=10, help="steps per timed block in part 1"
    )
    parser.add_argument(
        "--solve-steps", type=int, default=200, help="long run length in part 2 (short = 1/4)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument(
        "--estimator",
        choices=sorted(ESTIMATORS),
        default="min",
        help="per-candidate statistic over rounds in part 1 (min: robust to other load)",
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/step_cost.parquet"))
    args = parser.parse_args()
    if args.rounds < 1 or args.steps_per_block < 1 or args.solve_steps < 8:
        parser.error("need --rounds >= 1, --steps-per-block >= 1, --solve-steps >= 8")

    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, torch.set_num_threads({args.threads}) -> "
        f"{torch.get_num_threads()} threads; rounds={args.rounds}, "
        f"steps_per_block={args.steps_per_block}, solve_steps={args.solve_steps}"
    )
    setup = make_setup()
    started = time.perf_counter()
    rows = part1(args, setup)
    rows += part2(args, setup)
    common = {
        "rounds": args.rounds,
        "threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
    }
    rows = [{**dict.fromkeys(SCHEMA.names), **row, **common} for row in rows]
    report(rows, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), args.out)
    print(f"\nwrote {args.out} ({time.perf_counter() - started:.0f} s of timing)")


if __name__ == "__main__":
    main()
