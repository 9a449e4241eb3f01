"""Every error bilevel_ray raises on purpose, triggered through the public API.

Each ``raise`` in the library (except the CLI and the Ray runtimes) has a test here that provokes
it and checks the meaningful part of its message: the argument or object it names and the rule
it states. ``br.solve`` must refuse bad input *before* any step runs, which the tests check with
a problem that counts its loss evaluations. Each refusal has a positive control: the same call,
valid, works. Tests marked ``xfail(strict=True)`` pin down library bugs that remain; each reason
names the file and the fix. The tests under "Fixed library bugs" pinned bugs that are now fixed
and keep them fixed.

Everything runs in float64 on problems with one or two scalars, so the file takes seconds.
"""

from __future__ import annotations

import math
import re
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from torch import nn

import bilevel_ray as br
from bilevel_ray.data import BilevelBatch
from bilevel_ray.runtime.checkpoint import CHECKPOINT_KEYS

F64 = torch.float64


def t64(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


class CountingProblem:
    """f = (x - 1)^2 + (y - x)^2, g = (y - x)^2, counting every loss evaluation.

    ``upper`` / ``lower`` replace a loss by ``fn(x, y)`` to build a broken problem.
    """

    def __init__(self, upper=None, lower=None):
        self.calls = {"upper": 0, "lower": 0}
        self._upper = upper or (lambda x, y: ((x["x"] - 1) ** 2 + (y["y"] - x["x"]) ** 2).sum())
        self._lower = lower or (lambda x, y: ((y["y"] - x["x"]) ** 2).sum())

    def upper_loss(self, x, y, batch):
        self.calls["upper"] += 1
        return self._upper(x, y)

    def lower_loss(self, x, y, batch):
        self.calls["lower"] += 1
        return self._lower(x, y)


NO_CALLS = {"upper": 0, "lower": 0}


def solve_args(**overrides):
    """Keyword arguments of a tiny, valid ``br.solve`` call, with ``overrides`` applied."""
    args = {
        "problem": CountingProblem(),
        "x0": {"x": t64(2.0)},
        "y0": {"y": t64(0.0)},
        "steps": 3,
        "report_every": 1,
    }
    args.update(overrides)
    return args


def _snapshot(group):
    if not isinstance(group, dict):
        return group
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in group.items()}


def assert_refused_before_start(match: str, **overrides) -> br.ConfigError:
    """``br.solve`` raises ConfigError matching ``match`` without evaluating a loss, and leaves
    x0 / y0 as they were."""
    args = solve_args(**overrides)
    before = {level: _snapshot(args[level]) for level in ("x0", "y0")}
    with pytest.raises(br.ConfigError, match=match) as info:
        br.solve(**args)
    if isinstance(args["problem"], CountingProblem):
        assert args["problem"].calls == NO_CALLS
    for level, group in before.items():
        if isinstance(group, dict):
            assert group.keys() == args[level].keys()
            for k, v in group.items():
                if isinstance(v, torch.Tensor):
                    assert torch.equal(v, args[level][k])
    return info.value


def test_valid_call_runs():
    """The baseline every refusal below varies: it must work, so each refusal is meaningful."""
    args = solve_args()
    result = br.solve(**args)
    assert result.history.num_rows == 3
    assert args["problem"].calls["upper"] > 1 and args["problem"].calls["lower"] > 1


# --- br.solve: run settings (runtime/local.py) -------------------------------------------------


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
        ({"checkpoint_every": 5}, r"checkpoint_every / resume need checkpoint_path"),
        ({"resume": True}, r"checkpoint_every / resume need checkpoint_path"),
        (
            {"checkpoint_path": "never/written.pt"},
            r"checkpoint_path='never/written\.pt' given with checkpoint_every=0: nothing would "
            r"be saved",
        ),
        ({"lr": 0.1}, r"unknown keyword\(s\) \['lr'\]; solver settings are: .*\blr_x\b"),
        (
            {"gamma": 1.0, "stepz": 3},
            r"unknown keyword\(s\) \['stepz'\].*run settings are: steps, ",
        ),
    ],
)
def test_solve_refuses_bad_run_settings(overrides, match):
    assert_refused_before_start(match, **overrides)


# --- br.solve: solver settings, problem, x0 / y0 (config.py, problem.py) -------------------------


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"method": "sgd"}, r"method='sgd': unknown; choose one of pbgd_free, pbgd, "),
        ({"method": None}, r"^method=None: unknown; choose one of pbgd_free, pbgd, "),
        ({"lr_x": -0.1}, r"^lr_x=-0\.1: must stay > 0 at every step; e\.g\. lr_x=0\.01$"),
        ({"lr_y": math.inf}, r"^lr_y=inf: must be a finite number$"),
        ({"gamma": 0.0}, r"^gamma=0\.0: must stay > 0 at every step; e\.g\. gamma="),
        ({"inner_steps": 0}, r"^inner_steps=0: must be an integer >= 1"),
        ({"method": "bome", "gamma": 1.0}, r"gamma=1\.0 does not apply to method='bome'"),
        (
            {"problem": object()},
            r"problem object lacks upper_loss, lower_loss: a problem needs upper_loss\(x, y, "
            r"batch\) and lower_loss\(x, y, batch\)",
        ),
        ({"x0": [2.0]}, r"^x0 is a list: must be a dict of tensors"),
        ({"y0": {}}, r"^y0 is empty: each level needs at least one tensor"),
    ],
)
def test_solve_refuses_bad_settings_and_params(overrides, match):
    assert_refused_before_start(match, **overrides)


