"""Refusals of numbers: sizes, step sizes, counts, seeds and schedules.

Run counts (``steps``, ``report_every``, ``seed``, ``checkpoint_every``, ``num_workers``,
``max_failures``), step sizes and penalties (``lr_x``, ``lr_y``, ``gamma``), the update rules'
options (momentum, betas, eps, weight decay), the solvers' knobs (``inner_steps``, ``cg_steps``,
``cg_ridge``, ``bome_eta``, ``multiplier_growth``), schedules over their whole range or, for a
user callable, at every step, the built-in problems' sizes and seeds (checked before any
allocation, against this machine's memory), integers Python holds and torch does not, and the
numbers the CLI takes. A run whose step sizes make it diverge stops with a DivergenceError that
names the step. Each refusal comes before the first step (``br.solve``: no loss evaluated) or
before Ray starts (``br.train``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch

import bilevel_ray as br
import bilevel_ray.runtime.local.solve as local_runtime
from bilevel_ray.cli import main
from bilevel_ray.data import BilevelBatch
from bilevel_ray.problems.toys import NegativeToy

from .catalogue import (
    SOLVE,
    TUNE,
    api,
    cli,
    factory,
    needs_peft,
    params,
    report_folder,
    run_case,
)
from .support import (
    CountingProblem,
    assert_refused_before_start,
    assert_train_refused,
    negative_toy,
    solve,
    solve_args,
    t64,
)

S = br.schedules
TOO_LARGE = r": too large; must be an integer in "


def small_memory(run: Callable[[Path], Any], total: int = 2**30) -> Callable[[Path], Any]:
    """``run`` on a machine with ``total`` bytes of memory."""
    from bilevel_ray.problems import limits

    def patched(tmp: Path) -> Any:
        with mock.patch.object(limits, "physical_memory", lambda: total):
            return run(tmp)

    return patched


def population_room(
    run: Callable[[Path], Any], memory: int, per_trial: int, cpus: float = 64
) -> Callable[[Path], Any]:
    """``run`` where a sweep's trials have ``memory`` bytes and ``cpus`` CPUs, and one
    population member is estimated at ``per_trial`` bytes."""
    from bilevel_ray.runtime.tune import plan
    from bilevel_ray.runtime.tune.capacity import Capacity

    room = Capacity(memory, "MemAvailable", cpus, "this machine")

    def patched(tmp: Path) -> Any:
        with (
            mock.patch.object(plan, "sweep_capacity", lambda address: room),
            mock.patch.object(plan, "trial_memory", lambda problem, state: per_trial),
        ):
            return run(tmp)

    return patched


def _has(module: str) -> bool:
    from importlib.util import find_spec

    return find_spec(module) is not None


# --- br.solve: counts, step sizes and knobs ----------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"steps": 0}, r"^steps=0: must be an integer >= 1$"),
        ({"steps": 2.5}, r"^steps=2\.5: must be an integer >= 1$"),
        ({"steps": True}, r"^steps=True: must be an integer >= 1$"),
        ({"report_every": 0}, r"^report_every=0: must be an integer >= 1$"),
        ({"seed": -1}, r"^seed=-1: must be an integer >= 0$"),
        ({"seed": "0"}, r"^seed='0': must be an integer >= 0$"),
        ({"checkpoint_every": -2}, r"^checkpoint_every=-2: must be an integer >= 0$"),
        ({"lr_x": -0.1}, r"^lr_x=-0\.1: must stay > 0 at every step; e\.g\. lr_x=0\.01$"),
        ({"lr_y": math.inf}, r"^lr_y=inf: must be a finite number$"),
        ({"gamma": 0.0}, r"^gamma=0\.0: must stay > 0 at every step; e\.g\. gamma="),
        ({"inner_steps": 0}, r"^inner_steps=0: must be an integer >= 1"),
    ],
)
def test_solve_refuses_bad_numbers(overrides, match):
    assert_refused_before_start(match, **overrides)


@pytest.mark.parametrize(("checkpoint_every", "report_every"), [(3, 2), (1, 2), (5, 10)])
def test_solve_refuses_checkpoints_between_logged_rows(tmp_path, checkpoint_every, report_every):
    path = tmp_path / "ckpt.pt"
    assert_refused_before_start(
        rf"^checkpoint_every={checkpoint_every} must be a multiple of report_every="
        rf"{report_every}: a checkpoint carries the history up to a logged row$",
        steps=6,
        checkpoint_path=path,
        checkpoint_every=checkpoint_every,
        report_every=report_every,
    )
    assert not path.exists()


def _count_saves(monkeypatch) -> list[int]:
    """The step of each checkpoint br.solve saves."""
    steps: list[int] = []
    save = local_runtime.save_checkpoint

    def counting(payload, path, **options):
        steps.append(payload["state"]["step"])
        return save(payload, path, **options)

    monkeypatch.setattr(local_runtime, "save_checkpoint", counting)
    return steps


@pytest.mark.parametrize(
    ("checkpoint_every", "report_every", "saved_at"),
    [(0, 1, [5]), (0, 2, [5]), (2, 1, [2, 4, 5]), (4, 2, [4, 5]), (5, 5, [5])],
)
def test_checkpoint_settings_that_are_accepted(
    tmp_path, monkeypatch, checkpoint_every, report_every, saved_at
):
    """The counterpart of the refusals above: checkpoint_path alone saves only at the end;
    checkpoint_every (a multiple of report_every) saves every K steps and at the end."""
    saves = _count_saves(monkeypatch)
    path = tmp_path / "ckpt.pt"
    result = br.solve(
        **solve_args(
            steps=5,
            report_every=report_every,
            checkpoint_path=path,
            checkpoint_every=checkpoint_every,
        )
    )
    assert saves == saved_at
    assert result.state.step == 5
    saved = torch.load(path, weights_only=True)
    assert saved["state"]["step"] == 5 and saved["seed"] == 0
    assert [row["step"] for row in saved["history"]] == result.history["step"].to_pylist()


# --- SolverConfig: step sizes, update-rule options and the solvers' knobs ----------------------


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        (
            {"lr_x": -1.0, "lr_y": 0.0},
            r"^2 problems:\n  - lr_x=-1\.0: must stay > 0 at every step; e\.g\. lr_x=0\.01\n  - "
            r"lr_y=0\.0: must stay > 0 at every step; e\.g\. lr_y=0\.01$",
        ),
        ({"lr_x": math.nan}, r"^lr_x=nan: must be a finite number$"),
        ({"lr_x": True}, r"^lr_x=True: must be a number or a schedule .*; got bool$"),
        ({"lr_y": "fast"}, r"^lr_y='fast': must be a number or a schedule .*; got str$"),
        # the update rules' own checks (updates.py), through the config
        ({"nesterov": True}, r"^nesterov=True needs momentum > 0; set momentum=0\.9"),
        ({"momentum": 1.0}, r"^momentum=1\.0: must be in \[0, 1\)"),
        # Both levels report a bad weight_decay; the duplicate is dropped (no "2 problems").
        (
            {"weight_decay": -0.1},
            r"^weight_decay=-0\.1: must be a finite number >= 0; use weight_decay=0\.0 to "
            r"disable$",
        ),
        (
            {"optimizer": "adam", "eps": 0.0},
            r"^eps=0\.0: must be a finite number > 0; the usual value is 1e-8$",
        ),
        ({"optimizer": "adam", "eps": True}, r"^eps=True: must be a finite number > 0"),
        (
            {"optimizer": "adam", "betas": (0.9,)},
            r"^betas=\(0\.9,\): must be a pair \(beta1, beta2\)",
        ),
        ({"optimizer": "adam", "betas": (0.9, 1.0)}, r"^betas\[1\]=1\.0: must be in \[0, 1\)"),
        (
            {"optimizer": ("adam", "sgd"), "eps": -1.0, "momentum": 2.0},
            r"^2 problems:\n  - eps=-1\.0: must be a finite number > 0.*\n  - momentum=2\.0: "
            r"must be in \[0, 1\)",
        ),
        # the solvers' knobs (solvers/)
        ({"inner_steps": 0}, r"^inner_steps=0: must be an integer >= 1$"),
        ({"method": "pbgd", "inner_steps": 2.0}, r"^inner_steps=2\.0: must be an integer >= 1$"),
        ({"method": "bome", "inner_steps": True}, r"^inner_steps=True: must be an integer >= 1$"),
        ({"method": "implicit_cg", "cg_steps": 0}, r"^cg_steps=0: must be an integer >= 1$"),
        (
            {"method": "implicit_cg", "cg_ridge": -1.0},
            r"^cg_ridge=-1\.0: must be a finite number >= 0; it is added to the Hessian's diagonal",
        ),
        (
            {"method": "implicit_cg", "cg_ridge": math.nan},
            r"^cg_ridge=nan: must be a finite number >= 0",
        ),
        ({"method": "bome", "bome_eta": 0}, r"^bome_eta=0: must be a finite number > 0"),
        ({"method": "bome", "bome_eta": True}, r"^bome_eta=True: must be a finite number > 0"),
        (
            {"method": "f2sa", "multiplier_growth": -1.0},
            r"^multiplier_growth=-1\.0: must stay >= 0 at every step; e\.g\. "
            r"multiplier_growth=0\.0$",
        ),
        (
            {"method": "f2sa", "multiplier_growth": br.schedules.linear(0.0, -1.0, 10)},
            r"^multiplier_growth=linear\(init_value=0\.0, end_value=-1\.0, transition_steps=10, "
            r"transition_begin=0\): must stay >= 0 at every step",
        ),
        (
            {"method": "f2sa", "multiplier_growth": lambda t: -1.0},
            r"^multiplier_growth is -1\.0 at step 0: must be a finite number >= 0; fix the "
            r"schedule$",
        ),
        (
            {"method": "f2sa", "multiplier_growth": "fast"},
            r"^multiplier_growth='fast': must be a number or a schedule",
        ),
        ({"method": "f2sa", "gamma": 0.0}, r"^gamma=0\.0: must stay > 0 at every step"),
        (
            {"gamma": br.schedules.linear(1.0, 0.0, 10)},
            r"^gamma=linear\(init_value=1\.0, end_value=0\.0, transition_steps=10, "
            r"transition_begin=0\): must stay > 0 at every step",
        ),
        # A dict schedule is rebuilt first, so it is checked like the schedule it describes.
        (
            {
                "method": "alt_pbgd",
                "gamma": {"kind": "inverse_power", "scale": 0.0, "exponent": 1.0},
            },
            r"^gamma=inverse_power\(scale=0\.0, exponent=1\.0, offset=1\.0\): must stay > 0 at "
            r"every step",
        ),
        (
            {"method": "pbgd", "gamma": lambda t: -1.0},
            r"^gamma is -1\.0 at step 0: must be a finite number > 0; fix the schedule$",
        ),
        # update rules and solver knobs are checked together
        (
            {"method": "bome", "lr_y": -1.0, "bome_eta": 0.0},
            r"^2 problems:\n  - lr_y=-1\.0: must stay > 0.*\n  - bome_eta=0\.0: must be a "
            r"finite number > 0; BOME uses 0\.5$",
        ),
    ],
)
def test_solver_config_refuses_bad_numbers(settings, match):
    with pytest.raises(br.ConfigError, match=match):
        br.SolverConfig(**settings)


def test_solver_config_reports_every_problem_at_once():
    """Update-rule problems and the solver's knobs are reported together (the knobs used to be
    skipped once an update rule failed)."""
    with pytest.raises(br.ConfigError) as info:
        br.SolverConfig(lr_x=-1.0, inner_steps=0)
    assert info.value.problems == [
        "lr_x=-1.0: must stay > 0 at every step; e.g. lr_x=0.01",
        "inner_steps=0: must be an integer >= 1",
    ]


def test_non_finite_lr_message_names_the_argument():
    """as_schedule checks a number under the argument's name (not as 'constant.value')."""
    with pytest.raises(br.ConfigError, match=r"^lr_x=nan: must be a finite number$"):
        br.SolverConfig(lr_x=math.nan)


