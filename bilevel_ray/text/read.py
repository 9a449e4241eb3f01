"""Read a user's data file into rows: a list of dicts, one per example.

Accepted:

* JSON Lines (``.jsonl``): one JSON object per line; blank lines are ignored;
* JSON (``.json``): JSON Lines, or one JSON array of objects;
* Parquet (``.parquet``);
* CSV (``.csv``): the first row is the header; every value is read as a string, so a cell that
  holds JSON (a list of messages, say) stays a string: keep conversations in JSON Lines, JSON,
  Parquet or a ``datasets`` folder;
* a folder written by Hugging Face ``datasets``' ``Dataset.save_to_disk``, read with pyarrow
  (``datasets`` need not be installed). A ``DatasetDict``'s folder is refused: give the folder of
  one split, e.g. ``FOLDER/train``.

Text files are read as UTF-8 (a leading byte-order mark is dropped). A file that is not what its
extension says, holds no rows, nests deeper than :data:`MAX_DEPTH` levels or is larger than
:data:`MAX_FILE_BYTES` is refused with a :class:`~bilevel_ray.errors.ConfigError` that names the
file, the line, and the fix. So is a path that is not a regular file once links are followed (a
FIFO would block the read forever, ``/dev/zero`` would read until memory runs out):
:func:`check_data_file` is that check, for whoever reads or hashes a data file first.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import io
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.ipc
import pyarrow.parquet as pq

from bilevel_ray.errors import ConfigError
from bilevel_ray.handed_files import check_regular_file

__all__ = ["MAX_DEPTH", "MAX_FILE_BYTES", "SUFFIXES", "check_data_file", "read_rows"]

MAX_FILE_BYTES = 8 * 2**30
"""Files (a ``datasets`` folder: its data files together) above this size are refused: a text
file is read whole into memory, and its rows as Python objects take several times its size, so
8 GiB is past what a machine that trains this library's models holds in rows."""

MAX_DEPTH = 64
"""JSON nested deeper than this is refused (messages with tool calls need fewer than 10)."""

SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
_ACCEPTED = ".jsonl, .json, .parquet, .csv, or a folder written by datasets' save_to_disk"

# The csv module's default cell limit (128 KiB) would refuse long documents; this one is the
# largest that every platform's C long holds.
_CSV_FIELD_LIMIT = 2**31 - 1

# First bytes of binary formats a text file is sometimes confused with.
_MAGIC = (
    (b"PAR1", "a Parquet file: rename it to .parquet"),
    (b"PK\x03\x04", "a zip archive (an Excel workbook is one): export it as CSV UTF-8"),
    (b"\x1f\x8b", "gzip-compressed: decompress it first"),
    (b"ARROW1", "an Arrow file: convert it to Parquet"),
    (b"\xff\xff\xff\xff", "an Arrow stream (a datasets .arrow file): give its folder instead"),
)


def read_rows(path: str | Path, what: str) -> list[dict[str, Any]]:
    """The rows of ``path``, a file or a ``save_to_disk`` folder; ``what`` names it in messages."""
    p = Path(path)
    where = _where(p, what)
    check_data_file(p, what)
    rows = _read_folder(p, where) if p.is_dir() else _read_file(p, where)
    if not rows:
        raise ConfigError(f"{where}: holds no rows; give a file or folder with at least one row")
    return rows


def check_data_file(path: str | Path, what: str) -> None:
    """Refuse ``path`` unless it is a folder or a regular file (links followed) of at most
    :data:`MAX_FILE_BYTES`: before anything opens it (reading, hashing it for the cache)."""
    p = Path(path)
    where = _where(p, what)
    if not p.exists():
        raise ConfigError(_missing(p, where))
    if p.is_dir():
        return
    fix = f"give a regular file ({', '.join(SUFFIXES)}) or a datasets folder"
    # The limit is checked here, with this module's message, rather than by the house check.
    _check_size(check_regular_file(p, where, fix, max_bytes=2**63), where)


def _where(p: Path, what: str) -> str:
    return what if str(p) in what else f"{what} ({p})"


