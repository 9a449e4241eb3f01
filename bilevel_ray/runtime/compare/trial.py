"""One run of ``br.compare``: one method, one seed, a wall-clock budget (a Tune trial).

The run goes until the budget of its own steps is spent (or the problem's step count, scaled
far up, is reached); the scoring is not charged to the budget (every run scores the same number
of points, whatever its speed), and the trial reports the whole run's wall time, scoring and
start included, beside it (``run_wall_s``, ``scoring_s``). Logged rows, at most 40 spread over
the budget, are scored on held-out data and kept as the curve, against the method's time and
step. The held-out upper rows are split in two, strided (rows 0, 2, 4, ... validate; rows 1, 3,
5, ... test): the validation half chooses a run's best point (early stopping), the test half is
what the comparison reports (:mod:`bilevel_ray.runtime.compare.rank`). Upper data that cannot
be split (none, as on a deterministic toy) serves as both.

* ``eval/upper_loss``: f(x, y) at the run's own y, on the test rows;
* ``eval/phi`` and ``eval/phi_val``: f(x, y_hat(x)) on the test and the validation rows, the
  bilevel objective phi(x) = f(x, y*(x)) with y_hat a tracked approximation of
  argmin_y g(x, .) on the held-out lower sample. Methods are compared on phi: a penalty
  method's y sits O(1/gamma) off the lower solution, where f can be lower than any bilevel
  solution's.
* ``eval/solved``: whether y_hat had settled for that x, i.e. phi was read at a solved y. The
  ranking (:mod:`~bilevel_ray.runtime.compare.rank`) reads only such points; the others are
  kept in the curve, flagged, and scored as nothing.

How y_hat is solved (:class:`_LowerSolution`). Adam on g(x, .), warm-started from the previous
point's y_hat (x moves little between points), or from the run's own y where that has the lower
g. Adam's step is about its learning rate whatever the gradient, so a fixed number of steps
(the former rule: TRACK_STEPS per point) leaves y_hat where it was when y*(x) is far from it,
and f(x, y_hat) is then not phi: on the negative toy (f = 10 y + x^2, min phi = -35) a
y_hat left below y*(x) = x - 1 read phi = -52 at bome's first point and made bome "soonest
to the target". Now each point runs rounds of
TRACK_STEPS (the first with ``gap_steps`` more at the final point) until the distance phi has
still to move, extrapolated from its moves m1, m2 over the two halves of the last round
(:func:`remaining`: m2 r / (1 - r), r = |m2 / m1|, when they shrink one way; |m2| when they
alternate; inf when they do not shrink), is at most

    settle(phi) = SETTLE * (RTOL * max(phi(x0) - phi, 0) + ATOL),

a tenth of the ranking's tolerance (:func:`~bilevel_ray.runtime.compare.rank.within`: 5% of
the improvement from the problem's start), with at most SETTLE_ROUNDS rounds after the first.
The extrapolation matters: Adam's steps shrink near the solution (its second moment remembers
the larger gradients), so a slow last round is no proof that phi is within reach. A point that
has not settled is left unscored, never reported at a y that is not a solution; the next point
warm-starts from its y_hat and usually settles. A point that tracks costs one round, as
before; the catching-up is paid once. Chosen over re-scoring only the best and the
target-crossing points: the target is known only once every run has ended, and the final
point's "to target" reads every point, so every point needs a sound phi. The solve is
scoring: not charged to the budget.

At the end the trial reports its final phi, the final f, the lower-level gap
g(x, y) - g(x, y_hat), the steps it took, its solver state's bytes and its process's peak
memory. A run that raised DivergenceError, or whose code raised, reports that with its reason.
Before it reports, a run that completed or diverged writes its checkpoint
``runs/<method>-seed<k>.json`` (:mod:`~bilevel_ray.runtime.compare.finished`), which a resumed
comparison reads instead of running it again.
"""

from __future__ import annotations

import math
import resource
import statistics
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import ray
import torch
from ray import tune as ray_tune