def test_nonpositive_gamma_message_suggests_a_penalty_sized_value():
    with pytest.raises(br.ConfigError) as info:
        br.SolverConfig(gamma=0.0)
    assert str(info.value) == "gamma=0.0: must stay > 0 at every step; e.g. gamma=10.0"


@pytest.mark.parametrize(
    "gamma",
    [br.schedules.constant(1.0), lambda t: 1.0, True, "10"],
    ids=["schedule", "callable", "bool", "str"],
)
def test_f2sa_factory_refuses_a_gamma_that_is_not_a_number(gamma):
    """solvers/f2sa.py's own check, for a caller that builds the solver without SolverConfig."""
    with pytest.raises(
        br.ConfigError,
        match=r"^gamma=.*: for f2sa gamma is the initial multiplier lam_0 and must be a number; "
        r"schedule its growth with multiplier_growth$",
    ):
        br.solvers.f2sa(CountingProblem(), update_x=br.sgd(0.1), update_y=br.sgd(0.1), gamma=gamma)
    solver = br.solvers.f2sa(CountingProblem(), update_x=br.sgd(0.1), update_y=br.sgd(0.1), gamma=2)
    assert solver.init({"x": t64(1.0)}, {"y": t64(0.0)}).extra["multiplier"] == 2.0


def test_f2sa_refuses_a_gamma_schedule():
    """F2SA's multiplier grows through multiplier_growth; a gamma schedule would be ignored."""
    with pytest.raises(
        br.ConfigError, match=r"^gamma=.*: for f2sa gamma is the initial multiplier"
    ):
        br.solve(**solve_args(method="f2sa", gamma=br.schedules.linear(1.0, 10.0, 5)))


def test_f2sa_negative_growth_schedule_refused_before_start():
    """A built-in growth schedule that turns negative is refused from its range before step 0
    (it used to stop the run at step 1)."""
    assert_refused_before_start(
        r"^multiplier_growth=linear\(init_value=0\.0, end_value=-1\.0, transition_steps=10, "
        r"transition_begin=0\): must stay >= 0 at every step; e\.g\. multiplier_growth=0\.0$",
        method="f2sa",
        multiplier_growth=br.schedules.linear(0.0, -1.0, 10),
    )