def _missing(p: Path, where: str) -> str:
    """The message for a path that does not exist, with files of the same name nearby."""
    message = f"{where}: no such file or folder ({p.absolute()})"
    if not p.parent.is_dir():
        return f"{message}; its folder {p.parent} does not exist either: check the path"
    near = sorted(q.name for q in p.parent.iterdir() if q.stem == p.stem)[:5]
    if near:
        return f"{message}; its folder holds {', '.join(near)}: did you mean one of these?"
    return f"{message}; check the path (a relative path starts at the working directory)"


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def _check_size(size: int, where: str) -> None:
    # Read the module attribute at call time so that the limit can be changed (and tested).
    if size > MAX_FILE_BYTES:
        raise ConfigError(
            f"{where}: {_size(size)} is over the {_size(MAX_FILE_BYTES)} limit "
            "(bilevel_ray.text.read.MAX_FILE_BYTES); keep a subset of its rows in a smaller file"
        )


def _shown(text: str, limit: int = 80) -> str:
    """The first ``limit`` characters of ``text``, quoted, control characters escaped."""
    return repr(text[:limit]) + ("..." if len(text) > limit else "")


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")


# -- files ----------------------------------------------------------------------------------


def _read_file(p: Path, where: str) -> list[dict[str, Any]]:
    suffix = p.suffix.lower()
    if suffix not in SUFFIXES:
        if suffix == ".arrow":
            fix = "give the folder datasets' save_to_disk wrote (it holds state.json) instead"
        elif suffix in (".gz", ".zip", ".bz2", ".xz", ".zst"):
            fix = "decompress it first"
        else:
            fix = "convert the file to one of these, or rename it if it already is one"
        shown = suffix or "no extension"
        raise ConfigError(f"{where}: unknown file type ({shown}); accepted: {_ACCEPTED}; {fix}")
    size = p.stat().st_size
    if size == 0:
        raise ConfigError(f"{where}: the file is empty (0 bytes); give a file that holds rows")
    _check_size(size, where)
    if suffix == ".parquet":
        return _read_parquet(p, where, size)
    text = _read_text(p, where, suffix)
    if suffix == ".jsonl":
        return _read_jsonl(text, where)
    if suffix == ".json":
        return _read_json(text, where)
    return _read_csv(text, where)


def _read_text(p: Path, where: str, suffix: str) -> str:
    """The file decoded as UTF-8, after refusing binary content."""
    data = p.read_bytes()
    kind = suffix[1:].upper()
    for magic, what_it_is in _MAGIC:
        if data.startswith(magic):
            raise ConfigError(f"{where}: is not {kind} text but {what_it_is}")
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise ConfigError(f"{where}: is UTF-16 text; save it as UTF-8")
    nul = data.find(b"\x00")
    if nul >= 0:
        raise ConfigError(
            f"{where}: is binary, not {kind} text (a NUL byte at byte offset {nul}); "
            f"give the {kind} file itself, or give this file the extension of its real format"
        )
    bom = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data[bom:].decode("utf-8")
    except UnicodeDecodeError as e:
        offset = bom + e.start
        line = data.count(b"\n", 0, offset) + 1
        raise ConfigError(
            f"{where}: is not valid UTF-8: byte 0x{data[offset]:02x} at byte offset {offset} "
            f"(line {line}); save the file with the UTF-8 encoding"
        ) from None


_DEEP = f"nests deeper than {MAX_DEPTH} levels"


class _BadLine(Exception):
    """A JSON line that is not one object: its number and what is wrong with it."""

    def __init__(self, number: int, problem: str, fix: str = "write one JSON object per line"):
        super().__init__(problem)
        self.number = number
        self.problem = problem
        self.fix = fix


def _parse_lines(text: str) -> list[dict[str, Any]]:
    rows = []
    # Not splitlines(): it also splits at U+2028 and other characters JSON strings may hold.
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except RecursionError:
            raise _BadLine(number, _DEEP, "flatten the row") from None
        except json.JSONDecodeError as e:
            raise _BadLine(
                number, f"is not valid JSON ({e.msg}, column {e.colno}): {_shown(line)}"
            ) from None
        if not isinstance(value, dict):
            raise _BadLine(number, f"is a JSON {_json_type(value)}, not an object: {_shown(line)}")
        if _depth(value) > MAX_DEPTH:
            raise _BadLine(number, _DEEP, "flatten the row")
        rows.append(value)
    return rows