# --- br.solve: the data argument (data.py as_batches / _cycle) ---------------------------------


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (
            (torch.zeros(3), torch.zeros(3)),
            r"data=\(tensor, tensor\) is ambiguous: for in-memory tensors pass br\.full_batch",
        ),
        (([None], 5), r"data lower source is a int: must be re-iterable"),
        ((iter([None]), [None]), r"data upper source is a one-shot iterator: it cannot restart"),
        (([], [None]), r"data upper yielded no batch; it must yield at least one"),
        (([None], []), r"data lower yielded no batch; it must yield at least one"),
        ("batches", r"data is a str: pass None, br\.full_batch\(\.\.\.\), br\.minibatches"),
        ([[None], [None], [None]], r"data is a list: pass None, br\.full_batch"),
    ],
)
def test_solve_refuses_bad_data(data, match):
    assert_refused_before_start(match, data=data)


# --- br.solve: the one loss evaluation before step 0 (problem.py check_losses) ------------------
# Each loss is evaluated exactly once (the check), never by a solver step.


@pytest.mark.parametrize(
    ("upper", "lower", "match"),
    [
        (
            lambda x, y: 1.0,
            None,
            r"^upper_loss returned a float: must return a scalar torch\.Tensor$",
        ),
        (
            None,
            lambda x, y: (y["y"] - x["x"]) ** 2,
            r"^lower_loss returned a tensor of shape \(1,\): must be a scalar \(0-d\) tensor; "
            r"reduce it with \.mean\(\) or \.sum\(\)$",
        ),
        (
            lambda x, y: torch.tensor(3),
            None,
            r"^upper_loss returned dtype torch\.int64: must be floating point$",
        ),
        (
            None,
            lambda x, y: (y["y"] * math.nan).sum(),
            r"^lower_loss is nan at the initial point: fix x0 / y0 or the data$",
        ),
        (
            lambda x, y: (y["y"] + math.inf).sum(),
            None,
            r"^upper_loss is inf at the initial point",
        ),
        (
            None,
            lambda x, y: (x["x"] ** 2).sum(),
            r"^lower_loss does not depend on y: its gradient is undefined",
        ),
        (
            lambda x, y: (x["x"].detach() ** 2 + y["y"].detach() ** 2).sum(),
            None,
            r"^upper_loss does not depend on x or y: its gradient is undefined",
        ),
        (
            lambda x, y: 1.0,
            lambda x, y: (y["y"] - x["x"]) ** 2,
            r"^2 problems:\n  - upper_loss returned a float.*\n  - lower_loss returned a tensor "
            r"of shape \(1,\)",
        ),
    ],
)
# problem.py:289 formats the NaN loss with float(out) while it requires grad; torch warns (once).
@pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad=True:UserWarning")
def test_solve_refuses_unusable_losses(upper, lower, match):
    problem = CountingProblem(upper, lower)
    with pytest.raises(br.ConfigError, match=match):
        br.solve(**solve_args(problem=problem))
    assert problem.calls == {"upper": 1, "lower": 1}


# --- br.solve: x0 / y0 (problem.py check_params) ----------------------------------------------

_W = torch.zeros(2, dtype=F64)


@pytest.mark.parametrize(
    ("x0", "y0", "match"),
    [
        ("x", {"y": t64(0.0)}, r"^x0 is a str: must be a dict of tensors such as \{'w': "),
        ({"x": t64(1.0)}, {}, r"^y0 is empty: each level needs at least one tensor to optimize$"),
        ({1: t64(1.0)}, {"y": t64(0.0)}, r"^x0 key 1: names must be strings$"),
        (
            {"x": 1.5},
            {"y": t64(0.0)},
            r"^x0\['x'\] is a float: must be a torch\.Tensor \(wrap it: torch\.tensor\(1\.5\)\)$",
        ),
        (
            {"x": t64(1.0)},
            {"y": torch.tensor([1])},
            r"^y0\['y'\] has dtype torch\.int64: must be floating point",
        ),
        (
            {"w": t64(1.0)},
            {"w": t64(2.0)},
            r"^x0 and y0 share the names \['w'\]: each tensor belongs to exactly one level",
        ),
        (
            {"x": _W},
            {"y": _W},
            r"^x0\['x'\] and y0\['y'\] are the same tensor \(shared memory, e\.g\. tied weights\)",
        ),
        (
            [1.0],
            {},
            r"^2 problems:\n  - x0 is a list: must be a dict.*\n  - y0 is empty",
        ),
    ],
)
def test_solve_refuses_bad_x0_y0(x0, y0, match):
    assert_refused_before_start(match, x0=x0, y0=y0)