# --- br.sgd / br.adam (updates.py) ------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: br.sgd(-0.1), r"^lr=-0\.1: must stay > 0 at every step; e\.g\. lr=0\.01$"),
        (lambda: br.sgd(0.0, name="lr_y"), r"^lr_y=0\.0: must stay > 0 at every step"),
        (lambda: br.sgd(math.nan, name="lr_x"), r"^lr_x=nan: must be a finite number$"),
        (lambda: br.sgd("0.1"), r"^lr='0\.1': must be a number or a schedule"),
        (
            lambda: br.sgd(lambda t: 0.0, name="lr_x"),
            r"^lr_x is 0\.0 at step 0: must be a finite number > 0; fix the schedule$",
        ),
        (lambda: br.sgd(0.1, momentum=-0.1), r"^momentum=-0\.1: must be in \[0, 1\)"),
        (
            lambda: br.sgd(0.1, momentum=1.0),
            r"^momentum=1\.0: must be in \[0, 1\); typical values are 0\.9 or 0\.999$",
        ),
        (lambda: br.sgd(0.1, momentum="0.9"), r"^momentum='0\.9': must be in \[0, 1\)"),
        (lambda: br.sgd(0.1, momentum=True), r"^momentum=True: must be in \[0, 1\)"),
        (
            lambda: br.sgd(0.1, weight_decay=-1.0),
            r"^weight_decay=-1\.0: must be a finite number >= 0; use weight_decay=0\.0 to disable",
        ),
        (
            lambda: br.sgd(0.1, weight_decay=math.inf),
            r"^weight_decay=inf: must be a finite number >= 0",
        ),
        (
            lambda: br.sgd(0.1, weight_decay=True),
            r"^weight_decay=True: must be a finite number >= 0",
        ),
        (
            lambda: br.sgd(0.1, nesterov=True),
            r"^nesterov=True needs momentum > 0; set momentum=0\.9 or nesterov=False$",
        ),
        # every problem at once
        (
            lambda: br.sgd(-0.1, momentum=2.0, weight_decay=-1),
            r"^3 problems:\n  - lr=-0\.1: must stay > 0.*\n  - momentum=2\.0: must be in "
            r"\[0, 1\).*\n  - weight_decay=-1: must be a finite number >= 0",
        ),
        (lambda: br.adam(0.1, betas=0.9), r"^betas=0\.9: must be a pair \(beta1, beta2\)"),
        (
            lambda: br.adam(0.1, betas=(0.9, 0.99, 0.999)),
            r"^betas=\(0\.9, 0\.99, 0\.999\): must be a pair \(beta1, beta2\)",
        ),
        (lambda: br.adam(0.1, betas=(-0.1, 0.999)), r"^betas\[0\]=-0\.1: must be in \[0, 1\)"),
        (lambda: br.adam(0.1, betas=(0.9, 1.0)), r"^betas\[1\]=1\.0: must be in \[0, 1\)"),
        (
            lambda: br.adam(0.1, eps=0.0),
            r"^eps=0\.0: must be a finite number > 0; the usual value is 1e-8$",
        ),
        (lambda: br.adam(0.1, eps=-1e-8), r"^eps=-1e-08: must be a finite number > 0"),
        (lambda: br.adam(0.1, eps="1e-8"), r"^eps='1e-8': must be a finite number > 0"),
        (lambda: br.adam(0.1, eps=math.inf), r"^eps=inf: must be a finite number > 0"),
        (lambda: br.adam(0.1, eps=True), r"^eps=True: must be a finite number > 0"),
        (lambda: br.adam(0.1, weight_decay=-0.01), r"^weight_decay=-0\.01: must be a finite"),
        (lambda: br.adam(0.1, weight_decay=True), r"^weight_decay=True: must be a finite"),
        (
            lambda: br.adam(0, betas=(1.0, 2.0), eps=0, weight_decay=-1),
            r"^5 problems:\n  - lr=0: must stay > 0.*\n  - betas\[0\]=1\.0: .*\n  - betas\[1\]="
            r"2\.0: .*\n  - eps=0: .*\n  - weight_decay=-1: ",
        ),
    ],
)
def test_update_rules_refuse_bad_numbers(build, match):
    with pytest.raises(br.ConfigError, match=match):
        build()


def test_update_rules_accept_valid_options():
    """The counterpart of the refusals above: the boundary values are accepted."""
    assert br.sgd(1e-3, momentum=0.0, weight_decay=0.0).name == "sgd"
    assert br.sgd(lambda t: 0.1, momentum=0.9, nesterov=True).name == "sgd"
    assert br.adam(br.schedules.inverse_power(1.0, 0.5), betas=[0.0, 0.5], eps=1).name == "adam"
    assert br.updates.make_update("adam", 0.1, momentum=0.9).name == "adam"  # momentum not Adam's


def test_nonpositive_lr_message_shows_the_given_value():
    """The value is echoed as given (not as a schedule dict) with a step-size-sized example."""
    with pytest.raises(br.ConfigError) as info:
        br.sgd(-0.1, name="lr_x")
    assert str(info.value) == "lr_x=-0.1: must stay > 0 at every step; e.g. lr_x=0.01"


def test_invalid_momentum_does_not_add_a_false_nesterov_problem():
    with pytest.raises(br.ConfigError) as info:
        br.sgd(0.1, momentum=1.0, nesterov=True)
    assert info.value.problems == [
        "momentum=1.0: must be in [0, 1); typical values are 0.9 or 0.999"
    ]


# --- br.schedules -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "match"),
    [
        # _finite: every number field of a built-in schedule
        (lambda: S.constant(math.inf), r"^constant\.value=inf: must be a finite number$"),
        (lambda: S.constant(True), r"^constant\.value=True: must be a finite number$"),
        (lambda: S.linear(math.nan, 1.0, 5), r"^linear\.init_value=nan: must be a finite number$"),
        (lambda: S.linear(1.0, "2", 5), r"^linear\.end_value='2': must be a finite number$"),
        (
            lambda: S.inverse_power("1", 1.0),
            r"^inverse_power\.scale='1': must be a finite number$",
        ),
        (
            lambda: S.inverse_power(1.0, -math.inf),
            r"^inverse_power\.exponent=-inf: must be a finite number$",
        ),
        # linear's step counts
        (
            lambda: S.linear(1.0, 2.0, -1),
            r"^linear\.transition_steps=-1: must be an integer >= 0$",
        ),
        (
            lambda: S.linear(1.0, 2.0, 10, transition_begin=0.5),
            r"^linear\.transition_begin=0\.5: must be an integer >= 0$",
        ),
        # pbgd_ramp names its own arguments
        (
            lambda: S.pbgd_ramp(1.0, 10.0, -5),
            r"^gamma_argmax_step=-5: must be an integer >= 0 \(the step at which gamma reaches "
            r"gamma_max\)$",
        ),
        (lambda: S.pbgd_ramp(1.0, 10.0, True), r"^gamma_argmax_step=True: must be an integer"),
        (lambda: S.pbgd_ramp(1.0, 10.0, 5.0), r"^gamma_argmax_step=5\.0: must be an integer"),
        (lambda: S.pbgd_ramp(math.nan, 10.0, 5), r"^gamma_init=nan: must be a finite number$"),
        (lambda: S.pbgd_ramp(1.0, "10", 5), r"^gamma_max='10': must be a finite number$"),
        # inverse_power's offset
        (
            lambda: S.inverse_power(1.0, 1.0, offset=0.0),
            r"^inverse_power\.offset=0\.0: must be > 0 so that t \+ offset > 0 at t = 0",
        ),
        # as_schedule: numbers are checked under the argument's name; dicts are rebuilt
        (
            lambda: S.as_schedule("gamma", None),
            r"^gamma=None: must be a number or a schedule \(a callable of the step.*got NoneType$",
        ),
        (lambda: S.as_schedule("lr_x", math.nan), r"^lr_x=nan: must be a finite number$"),
        (lambda: S.as_schedule("lr_x", -math.inf), r"^lr_x=-inf: must be a finite number$"),
        (lambda: S.as_schedule("lr_x", False), r"^lr_x=False: must be a number or a schedule"),
        (
            lambda: S.as_schedule("gamma", {"kind": "cosine"}),
            r"^gamma=\{'kind': 'cosine'\}: 'kind' must be one of",
        ),
        # positive_schedule / nonnegative_schedule: the whole range of a built-in schedule
        (
            lambda: S.positive_schedule("gamma", S.inverse_power(-1.0, 1.0)),
            r"^gamma=inverse_power\(scale=-1\.0, exponent=1\.0, offset=1\.0\): must stay > 0 at "
            r"every step; e\.g\. gamma=",
        ),
        (
            lambda: S.positive_schedule("lr", S.linear(0.1, 0.0, 10), example="1e-3"),
            r"^lr=linear\(init_value=0\.1, end_value=0\.0, .*\): must stay > 0 at every step; "
            r"e\.g\. lr=1e-3$",
        ),
        (
            lambda: S.nonnegative_schedule("delta", -0.5),
            r"^delta=-0\.5: must stay >= 0 at every step; e\.g\. delta=0\.0$",
        ),
        (
            lambda: S.nonnegative_schedule("delta", S.inverse_power(-1.0, -1.0)),
            r"^delta=inverse_power\(scale=-1\.0, exponent=-1\.0, offset=1\.0\): must stay >= 0",
        ),
        # checked_value / positive_value: a user callable, at one step
        (
            lambda: S.positive_schedule("lr", lambda t: 0.0),
            r"^lr is 0\.0 at step 0: must be a finite number > 0; fix the schedule$",
        ),
        (
            lambda: S.nonnegative_schedule("delta", lambda t: -1.0),
            r"^delta is -1\.0 at step 0: must be a finite number >= 0; fix the schedule$",
        ),
        (
            lambda: S.positive_value("gamma", lambda t: math.inf, 3),
            r"^gamma is inf at step 3: must be a finite number > 0; fix the schedule$",
        ),
        (
            lambda: S.positive_value("gamma", lambda t: math.nan, 3),
            r"^gamma is nan at step 3: must be a finite number > 0",
        ),
        (
            lambda: S.positive_value("gamma", lambda t: "10", 0),
            r"^gamma is '10' at step 0: must be a finite number > 0",
        ),
        (
            lambda: S.checked_value("delta", lambda t: -0.5, 7, strict=False),
            r"^delta is -0\.5 at step 7: must be a finite number >= 0; fix the schedule$",
        ),
    ],
)
def test_schedules_refuse(build, match):
    with pytest.raises(br.ConfigError, match=match):
        build()