def _depth(value: Any) -> int:
    """How many objects and arrays deep ``value`` nests (without recursion: the depth is data)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            if depth <= MAX_DEPTH:
                children = item.values() if isinstance(item, dict) else item
                stack.extend((child, depth + 1) for child in children)
    return deepest


def _read_jsonl(text: str, where: str) -> list[dict[str, Any]]:
    try:
        return _parse_lines(text)
    except _BadLine as bad:
        hint = bad.fix
        if bad.problem != _DEEP and _whole_json(text) is not None:
            hint = "the file holds one JSON document, not JSON Lines: name it .json"
        raise ConfigError(f"{where}: line {bad.number} {bad.problem}; {hint}") from None


def _whole_json(text: str) -> Any:
    """``text`` parsed as one JSON document, or None."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def _read_json(text: str, where: str) -> list[dict[str, Any]]:
    if text.lstrip().startswith("["):
        return _read_json_array(text, where)
    try:
        return _parse_lines(text)
    except _BadLine as bad:
        if bad.problem == _DEEP:
            raise ConfigError(f"{where}: line {bad.number} {_DEEP}; {bad.fix}") from None
        whole = _whole_json(text)
        if isinstance(whole, dict):
            raise ConfigError(
                f"{where}: holds one JSON object, not rows; {_one_object_fix(whole)}"
            ) from None
        raise ConfigError(
            f"{where}: is neither JSON Lines nor one JSON array of objects (read as JSON Lines, "
            f"line {bad.number} {bad.problem}); write one object per line, or [{{...}}, {{...}}]"
        ) from None


def _one_object_fix(whole: dict[str, Any]) -> str:
    for key, value in whole.items():
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            return f"its key {key!r} holds a list of {len(value)} objects: save that list alone"
    return "write one object per line (JSON Lines), or an array of objects [{...}, {...}]"


def _read_json_array(text: str, where: str) -> list[dict[str, Any]]:
    try:
        value = json.loads(text)
    except RecursionError:
        raise ConfigError(f"{where}: {_DEEP}; flatten the rows") from None
    except json.JSONDecodeError as e:
        raise ConfigError(
            f"{where}: is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}; "
            "fix the file, or write it again with json.dump"
        ) from None
    if not isinstance(value, list):  # "[1] 2" and the like fail to parse; this is a safeguard
        raise ConfigError(
            f"{where}: is a JSON {_json_type(value)}, not an array of objects; give "
            "[{...}, {...}] with one object per row"
        )
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise ConfigError(
                f"{where}: item {i} of the JSON array is a {_json_type(item)}, not an object; "
                'give one object per row, e.g. [{"prompt": ..., "completion": ...}, ...]'
            )
        if _depth(item) > MAX_DEPTH:
            raise ConfigError(f"{where}: item {i} of the JSON array {_DEEP}; flatten it")
    return value


def _read_csv(text: str, where: str) -> list[dict[str, Any]]:
    limit = csv.field_size_limit()
    csv.field_size_limit(_CSV_FIELD_LIMIT)
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        return _csv_rows(reader, where)
    except csv.Error as e:
        raise ConfigError(
            f"{where}: line {reader.line_num} is not valid CSV ({e}); write the file again "
            "with a CSV writer (pandas' to_csv, Python's csv module)"
        ) from None
    finally:
        csv.field_size_limit(limit)


def _csv_rows(reader: Any, where: str) -> list[dict[str, Any]]:
    header = next((row for row in reader if row), None)
    if header is None:
        return []
    seen: dict[str, int] = {}
    for i, name in enumerate(header, 1):
        if not name.strip():
            raise ConfigError(
                f"{where}: column {i} of the header (line {reader.line_num}) has no name; the "
                "first row must name every column, e.g. prompt,chosen,rejected"
            )
        if name in seen:
            raise ConfigError(
                f"{where}: the header (line {reader.line_num}) names {name!r} twice (columns "
                f"{seen[name]} and {i}); give each column its own name"
            )
        seen[name] = i
    rows = []
    for row in reader:
        if not row:  # a blank line
            continue
        if len(row) != len(header):
            raise ConfigError(
                f"{where}: line {reader.line_num} has {len(row)} field{'s' * (len(row) != 1)} "
                f"but the header has "
                f'{len(header)}; quote cells that hold commas or line breaks ("a, b")'
            )
        rows.append(dict(zip(header, row)))
    return rows


