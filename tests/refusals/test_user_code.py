"""Refusals of user code that misbehaves: problem factories, problems, losses and models.

A factory reference that does not resolve (``file.py:factory``, ``package.module:factory``), a
factory that fails to import, exits, is a standard-library function or returns something other
than a ``br.ProblemSpec``; a problem without ``upper_loss`` / ``lower_loss``; losses that return
no scalar floating tensor, are not finite, or do not depend on the level they must (checked once
at the initial point, then at every step with a message that names the loss and the step); a
lower level that is not strongly convex where implicit_cg needs it to be; ``br.module_problem`` /
``br.split_module_problem`` selectors and modules that cannot be split. The user's own exceptions
propagate as they are.
"""

from __future__ import annotations

import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

import bilevel_ray as br
from bilevel_ray.linear_solve import solve_cg
from bilevel_ray.problems import build_spec

from .catalogue import CKPT, api, cli, late_solve, params, run_case
from .support import (
    F64,
    CountingProblem,
    Quad,
    assert_refused_before_start,
    assert_train_refused,
    solve,
    solve_args,
    spec_factory,
    t64,
)

# --- a problem without losses, and br.train's factory and what it returns ----------------------


def test_solve_refuses_an_object_without_losses():
    assert_refused_before_start(
        r"problem object lacks upper_loss, lower_loss: a problem needs upper_loss\(x, y, "
        r"batch\) and lower_loss\(x, y, batch\)",
        problem=object(),
    )


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
            {"factory": spec_factory(problem=object())},
            r"^problem object lacks upper_loss, lower_loss: ",
        ),
        (
            {"factory": spec_factory(x0={"x": 1.5})},
            r"^x0\['x'\] is a float: must be a torch\.Tensor",
        ),
    ],
)
def test_train_refuses_a_bad_factory_before_any_worker_starts(tmp_path, no_ray, overrides, match):
    assert_train_refused(tmp_path, overrides, match)


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


# --- losses that misbehave mid-run ---------------------------------------------------------------


def test_a_wrong_return_keeps_the_history_written(tmp_path):
    """The history up to the failing step is still written (a finished part is not lost)."""
    history = tmp_path / "h.parquet"
    with pytest.raises(br.ConfigError, match=r"upper_loss returned a NoneType at step \d+"):
        late_solve("upper", lambda x, y: None, history_path=history)(tmp_path)
    assert pq.read_table(history).num_rows >= 1
    assert math.isfinite(pq.read_table(history).column("upper/loss")[0].as_py())


class Mine(Exception):
    """The user's own exception."""


def test_the_users_own_exceptions_propagate_as_they_are():
    from bilevel_ray.problems import build_spec

    def factory(config):
        raise Mine("from the factory")

    with pytest.raises(Mine, match="from the factory"):
        build_spec(factory, {})

    def raises(x, y):
        raise Mine("from the loss")

    with pytest.raises(Mine, match="from the loss"):
        late_solve("upper", raises)(Path("."))


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


def test_a_non_iterable_selector_is_a_config_error():
    with pytest.raises(br.ConfigError):
        br.module_problem(linear(), x=5, y="bias", upper_loss=mse, lower_loss=mse)


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


# --- the catalogue's cases ---------------------------------------------------------------------

WRONG_RETURN = r"it must return a scalar \(0-d\) floating tensor at every step; reduce it with "


def _returned(loss: str, what: str) -> str:
    return rf"^{loss} returned {what} at step \d+: " + WRONG_RETURN


def exiting_factory(tmp: Path) -> None:
    (tmp / "exits.py").write_text("import sys\n\ndef factory(config):\n    sys.exit(3)\n")


def no_eval_factory(config):
    return br.ProblemSpec(Quad(), {"x": t64(2.0)}, {"y": t64(0.0)})


def _signature_file(tmp: Path) -> None:
    (tmp / "sig.py").write_text("def no_args():\n    pass\n\n\ndef two_args(a, b):\n    pass\n")


def _keyword_only(*, config):
    raise AssertionError("never called")


