"""Every error bilevel_ray raises on purpose, triggered through the public API.

Each ``raise`` in the library (except the CLI, the Ray worker code in ``train_worker.py`` /
``ray_session.py``, and what ``br.train`` re-raises once a worker group runs) has a test here that
provokes it and checks the meaningful part of its message: the argument or object it names and the
rule it states. ``br.solve`` must refuse bad input *before* any step runs, which the tests check
with a problem that counts its loss evaluations; ``br.train`` must refuse it before Ray starts,
which the tests check by making any start of Ray fail. Each refusal has a positive control: the
same call, valid, works. Tests marked ``xfail(strict=True)`` pin down library bugs that remain;
each reason names the file and the fix. The tests under "Fixed library bugs" pinned bugs that are
now fixed and keep them fixed.

Everything runs in float64 on problems with one or two scalars, so the file takes seconds.
"""

from __future__ import annotations

import math
import re
import sys
import types
from collections import namedtuple
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

import bilevel_ray as br
import bilevel_ray.runtime.local.solve as local_runtime
import bilevel_ray.runtime.train.group as worker_group
from bilevel_ray.data import BilevelBatch, as_batches
from bilevel_ray.linear_solve import solve_cg
from bilevel_ray.problem import factory_config
from bilevel_ray.runtime.local.checkpoint import CHECKPOINT_KEYS
from bilevel_ray.runtime.local.output_files import check_writable, previous_path
from bilevel_ray.tables import read_table, table_to_tensors

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


# --- br.solve: run settings (runtime/local/solve.py) -------------------------------------------------


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
        (
            {"checkpoint_every": 5},
            r"^checkpoint_every=5 needs checkpoint_path: pass checkpoint_path='run/ckpt\.pt'$",
        ),
        (
            {"resume": True},
            r"^resume=True needs checkpoint_path: pass checkpoint_path='run/ckpt\.pt'$",
        ),
        # resume is checked first
        (
            {"resume": True, "checkpoint_every": 5},
            r"^resume=True needs checkpoint_path",
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

X4 = torch.zeros(4, 1, dtype=F64)
X3 = torch.zeros(3, 1, dtype=F64)
_IN_TARGETS = (X4, X4[:, 0])


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (
            (torch.zeros(3), torch.zeros(3)),
            r"^data=\(upper, lower\) of in-memory tensors is ambiguous \(a pair of batch sources "
            r"is expected there; a list of batches must hold tuples or dicts\): for tensors pass "
            r"br\.full_batch\(upper=\.\.\., lower=\.\.\.\) "
            r"or br\.minibatches\(upper=\.\.\., lower=\.\.\., batch_size=\.\.\.\)$",
        ),
        # level data as (inputs, targets), a dict of columns, or only one side of the pair
        ((_IN_TARGETS, _IN_TARGETS), r"^data=\(upper, lower\) of in-memory tensors is ambiguous"),
        (({"a": torch.zeros(3)}, [None]), r"^data=\(upper, lower\) of in-memory tensors is "),
        (([None], [torch.zeros(3)]), r"^data=\(upper, lower\) of in-memory tensors is "),
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


def test_solve_accepts_a_pair_of_batch_lists():
    """The counterpart of the ambiguity above: lists of batches (tuples, dicts) are sources."""
    batch = torch.zeros(2, dtype=F64)
    result = br.solve(**solve_args(data=([(batch, batch)], [{"a": batch}, {"a": batch}])))
    assert result.state.step == 3


# --- data shared across data-parallel workers (data.py, as br.train's workers call it) ----------


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (
            lambda: as_batches(br.full_batch(X3, X4), 0, world=2),
            r"^full-batch upper data of 3 samples cannot be split evenly over 2 workers; use a "
            r"multiple of 2 samples or br\.minibatches$",
        ),
        (
            lambda: as_batches(br.full_batch(X4, X3), 0, rank=1, world=2),
            r"^full-batch lower data of 3 samples cannot be split evenly over 2 workers",
        ),
        (
            lambda: next(as_batches(br.minibatches(X4, X3, 2), 0, world=2)),
            r"^2 workers x batch 2 = 4 exceeds the 3 lower-level samples; use a smaller "
            r"batch_size or fewer workers$",
        ),
        (
            lambda: next(as_batches(br.minibatches(X4, X4, (3, 1)), 0, world=2)),
            r"^2 workers x batch 3 = 6 exceeds the 4 upper-level samples",
        ),
        (
            lambda: as_batches(([None], [None]), 0, world=2),
            r"^data given as a pair of batch sources cannot be sharded across workers \(each "
            r"would read the same batches\); use br\.minibatches, br\.table_minibatches or Ray "
            r"Data$",
        ),
    ],
)
def test_sharded_data_refuses(make, match):
    with pytest.raises(br.ConfigError, match=match):
        make()