# --- SolverConfig: method options, optimizers, cross-checks (config.py, updates.py, solvers/) -----


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ({"method": "adamw"}, r"^method='adamw': unknown; choose one of pbgd_free, pbgd, alt_pbgd"),
        (
            {"method": "bome", "gamma": 1.0},
            r"^gamma=1\.0 does not apply to method='bome' \(only to pbgd_free, pbgd, alt_pbgd, "
            r"f2sa\); remove it$",
        ),
        (
            {"cg_steps": 3},
            r"^cg_steps=3 does not apply to method='pbgd_free' \(only to implicit_cg\)",
        ),
        (
            {"method": "pbgd", "bome_eta": 0.5, "multiplier_growth": 1.0},
            r"^2 problems:\n  - multiplier_growth=1\.0 does not apply to method='pbgd' "
            r"\(only to f2sa\).*\n  - bome_eta=0\.5 does not apply to method='pbgd' "
            r"\(only to bome\)",
        ),
        (
            {"lr_x": -1.0, "lr_y": 0.0},
            r"^2 problems:\n  - lr_x=-1\.0: must stay > 0 at every step; e\.g\. lr_x=0\.01\n  - "
            r"lr_y=0\.0: must stay > 0 at every step; e\.g\. lr_y=0\.01$",
        ),
        ({"lr_x": math.nan}, r"^lr_x=nan: must be a finite number$"),
        ({"lr_x": True}, r"^lr_x=True: must be a number or a schedule .*; got bool$"),
        ({"lr_y": "fast"}, r"^lr_y='fast': must be a number or a schedule .*; got str$"),
        # A non-string method is refused by name, not with a TypeError from a dict lookup.
        ({"method": ["pbgd"]}, r"^method=\['pbgd'\]: unknown; choose one of pbgd_free, pbgd, "),
        # _kinds: the optimizer setting itself (reported once, not once per level)
        (
            {"optimizer": ("sgd",)},
            r"^optimizer=\('sgd',\): must be one of sgd, adam or a pair such as \('adam', 'sgd'\) "
            r"for \(x, y\)$",
        ),
        ({"optimizer": 5}, r"^optimizer=5: must be one of sgd, adam or a pair"),
        ({"optimizer": "rmsprop"}, r"^optimizer='rmsprop': must be one of sgd, adam or a pair"),
        (
            {"optimizer": ("adam", "lion")},
            r"^optimizer=\('adam', 'lion'\): must be one of sgd, adam or a pair",
        ),
        # stray options: set away from their neutral value, taken by no optimizer in use
        (
            {"optimizer": "adam", "momentum": 0.9},
            r"^optimizer='adam' does not take momentum; adam takes betas, eps, weight_decay, "
            r"decoupled_weight_decay$",
        ),
        (
            {"betas": (0.8, 0.9)},
            r"^optimizer='sgd' does not take betas; sgd takes momentum, weight_decay, nesterov$",
        ),
        (
            {"optimizer": ("sgd", "sgd"), "eps": 1e-7, "decoupled_weight_decay": True},
            r"^optimizer=\('sgd', 'sgd'\) does not take eps, decoupled_weight_decay; sgd takes "
            r"momentum, weight_decay, nesterov$",
        ),
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
def test_solver_config_refuses(settings, match):
    with pytest.raises(br.ConfigError, match=match):
        br.SolverConfig(**settings)


@pytest.mark.parametrize(
    ("d", "match"),
    [
        (
            {"lr": 0.1, "gama": 1.0},
            r"^unknown solver setting\(s\) \['gama', 'lr'\]; the allowed ones are: method, lr_x",
        ),
        (
            {"lr_x": {"kind": "cosine"}},
            r"^lr_x=\{'kind': 'cosine'\}: 'kind' must be one of \['constant', 'inverse_power', "
            r"'linear'\]",
        ),
        (
            {"gamma": {"kind": "linear", "init_value": 1.0}},
            r"^gamma=\{'kind': 'linear', 'init_value': 1\.0\}: wrong fields for a linear "
            r"schedule \(.*end_value",
        ),
        ([("lr_x", 0.1)], r"^solver settings must be a dict, got list$"),
        ("lr_x=0.1", r"^solver settings must be a dict, got str$"),
    ],
)
def test_solver_config_from_dict_refuses(d, match):
    with pytest.raises(br.ConfigError, match=match):
        br.SolverConfig.from_dict(d)


def test_solver_config_from_dict_round_trips():
    """The counterpart of the refusals above: to_dict's output (dict schedules, lists for
    tuples) is accepted and rebuilt into the same settings."""
    config = br.SolverConfig(
        method="pbgd",
        gamma=br.schedules.pbgd_ramp(1.0, 10.0, 5),
        optimizer=("adam", "sgd"),
        betas=(0.8, 0.9),
        momentum=0.5,
    )
    d = config.to_dict()
    assert d["gamma"]["kind"] == "linear" and d["optimizer"] == ["adam", "sgd"]
    assert br.SolverConfig.from_dict(d) == config


