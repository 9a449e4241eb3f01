"""A manifest on one screen (``bilevel-ray show DIR``): what produced the result (command, code,
environment, problem, data, settings, seeds), when, how it ended, its outputs and its
continuations, whether the record still verifies, and whether this account sealed it."""

from __future__ import annotations

import datetime
import textwrap
from collections.abc import Mapping
from typing import Any

from bilevel_ray.records.continuation import flatten

__all__ = ["format_manifest"]

WIDTH = 100
LABEL = 12


def format_manifest(
    folder: str, manifest: Mapping[str, Any], problems: list[str], sealed: bool
) -> str:
    """The lines ``show`` prints; ``problems``: what does not verify (empty: it verifies);
    ``sealed``: whether this account's key sealed the record."""
    outcome = manifest.get("outcome") or {}
    lines = [
        f"{folder}: {manifest.get('kind')} ({manifest.get('entry_point')}), "
        f"{_outcome_line(outcome)}"
    ]

    def field(label: str, text: str) -> None:
        wrapped = textwrap.wrap(text, WIDTH - LABEL - 2) or [""]
        lines.append(f"  {label:<{LABEL}}{wrapped[0]}")
        lines.extend(f"  {'':<{LABEL}}{more}" for more in wrapped[1:])

    invocation = manifest.get("invocation") or {}
    field("asked by", invocation.get("command") or f"{invocation.get('api')}(...)")
    problem = manifest.get("problem") or {}
    config = ", ".join(f"{k}={v}" for k, v in (problem.get("config") or {}).items())
    field("problem", f"{problem.get('name')}" + (f" ({config})" if config else ""))
    field("data", _data_line(manifest.get("data")))
    settings = {k: v for k, v in flatten(manifest.get("settings") or {}).items() if v is not None}
    field("settings", "; ".join(f"{k}={_short(v)}" for k, v in settings.items()))
    seeds = {k: v for k, v in (manifest.get("seeds") or {}).items() if v is not None}
    field("seeds", ", ".join(f"{k}={v}" for k, v in seeds.items()) or "none")
    field("code", _code_line(manifest.get("code") or {}))
    field("environment", _environment_line(manifest.get("environment") or {}))
    field("time", _time_line(manifest.get("started"), manifest.get("ended")))
    details = {k: v for k, v in outcome.items() if k not in ("status", "step")}
    if details:
        field("outcome", "; ".join(f"{k}: {_short(v)}" for k, v in details.items()))
    outputs = manifest.get("outputs") or {}
    field(
        "outputs",
        ", ".join(f"{name} ({_size(o.get('bytes'))})" for name, o in outputs.items()) or "none",
    )
    for entry in manifest.get("continuations") or []:
        if entry.get("note"):
            field("continued", f"{entry.get('at')}: {entry['note']}")
            continue
        changed = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in (entry.get("changed") or {}).items())
        code = "; other code" if entry.get("code") else ""
        field("continued", f"{entry.get('at')} from step {entry.get('from_step')}: "
              f"{changed or 'nothing changed'}{code}")  # fmt: skip
    if problems:
        lines.append("  DOES NOT VERIFY:")
        lines.extend(f"    - {problem}" for problem in problems)
    else:
        lines.append("  verifies: the record is as written and every output has its hash")
    if sealed:
        lines.append("  sealed by this account")
    else:
        why = "" if manifest.get("seal") else " (it carries no seal, as records from before seals)"
        lines.append(
            f"  not sealed by this account: written elsewhere or edited{why}; bilevel-ray "
            "rerun runs it only with --trust-record"
        )
    return "\n".join(lines)


def _outcome_line(outcome: Mapping[str, Any]) -> str:
    status = outcome.get("status", "unknown")
    if status == "running":
        return "running, or interrupted (no end recorded)"
    step = outcome.get("step")
    return f"{status}" + (f" at step {step}" if step is not None else "")


def _data_line(data: Mapping[str, Any] | None) -> str:
    if not data:
        return "not fingerprinted"
    parts = [k for k, v in (data.get("tensors") or {}).items() if v is not None]
    files = data.get("files") or []
    text = f"sha256 {str(data.get('sha256'))[:16]} of {', '.join(parts) or 'no tensors'}"
    if files:
        text += f" and {len(files)} file(s): " + ", ".join(
            f"{f['path']} ({_size(f.get('bytes'))}, by {f.get('by')})" for f in files
        )
    if data.get("unhashed"):
        text += "; not hashed: " + ", ".join(data["unhashed"])
    return text


def _code_line(code: Mapping[str, Any]) -> str:
    git = code.get("git")
    where = "not a git checkout"
    if git:
        where = f"git {str(git.get('commit'))[:10]}" + (" (dirty)" if git.get("dirty") else "")
    return (
        f"bilevel_ray {code.get('bilevel_ray')}, {where}, source "
        f"{str(code.get('source_sha256'))[:12]}"
    )


def _environment_line(env: Mapping[str, Any]) -> str:
    packages = ", ".join(f"{k} {v}" for k, v in (env.get("packages") or {}).items() if v)
    device = env.get("device") or {}
    gpu = f"{device.get('gpu_count')} x {device.get('gpu')}" if device.get("gpu") else "no GPU"
    return (
        f"Python {env.get('python')}, {packages}; {device.get('cpu')} "
        f"({device.get('cpu_count')} CPUs, {device.get('torch_threads')} torch threads), {gpu}"
    )


def _time_line(started: Any, ended: Any) -> str:
    if not ended:
        return f"started {started}, no end recorded"
    try:
        took = datetime.datetime.fromisoformat(ended) - datetime.datetime.fromisoformat(started)
        return f"{started} to {ended} ({took.total_seconds():.0f} s)"
    except (TypeError, ValueError):
        return f"{started} to {ended}"


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _size(size: Any) -> str:
    if not isinstance(size, int):
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return "?"