def test_sharded_data_accepts_even_splits():
    """The counterpart of the refusals above: each rank gets its own equal share."""
    data = torch.arange(4, dtype=F64).unsqueeze(1)
    full = [next(as_batches(br.full_batch(data, data), 0, rank=r, world=2)) for r in (0, 1)]
    assert [b.upper[:, 0].tolist() for b in full] == [[0.0, 1.0], [2.0, 3.0]]
    mini = [next(as_batches(br.minibatches(data, data, 2), 0, rank=r, world=2)) for r in (0, 1)]
    assert sorted(v for b in mini for v in b.upper[:, 0].tolist()) == [0.0, 1.0, 2.0, 3.0]
    assert next(as_batches(([None], [None]), 0, world=1)) == BilevelBatch(None, None)


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
        # the default method, pbgd_free, needs grad_x f (check_losses' upper_needs_x)
        (
            lambda x, y: (x["x"].detach() ** 2 + y["y"].detach() ** 2).sum(),
            None,
            r"^upper_loss does not depend on x: its gradient is undefined; compute it from the x "
            r"and y it receives \(not from copies or \.detach\(\)ed tensors\); PBGD-Free's x step "
            r"is grad_x f, so x would never move: use pbgd, alt_pbgd or implicit_cg$",
        ),
        (
            lambda x, y: (y["y"] ** 2).sum(),
            None,
            r"^upper_loss does not depend on x: .*PBGD-Free's x step is grad_x f",
        ),
        (
            lambda x, y: 1.0,
            lambda x, y: (y["y"] - x["x"]) ** 2,
            r"^2 problems:\n  - upper_loss returned a float.*\n  - lower_loss returned a tensor "
            r"of shape \(1,\)",
        ),
    ],
)
# check_losses formats a NaN loss from a detached tensor: torch must not warn (it used to).
@pytest.mark.filterwarnings("error:Converting a tensor with requires_grad=True:UserWarning")
def test_solve_refuses_unusable_losses(upper, lower, match):
    problem = CountingProblem(upper, lower)
    with pytest.raises(br.ConfigError, match=match):
        br.solve(**solve_args(problem=problem))
    assert problem.calls == {"upper": 1, "lower": 1}


@pytest.mark.parametrize("method", ["pbgd", "alt_pbgd", "f2sa", "bome", "implicit_cg"])
def test_other_methods_need_f_to_depend_on_x_or_y(method):
    """Only pbgd_free needs grad_x f: the other methods accept an f of y alone (the positive
    control of the pbgd_free refusal above), and refuse an f of neither."""
    only_y = CountingProblem(upper=lambda x, y: ((y["y"] - 1) ** 2).sum())
    assert br.solve(**solve_args(problem=only_y, method=method)).state.step == 3
    neither = CountingProblem(upper=lambda x, y: (x["x"].detach() ** 2 + y["y"].detach()).sum())
    with pytest.raises(
        br.ConfigError,
        match=r"^upper_loss does not depend on x or y: its gradient is undefined; compute it "
        r"from the x and y it receives \(not from copies or \.detach\(\)ed tensors\)$",
    ):
        br.solve(**solve_args(problem=neither, method=method))
    assert neither.calls == {"upper": 1, "lower": 1}


def _raise(error):
    def loss(x, y):
        raise error

    return loss


