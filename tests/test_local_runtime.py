"""br.solve: history schema, Parquet output, minibatches, checkpoint and resume, progress."""

from __future__ import annotations

import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import torch

import bilevel_ray as br
from bilevel_ray.runtime.local.history import HISTORY_SCHEMA


def _negative():
    return br.problems.BUILTIN_PROBLEMS["toy-negative"]({})


def test_history_has_the_fixed_schema_and_is_written_to_parquet(tmp_path):
    spec = _negative()
    path = tmp_path / "run" / "history.parquet"
    res = br.solve(spec.problem, spec.x0, spec.y0, steps=25, report_every=10, history_path=path)
    assert res.history.schema == HISTORY_SCHEMA
    assert res.history["step"].to_pylist() == [10, 20, 25]  # the final step is always logged
    written = pq.read_table(path)
    assert written.schema == HISTORY_SCHEMA
    for column in ("step", "upper/loss", "lower/loss", "time/elapsed_s"):
        assert written[column].to_pylist() == res.history[column].to_pylist()
    for method in br.SOLVERS:  # one schema for every method: tables concatenate
        options = {} if method in ("bome", "implicit_cg") else {"gamma": 10.0}
        other = br.solve(spec.problem, spec.x0, spec.y0, method=method, steps=2, **options)
        assert other.history.schema == HISTORY_SCHEMA
        assert other.history["method"].to_pylist() == [method]


def test_logged_losses_are_the_solver_metrics_at_that_step():
    spec = _negative()
    res = br.solve(
        spec.problem, spec.x0, spec.y0, steps=10, report_every=5, lr_x=0.01, lr_y=0.1, gamma=10.0
    )
    solver = br.SolverConfig(lr_x=0.01, lr_y=0.1, gamma=10.0).build(spec.problem)
    state = solver.init(spec.x0, spec.y0)
    for _ in range(10):
        state, metrics = solver.step(state, br.BilevelBatch(None, None))
    assert res.history["upper/loss"][-1].as_py() == float(metrics["upper/loss"])
    assert res.history["penalty/gamma"][-1].as_py() == 10.0
    assert torch.equal(res.x["x"], state.x["x"])


def test_minibatch_pbgd_free_reaches_the_full_batch_solution_within_its_noise():
    """Linear representation regression: the minibatch runs (3 seeds, batches of 100 out of 2000)
    end where the full-batch run ends, up to sampling noise: the learned predictor W v is within
    3% of the full-batch one, and its upper loss on the training data (about the noise variance,
    0.01) is at most 30% above the full-batch one."""

    def run(batch_size, seed=0):
        spec = br.problems.BUILTIN_PROBLEMS["regression"]({"batch_size": batch_size})
        return br.solve(
            spec.problem,
            spec.x0,
            spec.y0,
            data=spec.data,
            steps=3000,
            seed=seed,
            lr_x=br.schedules.inverse_power(0.02, 0.5),
            lr_y=0.1,
            gamma=10.0,
            report_every=1000,
        )

    upper = br.problems.BUILTIN_PROBLEMS["regression"]({"batch_size": None}).data.upper

    def predictor_and_loss(res):
        w = res.x["W"] @ res.y["v"]
        return w, float(((upper[0] @ w - upper[1]) ** 2).mean())

    w_full, loss_full = predictor_and_loss(run(None))
    for seed in range(3):
        w_mb, loss_mb = predictor_and_loss(run(100, seed))
        assert float((w_mb - w_full).norm() / w_full.norm()) < 0.03
        assert loss_full * 0.95 <= loss_mb <= loss_full * 1.3


class CrashAfter:
    """The wrapped problem, whose upper loss raises after ``calls`` evaluations (a crash)."""

    def __init__(self, problem, calls):
        self.problem, self.calls = problem, calls

    def upper_loss(self, x, y, batch):
        self.calls -= 1
        if self.calls < 0:
            raise RuntimeError("simulated crash")
        return self.problem.upper_loss(x, y, batch)

    def lower_loss(self, x, y, batch):
        return self.problem.lower_loss(x, y, batch)


