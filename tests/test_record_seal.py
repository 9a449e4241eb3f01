"""A manifest's seal (this account's key's HMAC of the record): ``show`` says whether this
account wrote the record, ``rerun`` runs only a sealed one (or any with ``--trust-record``), and
every replayed run passes the checks a command line's settings pass; a manifest nested deeper
than any record is refused in one line."""

from __future__ import annotations

import hashlib
import json
import re

import pytest

from bilevel_ray.cli import main
from bilevel_ray.records.manifest import (
    MANIFEST,
    canonical,
    read_manifest,
    sealed,
    write_manifest,
)


@pytest.fixture
def solved(tmp_path, capsys):
    assert main(["solve", "quadratic", "--steps", "20", "--out", str(tmp_path / "a")]) == 0
    capsys.readouterr()
    return tmp_path / "a"


def _forge(folder, edit=lambda m: None, seal="drop"):
    """The manifest edited as someone without the key can: the plain digest recomputed, the
    seal dropped (or kept as it was: ``seal="keep"``)."""
    manifest = json.loads((folder / MANIFEST).read_text())
    edit(manifest)
    if seal == "drop":
        manifest.pop("seal", None)
    manifest["digest"] = hashlib.sha256(canonical(manifest)).hexdigest()
    (folder / MANIFEST).write_text(json.dumps(manifest))


def _one_error(capsys, argv):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


# --- show -----------------------------------------------------------------------------------


def test_a_record_this_account_wrote_is_sealed_and_shown_so(solved, capsys):
    manifest = read_manifest(solved, "run")
    assert len(manifest["seal"]) == 64 and sealed(manifest)
    assert main(["show", str(solved)]) == 0
    out = capsys.readouterr().out
    assert "verifies: the record is as written" in out and "  sealed by this account" in out


@pytest.mark.parametrize("seal", ["drop", "keep"])
def test_an_edit_with_the_digest_recomputed_verifies_but_is_not_sealed(solved, capsys, seal):
    _forge(solved, lambda m: m["settings"]["solver"].update(lr_x=0.5), seal)
    assert main(["show", str(solved)]) == 0  # a colleague's folder is shown, exit 0
    out = capsys.readouterr().out
    assert "verifies" in out
    assert "not sealed by this account: written elsewhere or edited" in out
    assert ("carries no seal" in out) == (seal == "drop")


def test_a_record_from_before_seals_is_read_and_not_sealed(solved, capsys):
    _forge(solved)  # no edit: a schema-1 manifest as written before seals
    assert "seal" not in json.loads((solved / MANIFEST).read_text())
    assert not sealed(read_manifest(solved, "run"))
    assert main(["show", str(solved)]) == 0
    assert "not sealed by this account" in capsys.readouterr().out


def test_a_record_another_account_sealed_is_not_sealed_by_this_one(solved, tmp_path, monkeypatch):
    monkeypatch.setenv("BILEVEL_RAY_STATE_KEY", str(tmp_path / "colleague.key"))
    write_manifest(solved, read_manifest(solved, "run"))  # sealed under the colleague's key
    assert sealed(read_manifest(solved, "run"))
    monkeypatch.undo()
    assert not sealed(read_manifest(solved, "run"))


def test_without_a_key_a_record_is_written_unsealed(solved, monkeypatch):
    import bilevel_ray.records.seal as seal

    monkeypatch.setattr(seal, "account_key", lambda: None)
    write_manifest(solved, read_manifest(solved, "run"))
    manifest = read_manifest(solved, "run")
    assert manifest["seal"] is None and not sealed(manifest)


# --- rerun ----------------------------------------------------------------------------------

EVIL = """
import pathlib
pathlib.Path(__file__).with_name("IMPORTED").write_text("ran")
import bilevel_ray as br

def factory(config):
    return br.problems.BUILTIN_PROBLEMS["quadratic"](config)
"""


def test_rerun_of_an_unsealed_record_is_refused_before_its_code_is_imported(solved, capsys):
    (solved.parent / "evil.py").write_text(EVIL)
    factory = f"{solved.parent / 'evil.py'}:factory"
    _forge(solved, lambda m: m["problem"].update(name=factory))
    err = _one_error(capsys, ["rerun", str(solved)])
    assert re.search(
        r"^error: rerun '.*a': its manifest is not sealed by this account \(written elsewhere, "
        r"or edited and its digest recomputed\), and a rerun runs what it names: the problem "
        r"'.*evil\.py:factory', as 'bilevel-ray solve quadratic --steps 20 --out .*'; nothing "
        r"was imported or run\. If you trust who wrote the folder, pass --trust-record$",
        err,
    ), err
    assert not (solved.parent / "IMPORTED").exists()
    assert not (solved.parent / "a-rerun").exists()
    # Trusted, it runs what the record names (the data is the same: it reproduces).
    assert main(["rerun", str(solved), "--trust-record", "--quiet"]) == 0
    assert (solved.parent / "IMPORTED").exists()


