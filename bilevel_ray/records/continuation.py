"""Honest continuation: a call that continues a result (a run resumed or extended under its
name, a sweep resumed, a schedule replayed) is compared with the result's manifest before any
work, and refused when it would change the trajectory: another problem config, other data,
another method, or a setting that steers the steps. The message names each difference, then
and now, and the way out. What only says how long or how loudly to run (the steps, the report
and checkpoint intervals, progress lines) may change and is recorded; so may the code, with a
warning (the record keeps both versions).

A manifest that does not verify (an edited setting, a changed output) is not continued: its
record would vouch for files it did not write.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bilevel_ray.errors import ConfigError
from bilevel_ray.records.manifest import MANIFEST, now, read_manifest, verify

__all__ = [
    "FREE",
    "check_continuation",
    "code_change",
    "data_difference",
    "differences",
    "flatten",
]

# Settings (flattened keys) that do not change a run's trajectory: how far it goes, how often
# it logs, reports and saves, where its workers run and how many restarts it may take.
FREE = frozenset(
    {
        "steps",
        "run.report_every",
        "run.checkpoint_every",
        "run.report_interval_s",
        "run.progress",
        "placement.max_failures",
        "placement.resources_per_worker",
    }
)


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one level of dotted keys (``solver.lr_x``); other values as they are."""
    if not isinstance(value, Mapping) or (prefix and not value):
        return {prefix: value}
    out: dict[str, Any] = {}
    for key, item in value.items():
        out.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _compared(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """What a continuation must keep, by the name a message gives it."""
    problem = manifest.get("problem") or {}
    out = {"problem": problem.get("name")}
    out.update({f"problem config {k}": v for k, v in (problem.get("config") or {}).items()})
    out["data"] = (manifest.get("data") or {}).get("sha256")
    out.update(flatten(manifest.get("settings") or {}))
    return out


def differences(
    old: Mapping[str, Any], new: Mapping[str, Any]
) -> tuple[list[str], dict[str, list[Any]]]:
    """(the refused differences, each ``key: old -> new``; the allowed ones, key -> [old,
    new]). A key only one side has counts as a difference (``(not given)``)."""
    before, after = _compared(old), _compared(new)
    refused, allowed = [], {}
    for key in sorted(set(before) | set(after), key=_order):
        then, now_ = before.get(key, _ABSENT), after.get(key, _ABSENT)
        if then == now_:
            continue
        if key in FREE:
            allowed[key] = [_value(then), _value(now_)]
        elif key == "data":
            refused.append(_data_line(old, new))
        else:
            refused.append(f"{key}: {_shown(then)} -> {_shown(now_)}")
    return refused, allowed


_ABSENT = object()


def _order(key: str) -> tuple[int, str]:
    """The problem, its config and the data first, then the settings by name."""
    if key == "problem":
        return (0, key)
    if key.startswith("problem config"):
        return (1, key)
    return (2 if key == "data" else 3, key)


def _value(value: Any) -> Any:
    return None if value is _ABSENT else value


def _shown(value: Any) -> str:
    return "(not given)" if value is _ABSENT else repr(value)


def _data_line(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    return f"data ({data_difference(old.get('data') or {}, new.get('data') or {})})"


def data_difference(then: Mapping[str, Any], now_: Mapping[str, Any]) -> str:
    """Which parts of two data fingerprints and which declared files differ, with the
    hashes."""
    tensors_then, tensors_now = then.get("tensors") or {}, now_.get("tensors") or {}
    parts = [
        part
        for part in sorted(set(tensors_then) | set(tensors_now))
        if tensors_then.get(part) != tensors_now.get(part)
    ]
    files_then = {f["path"]: f["sha256"] for f in then.get("files") or []}
    files_now = {f["path"]: f["sha256"] for f in now_.get("files") or []}
    changed = [
        p for p in sorted(set(files_then) | set(files_now)) if files_then.get(p) != files_now.get(p)
    ]
    what = ", ".join([*parts, *(f"file {p}" for p in changed)]) or "its fingerprint"
    return (
        f"{what} differ: sha256 {str(then.get('sha256'))[:12]}... -> "
        f"{str(now_.get('sha256'))[:12]}..."
    )


def code_change(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any] | None:
    """The code's identity then and now, when it changed (version, source or commit)."""
    then, now_ = old.get("code") or {}, new.get("code") or {}
    keys = ("bilevel_ray", "source_sha256", "git")
    if all(then.get(k) == now_.get(k) for k in keys):
        return None
    return {"then": {k: then.get(k) for k in keys}, "now": {k: now_.get(k) for k in keys}}


def _code_difference(code: Mapping[str, Any]) -> str:
    """What differs between the code then and now, each part shown as ``then -> now``: the
    version, the source's hash, the git commit and whether its tree was dirty."""
    names = {"bilevel_ray": "bilevel_ray", "source_sha256": "source", "git": "git"}
    parts = []
    for key, name in names.items():
        then, now_ = code["then"].get(key), code["now"].get(key)
        if then != now_:
            parts.append(f"{name} {_short(then)} -> {_short(now_)}")
    return "; ".join(parts)


def _short(value: Any) -> str:
    """A hash cut to 12 characters; a git record as its commit (and "dirty")."""
    if isinstance(value, Mapping):
        commit = str(value.get("commit"))[:12]
        return commit + (" (dirty)" if value.get("dirty") else "")
    return str(value)[:12] if isinstance(value, str) and len(value) > 16 else str(value)


def check_continuation(
    folder: Path,
    new: Mapping[str, Any],
    *,
    what: str,
    way_out: str,
    from_step: int | None = None,
) -> dict[str, Any]:
    """Refuse continuing the result in ``folder`` with the call ``new`` (a manifest of it)
    unless only free settings differ; returns the manifest continued: the old one with this
    call's settings and code, running, and this continuation in its history (a folder without
    a manifest, a result from before manifests, is continued unchecked, said on stderr: ``new``
    with a history entry saying so). ``what`` names the result (``run 'runs/q'``), ``way_out``
    is the advice of a refusal; ``from_step``: the step it continues from (default: the step
    its record ended at)."""
    old = read_manifest(folder, what)
    if old is None:
        print(
            f"note: {what} has no {MANIFEST}: it predates manifests, so this call could "
            "not be checked against the settings and data it was started with",
            file=sys.stderr,
        )
        unchecked = {
            "at": now(),
            "invocation": new.get("invocation"),
            "from_step": from_step,
            "note": "continued a result from before manifests: its earlier settings, data and "
            "code were not recorded, and this call was not checked against them",
        }
        return {**new, "continuations": [*(new.get("continuations") or []), unchecked]}
    problems = verify(folder, old)
    if problems:
        raise ConfigError(
            f"{what} does not match its manifest ({'; '.join(problems)}): its record cannot "
            "vouch for it, so it is not continued; start a new result under a new --name (or "
            "restore the files it recorded; bilevel-ray show shows the record)"
        )
    refused, allowed = differences(old, new)
    if refused:
        raise ConfigError(
            f"{what} was started with other settings or data, and continuing it would change "
            f"its trajectory: {'; '.join(refused)}. {way_out}"
        )
    code = code_change(old, new)
    if code is not None:
        print(
            f"warning: {what} was started with other code ({_code_difference(code)}): "
            "continuing it; the manifest records both",
            file=sys.stderr,
        )
    if from_step is None:
        from_step = (old.get("outcome") or {}).get("step")
    entry = {
        "at": now(),
        "invocation": new.get("invocation"),
        "from_step": from_step,
        "changed": allowed,
        "previous_outcome": old.get("outcome"),
        "code": code,
        "environment": new.get("environment"),
    }
    # The record describes the result as it stands: the settings and code of its latest call
    # (the history says what each call changed); its end and outputs come when this one ends.
    continued = dict(old)
    continued.update(
        settings=new.get("settings"),
        code=new.get("code"),
        environment=new.get("environment"),
        ended=None,
        outcome={"status": "running"},
        outputs={},
        replay=new.get("replay"),
        continuations=[*(old.get("continuations") or []), entry],
    )
    return continued