def test_checkpoint_resume_gives_the_uninterrupted_result(tmp_path):
    spec = br.problems.BUILTIN_PROBLEMS["regression"]({"n": 300, "batch_size": 30})
    options = dict(
        data=spec.data, lr_x=0.01, lr_y=0.1, gamma=10.0, optimizer="adam", seed=4, report_every=5
    )
    full = br.solve(spec.problem, spec.x0, spec.y0, steps=40, **options)

    ckpt = tmp_path / "ckpt.pt"
    # PBGD-Free evaluates f twice per step (plus once at the start): this dies in step 26.
    with pytest.raises(RuntimeError, match="simulated crash"):
        br.solve(
            CrashAfter(spec.problem, 1 + 2 * 25 + 1),
            spec.x0,
            spec.y0,
            steps=40,
            checkpoint_path=ckpt,
            checkpoint_every=10,
            **options,
        )
    saved = torch.load(ckpt, weights_only=True)
    assert saved["state"]["step"] == 20  # the last save before the crash
    resumed = br.solve(
        spec.problem,
        spec.x0,
        spec.y0,
        steps=40,
        checkpoint_path=ckpt,
        checkpoint_every=10,
        resume=True,
        **options,
    )
    assert torch.equal(resumed.x["W"], full.x["W"]) and torch.equal(resumed.y["v"], full.y["v"])
    assert resumed.history["step"].to_pylist() == full.history["step"].to_pylist()
    assert resumed.history["upper/loss"].to_pylist() == full.history["upper/loss"].to_pylist()
    assert torch.load(ckpt, weights_only=True)["state"]["step"] == 40  # the end is saved too


def test_resume_without_a_checkpoint_starts_afresh(tmp_path):
    spec = _negative()
    res = br.solve(
        spec.problem,
        spec.x0,
        spec.y0,
        steps=5,
        checkpoint_path=tmp_path / "c.pt",
        checkpoint_every=5,
        report_every=5,
        resume=True,
    )
    assert res.state.step == 5 and (tmp_path / "c.pt").exists()


def test_progress_lines_go_to_stderr(capsys):
    spec = _negative()
    br.solve(spec.problem, spec.x0, spec.y0, steps=20, report_every=10, progress=True)
    err = capsys.readouterr().err
    assert "[pbgd_free] step 20/20 upper/loss=" in err and "ms/step" in err


def test_solve_leaves_the_global_rng_untouched():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    spec = _negative()
    br.solve(spec.problem, spec.x0, spec.y0, steps=3, seed=9)
    assert torch.equal(torch.rand(3), expected)


def test_import_does_not_load_ray():
    code = "import sys, bilevel_ray; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_solve_takes_a_factorys_problem_spec_whole():
    # The spec's start point, data and suggested settings (its steps included), the call's
    # keywords over them: the same run as unpacking the spec by hand.
    spec = br.problems.BUILTIN_PROBLEMS["toy-negative"]({})
    whole = br.solve(spec, steps=50)
    by_hand = br.solve(spec.problem, spec.x0, spec.y0, steps=50, **{
        k: v for k, v in spec.defaults.items() if k != "steps"})  # fmt: skip
    assert torch.equal(whole.x["x"], by_hand.x["x"]) and whole.state.step == 50
    assert br.solve(spec, lr_x=0.02, steps=10).config["lr_x"] == 0.02
    assert br.solve(spec).state.step == spec.defaults["steps"]
    with pytest.raises(br.ConfigError, match=r"takes x0 and y0 from the ProblemSpec"):
        br.solve(spec, spec.x0, spec.y0)
    with pytest.raises(br.ConfigError, match=r"solve needs x0 and y0"):
        br.solve(spec.problem)


def test_every_public_function_shows_its_own_arguments_in_help():
    import inspect

    for name in ("solve", "train", "tune", "compare", "diagnose"):
        function = getattr(br, name)
        parameters = inspect.signature(function).parameters
        assert len(parameters) > 3, name  # not a (factory, **kwargs) stub
        assert function.__doc__ and len(function.__doc__.splitlines()) > 5, name
