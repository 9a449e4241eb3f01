"""Is the flatness verdict right? A panel of problems whose truth is the outcome.

For each problem and start the truth comes from running the solver to convergence with
``pbgd_free`` and with ``alt_pbgd`` (the corrected method, both inner loops, K = 5) at the same
gamma from that start (seed 0's batches), and evaluating the true upper objective
phi(x) = f(x, y*(x)) on the full data at both ends (y*(x) by L-BFGS; on the networks the mean of
the last evaluations, as their test loss wanders):

    gap = phi(x_pbgd_free) - phi(x_alt)

PBGD-Free is "as good" when gap <= 5% of the achievable improvement (phi at the problem's
reference point, its canonical start, less the better end) plus 1e-6 plus, on minibatch data,
the precision a run can reach (how far apart phi is at PBGD-Free's ends with seeds 0 and 1,
whose batch orders differ; diagnose's side-by-side branch measures the same with a replica),
"worse" otherwise, and a run that diverges is "worse": the rule of diagnose's own tolerance
(``bilevel_ray.diagnostics.verdict.tolerance``), the same from every start (the former
truth, 5% of the improvement from each start, called the negative toy's 25 "as good"
from x0 = 100, 0.2% of 11025, though PBGD-Free ends at x = 0 where |phi'| = 10 from every
start). Each
start is then diagnosed (``br.diagnose``) with every seed of its family; a verdict is right when
"suitable" meets "as good" or "unsuitable" meets "worse"; "uncertain" is counted as not right.
Printed: every start's truth and verdicts (with the slowest diagnosis' seconds), each problem's
consistency (how many of its starts x seeds got its most common verdict), the confusion table,
and the problems whose verdicts differ under one truth (over seeds or starts). The networks'
diagnoses judge on their held-out data (``eval_data``, as ``bilevel-ray diagnose`` does).

Problems (all float64, small; ~2 to 8 minutes on 2 cores without the networks):

* the paper's negative toy from x0 = 2, -8, 100; its positive toy from the notebook's start;
* strongly convex quadratics: coupled (3 seeds), flat (f depends on y through (y - y*)^2), and
  uncoupled (g independent of x, so the dropped term is 0);
* Hölder-flat: g = (y - x)^2 / 2, f = (x - 1)^2 / 2 + |y - x - e|^alpha, alpha = 1.25, 1.5,
  1.75, at gamma = 5 and 20 (f is flat at y* up to the residual from e);
* Lipschitz: f = (x - 1)^2 / 2 + l y with l = 0.05 and 2 (the negative toy's shape);
* the Lipschitz shape on minibatches (l = 0.5, 1 and 2, batches of 8 and 32, 5 seeds): a real
  bias of l^2 / 2 under batch noise, which the side-by-side branch's replica floor (what two
  PBGD-Free runs differ by) must not hide;
* minibatch least squares (x, y = two blocks of weights; f = MSE on the upper sample, g = MSE +
  ridge on the lower): the same target for both levels, and shifted targets; batch sizes 20, 50,
  200, diagnosed with 5 seeds each; the built-in ``regression`` (its factory's settings, 5 seeds);
* with ``--networks`` (or ``--only-networks``): ``representation`` on the NLSY79 CSV
  (``--data``; 3000 steps) and ``peft-dpo-sft`` (the built small Llama; 1200 steps), at their
  factories' settings (their truth: phi on the held-out data, about 3 minutes more).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/diagnose_panel.py [--networks --data CSV]

Unseen classes (``--unseen``, ``--sklearn``; either runs those instead of the panel above):
problems the verdict was not designed on, in ``panel_classes.py`` (whose docstring describes
each class): Hölder uppers whose y_g is a saddle of the penalty objective, float32 with f scaled
by 1e-4, coupling that switches on only where the run arrives late, a 640-parameter x under Adam,
cross-entropy minibatches with a shifted validation distribution, and (``--sklearn``)
``examples/sklearn_nets.py`` on four scikit-learn sets x 3 batch sizes x 3 seeds. Each class
holds positive controls (PBGD-Free as good) beside the biased cases. One trial is one problem,
start and seed. Its truth (``panel_truth.py``) is by outcome: ``br.solve`` with pbgd_free for
the trial's horizon (its ``steps``) and with alt_pbgd (K = 5) at the same gamma and settings,
phi(x) = f(x, y*(x)) on f's own rows in float64 (y*(x) by L-BFGS on the full lower data from the
run's y), "worse" when phi_free - phi_alt exceeds ``verdict.tolerance`` (5% of phi(x0) less the
better end, plus 1e-6, plus on minibatch data the spread of phi over two PBGD-Free batch
orders); held-out losses are printed beside it, never used in it. Truths are cached in a JSON
file (``--cache``), keyed by the trial and its settings. Then each trial is diagnosed
(``br.diagnose`` with the trial's settings, seed, eval_data and ``steps=`` its horizon where
diagnose takes it), and the confusion table, the per-trial lines and the summary ('suitable'
where the truth is worse: target 0; verdicts other than 'uncertain': target >= 80%) printed.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/diagnose_panel.py --unseen --sklearn
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/diagnose_panel.py --unseen --truth-only
"""

