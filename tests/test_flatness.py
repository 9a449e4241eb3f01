"""Flatness diagnostics against known answers (float64 unless a test says otherwise).

Negative toy f = 10y + x^2, g = (y - x + 1)^2: y_g = x - 1, y_gamma = x - 1 - 5/gamma, so
kept = grad_x f = 2x, dropped = gamma * 2 (y_g - y_gamma) = 10 for every gamma, and f is exactly
10-Lipschitz in y (alpha = 1, c = 10). Positive toy: the digest's table (§2.6(c)). Quadratics:
the flat member has y_gamma = y_g (dropped = 0), the other grad_y f(x*, y*) != 0.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import math
import re
from pathlib import Path

import pytest
import torch

import bilevel_ray as br
from bilevel_ray.diagnostics import (
    Verdict,
    decide,
    delta_hat,
    diagnose,
    estimate,
    fit_exponent,
    lower_responses,
)
from bilevel_ray.problems.quadratic import QuadraticProblem
from bilevel_ray.problems.toys import NegativeToy, positive_toy

F64 = torch.float64


def t64(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


def stat(stats: dict, name: str) -> float:
    return stats[f"flatness/{name}"]


# --- estimates at one point, against closed forms ----------------------------------------------


@pytest.mark.parametrize("optimizer", ["adam", "lbfgs"])
@pytest.mark.parametrize("gamma", [5.0, 15.0, 50.0])
def test_negative_toy_closed_forms(gamma, optimizer):
    x, y = {"x": t64(2.0)}, {"y": t64(0.0)}
    r = lower_responses(NegativeToy(), x, y, None, gamma, optimizer=optimizer)
    assert float(r.y_g["y"]) == pytest.approx(1.0, abs=1e-6)  # y_g = x - 1
    assert float(r.y_gamma["y"]) == pytest.approx(1.0 - 5.0 / gamma, abs=1e-6)
    assert not r.y_g["y"].requires_grad and r.y_g["y"].grad_fn is None
    s = estimate(NegativeToy(), x, y, None, gamma, optimizer=optimizer)
    gap = 5.0 / gamma
    expected = {
        "kept": 4.0,  # 2x
        "dropped": 10.0,  # gamma * 2 * 5 / gamma, for every gamma
        "full": 14.0,  # phi'(2) = 2x + 10
        "rho": 2.5,
        "cos": 1.0,
        "gap": gap,
        "f_gap": 10.0 * gap,
        "grad_y_f": 10.0,
        "scaled_gap": 5.0,
        "scaled_gap_hi": 5.0,  # gamma * ||y_gamma - y_g|| = 5 at 4 gamma too: no decrease
        "dropped_hi": 10.0,
        "delta_hat_c0.5_a1.5": 10.0 * gap - 0.5 * gap**1.5,
        "delta_hat_c1_a1.5": 10.0 * gap - gap**1.5,
    }
    for name, value in expected.items():
        assert stat(s, name) == pytest.approx(value, rel=1e-4, abs=1e-6), name
    assert abs(stat(s, "gap_slope")) < 1e-3 and abs(stat(s, "dropped_slope")) < 1e-3
    assert stat(s, "alpha_hat") == pytest.approx(1.0, abs=0.05)
    assert stat(s, "c_hat") == pytest.approx(10.0, rel=1e-3)
    assert stat(s, "residual") < 1e-3
    assert all(isinstance(v, float) for v in s.values())


@pytest.mark.parametrize(("x", "cos"), [(-3.0, -1.0), (0.5, 1.0)])
def test_negative_toy_rho_and_cos(x, cos):
    s = estimate(NegativeToy(), {"x": t64(x)}, {"y": t64(0.0)}, None, 10.0)
    assert stat(s, "rho") == pytest.approx(10.0 / abs(2 * x), rel=1e-4)
    assert stat(s, "full") == pytest.approx(abs(2 * x + 10.0), rel=1e-4)
    assert stat(s, "cos") == pytest.approx(cos, abs=1e-9)


def test_delta_hat_formula():
    assert delta_hat(5.0, 0.5, c=0.5, alpha=1.5) == pytest.approx(5.0 - 0.5 * 0.5**1.5)
    assert delta_hat(0.001, 0.5) == 0.0  # clipped at 0


class PowerProblem:
    """f = |y - 1|^1.5 + x^2, g = (y - 1)^2: f is (0, 1.5)-flat at y_g = 1 with c = 1."""

    def upper_loss(self, x, y, batch):
        return ((y["y"] - 1).abs() ** 1.5).sum() + (x["x"] ** 2).sum()

    def lower_loss(self, x, y, batch):
        return ((y["y"] - 1) ** 2).sum()


def test_exponent_fit_recovers_a_known_power():
    alpha, c = fit_exponent(
        PowerProblem(), {"x": t64(0.0)}, {"y": t64(1.0)}, toward={"y": t64(1.1)}
    )
    assert alpha == pytest.approx(1.5, abs=1e-6)
    assert c == pytest.approx(1.0, rel=1e-6)


def test_positive_toy_matches_the_digest_table():
    # Digest §2.6(c) at x = 3, gamma = 16: kept 0.552, dropped -0.009, |f gap| 0.0013,
    # ||y_g - y_gamma|| 0.049, |grad_y f(x, y_g)| 0.026.
    spec = positive_toy()
    s = estimate(spec.problem, {"w1": t64(3.0)}, {"w2": t64(1.3)}, None, 16.0)
    assert stat(s, "kept") == pytest.approx(0.552, abs=5e-4)
    assert stat(s, "dropped") == pytest.approx(0.009, abs=5e-4)
    assert stat(s, "f_gap") == pytest.approx(0.0013, abs=5e-5)
    assert stat(s, "gap") == pytest.approx(0.049, abs=5e-4)
    assert stat(s, "grad_y_f") == pytest.approx(0.026, abs=5e-4)
    assert stat(s, "rho") < 0.1


def test_quadratic_dropped_term_matches_closed_form():
    q = QuadraticProblem(flat=False)
    x = {"x": t64(0.3, -0.2, 0.5)}
    s = estimate(q, x, {"y": torch.zeros(4, dtype=F64)}, None, 10.0)
    y_g, y_gam = q.lower_solution(x)["y"], q.perturbed_solution(x, 10.0)["y"]
    # grad_x g = -B'y, so dropped = gamma B'(y_g - y_gamma).
    assert stat(s, "dropped") == pytest.approx(
        float((10.0 * q.B.T @ (y_g - y_gam)).norm()), rel=1e-5
    )
    kept = q.P @ x["x"] + q.Q @ y_gam + q.p
    assert stat(s, "kept") == pytest.approx(float(kept.norm()), rel=1e-5)


# --- verdicts on the acceptance problems --------------------------------------------------------


class Toy:
    """The CONTRACT example: the negative toy in float32."""

    def upper_loss(self, x, y, batch):
        return 10 * y["y"].sum() + (x["x"] ** 2).sum()

    def lower_loss(self, x, y, batch):
        return ((y["y"] - x["x"] + 1) ** 2).sum()


def test_contract_example_negative_toy_is_unsuitable():
    v = diagnose(Toy(), x0={"x": torch.tensor([2.0])}, y0={"y": torch.tensor([0.0])}, gamma=10.0)
    assert (v.suitable, v.verdict, v.fallback) == (False, "unsuitable", "alt_pbgd")
    assert v.recommendation == "switch to alt_pbgd"
    assert "alt_pbgd" in v.reason and "costs it the bilevel objective" in v.reason
    # The early price, reported beside the certificate as what it is: a prediction.
    assert "Lipschitz-like" in v.prediction and "costs about 25" in v.prediction
    assert v.stats["flatness/dropped"] == pytest.approx(10.0, rel=1e-4)
    # F_gamma = x^2 + 10 x + const: curvature 2, so the dropped 10 costs 10^2 / (2 * 2) = 25.
    assert v.stats["flatness/cost"] == pytest.approx(25.0, rel=1e-3)


@pytest.mark.parametrize("gamma", [5.0, 15.0, 50.0])
def test_negative_toy_is_unsuitable_at_every_gamma(gamma):
    v = diagnose(NegativeToy(), {"x": t64(2.0)}, {"y": t64(0.0)}, gamma)
    assert not v.suitable and v.fallback == "alt_pbgd" and v.recommendation == "switch to alt_pbgd"
    assert v.stats["flatness/dropped"] == pytest.approx(10.0, rel=1e-4)
    assert v.stats["flatness/cost"] == pytest.approx(25.0, rel=1e-3)  # for every gamma
    assert v.stats["flatness/alpha_hat"] == pytest.approx(1.0, abs=0.05)
    assert v.stats["flatness/c_hat"] == pytest.approx(10.0, rel=1e-3)
    assert abs(v.stats["flatness/dropped_slope"]) < 1e-3


@pytest.mark.slow
def test_positive_toy_is_suitable():
    spec = positive_toy()  # start (5, -9.9) as in the notebook, gamma 16
    v = diagnose(
        spec.problem, spec.x0, spec.y0, 16.0, lr_x=0.01, lr_y=0.01, inner_steps=2, steps=4000
    )
    assert (v.suitable, v.verdict, v.fallback) == (True, "suitable", None)
    assert v.recommendation == "keep pbgd_free"
    # At its end PBGD-Free is within 0.04 of the bilevel optimum phi ~ 1.27 (digest §3.2), far
    # within 5% of the improvement from phi = 5.43 at the start.
    assert v.stats["end/phi_corrected"] == pytest.approx(1.27, abs=0.02)
    assert abs(v.stats["end/effect"]) < 0.05 < v.stats["end/tolerance"]
    assert v.stats["flatness/cost"] < 0.05 * v.stats["flatness/upper"]
    assert v.stats["flatness/dropped"] < 0.1


def test_flat_quadratic_is_suitable(origin):
    q = QuadraticProblem(flat=True)
    v = diagnose(q, *origin, 10.0, lr_x=0.05, lr_y=0.2)
    assert v.suitable and v.recommendation == "keep pbgd_free"
    assert v.stats["flatness/dropped"] < 1e-8
    assert v.stats["flatness/alpha_hat"] > 1.5  # f - f(y_g) is quadratic in y - y_g


def test_flat_quadratic_at_its_solution_is_suitable():
    # Every gradient is ~0 there: the solves must not chase rounding, the bias is below atol.
    q = QuadraticProblem(flat=True)
    x = q.solution()
    v = diagnose(q, x, q.lower_solution(x), 10.0, lr_x=0.05, lr_y=0.2)
    assert v.suitable and v.stats["flatness/dropped"] < 1e-8


@pytest.mark.parametrize("at_solution", [False, True])
def test_nonflat_quadratic_is_unsuitable(origin, at_solution):
    q = QuadraticProblem(flat=False)
    x_star = q.solution()
    grad_y_f = q.Q.T @ x_star["x"] + q.R @ q.lower_solution(x_star)["y"] + q.r
    assert float(grad_y_f.norm()) > 1.0  # grad_y f(x*, y*(x*)) != 0
    x0, y0 = (x_star, q.lower_solution(x_star)) if at_solution else origin
    v = diagnose(q, x0, y0, 10.0, lr_x=0.05, lr_y=0.2)
    assert (v.suitable, v.verdict, v.fallback) == (False, "unsuitable", "alt_pbgd")
    # C = 0.88 against 5% of |f| ~ 4.3 at the ends: 0.21, whatever the start.
    assert v.stats["flatness/cost"] > 3 * v.stats["flatness/tolerance"]


def test_diagnose_with_data_is_deterministic_and_leaves_x0_y0_alone():
    class Regression:  # least squares of x u + y v - t on the UL / LL batches
        def upper_loss(self, x, y, batch):
            u, v, t = batch
            return ((x["x"] * u + y["y"] * v - t) ** 2).mean()

        def lower_loss(self, x, y, batch):
            u, v, t = batch
            return ((x["x"] * u + y["y"] * v - t) ** 2).mean() + 0.1 * (y["y"] ** 2).sum()

    gen = torch.Generator().manual_seed(0)
    data = [tuple(torch.randn(32, generator=gen, dtype=F64) for _ in range(3)) for _ in range(2)]
    x0, y0 = {"x": t64(1.0)}, {"y": t64(-1.0)}
    before = (x0["x"].clone(), y0["y"].clone(), dict(x0), dict(y0))
    batches = br.minibatches(data[0], data[1], batch_size=8)
    options = {"data": batches, "warmup_steps": 20, "every": 10}
    runs = [diagnose(Regression(), x0, y0, 10.0, **options) for _ in range(2)]
    assert runs[0].to_dict() == runs[1].to_dict()
    assert runs[0].stats["flatness/judged"] == 4.0  # the end point, priced on 4 batches
    assert torch.equal(x0["x"], before[0]) and torch.equal(y0["y"], before[1])
    assert x0 == before[2] and y0 == before[3]  # same tensor objects, no new keys
    assert not x0["x"].requires_grad and not y0["y"].requires_grad


def test_diagnose_leaves_the_global_rng_untouched():
    state = torch.get_rng_state()
    diagnose(NegativeToy(), {"x": t64(2.0)}, {"y": t64(0.0)}, warmup_steps=0)
    assert torch.equal(torch.get_rng_state(), state)


# --- the decision rule on hand-built estimates --------------------------------------------------


def point(dropped, kept, full=None, **more):
    full = kept + dropped if full is None else full
    base = {"dropped": dropped, "kept": kept, "full": full, "gamma": 10.0, "residual": 0.0}
    return {f"flatness/{k}": float(v) for k, v in {**base, **more}.items()}


def test_decide_recommends_raising_gamma_when_the_term_shrinks():
    v = decide(point(1.0, 1.0, full=2.0, dropped_slope=-1.0, alpha_hat=1.5, c_hat=1.0))
    assert (v.verdict, v.recommendation, v.fallback) == ("unsuitable", "raise gamma", "alt_pbgd")
    # ratio 0.5 must fall to 0.1: gamma * (0.5 / 0.1)^(1/1) = 50.
    assert v.stats["flatness/suggested_gamma"] == pytest.approx(50.0)
    assert "raise gamma to about 50" in v.reason


def test_decide_switches_when_raising_gamma_does_not_help():
    v = decide(point(1.0, 1.0, full=2.0, dropped_slope=-0.1, alpha_hat=1.5, c_hat=1.0))
    assert (v.recommendation, v.fallback) == ("switch to alt_pbgd", "alt_pbgd")
    assert "only up to a residual" in v.reason and "slope -0.10" in v.reason


def test_decide_uncertain_band_and_median_over_points():
    v = decide([point(0.2, 1.0, full=1.0), point(0.2, 0.5), point(50.0, 1.0, full=1.0)])
    assert (v.verdict, v.suitable, v.fallback) == ("uncertain", False, None)
    assert v.recommendation == "compare with alt_pbgd"
    assert v.stats["flatness/dropped"] == pytest.approx(0.2)  # the median, not the outlier
    assert "between 10% and 30%" in v.reason


def test_decide_near_a_stationary_point_uses_the_largest_gradient_scale():
    # The kept term vanishes at the last point (rho = inf there); the scale is the first point's.
    v = decide([point(0.01, 1.0), point(0.01, 0.1), point(0.01, 0.0, full=0.01)])
    assert v.suitable and v.stats["flatness/grad_scale"] == pytest.approx(1.01)
    tiny = decide(point(1e-9, 0.0, full=1e-9, rho=math.inf))
    assert tiny.suitable and "1e-06" in tiny.reason  # below atol whatever the ratio


def test_decide_leaves_out_unconverged_and_nonfinite_points():
    v = decide([point(5.0, 1.0, residual=0.5), point(0.01, 1.0)])
    assert v.suitable and v.stats["flatness/used"] == 1.0
    stuck = decide(point(5.0, 1.0, residual=0.5))
    assert stuck.verdict == "uncertain" and "raise solve_steps" in stuck.reason
    broken = decide(point(math.nan, 1.0))
    assert broken.verdict == "uncertain" and "not finite" in broken.reason


def test_verdict_is_frozen_and_its_dict_is_json():
    v = decide(point(1.0, 1.0, full=2.0, dropped_slope=math.nan))
    with pytest.raises(dataclasses.FrozenInstanceError):
        v.suitable = True
    d = v.to_dict()
    json.dumps(d, allow_nan=False)  # NaN statistics become None
    assert d["stats"]["flatness/dropped_slope"] is None and d["fallback"] == "alt_pbgd"
    assert set(d) == {
        "suitable",
        "verdict",
        "reason",
        "recommendation",
        "fallback",
        "held_out",
        "prediction",
        "stats",
    }
    assert isinstance(v, Verdict)


def test_diagnostics_import_neither_ray_nor_the_runtimes():
    package = Path(br.__file__).parent / "diagnostics"
    for path in package.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                assert name.split(".")[0] != "ray", path
                assert not name.startswith("bilevel_ray.runtime"), path


# --- errors -------------------------------------------------------------------------------------


class CountingToy(NegativeToy):
    def __init__(self):
        self.calls = 0

    def upper_loss(self, x, y, batch):
        self.calls += 1
        return super().upper_loss(x, y, batch)

    def lower_loss(self, x, y, batch):
        self.calls += 1
        return super().lower_loss(x, y, batch)


BAD_OPTIONS = [
    ({"gamma": 0.0}, "gamma=0.0: must be a finite number > 0"),
    ({"gamma": math.inf}, "gamma=inf: must be a finite number > 0"),
    ({"gamma": "10"}, "gamma='10': must be a finite number > 0"),
    ({"warmup_steps": -1}, "warmup_steps=-1: must be an integer >= 0"),
    ({"every": 0}, "every=0: must be an integer >= 1"),
    ({"seed": -1}, "seed=-1: must be an integer >= 0"),
    ({"solve_steps": 0}, "solve_steps=0: must be an integer >= 1"),
    ({"solve_lr": -0.1}, "solve_lr=-0.1: must be a finite number > 0"),
    ({"solve_rtol": 1.0}, "solve_rtol=1.0: must be a finite number in (0, 1)"),
    ({"solve_optimizer": "newton"}, "solve_optimizer='newton': unknown; choose one of"),
    ({"gamma_factor": 1.0}, "gamma_factor=1.0: must be a finite number > 1"),
    ({"directions": -1}, "directions=-1: must be an integer >= 0"),
    ({"delta_pairs": ((0.5,),)}, "delta_pairs=((0.5,),): must be (c, alpha) pairs"),
    ({"delta_pairs": ((0.5, 0.0),)}, "with c >= 0 and alpha > 0"),
    ({"rho_ok": -0.1}, "rho_ok=-0.1: must be a finite number >= 0"),
    ({"rho_bad": math.nan}, "rho_bad=nan: must be a finite number >= 0"),
    ({"rho_ok": 0.5, "rho_bad": 0.3}, "rho_ok=0.5 must be < rho_bad=0.3"),
    ({"atol": -1.0}, "atol=-1.0: must be a finite number >= 0"),
    ({"max_residual": -1.0}, "max_residual=-1.0: must be a finite number >= 0"),
    ({"lr_x": -1.0}, "lr_x=-1.0: must stay > 0"),
    ({"inner_steps": 0}, "inner_steps=0: must be an integer >= 1"),
]


@pytest.mark.parametrize(("options", "message"), BAD_OPTIONS)
def test_diagnose_refuses_bad_options_before_any_work(options, message):
    problem = CountingToy()
    with pytest.raises(br.ConfigError, match=re.escape(message)):
        diagnose(problem, {"x": t64(2.0)}, {"y": t64(0.0)}, **{"gamma": 10.0, **options})
    assert problem.calls == 0


def test_diagnose_lists_every_problem_at_once():
    with pytest.raises(br.ConfigError, match=r"^3 problems:") as err:
        diagnose(NegativeToy(), {"x": t64(2.0)}, {"y": t64(0.0)}, -1.0, every=0, lr_y=0.0)
    assert len(err.value.problems) == 3


def test_diagnose_refuses_bad_params_and_losses_before_any_step():
    with pytest.raises(br.ConfigError, match=r"x0 is a list: must be a dict of tensors"):
        diagnose(NegativeToy(), [t64(2.0)], {"y": t64(0.0)})

    class NoX(NegativeToy):
        def upper_loss(self, x, y, batch):
            return 10.0 * y["y"].sum()

    # f of y alone is a verdict, not an error: PBGD-Free's x step is 0 (hyperclean's shape).
    v = diagnose(NoX(), {"x": t64(2.0)}, {"y": t64(0.0)})
    assert (v.verdict, v.fallback) == ("unsuitable", "alt_pbgd")
    assert "upper_loss does not depend on x directly" in v.reason

    class Detached(NegativeToy):
        def upper_loss(self, x, y, batch):
            return (10.0 * y["y"] + x["x"].detach() ** 2).sum()

    assert (
        "or from .detach()ed copies"
        in diagnose(Detached(), {"x": t64(2.0)}, {"y": t64(0.0)}).reason
    )


def test_diagnose_without_warmup_estimates_the_start_only():
    v = diagnose(NegativeToy(), {"x": t64(2.0)}, {"y": t64(0.0)}, warmup_steps=0)
    assert v.stats["flatness/points"] == 1.0
    assert v.stats["flatness/rho"] == pytest.approx(2.5, rel=1e-4)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"gamma": -2.0}, "gamma=-2.0: must be a finite number > 0"),
        (
            {"optimizer": "rmsprop"},
            "optimizer='rmsprop': unknown; choose one of ['adam', 'lbfgs', 'sgd']",
        ),
        ({"solve_steps": 1.5}, "solve_steps=1.5: must be an integer >= 1"),
    ],
)
def test_estimate_refuses_bad_options(options, message):
    problem = CountingToy()
    with pytest.raises(br.ConfigError, match=re.escape(message)):
        estimate(problem, {"x": t64(2.0)}, {"y": t64(0.0)}, **options)
    assert problem.calls == 0


@pytest.mark.parametrize(
    ("stats", "options", "message"),
    [
        ([], {}, "stats is empty: decide needs at least one estimate"),
        (point(1.0, 1.0), {"rho_ok": 0.3, "rho_bad": 0.3}, "rho_ok=0.3 must be < rho_bad=0.3"),
        (point(1.0, 1.0), {"atol": True}, "atol=True: must be a finite number >= 0"),
    ],
)
def test_decide_refuses_bad_input(stats, options, message):
    with pytest.raises(br.ConfigError, match=re.escape(message)):
        decide(stats, **options)