def test_schedules_accept_boundary_values():
    """The counterpart of the refusals above: the boundary cases are accepted."""
    assert S.pbgd_ramp(1.0, 10.0, 0)(0) == 10.0
    assert S.linear(1.0, 2.0, 0).transition_steps == 0
    # decays towards 0 but never reaches it
    assert S.positive_schedule("gamma", S.inverse_power(1.0, 1.0))(10**6) > 0
    assert S.nonnegative_schedule("delta", 0.0)(5) == 0.0
    assert S.nonnegative_schedule("delta", S.linear(0.0, 1.0, 10))(0) == 0.0
    assert S.positive_value("gamma", lambda t: 2, 0) == 2.0
    assert S.as_schedule("lr_x", {"kind": "constant", "value": 0.5}) == S.constant(0.5)
    assert S.from_dict(S.to_dict(S.pbgd_ramp(1.0, 10.0, 9))) == S.linear(1.0, 10.0, 9)


# --- user schedules: checked at t = 0 up front and at every later step ---------------------------


def test_user_gamma_schedule_checked_at_every_step():
    """A user callable is checked at t = 0 up front and at each later step while running."""
    problem = CountingProblem()
    with pytest.raises(
        br.ConfigError, match=r"^gamma is 0\.0 at step 2: must be a finite number > 0; fix the "
    ):
        br.solve(**solve_args(problem=problem, steps=5, gamma=lambda t: 1.0 if t < 2 else 0.0))


def test_user_multiplier_growth_checked_at_every_step():
    """F2SA's non-negative growth schedule: a user callable is checked at each step too."""
    with pytest.raises(
        br.ConfigError,
        match=r"^multiplier_growth is -1\.0 at step 2: must be a finite number >= 0; fix the "
        r"schedule$",
    ):
        br.solve(
            **solve_args(
                method="f2sa",
                inner_steps=1,
                steps=5,
                multiplier_growth=lambda t: 0.5 if t < 2 else -1.0,
            )
        )


def test_user_lr_schedule_checked_at_every_step():
    """A user lr callable is checked at each step, not only at t = 0 (a negative step size used
    to ascend silently)."""
    problem, x0, y0 = negative_toy()
    config = br.SolverConfig(lr_x=lambda t: 0.01 if t == 0 else -0.01)
    solver = config.build(problem)
    state = solver.init(x0, y0)
    state, _ = solver.step(state, BilevelBatch(None, None))
    with pytest.raises(
        br.ConfigError,
        match=r"^lr_x is -0\.01 at step 1: must be a finite number > 0; fix the schedule$",
    ):
        solver.step(state, BilevelBatch(None, None))


def test_solve_accepts_user_callable_lr():
    """Without a checkpoint, a user-written schedule runs to the end (result.config used to
    serialise it strictly and raise after the last step); the config shows its repr."""
    lr_x = lambda t: 0.05  # noqa: E731
    result = br.solve(**solve_args(lr_x=lr_x))
    assert result.state.step == 3
    assert result.config["lr_x"] == repr(lr_x)


# --- br.train: counts and step sizes, before any worker starts ---------------------------------


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"lr_x": -1.0}, r"^lr_x=-1\.0: must stay > 0 at every step"),
        ({"steps": 0}, r"^steps=0: must be an integer >= 1$"),
        ({"num_workers": 0}, r"^num_workers=0: must be an integer >= 1$"),
        ({"num_workers": 1.0}, r"^num_workers=1\.0: must be an integer >= 1$"),
        ({"max_failures": -1}, r"^max_failures=-1: must be an integer >= 0$"),
        ({"checkpoint_every": -1}, r"^checkpoint_every=-1: must be an integer >= 0$"),
        ({"report_every": 0}, r"^report_every=0: must be an integer >= 1$"),
        ({"seed": True}, r"^seed=True: must be an integer >= 0$"),
        (
            {"checkpoint_every": 3, "report_every": 2},
            r"^checkpoint_every=3 must be a multiple of report_every=2: a checkpoint carries the "
            r"history up to a logged row$",
        ),
    ],
)
def test_train_refuses_bad_numbers_before_any_worker_starts(tmp_path, no_ray, overrides, match):
    assert_train_refused(tmp_path, overrides, match)


# --- DivergenceError (runtime/local/history.py): step sizes too large --------------------------


def _diverge(report_every: int, lr_y: float = 5.0) -> br.DivergenceError:
    problem, x0, y0 = negative_toy()
    with pytest.raises(br.DivergenceError) as info:
        br.solve(problem, x0, y0, steps=1000, lr_y=lr_y, report_every=report_every)
    return info.value


def test_divergence_names_the_step_and_keeps_last_finite_metrics():
    err = _diverge(report_every=1)
    assert isinstance(err, FloatingPointError) and isinstance(err, br.BilevelRayError)
    assert err.step > 1
    assert err.metric in ("upper/loss", "lower/loss")
    message = str(err)
    assert re.match(
        # Not finite, or exploded first: past 1e12 times its first logged value.
        rf"diverged at step {err.step}: {re.escape(err.metric)} (is not finite|grew from \S+ "
        rf"to \S+, past any converging run); last finite metrics: step={err.step - 1}, "
        rf"upper/loss=",
        message,
    ), message
    assert message.endswith(
        ". Lower the step sizes lr_x / lr_y; with a penalty method, a smaller gamma or a gamma "
        "ramp (br.schedules.pbgd_ramp) also helps."
    ), message
    assert err.last_finite["step"] == err.step - 1
    for key in ("upper/loss", "lower/loss"):
        assert math.isfinite(err.last_finite[key])
    assert err.last_finite["penalty/gamma"] == 10.0