def test_solver_config_to_dict_refuses_user_schedule():
    config = br.SolverConfig(lr_x=lambda t: 0.1)
    with pytest.raises(
        br.ConfigError, match=r"^lr_x=<function .*>: a user-written schedule cannot"
    ):
        config.to_dict()


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
        # make_update: the update rule by name
        (
            lambda: br.updates.make_update("rmsprop", 0.1),
            r"^optimizer='rmsprop': unknown; choose one of \['adam', 'sgd'\] \(or a pair such as "
            r"\('adam', 'sgd'\) for x and y\)$",
        ),
        (lambda: br.updates.make_update(None, 0.1), r"^optimizer=None: unknown; choose one of"),
    ],
)
def test_update_rules_refuse(build, match):
    with pytest.raises(br.ConfigError, match=match):
        build()


def test_update_rules_accept_valid_options():
    """The counterpart of the refusals above: the boundary values are accepted."""
    assert br.sgd(1e-3, momentum=0.0, weight_decay=0.0).name == "sgd"
    assert br.sgd(lambda t: 0.1, momentum=0.9, nesterov=True).name == "sgd"
    assert br.adam(br.schedules.inverse_power(1.0, 0.5), betas=[0.0, 0.5], eps=1).name == "adam"
    assert br.updates.make_update("adam", 0.1, momentum=0.9).name == "adam"  # momentum not Adam's


# --- br.schedules -----------------------------------------------------------------------------