def test_a_recorded_name_is_shown_quoted_on_one_line(solved, capsys):
    _forge(solved, lambda m: m["problem"].update(name="x\nerror: forged line" + "y" * 500))
    err = _one_error(capsys, ["rerun", str(solved)])
    assert "'x\\nerror: forged line" in err and "yyy...'" in err


@pytest.fixture
def never_runs(monkeypatch):
    """Building the problem or running it fails the test (a refusal must come first)."""
    import bilevel_ray.cli.rerun as rerun

    def reached(*args, **kwargs):
        raise AssertionError("the rerun reached the problem before refusing its settings")

    monkeypatch.setattr(rerun, "_check_data", reached)
    monkeypatch.setattr(rerun, "_execute", reached)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (
            lambda m: m["replay"]["runs"][0].update(steps=10**12),
            r"steps=1000000000000: too large; must be an integer in \[1, ",
        ),
        (
            lambda m: m["replay"]["runs"][0]["solver"].update(lr_x=-1.0),
            r"lr_x=-1\.0",
        ),
        (
            lambda m: m["replay"]["runs"][0]["run"].update(seed=-3),
            r"seed=-3: must be an integer >= 0",
        ),
        (
            lambda m: m["replay"]["runs"][0].update(threads=10**6),
            r"threads=1000000: must be a whole number in \[1, \d+\]",
        ),
    ],
    ids=["steps-1e12", "negative-lr", "negative-seed", "threads"],
)
def test_a_trusted_replay_passes_the_command_lines_checks(solved, capsys, never_runs, edit, match):
    _forge(solved, edit)
    err = _one_error(capsys, ["rerun", str(solved), "--trust-record"])
    assert re.search(
        r"^error: rerun '.*a': its recorded run 'run' would be refused from a command line: .*"
        + match,
        err,
    ), err
    assert err.rstrip().endswith("the record was edited or written by another bilevel_ray")


def test_a_trusted_train_replay_checks_its_workers(tmp_path, capsys, never_runs):
    import bilevel_ray as br

    br.train("quadratic", steps=4, report_every=2, storage_path=tmp_path, name="t")
    _forge(tmp_path / "t", lambda m: m["settings"]["placement"].update(num_workers=10**9))
    err = _one_error(capsys, ["rerun", str(tmp_path / "t"), "--trust-record"])
    assert "would be refused from a command line: num_workers=1000000000: too large" in err


# --- a manifest that is not one ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("[" * 100_000 + "]" * 100_000, r"manifest\.json is nested too deeply to be a manifest"),
        ("[" * 500 + "]" * 500, r"manifest\.json is nested more than 64 levels deep"),
    ],
    ids=["past-the-stack", "deep"],
)
@pytest.mark.parametrize("command", ["show", "rerun"])
def test_a_deeply_nested_manifest_is_refused_in_one_line(tmp_path, capsys, text, match, command):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / MANIFEST).write_text(text)
    err = _one_error(capsys, [command, str(tmp_path / "r")])
    assert re.search(
        rf"^error: {command} '.*r': {match}.*; restore the folder's manifest\.json from a copy "
        r"of the folder$",
        err,
    ), err


def test_a_manifest_whose_fields_are_of_other_types_is_refused(solved, capsys):
    _forge(solved, lambda m: m.update(outcome=[1], continuations={}))
    err = _one_error(capsys, ["show", str(solved)])
    assert "manifest.json's ['outcome', 'continuations'] are not of a manifest's types" in err


# --- diagnose --at-end ------------------------------------------------------------------------


def _code_run(tmp_path, capsys):
    """A finished run of a problem that is code (a factory file)."""
    (tmp_path / "problem.py").write_text(
        "import bilevel_ray as br\n\n\ndef factory(config):\n"
        "    return br.problems.build_spec('toy-negative', {})\n"
    )
    run = tmp_path / "run"
    argv = ["solve", f"{tmp_path}/problem.py:factory", "--steps", "200", "--out", str(run)]
    assert main([*argv, "--quiet"]) == 0
    capsys.readouterr()
    return run


def test_at_end_imports_a_folders_code_only_when_this_account_sealed_it(tmp_path, capsys):
    run = _code_run(tmp_path, capsys)
    _forge(run)  # as a colleague's folder, or an edited one, reads
    err = _one_error(capsys, ["diagnose", "--at-end", str(run), "--quiet"])
    assert re.search(
        r"its run names the code '.*problem\.py:factory', and its manifest is not sealed by "
        r"this account .*: certifying it would import that code\. .*pass --trust-record",
        err,
    )
    (run / MANIFEST).unlink()
    err = _one_error(capsys, ["diagnose", "--at-end", str(run), "--quiet"])
    assert "and its manifest is missing" in err
    argv = ["diagnose", "--at-end", str(run), "--quiet", "--trust-record", "--check-steps", "20"]
    assert main(argv) in (0, 3)  # certified: a verdict, whichever it is


def test_trust_record_goes_with_at_end(capsys):
    err = _one_error(capsys, ["diagnose", "toy-negative", "--trust-record"])
    assert "--trust-record goes with --at-end RUN_DIR" in err
