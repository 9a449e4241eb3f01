"""A handed-over ``best_schedule.json`` replays what its sweep learned and nothing else: an
unknown field, or settings its lineage does not give, is refused with the file named
(``runtime/tune/lineage.read_schedule_file``)."""

from __future__ import annotations

import json

import pytest

import bilevel_ray as br
from bilevel_ray.runtime.tune.lineage import read_schedule_file, write_best_schedule

A = {"method": "pbgd_free", "lr_x": 0.01, "lr_y": 0.1, "gamma": 1.0, "optimizer": "adam"}


def _schedule(folder):
    lineage = [
        {"from_step": 0, "trial_id": "a", "settings": A},
        {"from_step": 20, "trial_id": "b", "settings": {**A, "gamma": 5.0}},
    ]
    sweep = {"problem": "toy-negative", "problem_config": {}, "method": "pbgd_free"}
    trial = {"trial_id": "b", "eval/upper_loss": 1.5, "eval/lower_gap": 0.0}
    return write_best_schedule(folder, trial, lineage, {**sweep, "steps": 60, "seed": 0})


def _edit(path, edit):
    document = json.loads(path.read_text())
    edit(document)
    path.write_text(json.dumps(document))
    return path


def test_the_file_a_sweep_writes_reads_back(tmp_path):
    gamma = read_schedule_file(_schedule(tmp_path))["settings"]["gamma"]
    assert (gamma(0), gamma(19), gamma(20)) == (1.0, 1.0, 5.0)


def test_an_unknown_field_is_refused(tmp_path):
    path = _edit(_schedule(tmp_path), lambda d: d.update(extra=1, data="/their/file.csv"))
    with pytest.raises(br.ConfigError, match=r"\['data', 'extra'\] are not fields of a best_sch"):
        read_schedule_file(path)


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda d: d["settings"].update(gamma=1e6), r"its settings \['gamma'\] are not what its"),
        (lambda d: d["settings"].update(lr_x=0.5), r"its settings \['lr_x'\] are not what its"),
        (lambda d: d["lineage"][1]["settings"].update(gamma=1e6), r"settings \['gamma'\] are not"),
        (lambda d: d.update(lineage=[]), r"its lineage is not one a sweep writes \(segments"),
        (lambda d: d["lineage"][0].update(foo=1), r"its lineage is not one a sweep writes"),
        (lambda d: d["lineage"][1].update(from_step=500), r"increasing steps below steps=60"),
        (lambda d: d["lineage"][1].update(from_step=0), r"increasing steps below steps=60"),
        (lambda d: d.update(method="alt_pbgd"), r"its method 'alt_pbgd' is not its lineage's"),
        (
            lambda d: d["lineage"][1]["settings"].update(method="alt_pbgd"),
            r"its method 'pbgd_free' is not its lineage's 'alt_pbgd'",
        ),
        (lambda d: d.update(lineage=[{"x": 1}]), r"its lineage is not one a sweep writes"),
        (lambda d: d.update(lineage="a"), r"its lineage is not one a sweep writes"),
    ],
    ids=[
        "settings-gamma",
        "settings-lr_x",
        "lineage-gamma",
        "empty",
        "unknown-field",
        "past-the-end",
        "not-increasing",
        "top-method",
        "lineage-method",
        "no-settings",
        "a-string",
    ],
)
def test_settings_that_contradict_the_lineage_are_refused(tmp_path, edit, match):
    path = _edit(_schedule(tmp_path), edit)
    with pytest.raises(br.ConfigError, match=match):
        read_schedule_file(path)