@pytest.mark.parametrize(
    ("upper", "lower", "match", "calls"),
    [
        (
            lambda x, y: x["w"].sum(),
            None,
            r"^upper_loss raised KeyError at the initial point: 'w' \(check the parameter names "
            r"in x0 / y0 and the batch format the loss expects\)$",
            {"upper": 1, "lower": 0},
        ),
        (
            None,
            _raise(TypeError("batch is None")),
            r"^lower_loss raised TypeError at the initial point: batch is None \(check the ",
            {"upper": 1, "lower": 1},
        ),
    ],
)
def test_solve_reports_a_loss_that_raises_on_its_first_call(upper, lower, match, calls):
    problem = CountingProblem(upper, lower)
    with pytest.raises(br.ConfigError, match=match) as info:
        br.solve(**solve_args(problem=problem))
    assert problem.calls == calls
    assert isinstance(info.value.__cause__, (KeyError, TypeError))  # the user's error is kept


# --- br.solve: x0 / y0 (problem.py check_params) ----------------------------------------------

_W = torch.zeros(2, dtype=F64)
_BUF = torch.zeros(3, dtype=F64)


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
            r"^x0\['x'\] and y0\['y'\] share a memory range \(the same tensor, tied weights or "
            r"interleaved views\): "
            r"each level needs its own; pass a \.clone\(\) or untie the weights$",
        ),
        # overlapping views of one buffer share memory too
        (
            {"x": _BUF[:2]},
            {"y": _BUF[1:]},
            r"^x0\['x'\] and y0\['y'\] share a memory range \(the same tensor",
        ),
        ({"x": _W}, {"y": _W.view(1, 2)}, r"^x0\['x'\] and y0\['y'\] share a memory range"),
        (
            [1.0],
            {},
            r"^2 problems:\n  - x0 is a list: must be a dict.*\n  - y0 is empty",
        ),
    ],
)
def test_solve_refuses_bad_x0_y0(x0, y0, match):
    assert_refused_before_start(match, x0=x0, y0=y0)


def test_solve_accepts_disjoint_views_of_one_buffer():
    """The counterpart of the shared-memory refusal: views that do not overlap are separate
    tensors; x0 / y0 are copied, so the buffer is left as it was."""
    buffer = t64(2.0, 0.0)
    result = br.solve(**solve_args(x0={"x": buffer[:1]}, y0={"y": buffer[1:]}))
    assert result.state.step == 3
    assert buffer.tolist() == [2.0, 0.0]


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
            r"'linear', 'piecewise_constant'\]",
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


# --- implicit_cg's conjugate gradients (linear_solve.py) ---------------------------------------
# A lower level that is not strongly convex in y has no positive definite Hessian for CG: the
# run stops at its first step with a ConfigError that says to add a ridge.

_NOT_PD = (
    r"^CG: the lower-level Hessian is not positive definite along a search direction "
    r"\(p'Hp = {}\); set cg_ridge > 0 \(e\.g\. cg_ridge=1e-3\) to regularise it$"
)


def _linear_in_y(x, y):  # Hessian 0
    return (x["x"] * y["y"]).sum()


def _concave_in_y(x, y):  # Hessian -1
    return (x["x"] * y["y"]).sum() - 0.5 * (y["y"] ** 2).sum()


@pytest.mark.parametrize(("lower", "curvature"), [(_linear_in_y, "0"), (_concave_in_y, r"-[\d.]+")])
def test_implicit_cg_refuses_a_hessian_that_is_not_positive_definite(lower, curvature):
    problem = CountingProblem(lower=lower)
    with pytest.raises(br.ConfigError, match=_NOT_PD.format(curvature)):
        br.solve(**solve_args(problem=problem, method="implicit_cg", inner_steps=2))
    assert problem.calls["upper"] == 2  # the check and step 0: it stopped at the first step


@pytest.mark.parametrize(
    ("matvec", "curvature"),
    [
        (lambda p: {"v": -p["v"]}, "-2"),  # p = b = (1, 1)
        (lambda p: {"v": torch.zeros_like(p["v"])}, "0"),
        # indefinite, diag(1, -1): p'Ap = 0 along p = b = (1, 1)
        (lambda p: {"v": p["v"] * t64(1.0, -1.0)}, "0"),
    ],
)
def test_solve_cg_refuses_an_operator_that_is_not_positive_definite(matvec, curvature):
    with pytest.raises(br.ConfigError, match=_NOT_PD.format(curvature)):
        solve_cg(matvec, {"v": t64(1.0, 1.0)}, maxiter=5)