S = br.schedules


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
        # to_dict / from_dict
        (
            lambda: S.to_dict(lambda t: 1.0),
            r"^schedule <function .*>: only built-in schedules \(constant, linear, "
            r"inverse_power\) and numbers can be serialised",
        ),
        (
            lambda: S.from_dict({"kind": "cosine"}),
            r"^schedule=\{'kind': 'cosine'\}: 'kind' must be one of \['constant', "
            r"'inverse_power', 'linear'\]",
        ),
        (
            lambda: S.from_dict({"value": 1.0}),
            r"^schedule=\{'value': 1\.0\}: 'kind' must be one of",
        ),
        (
            lambda: S.from_dict({"kind": "constant", "value": 1.0, "scale": 2.0}, name="gamma"),
            r"^gamma=\{'kind': 'constant', 'value': 1\.0, 'scale': 2\.0\}: wrong fields for a "
            r"constant schedule \(.*'scale'",
        ),
        (
            lambda: S.from_dict([("kind", "constant"), ("value", 1.0)], name="lr_x"),
            r"^lr_x=\[\('kind', 'constant'\), \('value', 1\.0\)\]: 'kind' must be one of",
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


# --- br.full_batch / br.minibatches (data.py) --------------------------------------------------

X4 = torch.zeros(4, 1, dtype=F64)
X3 = torch.zeros(3, 1, dtype=F64)


@pytest.mark.parametrize(
    ("upper", "lower", "match"),
    [
        (
            torch.tensor(1.0),
            X4,
            r"^upper: item 0 is a 0-d tensor; data needs a leading sample dimension$",
        ),
        (
            X4,
            "text",
            r"^lower: item 0 is a str; level data must be a tensor or a tuple/list/dict of "
            r"tensors$",
        ),
        (
            (X4, torch.zeros(0)),
            X4,
            r"^upper: item 1 is empty \(0 samples\); give at least one sample$",
        ),
        (
            X4,
            {"a": t64(1.0, math.nan, math.inf)},
            r"^lower: item 0 holds 2 NaN/Inf values; clean or impute them before solving$",
        ),
        (
            [X4, X3],
            X4,
            r"^upper: tensors have different numbers of samples \[4, 3\]; every tensor of a "
            r"level must have the same leading dimension$",
        ),
        (
            ("a", torch.tensor(1.0)),
            X4,
            r"^2 problems:\n  - upper: item 0 is a str.*\n  - upper: item 1 is a 0-d tensor",
        ),
    ],
)
def test_full_batch_refuses(upper, lower, match):
    with pytest.raises(br.ConfigError, match=match):
        br.full_batch(upper, lower)


@pytest.mark.parametrize(
    ("upper", "lower", "batch_size", "match"),
    [
        (X4, X4, (1, 2, 3), r"^batch_size=\(1, 2, 3\): give one size or a pair \(upper, lower\)$"),
        (X4, X4, [2], r"^batch_size=\[2\]: give one size or a pair"),
        (
            X4,
            X3,
            0,
            r"^batch_size for upper=0: must be an integer in \[1, 4\] \(the upper-level data has "
            r"4 samples\)$",
        ),
        (
            X4,
            X3,
            (2, 5),
            r"^batch_size for lower=5: must be an integer in \[1, 3\] \(the lower-level data has "
            r"3 samples\)$",
        ),
        (X4, X4, True, r"^batch_size for upper=True: must be an integer in \[1, 4\]"),
        (X4, X4, 2.0, r"^batch_size for upper=2\.0: must be an integer in \[1, 4\]"),
        (torch.tensor(1.0), X4, 1, r"^upper: item 0 is a 0-d tensor"),
    ],
)
def test_minibatches_refuses(upper, lower, batch_size, match):
    with pytest.raises(br.ConfigError, match=match):
        br.minibatches(upper, lower, batch_size)


# --- br.module_problem / br.split_module_problem (problem.py) ----------------------------------


def mse(*args):
    return torch.zeros((), dtype=F64)


def linear():
    return nn.Linear(2, 1).double()


@pytest.mark.parametrize(
    ("model", "x", "y", "match"),
    [
        ("model", "w", "b", r"^model is a str: must be a torch\.nn\.Module$"),
        (None, "w", "b", r"^model is a NoneType: must be a torch\.nn\.Module$"),
        (linear(), "(", "bias", r"^x='\(': not a valid regular expression \("),
        (linear(), "weight", "[", r"^y='\[': not a valid regular expression \("),
        (
            linear(),
            "weight|bias",
            "bias",
            r"^parameters \['bias'\] match both x='weight\|bias' and y='bias': the groups must be "
            r"disjoint; narrow one selector$",
        ),
        (
            linear(),
            "lora_",
            "bias",
            r"^x='lora_' selects no parameter of the model; its parameters are named like: "
            r"weight, bias$",
        ),
        (
            linear(),
            "weight",
            ["head.bias"],
            r"^y names \['head\.bias'\] that the model does not have; its parameters are named "
            r"like: weight, bias$",
        ),
        (
            linear(),
            ["weight", "w", "b"],
            "bias",
            r"^x names \['b', 'w'\] that the model does not have",
        ),
        (linear(), "weight", [], r"^y=\[\] selects no parameter of the model"),
        (linear(), lambda n: False, "bias", r"^x=<function .*> selects no parameter"),
        (
            nn.ReLU(),
            "weight",
            "bias",
            r"^model ReLU has no parameters to split into x and y$",
        ),
    ],
)
def test_module_problem_refuses(model, x, y, match):
    with pytest.raises(br.ConfigError, match=match):
        br.module_problem(model, x=x, y=y, upper_loss=mse, lower_loss=mse)


@pytest.mark.parametrize(
    ("x", "y"),
    [("weight", "bias"), (["weight"], ("bias",)), (lambda n: n == "weight", r"^bias$")],
)
def test_module_problem_accepts_every_selector_form(x, y):
    """The counterpart of the refusals above: a regex, a list of names, a predicate."""
    _, x0, y0 = br.module_problem(linear(), x=x, y=y, upper_loss=mse, lower_loss=mse)
    assert list(x0) == ["weight"] and list(y0) == ["bias"]


def _frozen(module):
    return module.requires_grad_(False)


_SHARED = linear()


@pytest.mark.parametrize(
    ("upper", "lower", "match"),
    [
        ("net", linear(), r"^upper_module is a str: must be a torch\.nn\.Module$"),
        (linear(), None, r"^lower_module is a NoneType: must be a torch\.nn\.Module$"),
        (
            _SHARED,
            _SHARED,
            r"^upper_module and lower_module share parameter tensors: each level needs its own",
        ),
        (
            nn.Sequential(_SHARED),
            nn.Sequential(_SHARED, nn.ReLU()),
            r"^upper_module and lower_module share parameter tensors",
        ),
        (
            linear(),
            _frozen(linear()),
            r"^lower_module has no trainable parameter \(all have requires_grad=False\): its "
            r"level would have nothing to optimize$",
        ),
        (
            nn.ReLU(),
            linear(),
            r"^upper_module has no trainable parameter \(it has no parameters\): its level would "
            r"have nothing to optimize$",
        ),
    ],
)
def test_split_module_problem_refuses(upper, lower, match):
    with pytest.raises(br.ConfigError, match=match):
        br.split_module_problem(upper, lower, upper_loss=mse, lower_loss=mse)


# --- br.problems.load_factory (problems/__init__.py) -------------------------------------------


def test_load_factory_accepts_file_and_module(tmp_path):
    """The counterpart of the refusals below: the same forms, valid."""
    path = tmp_path / "userprob.py"
    path.write_text("def factory(config):\n    return config\n")
    assert br.problems.load_factory(f"{path}:factory")({"a": 1}) == {"a": 1}
    assert br.problems.load_factory("math:sqrt")(4.0) == 2.0
    assert br.problems.load_factory("toy-negative") is br.problems.BUILTIN_PROBLEMS["toy-negative"]


@pytest.mark.parametrize(
    ("ref", "match"),
    [
        (
            "toy_negative",
            r"^problem 'toy_negative': not a built-in \(toy-negative, toy-positive, quadratic, "
            r"regression\) and not of the form path/to/file\.py:factory or "
            r"package\.module:factory$",
        ),
        ("{tmp}/missing.py:factory", r"^problem file '.*missing\.py' does not exist$"),
        (":factory", r"^problem ':factory': give both parts, as in path/to/file\.py:factory or "),
        ("math:", r"^problem 'math:': give both parts"),
        # any failure while importing the module or file is named with its type and text
        (
            "no_such_module_xyz.sub:factory",
            r"^problem 'no_such_module_xyz\.sub:factory': importing 'no_such_module_xyz\.sub' "
            r"failed \(ModuleNotFoundError: No module named 'no_such_module_xyz'\)$",
        ),
        (
            "{tmp}/needs.py:factory",
            r"^problem '.*needs\.py:factory': importing '.*needs\.py' failed "
            r"\(ModuleNotFoundError: No module named 'no_such_pkg_xyz'\)$",
        ),
        (
            "{tmp}/syn.py:factory",
            r"^problem '.*syn\.py:factory': importing '.*syn\.py' failed \(SyntaxError: ",
        ),
        (
            "{tmp}/boom.py:factory",
            r"^problem '.*boom\.py:factory': importing '.*boom\.py' failed \(RuntimeError: boom\)$",
        ),
        ("math:no_such", r"^problem 'math:no_such': 'math' has no callable named 'no_such'$"),
        ("math:pi", r"^problem 'math:pi': 'math' has no callable named 'pi'$"),
        ("{tmp}/prob.py:factory", r"^problem '.*prob\.py:factory': '.*prob\.py' has no callable"),
        ("{tmp}/prob.py:VALUE", r"has no callable named 'VALUE'$"),
    ],
)
def test_load_factory_refuses(tmp_path, ref, match):
    (tmp_path / "prob.py").write_text("VALUE = 3\n")
    (tmp_path / "needs.py").write_text("import no_such_pkg_xyz\n")
    (tmp_path / "syn.py").write_text("def (\n")
    (tmp_path / "boom.py").write_text("raise RuntimeError('boom')\n")
    with pytest.raises(br.ConfigError, match=match):
        br.problems.load_factory(ref.format(tmp=tmp_path))


# --- br.state_from_dict (solvers/base.py) ------------------------------------------------------

_STATE = {"step": 0, "x": {}, "y": {}, "opt": {}, "extra": {}}


@pytest.mark.parametrize(
    ("d", "match"),
    [
        (
            [1, 2],
            r"^not a solver state: expected the keys \['extra', 'opt', 'step', 'x', 'y'\], got "
            r"list; load a file written by state_to_dict",
        ),
        ({"step": 0, "x": {}}, r"""^not a solver state: .*, got \["'step'", "'x'"\];"""),
        (
            {**_STATE, "rng": None},
            r"""got \["'extra'", "'opt'", "'rng'", "'step'", "'x'", "'y'"\]""",
        ),
        # keys of mixed types are listed too (by repr), not a TypeError from sorting them
        ({1: 0, "step": 0}, r"""got \["'step'", '1'\]; load a file written by state_to_dict"""),
        ({**_STATE, "step": -1}, r"^solver state step=-1: must be an integer >= 0$"),
        ({**_STATE, "step": 1.0}, r"^solver state step=1\.0: must be an integer >= 0$"),
        ({**_STATE, "step": True}, r"^solver state step=True: must be an integer >= 0$"),
    ],
)
def test_state_from_dict_refuses(d, match):
    with pytest.raises(br.ConfigError, match=match):
        br.state_from_dict(d)


# --- resuming from a checkpoint (runtime/checkpoint.py, runtime/local.py) ----------------------


def _checkpointed_run(path: Path, **overrides):
    return br.solve(**solve_args(checkpoint_path=path, checkpoint_every=1, **overrides))


def _truncated(path: Path) -> None:
    _checkpointed_run(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _edited(edit):
    """A writer: a genuine checkpoint (written with lr_x=0.02), then ``edit(payload)``."""

    def write(path: Path) -> None:
        _checkpointed_run(path, lr_x=0.02)
        payload = torch.load(path, weights_only=True)
        edit(payload)
        torch.save(payload, path)

    return write


_NOT_OURS = r"^checkpoint '.*ckpt\.pt' is not a bilevel_ray checkpoint \(missing "


@pytest.mark.parametrize(
    ("write", "match"),
    [
        (
            lambda p: p.write_bytes(b"not a checkpoint"),
            # torch's own text is left out: it may advise weights_only=False (running code).
            r"^checkpoint '.*ckpt\.pt' cannot be read \(\w+\): it is truncated, corrupted or not "
            r"a bilevel_ray checkpoint\. Delete it to start afresh\.$",
        ),
        (_truncated, r"^checkpoint '.*ckpt\.pt' cannot be read \(\w+\): it is truncated"),
        (
            lambda p: torch.save({"weights": torch.zeros(1)}, p),
            _NOT_OURS + r"\['config', 'elapsed_s', 'history', 'rng', 'state'\]\); delete it to "
            r"start afresh$",
        ),
        (
            lambda p: torch.save({"state": {}}, p),
            _NOT_OURS + r"\['config', 'elapsed_s', 'history', 'rng'\]\)",
        ),
        (lambda p: torch.save([1, 2], p), _NOT_OURS + r"everything: not a dict\); delete it"),
        *[
            (_edited(lambda d, k=key: d.pop(k)), _NOT_OURS + rf"\['{key}'\]\)")
            for key in CHECKPOINT_KEYS
        ],
        (
            lambda p: _checkpointed_run(p, lr_x=0.01),
            r"^checkpoint '.*ckpt\.pt' was written with other solver settings \(\{.*'lr_x': "
            r"0\.01.*\}\); resume with the same settings or pass resume=False$",
        ),
        (
            _edited(lambda d: d["state"].pop("opt")),
            r"""^not a solver state: expected the keys \[.*\], got \["'extra'", "'step'", """,
        ),
    ],
)
def test_resume_refuses_bad_checkpoint(tmp_path, write, match):
    path = tmp_path / "ckpt.pt"
    write(path)
    assert_refused_before_start(
        match, checkpoint_path=path, checkpoint_every=1, resume=True, lr_x=0.02
    )


def test_resume_with_same_settings_works(tmp_path):
    """The counterpart of the settings mismatch above: the same settings resume."""
    path = tmp_path / "ckpt.pt"
    _checkpointed_run(path, lr_x=0.02, steps=2)
    result = _checkpointed_run(path, lr_x=0.02, steps=4, resume=True)
    assert result.state.step == 4


# --- DivergenceError (runtime/history.py) ------------------------------------------------------


def _negative_toy():
    spec = br.problems.BUILTIN_PROBLEMS["toy-negative"]({})
    return spec.problem, spec.x0, spec.y0


def _diverge(report_every: int, lr_y: float = 5.0) -> br.DivergenceError:
    problem, x0, y0 = _negative_toy()
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
        rf"diverged at step {err.step}: {re.escape(err.metric)} is not finite; last finite "
        rf"metrics: step={err.step - 1}, upper/loss=",
        message,
    ), message
    assert "Lower lr_x / lr_y" in message
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


# --- Fixed library bugs: these tests were strict xfails; each docstring names what was fixed -----


def test_solve_accepts_user_callable_lr():
    """Without a checkpoint, a user-written schedule runs to the end (result.config used to
    serialise it strictly and raise after the last step); the config shows its repr."""
    lr_x = lambda t: 0.05  # noqa: E731
    result = br.solve(**solve_args(lr_x=lr_x))
    assert result.state.step == 3
    assert result.config["lr_x"] == repr(lr_x)


def test_solve_refuses_user_callable_lr_with_a_checkpoint(tmp_path):
    """A checkpoint stores the settings, so an unserialisable one is refused before step 0 (it
    used to fail at the first save)."""
    path = tmp_path / "ckpt.pt"
    assert_refused_before_start(
        r"^lr_x=<function .*>: a user-written schedule cannot be saved with the settings "
        r"\(checkpoints, Tune\); use a br\.schedules one$",
        lr_x=lambda t: 0.05,
        checkpoint_path=path,
        checkpoint_every=1,
    )
    assert not path.exists()


def test_solve_accepts_dict_schedule():
    """A dict schedule (to_dict's form) is rebuilt into the schedule it describes."""
    config = br.SolverConfig(lr_x={"kind": "constant", "value": 0.05})
    assert config.lr_x == br.schedules.constant(0.05)
    result = br.solve(**solve_args(lr_x={"kind": "constant", "value": 0.05}))
    assert result.config["lr_x"] == {"kind": "constant", "value": 0.05}


def test_non_finite_lr_message_names_the_argument():
    """as_schedule checks a number under the argument's name (not as 'constant.value')."""
    with pytest.raises(br.ConfigError, match=r"^lr_x=nan: must be a finite number$"):
        br.SolverConfig(lr_x=math.nan)


def test_nonpositive_lr_message_shows_the_given_value():
    """The value is echoed as given (not as a schedule dict) with a step-size-sized example."""
    with pytest.raises(br.ConfigError) as info:
        br.sgd(-0.1, name="lr_x")
    assert str(info.value) == "lr_x=-0.1: must stay > 0 at every step; e.g. lr_x=0.01"


def test_user_lr_schedule_checked_at_every_step():
    """A user lr callable is checked at each step, not only at t = 0 (a negative step size used
    to ascend silently)."""
    problem, x0, y0 = _negative_toy()
    config = br.SolverConfig(lr_x=lambda t: 0.01 if t == 0 else -0.01)
    solver = config.build(problem)
    state = solver.init(x0, y0)
    state, _ = solver.step(state, BilevelBatch(None, None))
    with pytest.raises(
        br.ConfigError,
        match=r"^lr_x is -0\.01 at step 1: must be a finite number > 0; fix the schedule$",
    ):
        solver.step(state, BilevelBatch(None, None))


def test_f2sa_negative_growth_schedule_refused_before_start():
    """A built-in growth schedule that turns negative is refused from its range before step 0
    (it used to stop the run at step 1)."""
    assert_refused_before_start(
        r"^multiplier_growth=linear\(init_value=0\.0, end_value=-1\.0, transition_steps=10, "
        r"transition_begin=0\): must stay >= 0 at every step; e\.g\. multiplier_growth=0\.0$",
        method="f2sa",
        multiplier_growth=br.schedules.linear(0.0, -1.0, 10),
    )


def test_mixed_optimizer_pair_takes_its_options():
    """Each level of an optimizer pair takes its own options (Adam's betas, SGD's momentum);
    they used to be passed to both levels and refused as stray."""
    config = br.SolverConfig(optimizer=("adam", "sgd"), betas=(0.8, 0.9), momentum=0.5)
    assert config.optimizer == ("adam", "sgd")
    result = br.solve(**solve_args(optimizer=["adam", "sgd"], betas=[0.8, 0.9], momentum=0.5))
    assert result.config["optimizer"] == ["adam", "sgd"] and result.state.step == 3
    assert set(result.state.opt["x"]) == {"count", "m", "v"}  # Adam for x
    assert set(result.state.opt["y"]) == {"count", "momentum"}  # SGD with momentum for y


def test_solver_config_reports_every_problem_at_once():
    """Update-rule problems and the solver's knobs are reported together (the knobs used to be
    skipped once an update rule failed)."""
    with pytest.raises(br.ConfigError) as info:
        br.SolverConfig(lr_x=-1.0, inner_steps=0)
    assert info.value.problems == [
        "lr_x=-1.0: must stay > 0 at every step; e.g. lr_x=0.01",
        "inner_steps=0: must be an integer >= 1",
    ]


def test_divergence_last_finite_holds_only_finite_values():
    """last_finite used to carry the previous row's NaN placeholders (value/loss=nan for a
    method without a value function) when report_every=1."""
    err = _diverge(report_every=1)
    assert all(math.isfinite(v) for v in err.last_finite.values()), err.last_finite
    assert "value/loss" not in err.last_finite and "nan" not in str(err)


def test_incomplete_checkpoint_is_reported_as_such(tmp_path):
    """A dict with a 'state' entry but not the other keys is not taken for a checkpoint written
    with other settings; the missing keys are named."""
    path = tmp_path / "ckpt.pt"
    torch.save({"state": {}}, path)
    with pytest.raises(
        br.ConfigError,
        match=r"^checkpoint '.*ckpt\.pt' is not a bilevel_ray checkpoint \(missing \['config', "
        r"'elapsed_s', 'history', 'rng'\]\); delete it to start afresh$",
    ):
        br.solve(**solve_args(checkpoint_path=path, checkpoint_every=1, resume=True))


Pair = namedtuple("Pair", "inputs targets")


def test_minibatches_keep_namedtuples():
    """_take rebuilds a namedtuple field by field (it used to raise a raw TypeError)."""
    batches = br.minibatches(Pair(X4, X4[:, 0]), X4, 2)
    batch = next(batches.stream(seed=0))
    assert isinstance(batch.upper, Pair) and batch.upper.inputs.shape == (2, 1)
    assert batch.upper.targets.shape == (2,)


def test_state_round_trips_through_state_from_dict():
    """The counterpart of test_state_from_dict_refuses: state_to_dict's output is accepted."""
    problem, x0, y0 = _negative_toy()
    solver = br.SolverConfig(method="f2sa").build(problem)
    state = solver.init(x0, y0)
    assert br.state_from_dict(br.state_to_dict(state)) == state


# --- Known library bugs (xfail, strict): each reason names the place and the fix ----------------


def test_unserialisable_setting_refusal_names_the_setting(tmp_path):
    with pytest.raises(br.ConfigError) as info:
        br.solve(
            **solve_args(lr_x=lambda t: 0.05, checkpoint_path=tmp_path / "c.pt", checkpoint_every=1)
        )
    assert str(info.value).startswith("lr_x=") and "checkpoint" in str(info.value)


@pytest.mark.parametrize(
    "settings",
    [
        pytest.param(
            {"optimizer": "rmsprop", "inner_steps": 0},
            id="bad-optimizer-hides-knobs",
        ),
        pytest.param(
            {"lr_x": {"kind": "cosine"}, "inner_steps": 0},
            id="bad-dict-schedule-hides-knobs",
        ),
        pytest.param(
            {"method": "bome", "bome_eta": 0.0, "inner_steps": 0},
            id="first-bad-knob-hides-the-next",
        ),
    ],
)
def test_solver_config_reports_every_problem_despite_an_early_one(settings):
    with pytest.raises(br.ConfigError) as info:
        br.SolverConfig(**settings)
    assert len(info.value.problems) == 2, info.value.problems


def test_invalid_momentum_does_not_add_a_false_nesterov_problem():
    with pytest.raises(br.ConfigError) as info:
        br.sgd(0.1, momentum=1.0, nesterov=True)
    assert info.value.problems == [
        "momentum=1.0: must be in [0, 1); typical values are 0.9 or 0.999"
    ]


def test_nonpositive_gamma_message_suggests_a_penalty_sized_value():
    with pytest.raises(br.ConfigError) as info:
        br.SolverConfig(gamma=0.0)
    assert str(info.value) == "gamma=0.0: must stay > 0 at every step; e.g. gamma=10.0"


@pytest.mark.parametrize(
    "trigger",
    [
        pytest.param(
            lambda: br.SolverConfig.from_dict({"lr_x": {"kind": ["linear"]}}),
            id="schedules-from_dict-unhashable-kind",
        ),
        pytest.param(
            lambda: br.module_problem(linear(), x=5, y="bias", upper_loss=mse, lower_loss=mse),
            id="module_problem-non-iterable-selector",
        ),
    ],
)
def test_bad_input_is_a_config_error(trigger):
    with pytest.raises(br.ConfigError):
        trigger()


def test_f2sa_refuses_a_gamma_schedule():
    """F2SA's multiplier grows through multiplier_growth; a gamma schedule would be ignored."""
    with pytest.raises(
        br.ConfigError, match=r"^gamma=.*: for f2sa gamma is the initial multiplier"
    ):
        br.solve(**solve_args(method="f2sa", gamma=br.schedules.linear(1.0, 10.0, 5)))
