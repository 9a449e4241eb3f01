"""Tensors computed once and kept on disk under a fingerprint of what they were computed from.

A cached set is ``<cache_dir>/<key>.parquet``: one table row per sample, one column per tensor
(a [n, ...] tensor as a fixed-size list per row; integers as int32 when they fit, floats as
float64, half-precision floats as float32), each tensor's dtype, shape and SHA-256 in the
schema's metadata, so what is read back is exactly what was written or is not used at all.
Files are replaced atomically (a temporary file, then a rename), so a crash or two processes
writing the same key never leave a half-written file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from bilevel_ray.errors import ConfigError

if TYPE_CHECKING:
    from torch import Tensor

__all__ = [
    "cached_tensors",
    "default_cache_dir",
    "file_fingerprint",
    "fingerprint",
    "tokenizer_fingerprint",
]

FORMAT = "bilevel_ray.tensors/1"
METADATA_KEY = b"bilevel_ray"
READ_CHUNK = 1 << 20
KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def fingerprint(*parts: Any) -> str:
    """The first 16 hex digits of the SHA-256 of ``parts`` as canonical JSON (dict keys sorted,
    tuples as lists, paths as strings)."""
    text = json.dumps(_canonical(list(parts)), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _canonical(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted((_canonical(v) for v in value), key=lambda v: json.dumps(v, sort_keys=True))
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, bytes):
        return value.hex()
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise TypeError(f"fingerprint: a {type(value).__name__} has no canonical form; pass JSON data")


def file_fingerprint(path: str | os.PathLike[str]) -> str:
    """SHA-256 (hex) of a file's bytes; of a folder, of every file under it (its path relative
    to the folder and its bytes), in sorted order."""
    path = Path(path)
    if not path.is_dir():
        return _file_digest(path).hex()
    total = hashlib.sha256()
    entries = []
    for folder, dirs, files in os.walk(path):
        for name in files:
            entries.append(Path(folder, name))
        # A link to a folder is not walked into (it could loop); its target is hashed instead.
        entries.extend(Path(folder, d) for d in dirs if Path(folder, d).is_symlink())
    for entry in sorted(entries, key=lambda p: p.relative_to(path).as_posix()):
        total.update(entry.relative_to(path).as_posix().encode() + b"\0")
        if entry.is_dir():
            total.update(b"link\0" + os.readlink(entry).encode() + b"\0")
        else:
            total.update(b"file\0" + _file_digest(entry))
    return total.hexdigest()


def _file_digest(path: Path) -> bytes:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(READ_CHUNK):
            digest.update(block)
    return digest.digest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """SHA-256 (hex) of what decides a tokenizer's ids: its class, vocabulary, special and
    added tokens, chat template, padding and truncation sides, BOS/EOS flags and (for a fast
    tokenizer) its whole serialized pipeline, normalizer and post-processor included."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    parts = {
        "class": type(tokenizer).__name__,
        "vocab": sorted(tokenizer.get_vocab().items()),
        "special": dict(getattr(tokenizer, "special_tokens_map", {}) or {}),
        "added": sorted(
            (int(i), str(t), bool(getattr(t, "special", False))) for i, t in added.items()
        ),
        "chat_template": _canonical_template(getattr(tokenizer, "chat_template", None)),
        "padding_side": getattr(tokenizer, "padding_side", None),
        "truncation_side": getattr(tokenizer, "truncation_side", None),
        "add_bos_token": _flag(tokenizer, "add_bos_token"),
        "add_eos_token": _flag(tokenizer, "add_eos_token"),
    }
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        parts["backend"] = backend.to_str()
    text = json.dumps(_canonical(parts), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _canonical_template(template: Any) -> Any:
    return template if template is None or isinstance(template, str) else _canonical(template)


def _flag(tokenizer: Any, name: str) -> Any:
    value = getattr(tokenizer, name, None)
    return value if isinstance(value, bool) else None


def default_cache_dir() -> Path:
    """``$BILEVEL_RAY_CACHE``, else ``$XDG_CACHE_HOME/bilevel_ray``, else
    ``~/.cache/bilevel_ray``."""
    if os.environ.get("BILEVEL_RAY_CACHE"):
        return Path(os.environ["BILEVEL_RAY_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    # The XDG spec says a relative XDG_CACHE_HOME is invalid and to be ignored.
    if xdg and Path(xdg).is_absolute():
        return Path(xdg) / "bilevel_ray"
    return Path.home() / ".cache" / "bilevel_ray"


def cached_tensors(
    cache_dir: str | os.PathLike[str],
    key: str,
    build: Callable[[], dict[str, Tensor]],
    what: str,
) -> tuple[dict[str, Tensor], bool]:
    """(the tensors stored under ``key`` in ``cache_dir``, True) when that file reads back
    whole; else (``build()``, False) after storing them there. Every tensor is [n, ...] with the
    same n. A file that cannot be read back exactly is rebuilt, never trusted. ``what`` names
    the tensors in error messages."""
    if not isinstance(key, str) or not KEY.fullmatch(key):
        raise ValueError(f"cache key {key!r}: must be 1 to 128 letters, digits, '.', '_', '-'")
    folder = Path(cache_dir).expanduser()
    path = folder / f"{key}.parquet"
    tensors = _read(path)
    if tensors is not None:
        return tensors, True
    # The temporary file is made before building, so an unwritable folder is refused before
    # the work; its name is unique (pid and a random part), so writers never share one.
    tmp = _temporary(folder, path, what)
    try:
        tensors = build()
        table = _table(tensors, what)
        try:
            pq.write_table(table, tmp)
            os.replace(tmp, path)
        except OSError as e:
            raise _unwritable(folder, what, e) from e
    finally:
        tmp.unlink(missing_ok=True)
    return tensors, False


def _temporary(folder: Path, path: Path, what: str) -> Path:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(
            dir=folder, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp"
        )
        os.close(fd)
    except OSError as e:
        raise _unwritable(folder, what, e) from e
    return Path(name)


def _unwritable(folder: Path, what: str, error: OSError) -> ConfigError:
    return ConfigError(
        f"cache_dir={str(folder)!r}: cannot store {what} there ({type(error).__name__}: "
        f"{error.strerror or error}); set cache_dir= or BILEVEL_RAY_CACHE to a writable folder"
    )


def _table(tensors: dict[str, Tensor], what: str) -> pa.Table:
    """One row per sample, one column per tensor, dtypes, shapes and digests in the metadata."""
    if not tensors:
        raise ValueError(f"{what}: no tensors to store")
    rows = {t.shape[0] if t.dim() else None for t in tensors.values()}
    if len(rows) != 1 or None in rows:
        shapes = {name: tuple(t.shape) for name, t in tensors.items()}
        raise ValueError(f"{what}: tensors must all be [n, ...] with one n, got {shapes}")
    columns, described = {}, {}
    for name, tensor in tensors.items():
        tensor = tensor.detach().cpu().contiguous()
        columns[name] = _column(tensor)
        described[name] = {
            "dtype": str(tensor.dtype).removeprefix("torch."),
            "shape": list(tensor.shape),
            "sha256": _digest(tensor),
        }
    metadata = {METADATA_KEY: json.dumps({"format": FORMAT, "tensors": described}).encode()}
    return pa.table(columns).replace_schema_metadata(metadata)


def _column(tensor: Tensor) -> pa.Array:
    flat = tensor.reshape(-1)
    if tensor.dtype == torch.bool:
        values = pa.array(flat.numpy(), type=pa.bool_())
    elif tensor.dtype in (torch.float16, torch.bfloat16):
        # float32 holds every half-precision value exactly, NaN payloads included (through
        # float64, torch would turn a bfloat16 NaN into its canonical NaN).
        values = pa.array(flat.float().numpy(), type=pa.float32())
    elif tensor.is_floating_point():
        values = pa.array(flat.double().numpy(), type=pa.float64())
    elif tensor.dtype in (torch.int8, torch.int16, torch.int32, torch.uint8):
        values = pa.array(flat.numpy().astype(np.int32))
    elif tensor.dtype == torch.int64:
        # Token ids fit int32 and take half the room; wider values keep int64.
        narrow = flat.numel() == 0 or (int(flat.min()) >= -(2**31) and int(flat.max()) < 2**31)
        values = pa.array(flat.numpy().astype(np.int32 if narrow else np.int64))
    else:
        raise ValueError(f"cannot store a {tensor.dtype} tensor: bool, integers or floats only")
    if tensor.dim() == 1:
        return values
    return pa.FixedSizeListArray.from_arrays(values, int(np.prod(tensor.shape[1:])))


def _digest(tensor: Tensor) -> str:
    """SHA-256 of the tensor's bytes in its own dtype (so a bit that differs is caught)."""
    data = tensor.contiguous().reshape(-1).view(torch.uint8) if tensor.numel() else torch.empty(0)
    return hashlib.sha256(data.numpy()).hexdigest()


def _read(path: Path) -> dict[str, Tensor] | None:
    """The tensors stored at ``path``, or None when it is missing or not exactly what
    :func:`_table` wrote (unreadable, cut short, foreign, or its data changed)."""
    if not path.is_file():
        return None
    try:
        table = pq.read_table(path)
        meta = json.loads((table.schema.metadata or {})[METADATA_KEY])
        if meta.get("format") != FORMAT or set(meta["tensors"]) != set(table.column_names):
            return None
        tensors = {}
        for name, described in meta["tensors"].items():
            tensor = _tensor(table.column(name).combine_chunks(), described)
            if tensor is None or _digest(tensor) != described["sha256"]:
                return None
            tensors[name] = tensor
        return tensors
    except Exception:
        # Whatever is wrong with the file, it is rebuilt rather than trusted.
        return None


def _tensor(column: pa.Array, described: dict[str, Any]) -> Tensor | None:
    dtype = getattr(torch, described["dtype"])
    shape = [int(s) for s in described["shape"]]
    if not isinstance(dtype, torch.dtype) or len(column) != shape[0] or column.null_count:
        return None
    if len(shape) > 1:
        width = int(np.prod(shape[1:]))
        if not pa.types.is_fixed_size_list(column.type) or column.type.list_size != width:
            return None
        column = column.flatten()
        if column.null_count:
            return None
    values = column.to_numpy(zero_copy_only=False)
    if values.size != int(np.prod(shape)):
        return None
    # A copy: the array may be Arrow's read-only memory.
    return torch.from_numpy(np.array(values)).to(dtype).reshape(shape)
