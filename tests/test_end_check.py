"""The end-of-run certificate and the verdict built on it, against known answers.

Negative toy f = 10y + x^2, g = (y - x + 1)^2: y*(x) = x - 1, phi(x) = 10(x - 1) + x^2 with its
minimum at x* = -5 (phi = -35); PBGD-Free ends at x = 0 (phi = -10), 25 short. Shared-solution
problem f = (x - 1)^2 + (y - x)^2, g = (y - x)^2: y* = x is also f's minimiser in y, so the
dropped term is 0 and PBGD-Free ends at x = 1, phi = 0, as a corrected method does.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

import bilevel_ray as br
from bilevel_ray.diagnostics.end_check import EndCheck, _decide, end_check, held_out_line
from bilevel_ray.diagnostics.objective import Objective
from bilevel_ray.problems.toys import NegativeToy
from bilevel_ray.runtime.local.threads import threads_for_work, use_work_threads

F64 = torch.float64
ROOT = Path(__file__).resolve().parents[1]


def t64(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


class SharedSolution:
    def upper_loss(self, x, y, batch):
        return ((x["x"] - 1) ** 2).sum() + ((y["y"] - x["x"]) ** 2).sum()

    def lower_loss(self, x, y, batch):
        return ((y["y"] - x["x"]) ** 2).sum()


class NoisyLipschitz:
    """f = (x - 1)^2 / 2 + y mean(a), g = (y - x)^2 / 2, a ~ N(1, sigma^2) on f's rows: y* = x,
    phi(x) = (x - 1)^2 / 2 + x mean(a); PBGD-Free ends at x = 1, a corrected method at
    x = 1 - mean(a), about 1/2 lower. The batches' noise reaches the corrected x step through y."""

    def upper_loss(self, x, y, batch):
        return ((x["x"] - 1) ** 2).sum() / 2 + (y["y"] * batch.mean()).sum()

    def lower_loss(self, x, y, batch):
        return ((y["y"] - x["x"]) ** 2).sum() / 2


def _settings(**options):
    return br.SolverConfig(method="pbgd_free", **{"lr_x": 0.01, "lr_y": 0.1, **options})


def test_the_certificate_measures_the_negative_toys_shortfall_from_pbgd_frees_end():
    # PBGD-Free's end point x = 0, y = y_gamma = -1 - 5/gamma; alt_pbgd from there reaches
    # x ~ -5 (its penalty solution at gamma = 10): the gain is phi(0) - phi(-5) = 25.
    x, y = {"x": t64(0.0)}, {"y": t64(-1.5)}
    check = EndCheck(_settings(gamma=10.0), check_steps=800)
    v = end_check(NegativeToy(), x, y, None, check, reference=({"x": t64(2.0)}, {"y": t64(0.0)}))
    assert v.verdict == "unsuitable" and v.fallback == "alt_pbgd"
    assert v.stats["end/phi_end"] == pytest.approx(-10.0, abs=1e-6)
    assert v.stats["end/phi_start"] == pytest.approx(14.0, abs=1e-6)  # phi(2) = 10 + 4
    assert v.stats["end/effect"] == pytest.approx(25.0, abs=0.6)
    # tau = 5% of phi(2) - phi(-5) = 0.05 * 49; deterministic data: no noise floor.
    assert v.stats["end/tolerance"] == pytest.approx(0.05 * (14.0 - v.stats["end/phi_corrected"]))
    assert v.stats["end/replicas"] == 1.0 and v.stats["end/spread"] == 0.0
    assert "costs it the bilevel objective" in v.reason and "25" in v.reason


def test_the_certificate_finds_nothing_to_gain_where_the_dropped_term_is_zero():
    x, y = {"x": t64(1.0)}, {"y": t64(1.0)}
    check = EndCheck(_settings(gamma=10.0), check_steps=200)
    v = end_check(SharedSolution(), x, y, None, check, reference=({"x": t64(3.0)}, {"y": t64(0.0)}))
    assert v.verdict == "suitable" and v.suitable
    assert abs(v.stats["end/effect"]) < 1e-9
    assert v.stats["end/tolerance"] == pytest.approx(0.05 * 4.0, rel=1e-6)  # phi(3) = 4