def test_a_ridge_makes_cg_work():
    """The counterpart of the refusals above: cg_ridge shifts the Hessian to positive definite."""
    v = solve_cg(lambda p: {"v": -p["v"]}, {"v": t64(1.0, 2.0)}, maxiter=5, ridge=2.0)
    assert torch.allclose(v["v"], t64(1.0, 2.0))
    assert solve_cg(lambda p: {"v": -p["v"]}, {"v": t64(0.0)}, maxiter=5)["v"].item() == 0.0
    problem = CountingProblem(lower=_linear_in_y)
    result = br.solve(**solve_args(problem=problem, method="implicit_cg", cg_ridge=1e-3))
    assert result.state.step == 3


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
            r"inverse_power, piecewise_constant\) and numbers can be serialised",
        ),
        (
            lambda: S.from_dict({"kind": "cosine"}),
            r"^schedule=\{'kind': 'cosine'\}: 'kind' must be one of \['constant', "
            r"'inverse_power', 'linear', 'piecewise_constant'\]",
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


# --- br.table_minibatches: Arrow tables and Parquet files (tables.py) ---------------------------


def _table(**columns):
    return pa.table(columns or {"a": [1.0, 2.0, 3.0], "b": [0, 1, 1]})


@pytest.mark.parametrize(
    ("source", "columns", "match"),
    [
        ("{tmp}/missing.parquet", None, r"^Parquet source '.*missing\.parquet' does not exist$"),
        (
            "{tmp}/junk.parquet",
            None,
            r"^cannot read Parquet '.*junk\.parquet': .*Parquet",
        ),
        ({"a": [1.0]}, None, r"^table data is a dict: pass a pyarrow\.Table or a Parquet path$"),
        (torch.zeros(3), None, r"^table data is a Tensor: pass a pyarrow\.Table or a Parquet"),
        (
            _table(),
            ["a", "z", "c"],
            r"^columns \['c', 'z'\] are not in the table; it has: a, b$",
        ),
        (
            _table(a=[1.0, None, 3.0]),
            None,
            r"^column 'a' has 1 missing values; fill or drop them first$",
        ),
        (
            _table(a=[1.0, 2.0], name=["u", "v"]),
            None,
            r"^column 'name' has type string: only numeric, boolean and fixed-size list columns "
            r"can become tensors; select other columns with columns=\[\.\.\.\]$",
        ),
        (
            _table(a=pa.array([[1.0], [2.0, 3.0]])),
            None,
            r"^column 'a' has type list<.*>: only numeric, boolean and fixed-size list",
        ),
    ],
)
def test_table_minibatches_refuses(tmp_path, source, columns, match):
    (tmp_path / "junk.parquet").write_text("not parquet")
    if isinstance(source, str):
        source = source.format(tmp=tmp_path)
    with pytest.raises(br.ConfigError, match=match):
        br.table_minibatches(source, _table(), 1, columns=columns)
    with pytest.raises(br.ConfigError, match=match):  # either level
        br.table_minibatches(_table(), source, 1, columns=columns)


def test_table_minibatches_accepts_tables_and_parquet(tmp_path):
    """The counterpart of the refusals above: a table, a Parquet file, selected columns, a
    fixed-size list column (one 2-d tensor) and a dtype for the floating columns."""
    table = pa.table(
        {
            "a": [1.0, 2.0, 3.0],
            "b": [0, 1, 1],
            "ok": [True, False, True],
            "v": pa.array([[1.0, 2.0]] * 3, type=pa.list_(pa.float64(), 2)),
        }
    )
    pq.write_table(table, tmp_path / "t.parquet")
    data = br.table_minibatches(table, tmp_path / "t.parquet", 2, dtype=torch.float32)
    batch = next(data.stream(seed=0))
    assert batch.upper["v"].shape == (2, 2) and batch.lower["a"].dtype == torch.float32
    assert batch.upper["b"].dtype == torch.int64 and batch.upper["ok"].dtype == torch.bool
    assert list(read_table(str(tmp_path / "t.parquet"), ["b", "a"]).column_names) == ["b", "a"]
    assert table_to_tensors(read_table(table, ["a"]))["a"].dtype == torch.float64


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
        (
            linear(),
            5,
            "bias",
            r"^x=5: select parameters with a regular expression, a list of names or a predicate "
            r"name -> bool$",
        ),
        (linear(), "weight", None, r"^y=None: select parameters with a regular expression"),
        # normalisation layers that update running statistics in training mode
        (
            nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)).double(),
            "0",
            "1",
            r"^model has normalisation layers that update running statistics in training mode "
            r"\(1\): that state would not be part of x, y or checkpoints; call \.eval\(\) on them, "
            r"or use LayerNorm / GroupNorm$",
        ),
        (
            nn.BatchNorm1d(2),
            "weight",
            "bias",
            r"^model has normalisation layers that update running statistics in training mode "
            r"\(BatchNorm1d\)",
        ),
        (
            nn.Sequential(
                nn.Linear(2, 2),
                nn.Sequential(nn.InstanceNorm1d(2, affine=True, track_running_stats=True)),
            ),
            "0",
            "1",
            r"^model has normalisation layers .* \(1\.0\):",
        ),
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