from bilevel_ray.errors import DivergenceError
from bilevel_ray.problems import build_spec
from bilevel_ray.runtime.compare.finished import write_finished
from bilevel_ray.runtime.compare.rank import within
from bilevel_ray.runtime.local import loop
from bilevel_ray.runtime.local.checkpoint import tensor_bytes
from bilevel_ray.runtime.local.history import write_parquet
from bilevel_ray.runtime.local.output_files import atomic_write
from bilevel_ray.runtime.local.run_spec import RunSpec
from bilevel_ray.runtime.local.solve import run_params, run_spec_local, solver_config
from bilevel_ray.runtime.local.threads import use_cpus
from bilevel_ray.runtime.tune.outcome import one_line

__all__ = [
    "CURVES",
    "PARAMS_FOLDER",
    "ComparePlan",
    "remaining",
    "run_compare_trial",
    "settle",
    "split_rows",
    "start_phi",
]

CURVES = "curves"  # a comparison's folder of per-run curve files
PARAMS_FOLDER = "params"  # each run's final parameters, until the comparison has chosen
TRACK_STEPS = 50  # lower steps of y_hat per round of a point's solve (warm-started)
SCORED_POINTS = 40  # a curve's points over the budget: the scoring's cost stays bounded
TRACK_LR = 1e-2
# A point's y_hat has settled when phi's extrapolated remaining move is at most SETTLE times
# the ranking's tolerance there; at most SETTLE_ROUNDS rounds after the first, else unscored.
SETTLE, SETTLE_ROUNDS = 0.1, 40  # as many rounds as phi(x0)'s (START_ROUNDS)
START_ROUNDS, START_SECONDS, START_RTOL = 40, 10.0, 1e-4  # phi(x0)'s tracking of y_hat


@dataclass(frozen=True)
class ComparePlan:
    """What every run of a comparison shares; ``settings[method]`` are that method's solver
    keywords (the problem's suggestions and the user's fixed settings, where they apply)."""

    factory: Any
    problem_config: Mapping[str, Any]
    settings: Mapping[str, Mapping[str, Any]]
    budget_s: float
    max_steps: int
    report_every: int
    gap_steps: int
    folder: str
    # The comparison's checked TrackingSettings and its parent MLflow run's id: each run logs
    # every row to a run of its own, nested under it (None: not tracked).
    tracking: Any = None
    tracking_parent: str | None = None
    # The comparison each run's checkpoint names (finished.comparison_key), and the (method,
    # seed) runs to run (None: every method and seed; a resume runs those not finished).
    key: str = ""
    todo: tuple[tuple[str, int], ...] | None = None
    # phi(x0) on the test rows (start_phi), the scale of each point's settle tolerance; NaN:
    # the trial measures it itself (a driver that does not pass it).
    start: float = math.nan


