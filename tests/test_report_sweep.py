"""A sweep's report: the trials counted by how they ended, named by their settings, the lower
gap panel and a population's learned schedules."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bilevel_ray.runtime.report.folder import report
from bilevel_ray.runtime.report.sweep import kept_settings_note, settings_label, status_counts


def _trial(trial_id, status, loss, gap, gamma):
    return {
        "trial_id": trial_id,
        "status": status,
        "eval/upper_loss": loss,
        "eval/lower_gap": gap,
        "step": 40,
        "config/gamma": gamma,
        "config/lr_y": 0.01,
        "config/lr_ratio": 0.5,
        "config/inner_steps": 2,
        "config/optimizer": "adam",
    }


def test_trials_are_counted_by_how_they_ended():
    statuses = ["completed"] * 3 + ["stopped"] * 2 + ["diverged", "error", "unsuitable"]
    trials = [{"status": s} for s in statuses]
    assert status_counts(trials) == (
        "8 trials: 3 completed, 2 stopped early, 1 diverged, 2 failed or stopped by the diagnostic"
    )


def test_a_trial_is_named_by_its_settings_with_lr_x_from_the_ratio():
    label = settings_label(_trial("a", "completed", 1.0, 0.0, 10.0))
    assert label == "γ=10 lr_y=0.01 lr_x=0.005 K=2 adam"


def test_a_population_whose_best_trial_never_exploited_says_so():
    one = json.dumps([{"from_step": 0, "trial_id": "a", "settings": {}}])
    two = json.dumps(
        [{"from_step": 0, "trial_id": "a", "settings": {}}, {"from_step": 60, "trial_id": "b"}]
    )
    kept = "the best trial kept its first settings (no exploit)"
    assert kept_settings_note([{"lineage": one}, {"lineage": two}]) == kept
    # The best trial learned a schedule (the figure draws it), or nobody exploited (no
    # population), or there is no lineage to read (a sweep from before lineages): nothing.
    assert kept_settings_note([{"lineage": two}, {"lineage": one}]) == ""
    assert kept_settings_note([{"lineage": one}, {"lineage": one}]) == ""
    assert kept_settings_note([{}, {"lineage": "not json"}]) == ""


def test_the_report_of_a_population_sweep_counts_the_trials_and_draws_four_panels(tmp_path):
    pytest.importorskip("matplotlib")
    trials = [
        _trial("a", "completed", 0.5, 0.01, 10.0),
        _trial("b", "completed", 0.7, 0.5, 3.0),
        _trial("c", "diverged", float("inf"), float("inf"), 90.0),
    ]
    history = [
        {
            "trial_id": t,
            "step": s,
            "eval/upper_loss": 1.0 / s,
            "time/elapsed_s": s / 10.0,
            "restart": int(s > 20),
            "from_step": 20 * int(s > 20),
        }
        for t in ("a", "b")
        for s in (10, 20, 30, 40)
    ]
    pq.write_table(pa.Table.from_pylist(trials), tmp_path / "trials.parquet")
    pq.write_table(pa.Table.from_pylist(history), tmp_path / "history.parquet")
    lineage = [
        {"from_step": 0, "trial_id": "b", "settings": {"gamma": 3.0, "lr_x": 0.005, "lr_y": 0.01}},
        {
            "from_step": 20,
            "trial_id": "a",
            "settings": {"gamma": 12.0, "lr_x": 0.004, "lr_y": 0.01},
        },
    ]
    (tmp_path / "best_schedule.json").write_text(json.dumps({"steps": 40, "lineage": lineage}))
    table, png, note = report(tmp_path)
    assert note is None and png.is_file()
    assert table.splitlines()[-1] == "3 trials: 2 completed, 1 diverged"
    from PIL import Image

    width, height = Image.open(png).size
    # Four panels side by side (19 x 4.6 in); without a learned schedule three (15 x 4.6 in).
    assert width > 3.8 * height
    (tmp_path / "best_schedule.json").unlink()
    _, png, _ = report(tmp_path)
    width, height = Image.open(png).size
    assert width < 3.5 * height
