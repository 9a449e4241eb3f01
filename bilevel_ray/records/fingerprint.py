"""A fingerprint of the data a run was built from: the tensors of a factory's ``ProblemSpec``
(the start point x0 and y0, the data of ``br.full_batch`` / ``br.minibatches``, the held-out
``eval_data``) hashed by dtype, shape and bytes, and the files the factory declared
(:func:`bilevel_ray.declare_inputs`) hashed by content, read in chunks. A file over
``LARGE_FILE_BYTES`` is described by name, size and modification time instead (and the record
says so); so is a file the factory declared with ``by_content=False`` (a model folder).

Two builds of one problem from the same data have one fingerprint; any changed byte changes
it. Data the library cannot see into (a pair of ``DataLoader`` s) is named, not hashed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import torch

from bilevel_ray.data import FullBatch, Minibatches
from bilevel_ray.inputs import DeclaredInput, collect_inputs
from bilevel_ray.problem import ProblemSpec
from bilevel_ray.records.files import file_record

__all__ = ["fingerprint_spec", "fingerprinted_spec", "tensor_digest"]


def fingerprinted_spec(factory: Any, config: dict[str, Any]) -> tuple[ProblemSpec, dict[str, Any]]:
    """The factory's ``ProblemSpec`` (``bilevel_ray.problems.build_spec``) and its fingerprint,
    the files the factory declared while it ran included."""
    from bilevel_ray.problems import build_spec

    with collect_inputs() as declared:
        spec = build_spec(factory, config)
    return spec, fingerprint_spec(spec, declared)


def fingerprint_spec(spec: ProblemSpec, declared: list[DeclaredInput] = ()) -> dict[str, Any]:
    """``{"sha256": the whole, "tensors": {part: sha256 or None}, "files": [...], "unhashed":
    [...]}``: one hash per part of the spec and per declared file, and one of them all."""
    unhashed: list[str] = []
    tensors = {
        "x0": _digest_of(spec.x0, "x0", unhashed),
        "y0": _digest_of(spec.y0, "y0", unhashed),
        "data": _digest_of(_data_parts(spec.data), "data", unhashed),
        "eval_data": _digest_of(spec.eval_data, "eval_data", unhashed),
    }
    seen: set[tuple[str, bool]] = set()
    files = []
    for item in declared:
        key = (str(item.path.resolve()), item.by_content)
        if key not in seen:
            seen.add(key)
            files.append(file_record(item.path, item.by_content))
    whole = hashlib.sha256()
    for part, digest in tensors.items():
        whole.update(f"{part}={digest}\0".encode())
    # The files by content alone: the same data read from another folder is the same data
    # (a changed path shows in the problem's config).
    for record in files:
        whole.update(f"file={record['sha256']}\0".encode())
    return {"sha256": whole.hexdigest(), "tensors": tensors, "files": files, "unhashed": unhashed}


def _data_parts(data: Any) -> Any:
    """The tensors of a run's data with what decides its batches (the batch sizes)."""
    if isinstance(data, FullBatch):
        return {"kind": "full_batch", "upper": data.upper, "lower": data.lower}
    if isinstance(data, Minibatches):
        return {
            "kind": "minibatches",
            "upper": data.upper,
            "lower": data.lower,
            "batch": [data.upper_batch_size, data.lower_batch_size],
        }
    return data


def _digest_of(value: Any, name: str, unhashed: list[str]) -> str | None:
    """SHA-256 of a nest of tensors, numbers and strings; None for None. A part it cannot see
    into is listed in ``unhashed`` by its type."""
    if value is None:
        return None
    digest = hashlib.sha256()
    _feed(digest, value, name, unhashed)
    return digest.hexdigest()


def _feed(digest: Any, value: Any, where: str, unhashed: list[str]) -> None:
    if isinstance(value, torch.Tensor):
        digest.update(b"T" + tensor_digest(value).encode())
    elif isinstance(value, Mapping):
        digest.update(b"{")
        for key in sorted(value, key=str):
            digest.update(str(key).encode() + b":")
            _feed(digest, value[key], f"{where}.{key}", unhashed)
        digest.update(b"}")
    elif isinstance(value, (list, tuple)):
        digest.update(b"[")
        for i, item in enumerate(value):
            _feed(digest, item, f"{where}[{i}]", unhashed)
        digest.update(b"]")
    elif value is None or isinstance(value, (bool, int, float, str)):
        digest.update(repr(value).encode())
    else:
        # A DataLoader, a generator: its batches are not known before the run draws them.
        unhashed.append(f"{where}: a {type(value).__name__}")
        digest.update(b"?" + type(value).__qualname__.encode())


def tensor_digest(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes (on the CPU, contiguous)."""
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    digest = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    if t.numel():
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