def run_compare_trial(point: dict[str, Any], plan: ComparePlan) -> None:
    """A Tune function trainable: ``point`` is ``{"method": ..., "seed": ...}``."""
    method, seed = point["method"], int(point["seed"])
    name = f"{method}-seed{seed}"
    began = time.perf_counter()
    try:
        use_cpus(ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0))
        rss_before = _peak_rss_mb()
        spec = build_spec(plan.factory, {**plan.problem_config, "device": "cpu"})
        settings = solver_config(method, dict(plan.settings[method]))
        sink = _BudgetSink(spec, plan, method, seed)
        run = RunSpec(plan.max_steps, seed, plan.report_every)
        sink.tracker = _tracker(plan, settings, run, point)
        status, reason, held_out = "completed", None, {}
        try:  # the sink ends the run once its budget is spent
            result = run_spec_local(spec, settings, run, also=sink, tracker=sink.tracker)
            held_out = result.held_out
            _keep_params(plan.folder, name, result)
            if sink.tracker is not None:
                if held_out:
                    sink.tracker.log_row({"step": result.state.step, **held_out})
                sink.tracker.end(result.status)
        except DivergenceError as err:
            status, reason = "diverged", f"diverged at step {err.step}: {err.what}"
        write_parquet(
            pa.Table.from_pylist(sink.rows), Path(plan.folder) / CURVES / f"{name}.parquet"
        )
        final = sink.rows[-1] if sink.rows else {}
        completed = status == "completed"
        report = {
            "status": status,
            "reason": reason,
            "steps": int(final.get("step", 0)),
            "wall_s": float(final.get("wall_s", math.nan)),
            "final_phi": float(final.get("eval/phi", math.nan)) if completed else math.nan,
            # False: the final point's y_hat had not settled, its phi is unscored (rank.py).
            "final_solved": bool(final.get("eval/solved", False)) and completed,
            "final_upper_loss": float(final.get("eval/upper_loss", math.nan))
            if completed
            else math.nan,
            "lower_gap": sink.gap,
            "state_bytes": sink.state_bytes,
            "peak_rss_mb": _peak_rss_mb(),
            "rss_growth_mb": _peak_rss_mb() - rss_before,
            "scoring_s": sink.scoring_s,
            "run_wall_s": time.perf_counter() - began,
            **held_out,  # the problem's own numbers at the end (eval/<name>), if any
        }
        # The checkpoint before the report: once Tune hears of the run, a comparison killed
        # after it can resume without it (finished.py).
        params = f"{PARAMS_FOLDER}/{name}.pt" if completed else None
        write_finished(plan.folder, plan.key, method, seed, report, sink.rows, params)
    except Exception as err:  # the run's own code raised: a result, with its reason
        # No checkpoint: a resume runs it again (as tune --resume reruns errored trials).
        report = {"status": "error", "reason": one_line(err)}
    ray_tune.report(report)


def _tracker(plan: ComparePlan, settings: Any, run: RunSpec, point: dict[str, Any]) -> Any:
    """This run's tracked run (Ray's ``setup_mlflow`` in the trial, nested under the
    comparison's), or None when untracked."""
    if plan.tracking is None:
        return None
    from bilevel_ray.tracking import trial_tracker

    params = run_params(settings, run, budget_s=plan.budget_s)
    params["seed"] = int(point["seed"])
    return trial_tracker(plan.tracking, plan.tracking_parent, params)


def _keep_params(folder: str, name: str, result: Any) -> None:
    """The run's final parameters in ``{folder}/params/<method>-seed<k>.pt`` (the comparison
    keeps each method's best run's as ``results/<method>.pt``)."""
    params = {"x": result.x, "y": result.y}
    path = Path(folder) / PARAMS_FOLDER / f"{name}.pt"
    atomic_write(path, lambda tmp: torch.save(params, tmp))


def split_rows(upper: Any) -> tuple[Any, Any] | None:
    """``upper`` cut into its validation rows (0, 2, 4, ...) and test rows (1, 3, 5, ...) along
    the first dimension of every tensor (all of one length, at least 2), or None where it
    cannot be cut (no tensors, mixed lengths, a scalar)."""
    leaves: list[torch.Tensor] = []

    def walk(b: Any) -> bool:
        if isinstance(b, torch.Tensor):
            leaves.append(b)
            return b.dim() > 0
        if isinstance(b, (tuple, list)):
            return all(walk(v) for v in b)
        if isinstance(b, dict):
            return all(walk(v) for v in b.values())
        return False

    if not walk(upper) or not leaves or len({len(v) for v in leaves}) != 1 or len(leaves[0]) < 2:
        return None

    def cut(b: Any, k: int) -> Any:
        if isinstance(b, torch.Tensor):
            return b[k::2]
        if isinstance(b, dict):
            return {n: cut(v, k) for n, v in b.items()}
        items = [cut(v, k) for v in b]
        return type(b)(*items) if hasattr(b, "_fields") else type(b)(items)

    return cut(upper, 0), cut(upper, 1)


def remaining(early: float, late: float) -> float:
    """How far phi has still to move, from its moves over the two halves of a round: late *
    r / (1 - r) with r = |late / early| where the solve converges geometrically (both moves
    one way, shrinking); |late| where phi oscillates about its limit (the moves alternate);
    inf where the moves do not shrink (y_hat still travels; Adam's step is ~lr however far)."""
    if late == 0.0:
        return 0.0
    if early * late < 0:
        return abs(late)
    r = abs(late / early) if early != 0.0 else math.inf
    return abs(late) * r / (1.0 - r) if r < 1.0 else math.inf


