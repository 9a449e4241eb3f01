"""``manifest.json``: the record beside every result of ``solve``, ``train``, ``tune``,
``compare`` and ``diagnose``: which code, data, settings and seed produced it, and what it
produced.

Fields (``SCHEMA_VERSION`` 1):

* ``schema``, ``schema_version``, ``kind`` (run, sweep, comparison, diagnosis, rerun),
  ``entry_point``;
* ``invocation``: the command line, or the Python call and its keywords' names;
* ``code``: bilevel_ray's version, the SHA-256 of its source, the git commit and dirtiness;
* ``environment``: Python, the libraries' versions, the device (CPU, threads, GPUs);
* ``problem``: its name and its config as given; ``data``: the fingerprint of what the factory
  built and read (:mod:`~bilevel_ray.records.fingerprint`);
* ``settings``: every setting in force after defaults; ``seeds``;
* ``started``, ``ended`` (UTC, ISO 8601), ``outcome`` (``status``: running, completed,
  stopped, diverged, failed; the step; a fallback's step and the flatness verdicts);
* ``outputs``: each output file's SHA-256 and size; ``continuations``: each later call that
  continued the result (a resume, an extension), what it changed;
* ``replay``: what ``bilevel-ray rerun`` executes to reproduce the result's parameters;
* ``digest``: the SHA-256 of everything above, so that an edit is seen;
* ``seal``: an HMAC-SHA256 of the same content under this account's key
  (:mod:`~bilevel_ray.records.seal`), so that a record this account wrote is told from one
  written elsewhere or edited (anyone can recompute a digest). Optional: a manifest without it
  (written before seals, or where no key could be made) reads as not sealed.

Written atomically (a temporary file, then a rename). Read back with bounds: its size, its
nesting depth (a hostile file of 100000 nested brackets would otherwise exhaust the stack),
and the type of each field.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from bilevel_ray.atomic_files import atomic_text
from bilevel_ray.errors import ConfigError
from bilevel_ray.records.environment import code_identity, environment
from bilevel_ray.records.files import LARGE_FILE_BYTES, file_record, sha256_file
from bilevel_ray.records.invocation import invocation
from bilevel_ray.records.seal import make_seal, sealed_by_this_account

__all__ = [
    "KINDS",
    "MANIFEST",
    "RESTORE_FIX",
    "SCHEMA",
    "SCHEMA_VERSION",
    "finish",
    "hash_outputs",
    "new_manifest",
    "now",
    "plain",
    "problem_name",
    "read_manifest",
    "record_digest",
    "sealed",
    "update_outputs",
    "verify",
    "write_manifest",
]

SCHEMA = "bilevel_ray.manifest"
SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
KINDS = {"solve": "run", "train": "run", "tune": "sweep", "compare": "comparison"}
KINDS.update(diagnose="diagnosis", rerun="rerun")
FIELDS = (
    "schema",
    "schema_version",
    "kind",
    "entry_point",
    "invocation",
    "code",
    "environment",
    "problem",
    "data",
    "settings",
    "seeds",
    "started",
    "ended",
    "outcome",
    "outputs",
    "continuations",
    "replay",
    "digest",
)  # and "seal", optional: manifests written before seals have none
# Each field's JSON type (None: null allowed), checked on reading: show and rerun use them as such.
TABLES = ("invocation", "code", "environment", "problem", "settings", "seeds", "outcome")
TABLES += ("outputs",)
MAX_MANIFEST_BYTES = 16 << 20
# A manifest nests a few levels (settings, a schedule, a file list); far below the stack's limit.
MAX_DEPTH = 64
DEFAULT_FIX = "restore it, or use a new --name for a new result"
# The way out for a command that reads a result and writes none into its folder (show, rerun).
RESTORE_FIX = "restore the folder's manifest.json from a copy of the folder"


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def problem_name(factory: Any) -> str:
    """The problem as a record names it: a built-in or module name as given, a file by its
    absolute path, a callable by its module and name."""
    if isinstance(factory, str):
        where, sep, attr = factory.rpartition(":")
        if sep and where.endswith(".py"):
            return f"{Path(where).resolve()}:{attr}"
        return factory
    return f"{getattr(factory, '__module__', '?')}:{getattr(factory, '__qualname__', factory)}"


def plain(value: Any) -> Any:
    """``value`` as JSON holds it, the same after a round trip: str keys, lists for tuples, a
    non-finite float as its name, anything else JSON cannot hold as its ``str``."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:  # numpy / torch scalars
        return plain(value.item())
    return str(value)