from __future__ import annotations

import argparse
import inspect
import math
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch

import bilevel_ray as br
from bilevel_ray.config import SolverConfig
from bilevel_ray.data import BilevelBatch, as_batches
from bilevel_ray.diagnostics.responses import minimize
from bilevel_ray.diagnostics.verdict import tolerance
from bilevel_ray.problems import BUILTIN_PROBLEMS, NegativeToy, QuadraticProblem
from bilevel_ray.problems.toys import positive_toy

F64 = torch.float64


def t64(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


@dataclass
class Case:
    """One problem: its starts (the first is canonical), data per seed, settings."""

    name: str
    problem: Any
    starts: list[tuple[dict, dict]]
    settings: dict[str, Any]
    steps: int
    data: Any = None  # callable seed -> data, or None
    seeds: tuple[int, ...] = (0,)
    eval_batch: Any = None
    diagnose: dict[str, Any] = field(default_factory=dict)
    tail: int = 1  # evaluations averaged at the end of the truth's runs
    held_out: bool = False  # diagnose judges its outcome on eval_batch (as the CLI does)


class Holder:
    """g = (y - x)^2 / 2, f = (x - 1)^2 / 2 + |y - x - e|^alpha."""

    def __init__(self, alpha: float, e: float = 0.05):
        self.alpha, self.e = alpha, e

    def upper_loss(self, x, y, batch):
        return (0.5 * (x["x"] - 1) ** 2 + (y["y"] - x["x"] - self.e).abs() ** self.alpha).sum()

    def lower_loss(self, x, y, batch):
        return (0.5 * (y["y"] - x["x"]) ** 2).sum()


class Lipschitz:
    """g = (y - x)^2 / 2, f = (x - 1)^2 / 2 + l y."""

    def __init__(self, slope: float):
        self.slope = slope

    def upper_loss(self, x, y, batch):
        return (0.5 * (x["x"] - 1) ** 2 + self.slope * y["y"]).sum()

    def lower_loss(self, x, y, batch):
        return (0.5 * (y["y"] - x["x"]) ** 2).sum()


class Uncoupled(QuadraticProblem):
    """The coupled quadratic with B = 0: y* does not depend on x, the dropped term is 0."""

    def __init__(self, seed: int):
        super().__init__(seed=seed)
        self.B = torch.zeros_like(self.B)


class LeastSquares:
    """Predictions u x + v y (two feature blocks); f = MSE on the upper batch, g = MSE + ridge
    ||y||^2 on the lower batch."""

    def upper_loss(self, x, y, batch):
        u, v, t = batch
        return ((u @ x["x"] + v @ y["y"] - t) ** 2).mean()

    def lower_loss(self, x, y, batch):
        u, v, t = batch
        return ((u @ x["x"] + v @ y["y"] - t) ** 2).mean() + 0.01 * (y["y"] ** 2).sum()


class NoisyLipschitz:
    """The Lipschitz shape on minibatches (the negative toy's kind of bias, under batch noise):
    f = mean((x - 1 + s)^2) / 2 + l y, g = mean((y - x - t)^2) / 2 with noise s, t of mean 0.
    PBGD-Free heads for x = 1, the bilevel solution is x = 1 - l: a gap of l^2 / 2."""

    def __init__(self, slope: float):
        self.slope = slope

    def upper_loss(self, x, y, batch):
        (s,) = batch
        return 0.5 * ((x["x"] - 1 + s) ** 2).mean() + self.slope * y["y"].sum()

    def lower_loss(self, x, y, batch):
        (t,) = batch
        return 0.5 * ((y["y"] - x["x"] - t) ** 2).mean()


def noise_data(n: int = 600):
    gen = torch.Generator().manual_seed(11)
    return (torch.randn(n, generator=gen, dtype=F64),), (torch.randn(n, generator=gen, dtype=F64),)


def least_squares_data(shift: float, n: int = 600, dim: int = 4):
    gen = torch.Generator().manual_seed(7)
    w = torch.randn(2 * dim, generator=gen, dtype=F64)
    sets = []
    for level in range(2):
        feats = torch.randn(n, 2 * dim, generator=gen, dtype=F64)
        target = feats @ (w + level * shift * torch.randn(2 * dim, generator=gen, dtype=F64))
        target = target + 0.1 * torch.randn(n, generator=gen, dtype=F64)
        sets.append((feats[:, :dim], feats[:, dim:], target))
    return sets[0], sets[1]


def phi(case: Case, x: dict) -> float:
    """f(x, y*(x)) on the evaluation batch, y*(x) by L-BFGS from the canonical y0."""
    batch = case.eval_batch or BilevelBatch(None, None)
    y0 = {k: v.clone() for k, v in case.starts[0][1].items()}
    tol = 1e-10 if next(iter(y0.values())).dtype == F64 else 1e-6
    y, _ = minimize(
        lambda y_: case.problem.lower_loss(x, y_, batch.lower), y0, 500, 0.1, "lbfgs", tol
    )
    with torch.no_grad():
        return float(case.problem.upper_loss(x, y, batch.upper))


def final_phi(case: Case, method: str, start: int, seed: int = 0) -> float:
    """phi at the end of ``case.steps`` steps of ``method`` from start ``start`` (``seed``'s data),
    averaged over the last ``case.tail`` evaluations, spaced ``case.steps / 8`` apart (a
    minibatch network's test loss wanders from step to step); inf if the run diverges."""
    x0, y0 = case.starts[start]
    extra = {"inner_steps": 5} if method == "alt_pbgd" else {}
    solver = SolverConfig(method=method, **{**case.settings, **extra}).build(case.problem)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        stream = as_batches(case.data(seed) if case.data else None, seed)
        state, values = solver.init(x0, y0), []
        for t in range(case.steps + 1):
            if t >= case.steps - (case.tail - 1) * case.steps // 8 and t % (case.steps // 8) == 0:
                values.append(phi(case, state.x))
            if t < case.steps:
                state, _ = solver.step(state, next(stream))
    return statistics.fmean(values) if all(map(math.isfinite, values)) else math.inf


def truth(case: Case, start: int) -> tuple[str, float, float]:
    """("as good" | "worse", gap, gap / tolerance) from this start: as good when the gap is
    within 5% of the achievable improvement, phi at the problem's reference point (its canonical
    start) less the better end, plus 1e-6 and, on minibatch data, what two PBGD-Free runs on
    different batch orders end apart (seeds 0 and 1): the rule diagnose's tolerance uses
    (bilevel_ray.diagnostics.verdict.tolerance), the same from every start."""
    free, alt = final_phi(case, "pbgd_free", start), final_phi(case, "alt_pbgd", start)
    gap = free - alt
    if not math.isfinite(gap):
        return "worse", gap, math.inf
    # On minibatch data, the precision a run can reach: what PBGD-Free on another batch order
    # (seed 1) ends apart from seed 0's run, added like diagnose's replica floor.
    noise = abs(free - final_phi(case, "pbgd_free", start, 1)) if case.data else 0.0
    tol = tolerance(phi(case, case.starts[0][0]), free, gap, 0.05, 1e-6, noise)
    return ("as good" if gap <= tol else "worse"), gap, gap / tol


def verdicts(case: Case, start: int) -> tuple[list[str], list[float], list[float]]:
    """The verdict from this start with every seed, each one's cost / tolerance and seconds."""
    out, ratios, seconds = [], [], []
    x0, y0 = case.starts[start]
    for seed in case.seeds:
        data = case.data(seed) if case.data else None
        settings = {k: v for k, v in case.settings.items() if k != "gamma"}
        t0 = time.monotonic()
        v = br.diagnose(
            case.problem,
            x0,
            y0,
            case.settings["gamma"],
            data=data,
            seed=seed,
            **settings,
            **({"eval_data": case.eval_batch} if case.held_out else {}),
            reference=case.starts[0][0],  # the problem's own start: one tolerance for all
            **case.diagnose,
        )
        seconds.append(time.monotonic() - t0)
        out.append(v.verdict)
        cost, tol = v.stats.get("flatness/cost", math.nan), v.stats.get("flatness/tolerance")
        ratios.append(cost / tol if tol else math.nan)
    return out, ratios, seconds


def cases() -> list[Case]:
    neg = {"lr_x": 0.01, "lr_y": 0.1, "gamma": 10.0}
    out = [
        Case(
            "toy-negative",
            NegativeToy(),
            [({"x": t64(x)}, {"y": t64(0.0)}) for x in (2.0, -8.0, 100.0)],
            neg,
            4000,
        ),
    ]
    pos = positive_toy()
    out.append(
        Case(
            "toy-positive",
            pos.problem,
            [(pos.x0, pos.y0)],
            {"lr_x": 0.01, "lr_y": 0.01, "gamma": 16.0, "inner_steps": 2},
            20000,
        )
    )
    quad = {"lr_x": 0.05, "lr_y": 0.2, "gamma": 10.0}

    def quad_starts(dim_x=3, dim_y=4):
        return [
            ({"x": s * torch.ones(dim_x, dtype=F64)}, {"y": torch.zeros(dim_y, dtype=F64)})
            for s in (0.0, 3.0, -5.0)
        ]

    for seed in (0, 1, 2):
        out.append(
            Case(
                f"quadratic coupled seed={seed}",
                QuadraticProblem(seed=seed),
                quad_starts(),
                quad,
                3000,
            )
        )
    for seed in (0, 1):
        out.append(
            Case(
                f"quadratic flat seed={seed}",
                QuadraticProblem(seed=seed, flat=True),
                quad_starts(),
                quad,
                3000,
            )
        )
    out.append(Case("quadratic uncoupled", Uncoupled(0), quad_starts(), quad, 3000))
    scalar = [({"x": t64(x)}, {"y": t64(0.0)}) for x in (3.0, -2.0, 10.0)]
    for alpha in (1.25, 1.5, 1.75):
        for gamma in (5.0, 20.0):
            out.append(
                Case(
                    f"holder alpha={alpha} gamma={gamma:g}",
                    Holder(alpha),
                    scalar,
                    {"lr_x": 0.05, "lr_y": 0.2, "gamma": gamma},
                    4000,
                )
            )
    for slope in (0.05, 2.0):
        out.append(
            Case(
                f"lipschitz l={slope}",
                Lipschitz(slope),
                scalar,
                {"lr_x": 0.05, "lr_y": 0.2, "gamma": 10.0},
                3000,
            )
        )
    for shift in (0.0, 1.0):
        upper, lower = least_squares_data(shift)
        for size in (20, 50, 200):

            def data(seed, upper=upper, lower=lower, size=size):
                return br.minibatches(upper, lower, size)

            out.append(
                Case(
                    f"least squares shift={shift:g} batch={size}",
                    LeastSquares(),
                    [({"x": torch.zeros(4, dtype=F64)}, {"y": torch.zeros(4, dtype=F64)})],
                    {"lr_x": 0.02, "lr_y": 0.1, "gamma": 10.0},
                    3000,
                    data=data,
                    seeds=(0, 1, 2, 3, 4),
                    eval_batch=BilevelBatch(upper, lower),
                )
            )
    upper, lower = noise_data()
    for slope in (0.5, 1.0, 2.0):
        for size in (8, 32):

            def data(seed, upper=upper, lower=lower, size=size):
                return br.minibatches(upper, lower, size)

            out.append(
                Case(
                    f"lipschitz minibatch l={slope:g} batch={size}",
                    NoisyLipschitz(slope),
                    [({"x": t64(3.0)}, {"y": t64(0.0)})],
                    {"lr_x": 0.05, "lr_y": 0.2, "gamma": 10.0},
                    3000,
                    data=data,
                    seeds=(0, 1, 2, 3, 4),
                    eval_batch=BilevelBatch(upper, lower),
                )
            )
    spec = BUILTIN_PROBLEMS["regression"]({})
    out.append(
        Case(
            "regression (built-in)",
            spec.problem,
            [(spec.x0, spec.y0)],
            {k: v for k, v in spec.defaults.items() if k != "steps"},
            3000,
            data=lambda seed, spec=spec: spec.data,
            seeds=(0, 1, 2, 3, 4),
            eval_batch=spec.eval_data,
        )
    )
    return out


def network_cases(data: str | None) -> list[Case]:
    """The two networks, each at its factory's settings. Their truths run 3000 (representation)
    and 1200 (peft) steps and average the last 3 (2) evaluations, an eighth of the run apart;
    their diagnoses run at the CLI's settings (``bilevel-ray diagnose``)."""
    out = []
    config = {"data": data} if data else {}
    spec = BUILTIN_PROBLEMS["representation"](config)
    settings = {k: v for k, v in spec.defaults.items() if k != "steps"}
    out.append(
        Case(
            "representation" + (" (NLSY79)" if data else " (synthetic)"),
            spec.problem,
            [(spec.x0, spec.y0)],
            settings,
            3000,
            data=lambda seed, spec=spec: spec.data,
            eval_batch=spec.eval_data,
            tail=3,
            held_out=True,
        )
    )
    spec = BUILTIN_PROBLEMS["peft-dpo-sft"]({})
    settings = {k: v for k, v in spec.defaults.items() if k != "steps"}
    out.append(
        Case(
            "peft-dpo-sft",
            spec.problem,
            [(spec.x0, spec.y0)],
            settings,
            1200,
            data=lambda seed, spec=spec: spec.data,
            eval_batch=spec.eval_data,
            tail=2,
            held_out=True,
        )
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--networks", action="store_true")
    parser.add_argument("--only-networks", action="store_true")
    parser.add_argument("--data", default=None, help="the NLSY79 CSV for representation")
    parser.add_argument("--unseen", action="store_true", help="the unseen problem classes")
    parser.add_argument("--sklearn", action="store_true", help="examples/sklearn_nets.py cases")
    parser.add_argument(
        "--cache",
        default="benchmarks/results/panel_truth.json",
        help="JSON file of the unseen classes' truths (read, and written as they are computed)",
    )
    parser.add_argument("--truth-only", action="store_true", help="print the truths, no diagnose")
    parser.add_argument("--refresh", action="store_true", help="recompute cached truths")
    parser.add_argument("--only", default=None, help="trials whose family/name contains this")
    args = parser.parse_args()
    if args.unseen or args.sklearn:
        unseen_main(args)
        return
    panel = [] if args.only_networks else cases()
    if args.networks or args.only_networks:
        panel += network_cases(args.data)
    table: Counter = Counter()
    right = total = 0
    unstable: list[str] = []
    consistency: list[str] = []
    start = time.monotonic()
    for case in panel:
        case.settings.pop("steps", None)
        labels = []
        for index, (x0, _) in enumerate(case.starts):
            t0 = time.monotonic()
            label, gap, share = truth(case, index)
            got, ratios, seconds = verdicts(case, index)
            labels.append((label, got))
            ok = [(v == "suitable") == (label == "as good") and v != "uncertain" for v in got]
            right, total = right + sum(ok), total + len(ok)
            for v in got:
                table[(label, v)] += 1
            counts = ", ".join(f"{n}x {v}" for v, n in Counter(got).items())
            finite = sorted(r for r in ratios if math.isfinite(r))
            spread = f"cost/tol {finite[0]:.2g}..{finite[-1]:.2g}" if finite else "cost/tol n/a"
            where = f" x0={_first(x0):g}" if len(case.starts) > 1 else ""
            print(
                f"{case.name + where:44s} truth {label:8s} gap {gap:9.3g} ({share:7.3g} x tol)  "
                f"verdicts: {counts} ({spread}; diagnose {max(seconds):.1f} s)"
                f"  [{time.monotonic() - t0:.1f} s]",
                flush=True,
            )
        # Same truth, different verdicts (over seeds or starts): the verdict is not stable.
        for label in {lab for lab, _ in labels}:
            seen = {v for lab, got in labels if lab == label for v in got}
            if len(seen) > 1:
                unstable.append(f"{case.name} ({label}: {', '.join(sorted(seen))})")
        every = [v for _, got in labels for v in got]
        common, n = Counter(every).most_common(1)[0]
        truths = sorted({lab for lab, _ in labels})
        consistency.append(
            f"{case.name:40s} {n}/{len(every)} agree ({common}) over {len(case.starts)} "
            f"start(s) x {len(case.seeds)} seed(s); truth: {' / '.join(truths)}"
        )
    print("\nper-problem consistency (the same verdict over every start and seed):")
    print("\n".join(consistency))
    print(
        f"\nconfusion (rows: truth, columns: verdict), {total} diagnoses of {len(panel)} problems"
    )
    print(f"{'':10s}" + "".join(f"{v:>12s}" for v in ("suitable", "uncertain", "unsuitable")))
    for label in ("as good", "worse"):
        print(
            f"{label:10s}"
            + "".join(f"{table[(label, v)]:12d}" for v in ("suitable", "uncertain", "unsuitable"))
        )
    print(
        f"right: {right}/{total} = {100 * right / total:.1f}%; 'suitable' where worse: "
        f"{table[('worse', 'suitable')]}; verdict differs under one truth: "
        f"{'; '.join(unstable) if unstable else 'none'}; total {time.monotonic() - start:.0f} s"
    )


VERDICTS = ("suitable", "uncertain", "unsuitable")


def diagnose_trial(trial: Any) -> tuple[str, str, float]:
    """(verdict, reason, seconds) of ``br.diagnose`` on one trial, with the horizon ``steps``
    where diagnose takes it; an exception is verdict "error"."""
    settings = {k: v for k, v in trial.settings.items() if k != "gamma"}
    extra = {"steps": trial.steps} if "steps" in inspect.signature(br.diagnose).parameters else {}
    t0 = time.monotonic()
    try:
        v = br.diagnose(
            trial.problem,
            trial.x0,
            trial.y0,
            trial.settings["gamma"],
            data=trial.data(trial.seed) if trial.data else None,
            eval_data=trial.eval_data,
            seed=trial.seed,
            **settings,
            **extra,
        )
        verdict, reason = v.verdict, v.reason
    except Exception as err:  # a crash is a wrong answer, not the end of the panel
        verdict, reason = "error", f"{type(err).__name__}: {err}"
    return verdict, reason, time.monotonic() - t0


def _marginal(r: dict) -> bool:
    """A truth within a factor 2 of its tolerance either way (tol / 2 < gap <= 2 tol)."""
    return math.isfinite(r["tol"]) and r["tol"] / 2 < r["gap"] <= 2 * r["tol"]


def _mark(r: dict) -> str:
    return "*" if _marginal(r) else " "


def _num(value: float, width: int = 9) -> str:
    if math.isfinite(value):
        return f"{value:{width}.3g}"
    return f"{'n/a' if math.isnan(value) else str(value):>{width}}"


def unseen_main(args: argparse.Namespace) -> None:
    """The unseen classes (panel_classes.py): truths (cached), then diagnoses and the tables."""
    import panel_classes
    import panel_truth

    start = time.monotonic()
    trials = []
    if args.unseen:
        for build in panel_classes.UNSEEN.values():
            trials += build()
    if args.sklearn:
        trials += panel_classes.sklearn()
    if args.only:
        trials = [t for t in trials if args.only in f"{t.family}/{t.name}"]
    cache = panel_truth.Cache(args.cache)
    truths, computed = {}, 0.0
    head = (
        f"{'trial':58s} {'intent':8s} {'truth':9s} {'phi_free':>9s} {'phi_alt':>9s} {'gap':>9s} "
        f"{'tol':>9s} {'gap/tol':>8s} {'noise':>9s} {'held_free':>9s} {'held_alt':>9s}"
    )
    print(f"TRUTH ({len(trials)} trials; cache {args.cache})\n{head}", flush=True)
    for trial in trials:
        r, cached = cache.get(trial, args.refresh)
        computed += 0.0 if cached else r["seconds"]
        truths[trial.key] = r
        ratio = r["gap"] / r["tol"] if r["tol"] and math.isfinite(r["tol"]) else math.inf
        print(
            f"{trial.key:58s} {trial.intent:8s} {r['truth']:8s}{_mark(r)} {_num(r['phi_free'])} "
            f"{_num(r['phi_alt'])} {_num(r['gap'])} {_num(r['tol'])} {_num(ratio, 8)} "
            f"{_num(r['noise'])} {_num(r['held_free'])} {_num(r['held_alt'])}"
            + ("" if cached else f"  [{r['seconds']:.1f} s]"),
            flush=True,
        )
    families = list(dict.fromkeys(t.family for t in trials))
    for family in families:
        got = Counter(truths[t.key]["truth"] for t in trials if t.family == family)
        clear = sum(
            truths[t.key]["gap"] > 2 * truths[t.key]["tol"] for t in trials if t.family == family
        )
        print(
            f"truth {family:9s}: {got['worse']} worse ({clear} with gap > 2 tol), "
            f"{got['as good']} as good"
        )
    print(
        f"truth computed in {computed:.0f} s (the rest from the cache); * marks a marginal "
        "truth (tol / 2 < gap <= 2 tol)"
    )
    if args.truth_only:
        return
    takes = "steps" in inspect.signature(br.diagnose).parameters
    print(
        f"\nDIAGNOSE (br.diagnose {'takes' if takes else 'does not take'} steps=: "
        f"{'the horizon passed' if takes else 'called without it'})",
        flush=True,
    )
    table: dict[str, Counter] = {family: Counter() for family in families}
    clear: Counter = Counter()  # the trials whose truth is not marginal
    diag_seconds = 0.0
    for trial in trials:
        r = truths[trial.key]
        verdict, reason, seconds = diagnose_trial(trial)
        diag_seconds += seconds
        table[trial.family][(r["truth"], verdict)] += 1
        right = (verdict == "suitable") == (r["truth"] == "as good") and verdict in (
            "suitable",
            "unsuitable",
        )
        if not _marginal(r):
            clear[(r["truth"], verdict)] += 1
        held = f"{_num(r['held_free'], 7).strip()}/{_num(r['held_alt'], 7).strip()}"
        print(
            f"{trial.key:58s} truth {r['truth']:8s}{_mark(r)} gap {_num(r['gap'])} "
            f"tol {_num(r['tol'])} held-out free/alt {held:15s} verdict {verdict:10s} "
            f"{'ok ' if right else 'NO '} {seconds:6.1f} s",
            flush=True,
        )
        if verdict == "error" or (verdict == "suitable" and r["truth"] == "worse"):
            print(f"    {reason[:400]}", flush=True)
    total: Counter = sum(table.values(), Counter())
    columns = (*VERDICTS, "error") if any(v == "error" for _, v in total) else VERDICTS
    print(f"\nconfusion (rows: truth, columns: verdict), {len(trials)} trials")
    print(f"{'':22s}" + "".join(f"{v:>12s}" for v in columns) + "   ('all clear': no *)")
    for family, counts in [*table.items(), ("all", total), ("all clear", clear)]:
        for label in ("as good", "worse"):
            print(
                f"{family:10s} {label:10s} " + "".join(f"{counts[(label, v)]:12d}" for v in columns)
            )
    n = len(trials)
    decided = sum(c for (_, v), c in total.items() if v in ("suitable", "unsuitable"))
    right = total[("as good", "suitable")] + total[("worse", "unsuitable")]
    print(
        f"summary: 'suitable' where worse: {total[('worse', 'suitable')]} (target 0); "
        f"decided (not uncertain): {decided}/{n} = {100 * decided / n:.0f}% (target >= 80%); "
        f"right: {right}/{n} = {100 * right / n:.0f}%; diagnose {diag_seconds:.0f} s, "
        f"truth {computed:.0f} s, total {time.monotonic() - start:.0f} s"
    )


def _first(x0: dict) -> float:
    return float(next(iter(x0.values())).flatten()[0])


if __name__ == "__main__":
    main()