def _normalised(norm: nn.Module) -> nn.Module:
    return nn.Sequential(nn.Linear(2, 2), norm).double()


@pytest.mark.parametrize(
    "norm",
    [
        nn.BatchNorm1d(2).eval(),
        nn.BatchNorm1d(2, track_running_stats=False),
        nn.InstanceNorm1d(2, affine=True),
        nn.LayerNorm(2),
        nn.GroupNorm(1, 2),
    ],
    ids=["batchnorm-eval", "batchnorm-untracked", "instancenorm", "layernorm", "groupnorm"],
)
def test_adapters_accept_normalisation_without_running_updates(norm):
    """The counterpart of the running-statistics refusals: frozen statistics, or none."""
    _, x0, y0 = br.module_problem(_normalised(norm), x="^0", y="^1", upper_loss=mse, lower_loss=mse)
    assert list(x0) == ["0.weight", "0.bias"] and list(y0) == ["1.weight", "1.bias"]
    _, x0, y0 = br.split_module_problem(linear(), _normalised(norm), upper_loss=mse, lower_loss=mse)
    assert list(y0) == ["lower.0.weight", "lower.0.bias", "lower.1.weight", "lower.1.bias"]


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
        (
            _normalised(nn.BatchNorm1d(2)),
            linear(),
            r"^upper_module has normalisation layers that update running statistics in training "
            r"mode \(1\): that state would not be part of x, y or checkpoints; call \.eval\(\) on "
            r"them, or use LayerNorm / GroupNorm$",
        ),
        # at most three layers are named
        (
            linear(),
            nn.Sequential(nn.Linear(2, 2), *[nn.BatchNorm1d(2) for _ in range(4)]),
            r"^lower_module has normalisation layers that update running statistics in training "
            r"mode \(1, 2, 3\): ",
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
            r"regression, representation, hyperclean, peft-dpo-sft\) and not of the form "
            r"path/to/file\.py:factory or package\.module:factory$",
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


# --- the built-in problem factories' settings (problem.py factory_config, problems/*.py) --------

_SETTINGS = {
    "toy-negative": "dtype, x0, y0",
    "toy-positive": "dtype",
    "quadratic": "dim_x, dim_y, dtype, flat, seed",
    "regression": "batch_size, dim, features, n, ridge, seed",
}


@pytest.mark.parametrize("name", sorted(_SETTINGS))
def test_builtin_factories_refuse_unknown_settings(name):
    factory = br.problems.BUILTIN_PROBLEMS[name]
    with pytest.raises(
        br.ConfigError,
        match=rf"^problem '{name}' has no setting\(s\) \['dimx', 'lr'\]; its settings are: "
        rf"{_SETTINGS[name]}$",
    ):
        factory({"lr": 0.1, "dimx": 3})


@pytest.mark.parametrize("name", ["toy-negative", "toy-positive", "quadratic"])
@pytest.mark.parametrize("dtype", ["int64", "bool", "complex64", "float65", "Float32", None])
def test_builtin_factories_refuse_bad_dtypes(name, dtype):
    with pytest.raises(
        br.ConfigError,
        match=rf"^problem '{name}': dtype={re.escape(repr(dtype))} is not a floating torch "
        r"dtype; use float64 or float32$",
    ):
        br.problems.BUILTIN_PROBLEMS[name]({"dtype": dtype})


@pytest.mark.parametrize("name", ["toy-negative", "toy-positive", "quadratic"])
def test_builtin_factories_accept_their_settings(name):
    """The counterpart of the refusals above: a floating dtype by name, and device (which the
    runtimes always pass)."""
    spec = br.problems.BUILTIN_PROBLEMS[name]({"dtype": "float32", "device": "cpu"})
    assert {t.dtype for t in [*spec.x0.values(), *spec.y0.values()]} == {torch.float32}
    assert br.problems.BUILTIN_PROBLEMS["regression"]({"n": 40, "batch_size": None}).data


def test_factory_config_refuses_and_merges():
    defaults = {"dtype": "float64", "dim": 3}
    with pytest.raises(
        br.ConfigError,
        match=r"^problem 'mine' has no setting\(s\) \['dims'\]; its settings "
        r"are: dim, dtype$",
    ):
        factory_config("mine", {"dims": 4}, defaults)
    with pytest.raises(br.ConfigError, match=r"^problem 'mine': dtype='half ' is not a floating"):
        factory_config("mine", {"dtype": "half "}, defaults)
    assert factory_config("mine", None, defaults) == {
        "dtype": torch.float64,
        "dim": 3,
        "device": None,
    }
    assert factory_config("mine", {"dim": 4, "device": "cpu"}, {"dim": 3}) == {
        "dim": 4,
        "device": "cpu",
    }


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


# --- resuming from a checkpoint (runtime/local/checkpoint.py, runtime/local/solve.py) ----------------------


def _checkpointed_run(path: Path, **overrides):
    """A run's checkpoint at ``path``, alone: without the previous one a bad file has no
    fallback (tests/test_reliability.py covers the fallback)."""
    result = br.solve(**solve_args(checkpoint_path=path, checkpoint_every=1, **overrides))
    previous_path(path).unlink(missing_ok=True)
    return result


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
            _NOT_OURS + r"\['config', 'elapsed_s', 'history', 'rng', 'seed', 'state'\]\); delete "
            r"it to start afresh$",
        ),
        (
            lambda p: torch.save({"state": {}}, p),
            _NOT_OURS + r"\['config', 'elapsed_s', 'history', 'rng', 'seed'\]\)",
        ),
        (lambda p: torch.save([1, 2], p), _NOT_OURS + r"everything: not a dict\); delete it"),
        *[
            (_edited(lambda d, k=key: d.pop(k)), _NOT_OURS + rf"\['{key}'\]\)")
            for key in CHECKPOINT_KEYS
        ],
        (
            lambda p: _checkpointed_run(p, lr_x=0.01),
            r"^checkpoint '.*ckpt\.pt' was written with other solver settings \(\{.*'lr_x': "
            r"0\.01.*\}\); resume with the same settings, or start a new run \(another "
            r"checkpoint_path, or another name with br\.train\)$",
        ),
        # the seed of the data stream is checked too (and first)
        (
            lambda p: _checkpointed_run(p, lr_x=0.02, seed=1),
            r"^checkpoint '.*ckpt\.pt' was written with seed=1, not seed=0: the data stream would "
            r"differ; resume with the same seed, or start a new run$",
        ),
        (
            lambda p: _checkpointed_run(p, lr_x=0.01, seed=3),
            r"^checkpoint '.*ckpt\.pt' was written with seed=3, not seed=0",
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


def test_resume_with_same_seed_works(tmp_path):
    """The counterpart of the seed mismatch above: the same (non-default) seed resumes."""
    path = tmp_path / "ckpt.pt"
    _checkpointed_run(path, seed=7, steps=2)
    result = _checkpointed_run(path, seed=7, steps=4, resume=True)
    assert result.state.step == 4 and result.history["step"].to_pylist() == [1, 2, 3, 4]


# --- br.train: validation before any worker starts (runtime/train/driver.py) -------------------------


class RayStarted(AssertionError):
    """br.train got as far as starting Ray."""


@pytest.fixture
def no_ray(monkeypatch):
    """Any attempt of br.train to connect to Ray or to start a worker group fails loudly."""

    def refuse(*args, **kwargs):
        raise RayStarted("br.train tried to start Ray")

    fake = types.ModuleType("bilevel_ray.runtime.cluster.session")
    fake.connect = refuse
    monkeypatch.setitem(sys.modules, "bilevel_ray.runtime.cluster.session", fake)
    monkeypatch.setattr(worker_group, "fit_worker_group", refuse)


def train_args(tmp_path, **overrides):
    """Keyword arguments of a tiny, valid, in-process ``br.train`` call."""
    args = {
        "factory": "toy-negative",
        "steps": 3,
        "report_every": 1,
        "num_workers": 1,
        "storage_path": tmp_path / "runs",
        "name": "run",
    }
    args.update(overrides)
    return args


def _spec(**overrides):
    spec = {"problem": CountingProblem(), "x0": {"x": t64(2.0)}, "y0": {"y": t64(0.0)}}
    spec.update(overrides)
    return lambda config: br.ProblemSpec(**spec)


_DATASETS = {"upper": object(), "lower": object()}  # never read: refused before Ray starts


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        # the factory and what it returns (build_spec, then the checks br.solve makes)
        (
            {"factory": 5},
            r"^factory=5: must be callable or a 'file\.py:factory' string$",
        ),
        (
            {"factory": lambda config: {"x0": 1}},
            r"^the factory returned a dict: it must return br\.ProblemSpec\(problem, x0, y0, data, "
            r"defaults\)$",
        ),
        ({"factory": "toy_negative"}, r"^problem 'toy_negative': not a built-in \("),
        (
            {"problem_config": {"dim": 3}},
            r"^problem 'toy-negative' has no setting\(s\) \['dim'\]; its settings are: dtype, ",
        ),
        ({"factory": _spec(problem=object())}, r"^problem object lacks upper_loss, lower_loss: "),
        ({"factory": _spec(x0={"x": 1.5})}, r"^x0\['x'\] is a float: must be a torch\.Tensor"),
        # the solver settings, as in br.solve, and serialisable (workers rebuild them)
        ({"lr": 0.1}, r"^unknown keyword\(s\) \['lr'\]; solver settings are: "),
        ({"method": "sgd"}, r"^method='sgd': unknown; choose one of pbgd_free, "),
        ({"lr_x": -1.0}, r"^lr_x=-1\.0: must stay > 0 at every step"),
        (
            {"lr_x": lambda t: 0.1},
            r"^lr_x=<function .*>: a user-written schedule cannot be saved with the settings",
        ),
        # counts
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
        # run settings
        ({"use_gpu": "yes"}, r"^use_gpu='yes': must be 'auto', True or False$"),
        ({"use_gpu": None}, r"^use_gpu=None: must be 'auto', True or False$"),
        ({"fault": {"rank": 0}}, r"^fault=\{'rank': 0\}: must be a dict \{'rank': r, 'step': k\}$"),
        ({"fault": [0, 1]}, r"^fault=\[0, 1\]: must be a dict \{'rank': r, 'step': k\}$"),
        (
            {"batch_size": 4},
            r"^batch_size is for datasets=\.\.\.; the factory's data sets its own size$",
        ),
        ({"in_process": True}, r"^in_process=True: must be 'auto' or False$"),
        # Ray Data (_check_datasets)
        (
            {"datasets": {"upper": object()}, "batch_size": 2},
            r"^datasets must be \{'upper': ray\.data\.Dataset, 'lower': ray\.data\.Dataset\}, got "
            r"\['upper'\]$",
        ),
        ({"datasets": [1, 2], "batch_size": 2}, r"^datasets must be \{.*\}, got list$"),
        (
            {"datasets": _DATASETS},
            r"^batch_size=None: datasets need a per-worker batch size >= 1 \(one integer or a "
            r"pair \(upper, lower\)\)$",
        ),
        ({"datasets": _DATASETS, "batch_size": 0}, r"^batch_size=0: datasets need a per-worker"),
        ({"datasets": _DATASETS, "batch_size": True}, r"^batch_size=True: datasets need a "),
        ({"datasets": _DATASETS, "batch_size": (2, 0)}, r"^batch_size=\(2, 0\): datasets need "),
        ({"datasets": _DATASETS, "batch_size": [1, 2, 3]}, r"^batch_size=\[1, 2, 3\]: datasets"),
        ({"datasets": _DATASETS, "batch_size": 2.0}, r"^batch_size=2\.0: datasets need a "),
        (
            {"factory": "regression", "datasets": _DATASETS, "batch_size": 2},
            r"^the factory returned data and datasets=\.\.\. was given too: use one source of data "
            r"\(return data=None from the factory\)$",
        ),
    ],
)
def test_train_refuses_before_any_worker_starts(tmp_path, no_ray, overrides, match):
    with pytest.raises(br.ConfigError, match=match):
        br.train(**train_args(tmp_path, **overrides))
    assert not (tmp_path / "runs" / "run").exists()  # nothing was run or saved