def _read_parquet(p: Path, where: str, size: int) -> list[dict[str, Any]]:
    with p.open("rb") as f:
        head = f.read(64)
        f.seek(max(size - 4, 0))
        tail = f.read(4)
    if size < 8 or not head.startswith(b"PAR1") or tail != b"PAR1":
        stripped = head.lstrip()
        if stripped[:1] in (b"{", b"["):
            fix = "it looks like JSON: give it the extension .jsonl or .json"
        elif b"\x00" not in head:
            fix = "it looks like text: give it the extension of its format (.csv, .jsonl, .json)"
        else:
            fix = "write it again with pyarrow.parquet.write_table or pandas' to_parquet"
        raise ConfigError(
            f"{where}: is not a Parquet file (one starts and ends with the bytes PAR1); {fix}"
        )
    try:
        table = pq.read_table(p)
    except (pa.ArrowException, OSError) as e:
        raise ConfigError(
            f"{where}: is a damaged Parquet file ({e}); write it again with "
            "pyarrow.parquet.write_table or pandas' to_parquet"
        ) from None
    return table.to_pylist()


# -- datasets folders -------------------------------------------------------------------------


def _read_folder(p: Path, where: str) -> list[dict[str, Any]]:
    """The rows of a folder written by ``datasets.Dataset.save_to_disk``."""
    if (p / "dataset_dict.json").is_file():
        splits = _splits(p)
        example = "train" if "train" in splits or not splits else splits[0]
        names = ", ".join(repr(s) for s in splits) or "none found"
        raise ConfigError(
            f"{where}: is a DatasetDict folder (splits: {names}); give the folder of one "
            f"split, e.g. {p / example}"
        )
    state_path = p / "state.json"
    if not state_path.is_file():
        held = sorted(q.name for q in p.iterdir())
        shown = ", ".join(held[:8]) + (", ..." if len(held) > 8 else "") or "nothing"
        raise ConfigError(
            f"{where}: is a folder but not one written by datasets' save_to_disk (it has no "
            f"state.json; it holds {shown}); give a file ({', '.join(SUFFIXES)}) or such a folder"
        )
    paths = _data_files(p, state_path, where)
    _check_size(sum(q.stat().st_size for q in paths), where)
    rows: list[dict[str, Any]] = []
    for q in paths:
        try:
            with pa.OSFile(str(q), "rb") as f:
                table = pa.ipc.open_stream(f).read_all()
        except (pa.ArrowException, OSError) as e:
            raise ConfigError(
                f"{where}: {q.name} is not an Arrow stream that pyarrow can read ({e}); the "
                "folder is damaged: save the dataset again with save_to_disk"
            ) from None
        rows.extend(table.to_pylist())
    return rows


def _splits(p: Path) -> list[str]:
    with contextlib.suppress(ValueError, KeyError, TypeError):
        splits = json.loads((p / "dataset_dict.json").read_text(encoding="utf-8"))["splits"]
        if isinstance(splits, list) and all(isinstance(s, str) for s in splits):
            return splits
    # An unreadable dataset_dict.json: the sub-folders that hold a split are as good.
    return sorted(q.name for q in p.iterdir() if (q / "state.json").is_file())


def _data_files(p: Path, state_path: Path, where: str) -> list[Path]:
    """The data files ``state.json`` lists, in its order (the order of the rows)."""
    fix = "the folder is damaged: save the dataset again with save_to_disk"
    try:
        entries = json.loads(state_path.read_text(encoding="utf-8"))["_data_files"]
        names = [entry["filename"] for entry in entries]
    except (ValueError, KeyError, TypeError):
        raise ConfigError(
            f"{where}: state.json does not list the data files (a '_data_files' list of "
            f"{{'filename': ...}}); {fix}"
        ) from None
    paths = []
    for name in names:
        # A name with a folder in it could point outside the folder: save_to_disk writes none.
        if not isinstance(name, str) or Path(name).name != name or not (p / name).is_file():
            raise ConfigError(f"{where}: state.json lists the data file {name!r}, absent; {fix}")
        paths.append(p / name)
    if not paths:
        raise ConfigError(f"{where}: state.json lists no data files; {fix}")
    return paths