@pytest.mark.parametrize("report_every", [7, 1000])
def test_divergence_step_does_not_depend_on_report_every(report_every):
    """The exact step is named even when it falls inside a window of unlogged steps."""
    reference = _diverge(report_every=1)
    err = _diverge(report_every=report_every)
    assert (err.step, err.metric) == (reference.step, reference.metric)
    assert err.last_finite["step"] == reference.last_finite["step"]
    for key in ("upper/loss", "lower/loss", "penalty/gamma"):
        assert err.last_finite[key] == reference.last_finite[key]
    assert f"diverged at step {reference.step}: " in str(err)


def test_divergence_at_the_first_step_has_no_last_finite():
    err = _diverge(report_every=1, lr_y=1e308)
    assert err.step == 1
    assert err.last_finite == {}
    assert re.match(
        r"diverged at step 1: \S+ is not finite; last finite metrics: none \(the first step "
        r"already failed\)\.",
        str(err),
    ), str(err)


def test_divergence_last_finite_holds_only_finite_values():
    """last_finite used to carry the previous row's NaN placeholders (value/loss=nan for a
    method without a value function) when report_every=1."""
    err = _diverge(report_every=1)
    assert all(math.isfinite(v) for v in err.last_finite.values()), err.last_finite
    assert "value/loss" not in err.last_finite and "nan" not in str(err)


# --- the catalogue's cases: numbers through the API, the CLI and the built-in problems ----------

