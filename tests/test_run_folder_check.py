"""A finished run's folder is checked against its manifest before ``diagnose --at-end`` (and
``export``, tests/test_export.py) read it: an edited ``run.json`` or ``result.pt`` is refused by
name; a folder from before manifests is read with a note, its steps still bounded."""

from __future__ import annotations

import json
import re

import pytest

import bilevel_ray as br
from bilevel_ray.cli import main
from bilevel_ray.records.folder_check import check_folder
from bilevel_ray.records.manifest import MANIFEST, read_manifest, write_manifest
from bilevel_ray.runtime.local.diagnose_named import certify_run


@pytest.fixture
def run(tmp_path, capsys):
    argv = ["solve", "quadratic", "--steps", "20", "--out", str(tmp_path / "r"), "--quiet"]
    assert main(argv) == 0
    capsys.readouterr()
    return tmp_path / "r"


def _edit_run_json(folder, edit):
    record = json.loads((folder / "run.json").read_text())
    edit(record)
    (folder / "run.json").write_text(json.dumps(record))


@pytest.fixture
def never_certifies(monkeypatch):
    """Building the run's problem fails the test (the refusal must come first)."""
    import bilevel_ray.runtime.local.diagnose_named as named

    def reached(*args, **kwargs):
        raise AssertionError("--at-end built the problem before refusing the folder")

    monkeypatch.setattr(named, "fingerprinted_spec", reached)


@pytest.mark.parametrize(
    "edit",
    [lambda r: r.update(steps=10**12), lambda r: r["settings"].update(lr_x=0.5)],
    ids=["steps", "lr_x"],
)
def test_at_end_refuses_an_edited_run_json(run, capsys, never_certifies, edit):
    _edit_run_json(run, edit)
    assert main(["diagnose", "--at-end", str(run)]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1, err
    assert re.search(
        r"^error: --at-end '.*r' does not match its manifest \(output run\.json changed since "
        r"it was written \(sha256 .*\)\): its files are not the ones its run wrote; restore the "
        r"folder from the run's own copy, or rerun the run \(bilevel-ray show says more\)$",
        err,
    ), err


def test_a_file_the_manifest_does_not_record_is_refused(run, never_certifies):
    manifest = read_manifest(run, "run")
    del manifest["outputs"]["result.pt"]
    write_manifest(run, manifest)
    with pytest.raises(br.ConfigError, match=r"result\.pt is not among the outputs it records"):
        certify_run(run)


def test_a_folder_from_before_manifests_is_read_with_a_note_and_its_steps_bounded(
    run, capsys, never_certifies
):
    (run / MANIFEST).unlink()
    _edit_run_json(run, lambda r: r.update(steps=10**12))
    with pytest.raises(br.ConfigError) as err:
        certify_run(run)
    assert re.search(
        r"^--at-end '.*r': its run\.json's steps=1000000000000: too large; must be an integer "
        r"in \[1, .*; give the folder of a run bilevel_ray finished$",
        str(err.value),
    ), str(err.value)
    assert re.search(
        r"^note: --at-end '.*r' has no manifest\.json \(it predates manifests\): its files could "
        r"not be checked against the record of the run that wrote them$",
        capsys.readouterr().err,
    )


def test_a_damaged_manifest_in_a_run_folder_is_refused_with_the_way_out(run):
    (run / MANIFEST).write_text("[" * 100 + "]" * 100)
    with pytest.raises(br.ConfigError, match=r"nested more than 64 levels deep.*; restore the "
                       r"folder from the run's own copy, or rerun the run$"):  # fmt: skip
        check_folder(run, "export 'r'", ("run.json",))


def test_a_folder_that_verifies_is_certified(run, capsys):
    assert main(["diagnose", "--at-end", str(run), "--check-steps", "10", "--replicas", "1"]) in (
        0,
        3,
    )
    assert "error" not in capsys.readouterr().err
