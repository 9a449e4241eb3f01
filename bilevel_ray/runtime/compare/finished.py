"""A finished run's checkpoint: ``runs/<method>-seed<k>.json`` in the comparison's folder.

Each (method, seed) run that completes or diverges writes it itself as it ends (the trial,
after its curve and its parameters and before it reports to Tune), so that a comparison killed
after some runs keeps them, whatever happens to the driver: ``resume=True`` reads them and runs
only the others (:mod:`bilevel_ray.runtime.compare.resume`). A run whose code raised writes
none, and a resume runs it again (as ``tune --resume`` reruns errored trials).

It holds the run's final report (what the trial reports to Tune), its curve rows, and the
SHA-256 of its parameters file (``params/<method>-seed<k>.pt``); it names the comparison it
belongs to by a key of the problem, its data and every setting (:func:`comparison_key`), so
that a file from another comparison is not taken for one of this one's. Written atomically (a
temporary file, then a rename): a killed run leaves no half file. JSON as Python writes it: a
NaN (the final phi of a run that did not complete) is ``NaN``. It carries this account's seal
(an HMAC under :mod:`bilevel_ray.account_key`): a file whose numbers someone edited, who could
recompute every plain hash, is not trusted, and the run runs again.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bilevel_ray.account_key import account_key, keyed_digest, read_key
from bilevel_ray.atomic_files import atomic_text
from bilevel_ray.records.files import sha256_file
from bilevel_ray.records.manifest import now, plain

__all__ = [
    "FORMAT",
    "RUNS",
    "RUN_COLUMNS",
    "comparison_key",
    "read_finished",
    "run_name",
    "run_row",
    "write_finished",
]

RUNS = "runs"  # a comparison's folder of finished runs' checkpoints
FORMAT = "bilevel_ray.compare_run/1"
MAX_BYTES = 8 << 20  # a run's report and at most ~40 curve rows: far less
STATUSES = ("completed", "diverged")  # a run that raised has none: it runs again

# What a run reports that goes into its row of the table (beside a problem's eval/ numbers).
RUN_COLUMNS = (
    "status",
    "reason",
    "steps",
    "wall_s",
    "run_wall_s",
    "scoring_s",
    "final_phi",
    "final_upper_loss",
    "lower_gap",
    "state_bytes",
    "peak_rss_mb",
    "rss_growth_mb",
)


SEAL_CONTEXT = b"bilevel_ray.compare-run/1"
_UNSEALED = "not sealed by this account: written elsewhere, or its numbers edited"


def run_name(method: str, seed: int) -> str:
    return f"{method}-seed{seed}"


def run_row(method: str, seed: int, metrics: Mapping[str, Any]) -> dict[str, Any]:
    """A run's row of the table from what it reported: its columns and the problem's own
    held-out numbers at its end (``eval/...``, a language model's)."""
    row = {"method": method, "seed": seed}
    row.update({k: v for k, v in metrics.items() if k in RUN_COLUMNS})
    row.update({k: v for k, v in metrics.items() if str(k).startswith("eval/")})
    return row


def comparison_key(manifest: Mapping[str, Any]) -> str:
    """The comparison a checkpoint belongs to: a digest of its manifest's problem, data and
    settings (what a resume must keep; a resume checks them before it reads a checkpoint)."""
    body = {
        "problem": manifest.get("problem"),
        "data": (manifest.get("data") or {}).get("sha256"),
        "settings": manifest.get("settings"),
    }
    text = json.dumps(plain(body), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def write_finished(
    folder: str | Path,
    key: str,
    method: str,
    seed: int,
    report: Mapping[str, Any],
    curve: list[dict[str, Any]],
    params: str | None,
) -> Path:
    """The run's checkpoint (module docstring); ``params``: its parameters file, relative to
    ``folder`` (None: it left none)."""
    folder = Path(folder)
    kept = None
    if params is not None and (folder / params).is_file():
        kept = {"path": params, "sha256": sha256_file(folder / params)}
    record = {
        "format": FORMAT,
        "comparison": key,
        "method": method,
        "seed": seed,
        "written": now(),
        "report": dict(report),
        "curve": curve,
        "params": kept,
    }
    record = json.loads(json.dumps(record, default=str))  # as it will read back
    record["seal"] = _seal(record)
    path = folder / RUNS / f"{run_name(method, seed)}.json"
    return atomic_text(path, json.dumps(record, indent=1) + "\n")


def _seal(record: Mapping[str, Any]) -> str | None:
    """This account's HMAC of the record (all but the seal): a run's numbers edited by someone
    without the key no longer match it (None without a key: the run is then run again on a
    resume)."""
    key = account_key()
    if key is None:
        return None
    content = json.dumps({k: v for k, v in record.items() if k != "seal"}, sort_keys=True)
    return keyed_digest(key, SEAL_CONTEXT, content.encode())


def _sealed(record: Mapping[str, Any]) -> bool:
    key, seal = read_key(), record.get("seal")
    if key is None or not isinstance(seal, str):
        return False
    content = json.dumps({k: v for k, v in record.items() if k != "seal"}, sort_keys=True)
    return hmac.compare_digest(seal, keyed_digest(key, SEAL_CONTEXT, content.encode()))


def read_finished(
    folder: Path, key: str, method: str, seed: int
) -> tuple[dict[str, Any] | None, str | None]:
    """(the checkpoint of ``method`` seed ``seed`` in ``folder``, None) when it is there and
    sound; (None, why not) when it is there and is not trusted; (None, None) when there is
    none."""
    path = folder / RUNS / f"{run_name(method, seed)}.json"
    if not path.exists() and not path.is_symlink():
        return None, None
    if path.is_symlink() or not path.is_file() or path.stat().st_size > MAX_BYTES:
        return None, "not a file of a run's size"
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError) as err:
        return None, f"not readable JSON ({type(err).__name__}: it may be cut short)"
    why = _problem(folder, record, key, method, seed)
    return (None, why) if why else (record, None)


def _problem(folder: Path, record: Any, key: str, method: str, seed: int) -> str | None:
    """Why ``record`` is not a sound checkpoint of this comparison's run, or None."""
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        return f"not a run checkpoint ({FORMAT})"
    if record.get("comparison") != key:
        return "written by another comparison (its problem, data or settings differ)"
    if record.get("method") != method or record.get("seed") != seed:
        return f"holds {record.get('method')} seed {record.get('seed')}, not {method} seed {seed}"
    report, curve = record.get("report"), record.get("curve")
    if not isinstance(report, dict) or report.get("status") not in STATUSES:
        return "its report has no status"
    if not isinstance(report.get("reason"), (str, type(None))):
        return "its report's reason is not text"
    if not isinstance(curve, list) or not all(_point(r, method, seed) for r in curve):
        return "its curve rows are not this run's (method, seed, step, wall_s, eval/phi)"
    if report["status"] != "completed":
        return (
            None if _sealed(record) else "not sealed by this account: written elsewhere, or edited"
        )
    steps, phi = report.get("steps"), report.get("final_phi")
    if not isinstance(steps, int) or not isinstance(phi, (int, float)) or not curve:
        return "a completed run without its steps, final phi or curve"
    params = record.get("params")
    if not isinstance(params, dict) or not isinstance(params.get("path"), str):
        return "a completed run without its parameters file"
    where = Path(params["path"])
    if where.is_absolute() or ".." in where.parts or not (folder / where).is_file():
        return f"its parameters file {params['path']} is gone"
    if sha256_file(folder / where) != params.get("sha256"):
        return f"its parameters file {params['path']} changed since the run wrote it"
    if not _sealed(record):
        return _UNSEALED
    return None


def _point(row: Any, method: str, seed: int) -> bool:
    """Whether ``row`` is a curve point of this run."""
    return (
        isinstance(row, dict)
        and row.get("method") == method
        and row.get("seed") == seed
        and isinstance(row.get("step"), int)
        and all(isinstance(row.get(k), (int, float)) for k in ("wall_s", "eval/phi"))
    )
