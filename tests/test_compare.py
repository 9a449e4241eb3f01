"""``br.compare`` / ``bilevel-ray compare``: every method under one budget, and a
recommendation that follows the measured outcome (issue 20)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import bilevel_ray as br
from bilevel_ray.cli import main
from bilevel_ray.problems import build_spec
from bilevel_ray.runtime.compare.driver import _method_settings
from bilevel_ray.runtime.compare.outcome import write_outcome
from bilevel_ray.runtime.compare.rank import Ranking
from bilevel_ray.runtime.compare.verdict import method_table, recommend, time_to_target

ROOT = Path(__file__).resolve().parents[1]


def _refuse(constant):
    raise ValueError(f"not strict JSON: {constant}")


def _run(method, seed, phi, steps=100, wall=1.0, state=16):
    return {
        "method": method,
        "seed": seed,
        "status": "completed",
        "final_phi": phi,
        "best_phi": phi,
        "final_upper_loss": phi,
        "lower_gap": 0.0,
        "steps": steps,
        "wall_s": wall,
        "state_bytes": state,
        "peak_rss_mb": 100.0,
    }


def _curve(phis_at):
    return [{"wall_s": t, "eval/phi": phi} for t, phi in phis_at]


def test_time_to_target_is_the_first_time_at_or_below_it():
    curve = _curve([(0.1, 5.0), (0.2, 2.0), (0.3, 1.0)])
    assert time_to_target(curve, 2.0) == 0.2 and time_to_target(curve, 0.5) == math.inf


def test_a_biased_pbgd_free_is_not_recommended_and_its_bias_is_stated():
    # The negative toy's outcome: PBGD-Free ends at phi = -10, a corrected method at -35, from
    # phi(x0) = 14.
    runs = [_run("pbgd_free", s, -10.0, steps=4000) for s in (0, 1)]
    runs += [_run("alt_pbgd", s, -35.0 + 0.01 * s, steps=600, state=24) for s in (0, 1)]
    curves = {("pbgd_free", s): _curve([(0.5, -10.0)]) for s in (0, 1)}
    curves |= {("alt_pbgd", s): _curve([(0.3, -20.0), (0.6, -35.0 + 0.01 * s)]) for s in (0, 1)}
    ranking = method_table(runs, curves, start=14.0, rank_by="final")  # a deterministic toy
    assert [r["method"] for r in ranking.rows] == ["alt_pbgd", "pbgd_free"]
    # The target: the best median plus 5% of the improvement from phi(x0) = 14 (the verdict's
    # tolerance; it was 5% of |phi|, which moves when a constant is added to f).
    assert ranking.targets["final"] == pytest.approx(-34.995 + 0.05 * (14 + 34.995))
    advice = recommend(ranking, {"verdict": "unsuitable"}, "toy-negative", {})
    assert advice["method"] == "alt_pbgd"
    assert "PBGD-Free is biased here: it ends at phi = -10, 25 ± " in advice["text"]
    assert "beyond tau = 2.46 (5% of the improvement from phi(x0) = 14" in advice["text"]
    assert "'unsuitable' on the same start, which agrees" in advice["text"]
    assert "bilevel-ray tune toy-negative --method alt_pbgd" in advice["text"]


def test_an_unbiased_pbgd_free_is_recommended_with_its_speed():
    runs = [_run("pbgd_free", s, -1.419, steps=2600, state=56) for s in (0, 1)]
    runs += [_run("alt_pbgd", s, -1.419, steps=400, state=88) for s in (0, 1)]
    curves = {("pbgd_free", s): _curve([(0.05, -1.35), (1.0, -1.419)]) for s in (0, 1)}
    curves |= {("alt_pbgd", s): _curve([(0.2, -1.35), (1.0, -1.419)]) for s in (0, 1)}
    advice = recommend(
        method_table(runs, curves, start=0.0), {"verdict": "suitable"}, "quadratic", {}
    )
    assert advice["method"] == "pbgd_free"
    assert (
        "it reaches the target in 0.05 s against 0.2 s (4x sooner; 6.5x the steps"
        in (advice["text"])
    )
    assert "which agrees" in advice["text"]
    assert advice["text"].endswith("bilevel-ray train quadratic --workers N.")


def test_nothing_completed_says_why():
    advice = recommend(Ranking([], {}, math.nan), None, "p", {"pbgd_free": "diverged at step 3"})
    assert advice["method"] is None
    assert advice["text"] == "No method completed a run (pbgd_free: diverged at step 3)."


def test_a_method_that_cannot_apply_is_listed_with_its_reason():
    spec = build_spec("hyperclean", {"device": "cpu"})
    settings, failed = _method_settings(spec, ["pbgd_free", "alt_pbgd"], {})
    assert set(settings) == {"alt_pbgd"}
    assert "upper_loss does not depend on x" in failed["pbgd_free"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"budget_s": 0}, r"budget_s=0: must be a finite number of seconds > 0"),
        ({"seeds": 0}, r"seeds=0: must be an integer >= 1"),
        ({"seeds": 10**9}, r"seeds=1000000000: at most 100 runs per method"),
        ({"budget_s": 1e12}, r"budget_s=1e\+12: at most 86400 s \(a day\) per run"),
        ({"num_workers": 2}, r"num_workers=2: compare runs each method in one process; scale"),
        ({"methods": ["adam"]}, r"methods=\['adam'\]: choose among pbgd_free, "),
        ({"methods": []}, r"methods=\[\]: choose among"),
        ({"rank_by": "last"}, r"rank_by='last': choose 'best' \(each run at its best held-out"),
    ],
)
def test_bad_input_is_refused_before_anything_runs(kwargs, match, tmp_path):
    with pytest.raises(br.ConfigError, match=match):
        br.compare("toy-negative", storage_path=str(tmp_path), **kwargs)


def test_a_used_folder_is_refused(tmp_path):
    (tmp_path / "compare").mkdir()
    (tmp_path / "compare" / "compare.json").write_text("{}")
    with pytest.raises(br.ConfigError, match=r"already holds a comparison: use a new --name"):
        br.compare("toy-negative", storage_path=str(tmp_path), methods=["alt_pbgd"])


@pytest.mark.ray
@pytest.mark.slow
def test_the_negative_toy_recommends_a_corrected_method(ray_2cpu, tmp_path, capsys):
    code = main(
        [
            "compare",
            "toy-negative",
            "--methods",
            "pbgd_free,alt_pbgd",
            "--budget",
            "1.5",
            "--seeds",
            "2",
            "--out",
            str(tmp_path),
            "--quiet",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "PBGD-Free is biased here: it ends at phi = -10, 25" in out
    text = (tmp_path / "compare" / "compare.json").read_text()
    summary = json.loads(text, parse_constant=_refuse)  # strict JSON: no Infinity, no NaN
    assert summary["recommendation"]["method"] == "alt_pbgd"
    # What reruns it, from its folder: the budget, the seeds, each method's settings, the command.
    assert summary["budget_s"] == 1.5 and summary["seeds"] == [0, 1]
    assert summary["settings"]["alt_pbgd"] == {"lr_x": 0.01, "lr_y": 0.1, "gamma": 10.0}
    assert summary["rerun"]["command"] == (
        f"bilevel-ray compare toy-negative --methods pbgd_free,alt_pbgd --budget 1.5 --seeds 2 "
        f"--out {tmp_path} --name compare-rerun"
    )
    # The wall time beside the budget: each run's whole time, scoring and start included.
    assert all(r["run_wall_s"] >= r["wall_s"] >= 1.5 for r in summary["runs"])
    assert summary["plan"]["took_s"] > 0 and summary["plan"]["total_s"] > 0
    runs = pq.read_table(tmp_path / "compare" / "compare.parquet").to_pylist()
    assert sorted((r["method"], r["seed"]) for r in runs) == [
        ("alt_pbgd", 0),
        ("alt_pbgd", 1),
        ("pbgd_free", 0),
        ("pbgd_free", 1),
    ]
    assert all(
        r["final_phi"] == pytest.approx(-35.0 if r["method"] == "alt_pbgd" else -10.0, abs=0.5)
        for r in runs
    )
    curves = pq.read_table(tmp_path / "compare" / "curves.parquet")
    assert curves.num_rows > 8 and (tmp_path / "compare" / "compare.png").stat().st_size > 0


@pytest.mark.ray
@pytest.mark.slow
def test_a_flat_problem_from_a_users_file_recommends_pbgd_free(
    ray_2cpu, tmp_path, monkeypatch, capsys
):
    # A user's own file, from its own folder: the flat member of the quadratic family.
    (tmp_path / "flat.py").write_text(
        "from bilevel_ray.problems import quadratic\n\n\n"
        "def factory(config):\n"
        "    return quadratic({**config, 'flat': True})\n"
    )
    monkeypatch.chdir(tmp_path)
    code = main(
        [
            "compare",
            "flat.py:factory",
            "--methods",
            "pbgd_free,alt_pbgd",
            "--budget",
            "1.5",
            "--seeds",
            "2",
            "--out",
            "out",
            "--quiet",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "PBGD-Free is as good as the best corrected method alt_pbgd" in out
    assert "sooner" in out or "the steps per second" in out
    assert (
        json.loads((tmp_path / "out" / "compare" / "compare.json").read_text())["recommendation"][
            "method"
        ]
        == "pbgd_free"
    )
    shutil.rmtree(tmp_path / "out")


# --- the comparison's folder: checked as solve's and train's, its files never written through ---


def test_a_name_that_links_out_of_the_storage_folder_is_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "c").symlink_to(outside)
    with pytest.raises(
        br.ConfigError,
        match=r"^name '.*out/c' resolves to '.*outside', outside '.*out' \(a symbolic link\): "
        r"remove the link or choose another name$",
    ):
        br.compare("toy-negative", storage_path=str(tmp_path / "out"), name="c")
    assert list(outside.iterdir()) == []


def test_a_name_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "c").write_text("mine\n")
    with pytest.raises(br.ConfigError, match=r"^name '.*c' is a file, not a folder; remove it"):
        br.compare("toy-negative", storage_path=str(tmp_path), name="c")
    assert (tmp_path / "c").read_text() == "mine\n"


def test_the_outputs_replace_a_planted_link_and_never_write_through_it(tmp_path):
    """compare.json, compare.parquet and curves.parquet are written to a temporary file and
    renamed: a link planted at one (after the folder was checked) is replaced."""
    folder, target = tmp_path / "c", tmp_path / "target.txt"
    folder.mkdir()
    target.write_text("not yours\n")
    for name in ("compare.json", "compare.parquet", "curves.parquet"):
        (folder / name).symlink_to(target)
    runs = [_run("alt_pbgd", 0, 1.0), _run("pbgd", 0, 2.0)]
    write_outcome(runs, folder, None, "toy-negative", {})
    assert target.read_text() == "not yours\n"
    for name in ("compare.json", "compare.parquet", "curves.parquet"):
        assert (folder / name).is_file() and not (folder / name).is_symlink(), name