CASES = [
    api(
        "api-zero-lr",
        "API",
        "lr_y=0",
        lambda tmp: solve(lr_y=0.0),
        r"^lr_y=0\.0: must stay > 0 at every step; e\.g\. lr_y=0\.01$",
    ),
    api(
        "api-negative-gamma",
        "API",
        "gamma=-1",
        lambda tmp: solve(gamma=-1.0),
        r"^gamma=-1\.0: must stay > 0 at every step; e\.g\. gamma=\d",
    ),
    api(
        "api-negative-ramp",
        "API",
        "a gamma schedule that crosses zero (linear 10 -> -1)",
        lambda tmp: solve(gamma=br.schedules.linear(10.0, -1.0, 2)),
        r"^gamma=linear\(.*end_value=-1\.0.*\): must stay > 0 at every step; e\.g\. gamma=",
    ),
    api(
        "api-negative-steps",
        "API",
        "steps=-5",
        lambda tmp: solve(steps=-5),
        r"^steps=-5: must be an integer >= 1$",
    ),
    api(
        "api-negative-inner-steps",
        "API",
        "inner_steps=-1",
        lambda tmp: solve(inner_steps=-1),
        r"^inner_steps=-1: must be an integer >= 1",
    ),
    api(
        "api-train-negative-cpus",
        "API",
        "br.train resources_per_worker={'CPU': -1} with 2 workers",
        lambda tmp: br.train(
            "toy-negative",
            num_workers=2,
            resources_per_worker={"CPU": -1},
            steps=3,
            storage_path=tmp / "runs",
            name="r",
        ),
        r"^resources_per_worker=\{'CPU': -1\}: .*(> ?0|>= ?0|positive)",
        writes=("runs",),
    ),
    # integers Python holds and torch does not
    api(
        "lr-400-digits",
        "API",
        "lr_x=10**400 (an integer of 401 digits)",
        lambda tmp: solve(lr_x=10**400),
        r"^lr_x=<an integer of 401 digits>: too large; must be below 2\*\*63 \(for a rate or a "
        r"penalty, give a float such as 1e3\)$",
    ),
    api(
        "gamma-400-digits",
        "API",
        "gamma=-10**400",
        lambda tmp: solve(gamma=-(10**400)),
        r"^gamma=<an integer of 401 digits>: too large; must be below 2\*\*63",
    ),
    cli(
        "cli-set-lr-huge",
        "CLI",
        "solve --set lr_y=<a 400-digit integer>",
        SOLVE + " --set lr_y=" + "9" * 400,
        r"^error: lr_y=<an integer of 400 digits>: too large; must be below 2\*\*63",
    ),
    # the CLI's counts, step sizes and penalties
    cli(
        "cli-zero-workers",
        "CLI",
        "train --workers 0",
        "train regression --workers 0 --out {tmp}/out",
        match=r"^error: num_workers=0: must be an integer >= 1$",
        writes=("out",),
        process=True,
    ),
    cli(
        "cli-negative-max-failures",
        "CLI",
        "train --max-failures -1",
        "train regression --workers 1 --max-failures -1 --out {tmp}/out",
        match=r"^error: max_failures=-1: must be an integer >= 0$",
        writes=("out",),
    ),
    cli(
        "cli-zero-gamma",
        "CLI",
        "solve --set gamma=0",
        "solve toy-negative --set gamma=0 --out {tmp}/out",
        match=r"^error: gamma=0: must stay > 0 at every step; e\.g\. gamma=\d",
        writes=("out",),
        process=True,
    ),
    cli(
        "cli-nan-gamma",
        "CLI",
        "solve --set gamma=NaN",
        "solve toy-negative --set gamma=NaN",
        match=r"^error: gamma=nan: must be a finite number$",
    ),
    cli(
        "cli-zero-inner-steps",
        "CLI",
        "solve --method alt_pbgd --set inner_steps=0",
        "solve toy-negative --method alt_pbgd --set inner_steps=0",
        match=r"^error: inner_steps=0: must be an integer >= 1",
    ),
    cli(
        "cli-zero-report-every",
        "CLI",
        "solve --report-every 0",
        "solve toy-negative --report-every 0 --out {tmp}/out",
        match=r"^error: report_every=0: must be an integer >= 1$",
        writes=("out",),
    ),
    cli(
        "cli-zero-diagnose-window",
        "CLI",
        "solve --on-unsuitable stop --diagnose-window 0",
        "solve toy-negative --on-unsuitable stop --diagnose-window 0",
        match=r"^error: diagnose_window=0: must be an integer >= 1$",
    ),
    cli(
        "cli-diagnose-negative-gamma",
        "CLI",
        "diagnose --gamma -1",
        "diagnose toy-negative --gamma -1",
        match=r"^error: gamma=-1\.0: must be a finite number > 0; the penalty to diagnose at, "
        r"e\.g\. 10\.0$",
    ),
    cli(
        "cli-space-empty-range",
        "CLI",
        "tune --space 'gamma={\"loguniform\": [10, 1]}'",
        TUNE + """ --space 'gamma={"loguniform": [10, 1]}' --out {tmp}/sweeps""",
        match=r"^error: --space gamma=\{'loguniform': \[10, 1\]\}: .*(low|lower|bound)",
        writes=("sweeps",),
    ),
    cli(
        "cli-negative-gap-tol",
        "CLI",
        "tune --gap-tol -1",
        TUNE + """ --space 'gamma={"loguniform": [1, 10]}' --gap-tol -1 --out {tmp}/sweeps""",
        match=r"^error: gap_tol=-1\.0: must be a number >= 0$",
        writes=("sweeps",),
    ),
    cli(
        "report-gap-tol-nan",
        "CLI",
        "report --gap-tol nan",
        "report {tmp}/rep --gap-tol nan",
        r"^error: gap_tol=nan: must be a finite number >= 0, e\.g\. 0\.1$",
        writes=("rep",),
        setup=report_folder(),
    ),
    # a population (PBT / PB2) runs all at once: it must fit its machine's memory and CPUs
    cli(
        "cli-pbt-population-too-large",
        "CLI",
        "tune --scheduler pbt --samples 100000 (more trials than any one machine holds)",
        "tune toy-negative --scheduler pbt --samples 100000 --max-steps 5 --out {tmp}/sweeps",
        r"^error: scheduler='pbt' runs its whole population at once, and num_samples=100000 does "
        r"not fit: 100000 trials x \d+ MiB each is [\d,.]+ GiB, and (this machine|the Ray "
        r"cluster) has .* CPUs \(at most \d+ trials per CPU\); the largest population that fits "
        r"is \d+: use num_samples=\d+, or more memory or CPUs \(a Ray cluster: address=\.\.\.\)$",
        writes=("sweeps",),
    ),
    api(
        "api-pbt-population-over-memory",
        "API",
        "br.tune scheduler='pbt', num_samples=48 trials of about 400 MiB each, 5 GiB available",
        population_room(
            lambda tmp: br.tune(
                "toy-negative",
                scheduler="pbt",
                num_samples=48,
                steps=20,
                storage_path=tmp / "sweeps",
            ),
            memory=5 * 2**30,
            per_trial=400 * 2**20,
        ),
        r"^scheduler='pbt' runs its whole population at once, and num_samples=48 does not fit: "
        r"48 trials x 400 MiB each is 18\.8 GiB, and this machine has 5\.0 GiB of memory for the "
        r"trials \(MemAvailable\) and 64 CPUs \(at most \d+ trials per CPU\); the largest "
        r"population that fits is 12: use num_samples=12, or more memory or CPUs",
        writes=("sweeps",),
    ),
    api(
        "api-pb2-population-over-cpus",
        "API",
        "br.tune scheduler='pb2', num_samples=60 on 2 CPUs (memory to spare)",
        population_room(
            lambda tmp: br.tune(
                "toy-negative",
                scheduler="pb2",
                num_samples=60,
                steps=20,
                storage_path=tmp / "sweeps",
            ),
            memory=64 * 2**30,
            per_trial=400 * 2**20,
            cpus=2,
        ),
        r"^scheduler='pb2' runs its whole population at once, and num_samples=60 does not fit: .*"
        r"and 2 CPUs \(at most (\d+) trials per CPU\); the largest population that fits is "
        r"\d+: use num_samples=\d+",
        writes=("sweeps",),
        setup=lambda tmp: None if _has("sklearn") else "needs pip install 'bilevel_ray[pb2]'",
    ),
    cli(
        "report-gap-tol-inf",
        "CLI",
        "report --gap-tol inf",
        "report {tmp}/rep --gap-tol inf",
        r"^error: gap_tol=inf: must be a finite number >= 0",
        writes=("rep",),
        setup=report_folder(),
    ),
    cli(
        "report-gap-tol-negative",
        "CLI",
        "report --gap-tol -1",
        "report {tmp}/rep --gap-tol -1",
        r"^error: gap_tol=-1\.0: must be a finite number >= 0",
        writes=("rep",),
        setup=report_folder(),
    ),
    # the built-in problems' values, sizes and seeds (--config / problem_config)
    cli(
        "cli-nan-x0",
        "CLI",
        "solve toy-negative --config x0=NaN",
        "solve toy-negative --config x0=NaN",
        match=r"^error: 2 problems:\n  - upper_loss is nan at the initial point: fix x0 / y0 or "
        r"the data",
    ),
    cli(
        "cli-text-x0",
        "CLI",
        "solve toy-negative --config x0='\"abc\"'",
        "solve toy-negative --config 'x0=\"abc\"'",
        match=r"^error: problem 'toy-negative': x0='abc'.*number",
    ),
    cli(
        "config-toy-x0-400-digits",
        "CLI",
        "solve toy-negative --config x0=<a 400-digit integer>",
        "solve toy-negative --config x0=" + "9" * 400,
        r"^error: problem 'toy-negative': x0=<an integer of 400 digits>: too large; must be "
        r"below 2\*\*63 in size, e\.g\. --config x0=2\.0$",
    ),
    cli(
        "cli-zero-dim",
        "CLI",
        "solve quadratic --config dim_x=0",
        "solve quadratic --config dim_x=0",
        match=r"^error: problem 'quadratic': dim_x=0: must be an integer >= 1",
    ),
    cli(
        "config-dim-x-huge",
        "CLI",
        "solve quadratic --config dim_x=10000000",
        "solve quadratic --config dim_x=10000000",
        r"^error: problem 'quadratic': dim_x=10000000" + TOO_LARGE + r"\[1, 4096\] \(the "
        r"closed forms solve dense dim x dim systems\), e\.g\. --config dim_x=3$",
    ),
    api(
        "quadratic-seed-2-to-64",
        "API",
        "quadratic seed=2**64",
        factory("quadratic", seed=2**64),
        r"^problem 'quadratic': seed=18446744073709551616" + TOO_LARGE + r"\[0, 4294967295\] "
        r"\(a seed every random generator takes\), e\.g\. --config seed=0$",
    ),
    cli(
        "config-quadratic-seed-negative",
        "CLI",
        "solve quadratic --config seed=-1",
        "solve quadratic --config seed=-1",
        r"^error: problem 'quadratic': seed=-1: must be an integer >= 0, e\.g\. --config seed=0$",
    ),
    api(
        "quadratic-two-sizes",
        "API",
        "quadratic dim_x=10**12 and dim_y=-1 together",
        factory("quadratic", dim_x=10**12, dim_y=-1),
        r"^2 problems:\n  - problem 'quadratic': dim_x=1000000000000: too large.*\n  - problem "
        r"'quadratic': dim_y=-1: must be an integer >= 1, e\.g\. --config dim_y=4$",
    ),
    cli(
        "config-n-10-to-12",
        "CLI",
        "solve regression --config n=1000000000000",
        "solve regression --config n=1000000000000",
        r"^error: problem 'regression': n=1000000000000" + TOO_LARGE + r"\[1, 100000000\] "
        r"\(rows per group; the data is held in memory\), e\.g\. --config n=2000$",
    ),
    cli(
        "config-n-expression",
        "CLI",
        "solve regression --config n=10**12 (not JSON: a string)",
        "solve regression --config n=10**12",
        r"^error: problem 'regression': n='10\*\*12': must be an integer >= 1, e\.g\. "
        r"--config n=2000$",
    ),
    cli(
        "config-n-float",
        "CLI",
        "solve regression --config n=2.5",
        "solve regression --config n=2.5",
        r"^error: problem 'regression': n=2\.5: must be an integer >= 1, e\.g\. --config n=2000$",
    ),
    api(
        "regression-memory",
        "API",
        "regression n=2,000,000 x dim=100 on a machine of 1 GiB",
        small_memory(factory("regression", n=2_000_000, dim=100)),
        r"^problem 'regression': n=2000000 rows of dim=100 would take about 3\.6 GiB, more than "
        r"this machine's 1\.0 GiB of memory; lower n or dim$",
    ),
    api(
        "regression-ridge-400-digits",
        "API",
        "regression ridge=10**400",
        factory("regression", ridge=10**400),
        r"^problem 'regression': ridge=<an integer of 401 digits>: must be a finite number >= 0, "
        r"e\.g\. --config ridge=0\.01$",
    ),
    cli(
        "cli-zero-hidden",
        "CLI",
        "solve representation --config hidden=0",
        "solve representation --config hidden=0 --config n=200 --config batch_size=20 --steps 1",
        match=r"^error: problem 'representation': hidden=0: must be an integer >= 1",
    ),
    cli(
        "cli-test-fraction",
        "CLI",
        "solve representation --config test_fraction=1.5",
        "solve representation --config test_fraction=1.5 --config n=200",
        match=r"^error: problem 'representation': test_fraction=1\.5: must be",
    ),
    cli(
        "config-representation-n-huge",
        "CLI",
        "solve representation --config n=1000000000000",
        "solve representation --config n=1000000000000",
        r"^error: problem 'representation': n=1000000000000" + TOO_LARGE + r"\[1, 100000000\]",
    ),
    api(
        "representation-hidden-huge",
        "API",
        "representation hidden=10**6",
        factory("representation", hidden=10**6),
        r"^problem 'representation': hidden=1000000" + TOO_LARGE + r"\[1, 16384\] \(the "
        r"extractor's width; its middle layer is hidden x hidden\), e\.g\. --config hidden=200$",
    ),
    api(
        "representation-memory",
        "API",
        "representation n=2,000,000 synthetic rows on a machine of 1 GiB",
        small_memory(factory("representation", n=2_000_000)),
        r"^problem 'representation': n=2000000 rows and hidden=200 would take about 1\.9 GiB, "
        r"more than this machine's 1\.0 GiB of memory; lower n or hidden$",
    ),
    api(
        "representation-seed-2-to-64",
        "API",
        "representation seed=2**64",
        factory("representation", seed=2**64),
        r"^problem 'representation': seed=18446744073709551616" + TOO_LARGE,
    ),
    cli(
        "config-hyperclean-hidden-huge",
        "CLI",
        "solve hyperclean --config hidden=1000000000000",
        "solve hyperclean --config hidden=1000000000000 --method alt_pbgd",
        r"^error: problem 'hyperclean': hidden=1000000000000" + TOO_LARGE + r"\[0, 65536\] "
        r"\(the classifier's hidden width; 0 for a linear one\), e\.g\. --config hidden=32$",
    ),
    api(
        "hyperclean-seed-2-to-64",
        "API",
        "hyperclean seed=2**64",
        factory("hyperclean", seed=2**64),
        r"^problem 'hyperclean': seed=18446744073709551616" + TOO_LARGE + r"\[0, 4294967295\]",
    ),
    api(
        "hyperclean-ridge-400-digits",
        "API",
        "hyperclean ridge=10**400 (float() overflows)",
        factory("hyperclean", ridge=10**400),
        r"^problem 'hyperclean': ridge=<an integer of 401 digits>: must be a finite number >= 0; "
        r"use a small ridge such as 1e-3",
    ),
    cli(
        "config-peft-vocab-huge",
        "CLI",
        "solve peft-dpo-sft --config vocab=1000000000000",
        "solve peft-dpo-sft --config vocab=1000000000000",
        r"^error: problem 'peft-dpo-sft': vocab=1000000000000" + TOO_LARGE + r"\[2, 1048576\] "
        r"\(token ids; the largest tokenizers hold about 256k\), e\.g\. --config vocab=64$",
    ),
    api(
        "peft-seed-2-to-64",
        "API",
        "peft-dpo-sft seed=2**64",
        factory("peft-dpo-sft", seed=2**64),
        r"^problem 'peft-dpo-sft': seed=18446744073709551616" + TOO_LARGE,
    ),
    api(
        "peft-beta-400-digits",
        "API",
        "peft-dpo-sft beta=10**400",
        factory("peft-dpo-sft", beta=10**400),
        r"^problem 'peft-dpo-sft': beta=<an integer of 401 digits>: must be a finite number > 0$",
    ),
    api(
        "peft-data-memory",
        "API",
        "peft-dpo-sft n_pref=10**8 of 32768-token prompts",
        factory("peft-dpo-sft", n_pref=10**8, prompt_len=2**15),
        r"^problem 'peft-dpo-sft': the generated data would take about [\d,]+\.\d GiB, more "
        r"than this machine's [\d,.]+ GiB of memory; lower n_pref, n_sft, n_eval, prompt_len, "
        r"response_len or vocab$",
    ),
    api(
        "peft-built-model-memory",
        "API",
        "peft-dpo-sft hidden=65536, layers=1024 (a model of 7e13 parameters)",
        factory("peft-dpo-sft", hidden=2**16, layers=1024),
        r"^problem 'peft-dpo-sft': the built model \([\d,]+ parameters\) would take about "
        r"[\d,]+\.\d GiB, more than this machine's [\d,.]+ GiB of memory; choose a smaller "
        r"model \(fewer layers; a smaller hidden, vocab or MLP size\)$",
        setup=lambda tmp: needs_peft(),
    ),
    api(
        "peft-dict-model-memory",
        "API",
        "peft-dpo-sft model={'vocab_size': 10**9} (LlamaConfig's other defaults)",
        factory("peft-dpo-sft", model={"vocab_size": 10**9}),
        r"^problem 'peft-dpo-sft': model=\{'vocab_size': 1000000000\} \([\d,]+ parameters\) "
        r"would take about [\d,]+\.\d GiB, more than this machine's",
        setup=lambda tmp: needs_peft(),
    ),
]