def settle(start: float, phi: float) -> float:
    """settle(phi) = SETTLE * (RTOL * max(phi(x0) - phi, 0) + ATOL): how far phi may still
    have to move for a point to count as solved (module docstring); without phi(x0) (NaN)
    the tolerance's scale is |phi|."""
    return SETTLE * within(start, phi, 0.0, 0.0)


class _LowerSolution:
    """y_hat(x), tracked: Adam on g(x, .) over the held-out lower sample, warm-started from the
    previous call's y_hat (x moves little between logged rows), or from the run's own y when
    that one has the lower g. f is read on the validation and the test halves of the held-out
    upper rows (the whole of them, twice, where they cannot be split)."""

    def __init__(self, problem: Any, batch: Any):
        self.problem, self.lower = problem, batch.lower
        halves = split_rows(batch.upper)
        self.split = halves is not None
        self.validate, self.test = halves if halves is not None else (batch.upper, batch.upper)
        self.y: dict[str, torch.Tensor] | None = None
        self.optimizer: torch.optim.Optimizer | None = None

    def _phi(self, x: Any) -> float:
        with torch.no_grad():
            return float(self.problem.upper_loss(x, self.y, self.test))

    def _descend(self, x: Any, steps: int) -> None:
        for _ in range(steps):
            self.optimizer.zero_grad()
            self.problem.lower_loss(x, self.y, self.lower).backward()
            self.optimizer.step()

    def scores(
        self, x: Any, y: Any, steps: int, start: float | None = None
    ) -> dict[str, float | bool | int]:
        """phi = f(x, y_hat) on the test and validation rows, f(x, y) on the test rows and the
        gap g(x, y) - g(x, y_hat), after ``steps`` more updates of y_hat; with ``start``
        (phi(x0), NaN if unknown) then rounds of TRACK_STEPS until remaining() is at most
        settle(start, phi), at most SETTLE_ROUNDS more (``eval/solved``: it settled;
        ``eval/lower_steps``: the updates taken). Without ``start``: ``steps`` only, and
        ``eval/solved`` says nothing (start_phi's own rule settles phi(x0))."""
        x = {k: v.detach() for k, v in x.items()}
        lower = self.lower
        with torch.no_grad():
            restart = self.y is None or float(self.problem.lower_loss(x, y, lower)) < float(
                self.problem.lower_loss(x, self.y, lower)
            )
        if restart:  # the run's own y is nearer the lower solution: start from it
            self.y = {k: v.detach().clone().requires_grad_(True) for k, v in y.items()}
            self.optimizer = torch.optim.Adam(self.y.values(), lr=TRACK_LR)
        phi, taken, rounds = self._phi(x), 0, 0
        solved = start is None
        while True:
            # A round in two halves: how far phi moved in each gives the rate at which the
            # solve converges, and so how far phi has still to go (remaining()).
            first = steps if rounds == 0 else TRACK_STEPS
            half = first // 2 if start is not None else 0
            before = phi
            self._descend(x, half)
            middle = self._phi(x)
            self._descend(x, first - half)
            phi, taken = self._phi(x), taken + first
            if solved or not math.isfinite(phi):
                break
            if (solved := remaining(middle - before, phi - middle) <= settle(start, phi)) or (
                rounds >= SETTLE_ROUNDS
            ):
                break
            rounds += 1
        with torch.no_grad():
            g_run = float(self.problem.lower_loss(x, y, lower))
            g_hat = float(self.problem.lower_loss(x, self.y, lower))
            return {
                "eval/phi": phi,
                "eval/phi_val": float(self.problem.upper_loss(x, self.y, self.validate))
                if self.split
                else phi,
                "eval/upper_loss": float(self.problem.upper_loss(x, y, self.test)),
                "eval/lower_gap": max(g_run - min(g_hat, g_run), 0.0),
                "eval/solved": bool(solved),
                "eval/lower_steps": taken,
            }