CASES = [
    # --- losses, at the initial point -------------------------------------------------------
    api(
        "api-vector-loss",
        "API",
        "upper_loss returns a per-element vector",
        lambda tmp: solve(
            problem=Quad(upper=lambda x, y: (y["y"] - x["x"]) ** 2 + x["x"]),
            x0={"x": t64(1.0, 2.0, 3.0)},
            y0={"y": t64(0.0, 0.0, 0.0)},
        ),
        r"^upper_loss returned a tensor of shape \(3,\): must be a scalar \(0-d\) tensor; reduce "
        r"it with \.mean\(\) or \.sum\(\)$",
    ),
    api(
        "api-loss-ignores-y",
        "API",
        "lower_loss reads y through .detach()",
        lambda tmp: solve(problem=Quad(lower=lambda x, y: ((y["y"].detach() - x["x"]) ** 2).sum())),
        r"^lower_loss does not depend on y: its gradient is undefined; compute it from the x and "
        r"y it receives \(not from copies or \.detach\(\)ed tensors\)",
    ),
    # --- losses that misbehave mid-run ------------------------------------------------------
    api(
        "upper-none-later",
        "API",
        "upper_loss returns None after its first calls",
        late_solve("upper", lambda x, y: None),
        _returned("upper_loss", "a NoneType"),
    ),
    api(
        "lower-none-later",
        "API",
        "lower_loss returns None after its first calls",
        late_solve("lower", lambda x, y: None),
        _returned("lower_loss", "a NoneType"),
    ),
    api(
        "upper-float-later",
        "API",
        "upper_loss returns a Python float (.item()) after its first calls",
        late_solve("upper", lambda x, y: 1.5),
        _returned("upper_loss", "a float"),
    ),
    api(
        "lower-vector-later",
        "API",
        "lower_loss returns a vector of 2 after its first calls",
        late_solve("lower", lambda x, y: (y["y"] ** 2).repeat(2)),
        _returned("lower_loss", r"a tensor of shape \(2,\)"),
    ),
    api(
        "upper-int-tensor-later",
        "API",
        "upper_loss returns an int64 0-d tensor after its first calls",
        late_solve("upper", lambda x, y: torch.tensor(1)),
        _returned("upper_loss", "a tensor of dtype torch.int64"),
    ),
    api(
        "pbgd-lower-none-later",
        "API",
        "method='pbgd': lower_loss returns None after its first calls",
        late_solve("lower", lambda x, y: None, method="pbgd"),
        _returned("lower_loss", "a NoneType"),
    ),
    api(
        "alt-pbgd-upper-float-later",
        "API",
        "method='alt_pbgd': upper_loss returns a float after its first calls",
        late_solve("upper", lambda x, y: 0.5, method="alt_pbgd"),
        _returned("upper_loss", "a float"),
    ),
    api(
        "f2sa-lower-vector-later",
        "API",
        "method='f2sa': lower_loss returns a vector after its first calls",
        late_solve("lower", lambda x, y: (y["y"] ** 2).repeat(2), method="f2sa"),
        _returned("lower_loss", r"a tensor of shape \(2,\)"),
    ),
    api(
        "bome-upper-none-later",
        "API",
        "method='bome': upper_loss returns None after its first calls",
        late_solve("upper", lambda x, y: None, method="bome"),
        _returned("upper_loss", "a NoneType"),
    ),
    api(
        "implicit-cg-lower-float-later",
        "API",
        "method='implicit_cg': lower_loss returns a float after its first calls",
        late_solve("lower", lambda x, y: 2.0, method="implicit_cg"),
        _returned("lower_loss", "a float"),
    ),
    api(
        "none-later-with-checkpoint",
        "API",
        "upper_loss returns None mid-run of a checkpointed run",
        lambda tmp: late_solve(
            "upper", lambda x, y: None, checkpoint_every=5, checkpoint_path=tmp / CKPT
        )(tmp),
        _returned("upper_loss", "a NoneType"),
    ),
    # --- factories --------------------------------------------------------------------------
    api(
        "api-tune-no-eval-data",
        "API",
        "br.tune on a factory without eval_data",
        lambda tmp: br.tune(no_eval_factory, storage_path=tmp / "sweeps", steps=5),
        r"^tune scores trials on held-out data: the factory must return eval_data="
        r"br\.BilevelBatch\(upper_heldout, lower_sample\)",
        writes=("sweeps",),
    ),
    cli(
        "cli-unknown-problem",
        "CLI",
        "solve toy_negative (underscore)",
        "solve toy_negative",
        match=r"^error: problem 'toy_negative': not a built-in \(toy-negative, toy-positive, .*\) "
        r"and not of the form path/to/file\.py:factory or package\.module:factory$",
    ),
    cli(
        "file-factory-syntax-error",
        "config file",
        "a factory file with a syntax error",
        "solve {tmp}/broken.py:factory",
        match=r"^error: problem '.*broken\.py:factory': importing '.*broken\.py' failed "
        r"\(SyntaxError: ",
        process=True,
    ),
    cli(
        "file-factory-missing",
        "config file",
        "file.py:make where the file defines no make",
        "train {tmp}/nofactory.py:make --workers 1 --out {tmp}/out",
        match=r"^error: problem '.*nofactory\.py:make': '.*nofactory\.py' has no callable named "
        r"'make'$",
        writes=("out",),
    ),
    cli(
        "file-factory-returns-none",
        "config file",
        "a factory that returns None",
        "solve {tmp}/returns_none.py:factory",
        match=r"^error: the factory returned a NoneType: it must return br\.ProblemSpec\(",
    ),
    cli(
        "factory-sys-exit",
        "config file",
        "a factory that calls sys.exit(3)",
        "solve {tmp}/exits.py:factory",
        r"^error: the factory '.*exits\.py:factory' called sys\.exit\(3\): a factory must "
        r"return br\.ProblemSpec\(\.\.\.\) or raise an exception, not exit$",
        setup=exiting_factory,
    ),
    cli(
        "factory-stdlib",
        "config file",
        "the standard library's os:getcwd given as the factory",
        "solve os:getcwd",
        r"^error: factory='os:getcwd' is posix\.getcwd, a function of Python's standard "
        r"library, not a problem factory: give path/to/file\.py:factory",
    ),
    cli(
        "factory-stdlib-one-argument",
        "config file",
        "the standard library's json:dumps given as the factory",
        "solve json:dumps",
        r"^error: factory='json:dumps' is json\.dumps, a function of Python's standard library",
    ),
    cli(
        "factory-no-arguments",
        "config file",
        "a factory def no_args(): that takes no config",
        "solve {tmp}/sig.py:no_args",
        r"^error: the factory '.*sig\.py:no_args' takes no_args\(\) \(too many positional "
        r"arguments\): a problem factory takes one positional argument, the config dict; write "
        r"it as def factory\(config\): \.\.\. return br\.ProblemSpec\(\.\.\.\)$",
        setup=_signature_file,
    ),
    cli(
        "factory-two-arguments",
        "config file",
        "a factory def two_args(a, b): that needs two arguments",
        "solve {tmp}/sig.py:two_args",
        r"^error: the factory '.*sig\.py:two_args' takes two_args\(a, b\) \(missing a required "
        r"argument: 'b'\): a problem factory takes one positional argument, the config dict",
        setup=_signature_file,
    ),
    api(
        "api-factory-keyword-only",
        "API",
        "build_spec (what br.train calls) with a factory whose config is keyword-only",
        lambda tmp: build_spec(_keyword_only, {}),
        r"^the factory <function _keyword_only at .*> takes _keyword_only\(\*, config\) \(too "
        r"many positional arguments\): a problem factory takes one positional argument",
    ),
    api(
        "api-sparse-x0",
        "API",
        "br.solve with x0 a sparse tensor",
        lambda tmp: solve(x0={"x": t64(1.0, 0.0).to_sparse()}, y0={"y": t64(0.0, 0.0)}),
        r"^x0\['x'\] is a torch\.sparse_coo tensor: the solvers update dense tensors in place; "
        r"pass value\.to_dense\(\)$",
    ),
]


@pytest.mark.parametrize("case", params(CASES))
def test_bad_input(case, tmp_path, request, no_compare_ray):
    run_case(case, tmp_path, request, CASES)


# --- round three (a hidden catalogue's classes, closed) -------------------------------


def test_a_trial_whose_code_raises_reports_a_step_so_a_population_goes_on(monkeypatch):
    # PBT and PB2 read every result's "step": an error report without one ended the sweep.
    from bilevel_ray.runtime.local.run_spec import Placement, RunSpec
    from bilevel_ray.runtime.tune import trial

    reported = []

    class Context:
        def get_trial_id(self):
            return "t0"

    monkeypatch.setattr(trial.ray_tune, "get_context", lambda: Context())
    monkeypatch.setattr(trial.ray_tune, "report", reported.append)
    plan = trial.TrialPlan(
        "toy-negative", {}, "pbgd_free", {}, RunSpec(10), Placement(), False, 5, 0.1, "/tmp"
    )
    trial.run_trial({"lr_x": -1.0}, plan)  # a setting the trial's own code refuses
    assert reported[0]["status"] == "error" and reported[0]["step"] == 0
    assert "lr_x=-1.0" in reported[0]["error"]