def new_manifest(
    entry_point: str,
    *,
    problem: Any,
    problem_config: Mapping[str, Any],
    data: Mapping[str, Any] | None,
    settings: Mapping[str, Any],
    seeds: Mapping[str, Any],
    keywords: Mapping[str, Any] | None = None,
    started: str | None = None,
) -> dict[str, Any]:
    """A manifest of a result starting now (outcome ``running``, no outputs yet)."""
    config = {k: v for k, v in problem_config.items() if k != "device"}
    return plain(
        {
            "schema": SCHEMA,
            "schema_version": SCHEMA_VERSION,
            "kind": KINDS[entry_point],
            "entry_point": entry_point,
            "invocation": invocation(f"bilevel_ray.{entry_point}", keywords),
            "code": code_identity(),
            "environment": environment(),
            "problem": {"name": problem_name(problem), "config": config},
            "data": data,
            "settings": settings,
            "seeds": seeds,
            "started": started or now(),
            "ended": None,
            "outcome": {"status": "running"},
            "outputs": {},
            "continuations": [],
            "replay": None,
        }
    )


def hash_outputs(folder: Path, names: Iterable[str]) -> dict[str, Any]:
    """Each of ``names`` (paths relative to ``folder``) that exists: its SHA-256 and bytes (a
    file over ``LARGE_FILE_BYTES``: of its name, size and modification time, as it says)."""
    out = {}
    for name in names:
        path = Path(folder) / name
        if not path.is_file():
            continue
        size = path.stat().st_size
        if size > LARGE_FILE_BYTES:
            out[name] = {**file_record(path, by_content=False), "path": name}
        else:
            out[name] = {"sha256": sha256_file(path), "bytes": size}
    return out


def finish(
    manifest: dict[str, Any], folder: Path, outcome: Mapping[str, Any], outputs: Iterable[str]
) -> dict[str, Any]:
    """``manifest`` ended now with ``outcome``, its ``outputs`` hashed, written to ``folder``."""
    manifest.update(ended=now(), outcome=plain(dict(outcome)))
    manifest["outputs"] = hash_outputs(folder, outputs)
    write_manifest(folder, manifest)
    return manifest


def update_outputs(folder: Path, names: Iterable[str]) -> dict[str, Any] | None:
    """Add (or hash again) ``names`` in the manifest of ``folder``, after its owner wrote them;
    None when the folder has no manifest."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text())
    manifest["outputs"] = {**manifest.get("outputs", {}), **hash_outputs(folder, names)}
    write_manifest(folder, manifest)
    return manifest


def canonical(manifest: Mapping[str, Any]) -> bytes:
    """The manifest's canonical JSON, ``digest`` and ``seal`` left out: what both cover (a
    manifest from before seals has the same digest as before)."""
    body = {k: v for k, v in manifest.items() if k not in ("digest", "seal")}
    text = json.dumps(plain(body), sort_keys=True, separators=(",", ":"), allow_nan=False)
    return text.encode()


def record_digest(manifest: Mapping[str, Any]) -> str:
    """SHA-256 of the manifest's canonical JSON."""
    return hashlib.sha256(canonical(manifest)).hexdigest()


def sealed(manifest: Mapping[str, Any]) -> bool:
    """Whether this account wrote the manifest as it is: its seal is this account's key's."""
    return sealed_by_this_account(canonical(manifest), manifest.get("seal"))