def _spec_with_steps(steps: int) -> Any:
    """toy-negative's spec, its suggested steps replaced (a factory's ``defaults``)."""
    import dataclasses

    spec = br.problems.BUILTIN_PROBLEMS["toy-negative"]({})
    return dataclasses.replace(spec, defaults={**spec.defaults, "steps": steps})


def _two_cpus(run: Callable[[Path], Any]) -> Callable[[Path], Any]:
    """``run`` on a machine whose process may use two CPUs, with no Ray address set."""
    import os

    def patched(tmp: Path) -> Any:
        with (
            mock.patch.object(os, "sched_getaffinity", lambda pid: {0, 1}, create=True),
            mock.patch.dict(os.environ, {}, clear=False) as env,
        ):
            env.pop("RAY_ADDRESS", None)
            return run(tmp)

    return patched


STEPS_CAP = r"must be an integer in \[1, 100,000,000\]"

# Every number that sizes work is bounded where it enters.
CASES += [
    cli(
        "cli-steps-too-many",
        "CLI",
        "solve --steps 10**12 --report-every 1 (the history would grow without limit)",
        "solve toy-negative --steps 1000000000000 --report-every 1 --out {tmp}/out",
        r"^error: steps=1000000000000: too large; " + STEPS_CAP + r" \(.*e\.g\. steps=\d+\)$",
        writes=("out",),
    ),
    cli(
        "cli-history-rows-too-many",
        "CLI",
        "solve --steps 10**8 --report-every 1 (10**8 history rows in memory)",
        "solve toy-negative --steps 100000000 --report-every 1 --out {tmp}/out",
        r"^error: steps=100000000 with report_every=1 logs 100,000,000 history rows, more than "
        r"the 10,000,000 a run keeps in memory: log less often, with report_every >= 10 "
        r"\(--report-every 10\)$",
        writes=("out",),
    ),
    api(
        "api-factory-default-steps-too-many",
        "API",
        "br.solve(spec) whose factory suggests steps=10**12",
        lambda tmp: br.solve(_spec_with_steps(10**12)),
        r"^steps=1000000000000: too large; " + STEPS_CAP,
    ),
    api(
        "api-train-steps-too-many",
        "API",
        "br.train(steps=10**12)",
        lambda tmp: br.train("toy-negative", steps=10**12, storage_path=tmp / "out"),
        r"^steps=1000000000000: too large; " + STEPS_CAP,
    ),
    cli(
        "cli-workers-too-many",
        "CLI",
        "train --workers 1000000",
        "train toy-negative --workers 1000000 --steps 2 --out {tmp}/out --name r --quiet",
        r"^error: num_workers=1000000: too large; must be an integer in \[1, 10,000\] "
        r"\(.*e\.g\. num_workers=4\)$",
        writes=("out",),
    ),
    cli(
        "cli-workers-over-this-machine",
        "CLI",
        "train --workers 5000 with a local Ray (more CPUs than this machine has)",
        "train toy-negative --workers 5000 --steps 2 --out {tmp}/out --name r --quiet",
        r"^error: num_workers=5000 x 1 CPU per worker = 5000 CPUs, and this machine has \d+ "
        r"\(a local Ray gets no more\): lower num_workers \(--workers\) or resources_per_worker "
        r"\(--cpus-per-worker, e\.g\. 0\.5\), or give the address \(--address\)",
        writes=("out",),
    ),
    api(
        "api-workers-over-two-cpus",
        "API",
        "br.train(num_workers=3) on a two-CPU machine, local Ray",
        _two_cpus(
            lambda tmp: br.train(
                "toy-negative", num_workers=3, steps=2, storage_path=tmp / "out", name="r"
            )
        ),
        r"^num_workers=3 x 1 CPU per worker = 3 CPUs, and this machine has 2 ",
        writes=("out",),
    ),
    cli(
        "cli-samples-too-many",
        "CLI",
        "tune --samples 10**9",
        "tune toy-negative --samples 1000000000 --max-steps 5 --out {tmp}/sweeps",
        r"^error: num_samples=1000000000: too large; must be an integer in \[1, 100,000\] \(.*"
        r"e\.g\. num_samples=36\)$",
        writes=("sweeps",),
    ),
    cli(
        "cli-diagnose-check-steps-too-many",
        "CLI",
        "diagnose --check-steps 10**12",
        "diagnose toy-negative --steps 50 --check-steps 1000000000000 --quiet",
        r"^error: check_steps=1000000000000: too large; must be an integer in \[2, 100,000,000\] "
        r"\(.*e\.g\. check_steps=500, --check-steps 500\)$",
    ),
    cli(
        "cli-diagnose-replicas-too-many",
        "CLI",
        "diagnose --replicas 10**9",
        "diagnose regression --steps 50 --replicas 1000000000 --quiet",
        r"^error: replicas=1000000000: too large; must be an integer in \[1, 100\] \(.*"
        r"e\.g\. replicas=3, --replicas 3\)$",
    ),
    cli(
        "cli-diagnose-continuation-too-long",
        "CLI",
        "diagnose --check-steps 10**7 --replicas 100 (10**9 continued steps)",
        "diagnose toy-negative --steps 50 --check-steps 10000000 --replicas 100 --quiet",
        r"^error: check_steps=10000000 x replicas=100 = 1,000,000,000 continued steps per "
        r"method, more than the 100,000,000 a run may have: lower check_steps",
    ),
    cli(
        "cli-diagnose-at-end-check-steps-too-many",
        "CLI",
        "diagnose --at-end DIR --check-steps 10**12 (refused before the run is read)",
        "diagnose --at-end {tmp}/empty_dir --check-steps 1000000000000 --quiet",
        r"^error: check_steps=1000000000000: too large; " + STEPS_CAP,
    ),
    api(
        "api-diagnose-check-steps-too-many",
        "API",
        "br.diagnose(check_steps=10**15)",
        lambda tmp: br.diagnose(
            NegativeToy(), {"x": torch.ones(1)}, {"y": torch.zeros(1)}, check_steps=10**15
        ),
        r"^check_steps=1000000000000000: too large; must be an integer in \[2, 100,000,000\]",
    ),
    api(
        "api-diagnose-warmup-too-long",
        "API",
        "br.diagnose(warmup_steps=10**12, batches=10**6)",
        lambda tmp: br.diagnose(
            NegativeToy(),
            {"x": torch.ones(1)},
            {"y": torch.zeros(1)},
            warmup_steps=10**12,
            batches=10**6,
        ),
        r"warmup_steps=1000000000000: too large; .*\n?.*batches=1000000: too large; must be an "
        r"integer in \[1, 1,000\]",
    ),
    api(
        "api-diagnose-solve-steps-too-many",
        "API",
        "br.diagnose(solve_steps=10**9)",
        lambda tmp: br.diagnose(
            NegativeToy(), {"x": torch.ones(1)}, {"y": torch.zeros(1)}, solve_steps=10**9
        ),
        r"^solve_steps=1000000000: too large; must be an integer in \[1, 100,000\]",
    ),
    cli(
        "cli-text-samples-too-wide",
        "CLI",
        "text-samples --hidden 16384 --layers 64",
        "text-samples {tmp}/ts --hidden 16384 --layers 64",
        r"^error: hidden=16384: too large; must be a whole number from 1 to 4096 \(a small "
        r"sample model\); pass e\.g\. --hidden 64$",
        writes=(".",),
    ),
    cli(
        "cli-text-samples-too-deep",
        "CLI",
        "text-samples --layers 100000",
        "text-samples {tmp}/ts --layers 100000",
        r"^error: layers=100000: too large; must be a whole number from 1 to 64",
        writes=(".",),
    ),
    cli(
        "cli-text-samples-too-many-parameters",
        "CLI",
        "text-samples --hidden 2048 --layers 64 (4 billion parameters)",
        "text-samples {tmp}/ts --hidden 2048 --layers 64",
        r"^error: hidden=2048, layers=64: a model of about [\d,]+ parameters, more than the "
        r"100,000,000 a sample model may have; pass a smaller --hidden or --layers",
        writes=(".",),
    ),
]


