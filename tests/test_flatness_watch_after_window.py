"""The run-time watch after its window: a coupling that switches on only where the window did
not reach is still caught by a later check, and the watch acts on it."""

from __future__ import annotations

import re

import pytest
import torch

import bilevel_ray as br
from bilevel_ray.runtime.local.judge import FlatnessJudge
from bilevel_ray.runtime.local.watch import watch_settings

F64 = torch.float64


class LateCoupling:
    """f = (x - 5)^2 / 2 + 10 y, g = (y - s(x))^2 / 2 with s(x) = softplus(5 (x - 2)) / 5: y
    follows x only past x ~ 2, so the dropped term 10 s'(x) is ~0 where the window looks (from
    x0 = 0 at lr_x = 0.01, x ~ 0.9 at step 20) and 10 where PBGD-Free settles (x = 5, where
    phi(5) = 30 against phi ~ 4.5 near x = 2: the negative toy's bias, switched on late)."""

    def upper_loss(self, x, y, batch):
        return (0.5 * (x["x"] - 5) ** 2 + 10 * y["y"]).sum()

    def lower_loss(self, x, y, batch):
        s = torch.nn.functional.softplus(5 * (x["x"] - 2)) / 5
        return (0.5 * (y["y"] - s) ** 2).sum()


OPTIONS = {"steps": 600, "lr_x": 0.01, "lr_y": 0.2, "gamma": 10.0, "report_every": 10}
START = ({"x": torch.tensor([0.0], dtype=F64)}, {"y": torch.tensor([0.0], dtype=F64)})


def _late_coupling_run(on_unsuitable: str, steps: int = OPTIONS["steps"]):
    """PBGD-Free on LateCoupling from START, watched from a 20-step window on."""
    x0, y0 = START
    return br.solve(
        LateCoupling(),
        x0,
        y0,
        on_unsuitable=on_unsuitable,
        diagnose_window=20,
        diagnose_every=10,
        **{**OPTIONS, "steps": steps},
    )


def test_a_coupling_past_the_window_is_caught_later_and_the_watch_falls_back():
    res = _late_coupling_run("fallback")
    methods = list(zip(res.history["step"].to_pylist(), res.history["method"].to_pylist()))
    switched = min(s for s, m in methods if m == "alt_pbgd")
    # Suitable at the window (x ~ 0.9: no coupling yet); a later check (every 20 steps) finds
    # the dropped term 10 s'(x) = 10 once PBGD-Free settles near x = 5 and the run switches.
    assert res.verdict["verdict"] == "unsuitable" and res.config["method"] == "alt_pbgd"
    assert 60 < switched <= 600 and {m for s, m in methods if s <= 20} == {"pbgd_free"}
    # The check at step 180 (settled at x ~ 4.2) decided; its row is the first of alt_pbgd's.
    assert res.verdict["stats"]["flatness/decided_at"] == 180 and switched == 190
    assert "costs about 14" in res.verdict["reason"] and abs(float(res.x["x"][0]) - 5) > 1


def test_without_later_checks_the_window_verdict_stands():
    # The same run judged at step 20 only would have kept PBGD-Free (x far from 2 there).
    res = _late_coupling_run("fallback", steps=40)
    assert res.verdict["verdict"] != "unsuitable" and res.config["method"] == "pbgd_free"


def test_the_warning_states_a_tolerance_from_the_runs_start_and_the_step():
    with pytest.warns(
        UserWarning, match=r"flatness diagnostic at step \d+: PBGD-Free is biased"
    ) as w:
        _late_coupling_run("warn")
    text = str(w[0].message)
    # The recheck at step 180 judges its two latest estimates, yet measures the improvement
    # from the run's start (f(x, y_gamma(x)) at its first step, 2.25, which the watch measures
    # and every estimate carries), not from step 170: 5% of (2.25 - (12.15 - 14.4)) plus the
    # jitter floor.
    assert re.search(r"at step 180: .* improvement from f = 2\.25\d* at the", text), text
    assert re.search(r"tolerance of 0\.22\d+ \(5% of the achievable", text), text


def test_later_checks_default_to_every_window_and_the_judge_keeps_an_acted_verdict():
    settings = watch_settings("stop", "pbgd_free", 200, 50, None)
    assert [s for s in range(1, 801) if settings.rechecks(s)] == [400, 600, 800]
    judge = FlatnessJudge()
    biased = {"flatness/dropped": 10.0, "flatness/kept": 1.0, "flatness/full": 11.0}
    judge.add("a", 10, biased)
    first = judge.verdict("a")
    assert first["verdict"] == "unsuitable"
    judge.add("a", 400, {"flatness/dropped": 0.0, "flatness/kept": 1.0, "flatness/full": 1.0})
    assert judge.recheck("a", since=200) == first