def write_manifest(folder: Path, manifest: dict[str, Any]) -> Path:
    """``folder/manifest.json``, with its digest and this account's seal, written atomically."""
    content = canonical(manifest)
    manifest["digest"] = hashlib.sha256(content).hexdigest()
    manifest["seal"] = make_seal(content)
    text = json.dumps(plain(manifest), indent=1, allow_nan=False) + "\n"
    return atomic_text(Path(folder) / MANIFEST, text)


def read_manifest(
    folder: str | os.PathLike[str], what: str, fix: str = DEFAULT_FIX
) -> dict[str, Any] | None:
    """The manifest of ``folder`` (None when there is none), checked to be one: a file of a
    manifest's size, readable JSON nested at most ``MAX_DEPTH`` deep, our schema, a version
    this code reads, every field present and of its type. ``what`` starts the messages (e.g.
    ``run 'runs/q'``); ``fix`` ends them (the way out for the command that reads it)."""
    path = Path(folder) / MANIFEST
    if not path.exists():
        return None
    if not path.is_file() or path.stat().st_size > MAX_MANIFEST_BYTES:
        raise ConfigError(f"{what}: {MANIFEST} is not a file of a manifest's size; {fix}")
    try:
        manifest = json.loads(path.read_text())
    except RecursionError:
        raise ConfigError(
            f"{what}: {MANIFEST} is nested too deeply to be a manifest; {fix}"
        ) from None
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise ConfigError(f"{what}: {MANIFEST} is not valid JSON ({err}); {fix}") from None
    if _depth(manifest) > MAX_DEPTH:
        raise ConfigError(
            f"{what}: {MANIFEST} is nested more than {MAX_DEPTH} levels deep, which no "
            f"manifest is; {fix}"
        )
    if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA:
        raise ConfigError(f"{what}: {MANIFEST} is not a bilevel_ray manifest; {fix}")
    version = manifest.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool) or version > SCHEMA_VERSION:
        raise ConfigError(
            f"{what}: {MANIFEST} has schema_version {version!r}; this bilevel_ray reads up to "
            f"{SCHEMA_VERSION}: upgrade bilevel_ray to read it"
        )
    missing = [f for f in FIELDS if f not in manifest]
    if missing:
        raise ConfigError(f"{what}: {MANIFEST} lacks {missing}; {fix}")
    wrong = [f for f in TABLES if not isinstance(manifest[f], dict)]
    wrong += [f for f in ("data", "replay") if not isinstance(manifest[f], (dict, type(None)))]
    wrong += [] if isinstance(manifest["continuations"], list) else ["continuations"]
    if wrong:
        raise ConfigError(f"{what}: {MANIFEST}'s {wrong} are not of a manifest's types; {fix}")
    return manifest


def _depth(value: Any) -> int:
    """How deep JSON ``value`` nests (a scalar: 0), counted without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if not isinstance(item, (dict, list)):
            continue
        deepest = max(deepest, depth)
        if depth <= MAX_DEPTH:  # past the bound the answer is known
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return deepest


def verify(folder: str | os.PathLike[str], manifest: Mapping[str, Any]) -> list[str]:
    """What no longer agrees with the manifest: its own digest (an edited setting) and each
    recorded output (changed or gone). An empty list: it verifies."""
    problems = []
    if manifest.get("digest") != record_digest(manifest):
        problems.append(
            f"{MANIFEST} was edited after it was written (its content does not match its digest)"
        )
    outputs = manifest.get("outputs") or {}
    if not isinstance(outputs, Mapping):
        return [*problems, f"{MANIFEST}'s outputs are not a table of files"]
    for name, recorded in sorted(outputs.items()):
        path = Path(folder) / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            problems.append(f"output {name!r} is not a path inside the folder")
            continue
        if not path.is_file():
            problems.append(f"output {name} is gone")
            continue
        now_hash = hash_outputs(folder, [name]).get(name, {}).get("sha256")
        then = recorded.get("sha256") if isinstance(recorded, Mapping) else None
        if now_hash != then:
            problems.append(
                f"output {name} changed since it was written (sha256 {str(then)[:12]}... then, "
                f"{str(now_hash)[:12]}... now)"
            )
    return problems