def test_train_refused_for_cpus_leaves_no_run_folder(tmp_path, no_ray):
    """A group this machine cannot hold is refused before the run's folder is made."""
    out = tmp_path / "out"
    assert main(["train", "toy-negative", "--workers", "5000", "--steps", "2", "--out",
                 str(out), "--name", "r", "--quiet"]) == 2  # fmt: skip
    assert not (out / "r").exists()


def test_bounds_accept_their_largest_values():
    """The caps are inclusive: the largest value of each is a valid setting."""
    from bilevel_ray.runtime.local.run_spec import Placement, RunSpec

    RunSpec(100_000_000, report_every=10)
    Placement(num_workers=10_000, max_failures=1_000)


@pytest.mark.parametrize("case", params(CASES))
def test_bad_input(case, tmp_path, request, no_compare_ray):
    run_case(case, tmp_path, request, CASES)


# --- round three (a hidden catalogue's classes, closed) -------------------------------


@pytest.mark.parametrize("value", [100_001, 10**12])
def test_an_inner_loop_of_hours_is_refused_with_the_bound(value):
    with pytest.raises(br.ConfigError, match=r"inner_steps=.*must be at most 100,000") as err:
        br.solve(NegativeToy(), {"x": torch.ones(1)}, {"y": torch.zeros(1)}, inner_steps=value)
    assert "e.g. inner_steps=10" in str(err.value)


def test_thousands_of_threads_are_refused(monkeypatch, capsys):
    monkeypatch.setenv("OMP_NUM_THREADS", "100000")
    assert main(["solve", "toy-negative", "--steps", "5", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "OMP_NUM_THREADS='100000': at most 1024" in err and "OMP_NUM_THREADS=2" in err