@pytest.mark.parametrize(
    ("storage", "why"), [("a_file", "File exists"), ("a_file/sub", "Not a directory")]
)
def test_train_refuses_a_storage_path_that_is_not_writable(tmp_path, no_ray, storage, why):
    (tmp_path / "a_file").write_text("")
    match = rf"^storage_path '.*{storage}' is not writable \({why}\); choose another folder$"
    with pytest.raises(br.ConfigError, match=match):
        br.train(**train_args(tmp_path, storage_path=tmp_path / storage))
    with pytest.raises(br.ConfigError, match=match.replace("storage_path", "history folder")):
        check_writable(tmp_path / storage, "history folder")


def test_train_runs_one_worker_in_process(tmp_path, no_ray):
    """The counterpart of the refusals above: one CPU worker runs here, without Ray, saves its
    checkpoint under storage_path/name and resumes from it."""
    result = br.train(**train_args(tmp_path, checkpoint_every=2, problem_config={"x0": 1.5}))
    assert result.state.step == 3 and result.x["x"].dtype == F64
    assert (tmp_path / "runs" / "run" / "checkpoint.pt").is_file()
    assert check_writable(tmp_path / "runs", "storage_path") == (tmp_path / "runs").resolve()
    resumed = br.train(**train_args(tmp_path, steps=5, problem_config={"x0": 1.5}))
    assert resumed.history["step"].to_pylist() == [1, 2, 3, 4, 5]