def _noisy(sigma: float, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    a = 1.0 + sigma * torch.randn(512, generator=gen, dtype=F64)
    return br.minibatches(a, torch.zeros(512, dtype=F64), 4)


def test_a_small_spread_gives_a_decisive_verdict_on_minibatch_data():
    # Effect ~ 1/2 against tau = 5% of phi(3) - phi(0) ~ 0.23 and a spread of about 0.01.
    check = EndCheck(_settings(gamma=10.0, lr_x=0.05), check_steps=400, replicas=3)
    start = ({"x": t64(3.0)}, {"y": t64(0.0)})
    v = end_check(NoisyLipschitz(), {"x": t64(1.0)}, {"y": t64(1.0)}, _noisy(0.05), check,
                  reference=start)  # fmt: skip
    assert v.verdict == "unsuitable"
    assert v.stats["end/effect"] == pytest.approx(0.5, abs=0.05)
    assert 2 * v.stats["end/se"] < 0.2 * v.stats["end/tolerance"]


def test_a_spread_large_against_the_effect_is_uncertain_and_says_what_resolves_it():
    check = EndCheck(_settings(gamma=10.0, lr_x=0.05), check_steps=400, replicas=3)
    start = ({"x": t64(3.0)}, {"y": t64(0.0)})
    v = end_check(NoisyLipschitz(), {"x": t64(1.0)}, {"y": t64(1.0)}, _noisy(60.0), check,
                  reference=start)  # fmt: skip
    assert v.verdict == "uncertain" and not v.suitable
    assert "noise floor" in v.reason and "replicas" in v.reason and "larger batch" in v.reason
    assert 2 * v.stats["end/se"] > v.stats["end/tolerance"] / 2


def _series(phis: list[float]) -> list[dict[str, float]]:
    return [{"phi": p, "held": math.nan} for p in phis]


class _Flat:
    dtype = F64

    @staticmethod
    def rounding(value):
        return 0.0


def test_the_rule_on_hand_built_continuations():
    check = EndCheck(_settings(gamma=10.0), check_steps=8)
    start, end = {"phi": 10.0}, {"phi": 1.0}
    # Three batch orders whose corrected ends agree: effect 0.8, se 0, tau 5% of 10 - 0.2.
    runs = [(_series([1, 1, 1, 1]), _series([0.2, 0.2, 0.2, 0.2]))] * 3
    v = _decide(runs, False, end, start, _Flat(), check, 100)
    assert v.verdict == "unsuitable"
    assert v.stats["end/effect"] == pytest.approx(0.8) and v.stats[
        "end/tolerance"
    ] == pytest.approx(0.05 * 9.8 + 1e-9)
    # The same effect with ends that differ by 1.0 between orders: uncertain, spread named.
    spread = [
        (_series([1, 1, 1, 1]), _series([c] * 4)) for c in (-0.3, 0.2, 0.7)
    ]  # mean 0.2, sd 0.5
    v = _decide(spread, False, end, start, _Flat(), check, 100)
    assert v.verdict == "uncertain" and v.stats["end/spread"] == pytest.approx(0.5 / math.sqrt(3))
    # Nothing to gain and a corrected method that had stopped gaining: suitable.
    flat = [(_series([1, 1, 1, 1]), _series([1.0, 0.99, 0.99, 0.99]))] * 3
    v = _decide(flat, False, end, start, _Flat(), check, 100)
    assert v.verdict == "suitable"
    # Within the tolerance but still gaining fast at the check's end: uncertain, check_steps named.
    gaining = [(_series([1, 1]), _series([1.5, 0.9]))]  # effect 0.1, growth 0.6
    v = _decide(gaining, True, {"phi": 1.0}, start, _Flat(), check, 100)
    assert v.verdict == "uncertain" and "check_steps" in v.reason


def test_a_continuation_that_diverges_is_uncertain_with_the_step_size_named():
    check = EndCheck(_settings(gamma=10.0, lr_x=5.0), check_steps=400)  # x <- -9x: inf
    v = end_check(NegativeToy(), {"x": t64(0.0)}, {"y": t64(-1.5)}, None, check)
    assert v.verdict == "uncertain" and "diverged" in v.reason and "lr_x=5.0" in v.reason


def test_the_objective_solves_the_lower_level_and_promotes_small_float32_problems():
    problem = NegativeToy()
    obj = Objective(problem, None)
    assert obj.at({"x": t64(2.0)}, {"y": t64(0.0)})["phi"] == pytest.approx(14.0, abs=1e-9)
    f32 = Objective(problem, None)
    out = f32.at({"x": torch.tensor([0.5])}, {"y": torch.tensor([3.0])})
    assert f32.dtype == torch.float64  # solved and evaluated in float64
    assert out["phi"] == pytest.approx(10 * (0.5 - 1) + 0.25, abs=1e-9)


def test_held_out_line_reports_both_methods_and_their_spread():
    stats = {"end/held_free": 0.25, "end/held_corrected": 0.35, "end/held_spread": 0.2}
    line = held_out_line(stats)
    assert "0.25" in line and "0.35" in line and "spread 0.2" in line and "by less than" in line
    assert held_out_line({"end/held_free": math.nan, "end/held_corrected": 0.3}) is None


def test_diagnose_judges_at_the_runs_end_and_reports_the_early_price_as_a_prediction():
    x0, y0 = {"x": t64(2.0)}, {"y": t64(0.0)}
    v = br.diagnose(NegativeToy(), x0, y0, 10.0, steps=1500)
    assert v.verdict == "unsuitable" and v.stats["end/effect"] == pytest.approx(25.0, abs=0.6)
    assert v.prediction.startswith("the early price at step") and "unsuitable" in v.prediction
    early = br.diagnose(NegativeToy(), x0, y0, 10.0, steps=1500, predict_only=True)
    assert early.reason.startswith("prediction (the early price at step")
    assert "end/effect" not in early.stats


def test_diagnose_with_a_time_cap_says_uncertain_never_another_verdict():
    x0, y0 = {"x": t64(2.0)}, {"y": t64(0.0)}
    v = br.diagnose(NegativeToy(), x0, y0, 10.0, steps=200000, max_seconds=0.5)
    assert v.verdict == "uncertain" and "time cap reached at step" in v.reason


def test_diagnose_refuses_bad_horizon_settings():
    x0, y0 = {"x": t64(2.0)}, {"y": t64(0.0)}
    with pytest.raises(br.ConfigError) as err:
        br.diagnose(NegativeToy(), x0, y0, steps=0, check_steps=1, replicas=0, predict_only=1)
    text = str(err.value)
    for piece in ("steps=0", "check_steps=1", "replicas=0", "predict_only=1"):
        assert piece in text


def _wine():
    spec = importlib.util.spec_from_file_location("sklearn_nets", ROOT / "examples/sklearn_nets.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.wine


@pytest.mark.slow
@pytest.mark.parametrize("threads", [1, 2])
def test_the_wine_network_is_never_called_suitable_at_one_or_two_threads(threads):
    # The user problem: a 13-32-16 tanh MLP (x) under a ridge-1e-3 linear head (y),
    # f = validation cross-entropy, Adam, lr_x 0.01, lr_y 0.05, gamma 10, batches of 32.
    pytest.importorskip("sklearn")
    spec = _wine()({"seed": 0})
    torch.set_num_threads(threads)
    v = br.diagnose(
        spec.problem, spec.x0, spec.y0, 10.0, data=spec.data, eval_data=spec.eval_data,
        steps=3000, lr_x=0.01, lr_y=0.05, optimizer="adam",
    )  # fmt: skip
    assert v.verdict == "unsuitable"
    assert v.held_out is not None and "held-out rows" in v.held_out and "spread" in v.held_out
    assert "held" not in v.reason  # the held-out comparison is never folded into the verdict


def test_work_threads_follow_the_problems_size_unless_given():
    assert threads_for_work(10_000, 8) == 1
    assert threads_for_work(10_000_000, 8) == 8
    small = ({"x": torch.zeros(10)}, {"y": torch.zeros(10)})
    assert use_work_threads(*small) == 1 and torch.get_num_threads() == 1
    assert use_work_threads(*small, threads=2) == 2 and torch.get_num_threads() == 2
    torch.set_num_threads(1)
    with pytest.raises(br.ConfigError, match=r"threads=0: must be a whole number in \[1, 1024\]"):
        use_work_threads(*small, threads=0)


def test_cli_certifies_a_finished_run_folder_at_its_end(tmp_path, capsys):
    from bilevel_ray.cli import main

    run = tmp_path / "run"
    assert main(["solve", "toy-negative", "--steps", "1500", "--out", str(run), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["diagnose", "--at-end", str(run), "--quiet"]) == 3
    out = capsys.readouterr().out
    assert out.startswith(f"{run} (run of toy-negative): unsuitable")
    assert "from PBGD-Free's end (step 1500)" in out and "check_steps=375" in out


@pytest.mark.parametrize(
    ("make", "argv", "message"),
    [
        (lambda d: None, [], "holds no run.json"),
        (
            lambda d: (d / "run.json").write_text("{not json"),
            [],
            "is not valid JSON",
        ),
        (
            lambda d: (d / "run.json").write_text(
                '{"problem": "toy-negative", "settings": {"method": "alt_pbgd"}, '
                '"method": "alt_pbgd"}'
            ),
            [],
            "the run's method is 'alt_pbgd'",
        ),
        (
            lambda d: (d / "run.json").write_text(
                '{"problem": "toy-negative", "settings": {}, "method": "pbgd_free"}'
            ),
            [],
            "result.pt' cannot be read (No such file or directory)",
        ),
        (lambda d: None, ["--steps", "10"], "--at-end certifies a finished run"),
        (lambda d: None, ["toy-negative"], "drop PROBLEM"),
    ],
)
def test_cli_at_end_refuses_what_it_cannot_certify(tmp_path, capsys, make, argv, message):
    from bilevel_ray.cli import main

    make(tmp_path)
    assert main(["diagnose", *argv, "--at-end", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


def test_cli_diagnose_without_a_problem_or_a_run_folder_is_a_usage_error(capsys):
    from bilevel_ray.cli import main

    assert main(["diagnose"]) == 2
    assert "diagnose needs PROBLEM" in capsys.readouterr().err


class HoelderSaddle:
    """f = (x - 1)^2 / 2 - |y - x|^1.2, g = (y - x)^2 / 2: y_g = x, where grad_y f = 0, so y_g
    is stationary for f/gamma + g, a local maximum along y; the penalty's minimum is at
    |y - x| = (1.2 / gamma)^(1 / 0.8)."""

    def upper_loss(self, x, y, batch):
        return ((x["x"] - 1) ** 2).sum() / 2 - ((y["y"] - x["x"]).abs() ** 1.2).sum()

    def lower_loss(self, x, y, batch):
        return ((y["y"] - x["x"]) ** 2).sum() / 2


def test_a_penalty_solve_that_stops_at_a_saddle_of_y_g_goes_on_from_the_runs_y():
    from bilevel_ray.diagnostics.responses import lower_responses

    x, y = {"x": t64(0.3)}, {"y": t64(0.8)}  # the run's y, off y_g = 0.3
    r = lower_responses(HoelderSaddle(), x, y, None, 5.0, optimizer="lbfgs", solve_steps=500)
    assert float(r.y_g["y"]) == pytest.approx(0.3, abs=1e-6)
    assert float(r.y_gamma["y"]) == pytest.approx(0.3 + (1.2 / 5) ** (1 / 0.8), abs=1e-4)
    # Started exactly at y_g there is no other point to start from: the saddle stands (the
    # end-of-run certificate, which measures phi, does not depend on it).
    at_y_g = lower_responses(HoelderSaddle(), x, {"y": t64(0.3)}, None, 5.0, optimizer="lbfgs")
    assert float(at_y_g.y_gamma["y"]) == 0.3