def start_phi(spec: Any) -> tuple[float, float, bool]:
    """phi(x0) on the test rows: y_hat tracked from y0 in rounds of TRACK_STEPS until g(x0, .)
    improves by less than START_RTOL of itself in a round, or after START_ROUNDS rounds or
    START_SECONDS (a tolerance's scale: it need not be exact); the seconds one scored point
    (TRACK_STEPS updates and the losses) takes (the rounds' median); whether the rows split."""
    lower = _LowerSolution(spec.problem, spec.eval_data)
    x0 = {k: v.detach() for k, v in spec.x0.items()}
    times, previous, phi = [], math.inf, math.nan
    with torch.random.fork_rng(devices=[]):
        while len(times) < START_ROUNDS and sum(times) < START_SECONDS:
            began = time.perf_counter()
            phi = lower.scores(x0, spec.y0, TRACK_STEPS)["eval/phi"]
            times.append(time.perf_counter() - began)
            with torch.no_grad():
                g = float(spec.problem.lower_loss(x0, lower.y, lower.lower))
            if not math.isfinite(g) or previous - g <= START_RTOL * abs(g):
                break
            previous = g
    return phi, statistics.median(times), lower.split


class _BudgetSink:
    """Scores logged rows, at most ``SCORED_POINTS`` over the budget; ends the run once its
    budget is spent (the final row's y_hat gets ``gap_steps`` more updates)."""

    def __init__(self, spec: Any, plan: ComparePlan, method: str, seed: int):
        self.plan, self.method, self.seed = plan, method, seed
        began = time.perf_counter()
        # Each point's settle tolerance is measured from phi(x0): the driver's, else our own.
        self.start = plan.start if math.isfinite(plan.start) else start_phi(spec)[0]
        self.lower = _LowerSolution(spec.problem, spec.eval_data)
        self.started = began  # the method's time is the time since, less the scoring's
        self.scoring_s = time.perf_counter() - began
        self.last_scored = -math.inf
        self.rows: list[dict[str, Any]] = []
        self.gap = math.nan
        self.state_bytes = 0
        self.tracker: Any = None  # the run's RowTracker: every row, the scored with scores

    def before_step(self, step: int) -> None:
        """Nothing to do before a step."""

    def after_step(self, outcome: loop.StepOutcome, state: Any, active: Any) -> bool:
        """Score the row (when due); True once the budget is spent: the run ends here."""
        if outcome.row is None:
            return False
        began = time.perf_counter()
        # The method's own time: the scoring of rows is not charged to it (a method that takes
        # more steps per second logs more rows).
        wall = began - self.started - self.scoring_s
        spent = wall >= self.plan.budget_s
        final = spent or outcome.done
        if not final and wall - self.last_scored < self.plan.budget_s / SCORED_POINTS:
            if self.tracker is not None:
                self.tracker.log_row(outcome.row)  # a scored row goes with its scores, below
            return False
        self.last_scored = wall
        steps = TRACK_STEPS + (self.plan.gap_steps if final else 0)
        scores = self.lower.scores(state.x, state.y, steps, self.start)
        self.rows.append(
            {
                "method": self.method,
                "seed": self.seed,
                "step": outcome.row["step"],
                "wall_s": wall,
                "eval/phi": scores["eval/phi"],
                "eval/phi_val": scores["eval/phi_val"],
                "eval/upper_loss": scores["eval/upper_loss"],
                "eval/solved": scores["eval/solved"],
                "eval/lower_steps": scores["eval/lower_steps"],
            }
        )
        if final:
            self.gap = scores["eval/lower_gap"]
            self.state_bytes = tensor_bytes(state)
        if self.tracker is not None:
            self.tracker.log_row({**outcome.row, **scores, "wall_s": wall})
        self.scoring_s += time.perf_counter() - began
        return spent


def _peak_rss_mb() -> float:
    """This process's peak resident memory (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