# --- DivergenceError (runtime/local/history.py) ------------------------------------------------------


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
        r"'elapsed_s', 'history', 'rng', 'seed'\]\); delete it to start afresh$",
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


# --- More fixed library bugs (they were strict xfails too) --------------------------------------


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


# --- Fixed last: dtype objects, interleaved views, non-Dataset values ------------------------


@pytest.mark.parametrize("name", ["toy-negative", "quadratic"])
def test_builtin_factories_accept_a_torch_dtype(name):
    spec = br.problems.BUILTIN_PROBLEMS[name]({"dtype": torch.float32})
    assert next(iter(spec.x0.values())).dtype == torch.float32


def test_interleaved_views_are_refused_conservatively():
    """Views whose memory ranges interleave are refused (conservatively: they may not share an
    element), with the fix in the message."""
    buffer = t64(2.0, 0.0, 2.0, 0.0)
    with pytest.raises(br.ConfigError, match=r"share a memory range .*interleaved views.*clone"):
        br.solve(**solve_args(x0={"x": buffer[::2]}, y0={"y": buffer[1::2]}))


def test_train_refuses_datasets_that_are_not_ray_datasets(tmp_path, no_ray):
    with pytest.raises(
        br.ConfigError, match=r"datasets values must be ray\.data\.Dataset .*'upper': 'list'"
    ):
        br.train(**train_args(tmp_path, datasets={"upper": [1, 2], "lower": [3]}, batch_size=1))
