"""Where each step's data comes from: a stream of ``BilevelBatch(upper, lower)`` pairs.

PBGD-Free draws an upper-level batch xi_t and a lower-level batch zeta_t at every step and uses
xi_t in both its y and x updates (digest §1.5). ``solve(data=...)`` accepts:

* ``None``: deterministic problems; every step gets ``BilevelBatch(None, None)``;
* :func:`full_batch`: the same in-memory batches at every step;
* :func:`minibatches`: random minibatches of in-memory tensors, without replacement within an
  epoch, drawn from a generator seeded by the run's ``seed`` (reproducible, resumable);
* a pair ``(upper_iterable, lower_iterable)`` of re-iterable batch sources (e.g. two
  ``DataLoader``\\ s), each restarted when exhausted.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from bilevel_ray.errors import ConfigError

__all__ = ["BilevelBatch", "FullBatch", "Minibatches", "as_batches", "full_batch", "minibatches"]


class BilevelBatch(NamedTuple):
    upper: Any
    lower: Any


def _tensors(name: str, value: Any) -> list[Tensor]:
    """The tensors of one level's data: a tensor, or a tuple / list / dict of tensors."""
    if isinstance(value, Tensor):
        items = [value]
    elif isinstance(value, (tuple, list)):
        items = list(value)
    elif isinstance(value, Mapping):
        items = list(value.values())
    else:
        items = [value]
    problems = []
    for i, t in enumerate(items):
        if not isinstance(t, Tensor):
            problems.append(
                f"{name}: item {i} is a {type(t).__name__}; level data must be a tensor or a "
                "tuple/list/dict of tensors"
            )
        elif t.dim() == 0:
            problems.append(
                f"{name}: item {i} is a 0-d tensor; data needs a leading sample dimension"
            )
        elif t.shape[0] == 0:
            problems.append(f"{name}: item {i} is empty (0 samples); give at least one sample")
        elif t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            problems.append(
                f"{name}: item {i} holds {bad} NaN/Inf values; clean or impute them before solving"
            )
    if not problems and len({t.shape[0] for t in items}) > 1:
        problems.append(
            f"{name}: tensors have different numbers of samples {[t.shape[0] for t in items]}; "
            "every tensor of a level must have the same leading dimension"
        )
    if problems:
        raise ConfigError(problems)
    return items


def _take(value: Any, index: Tensor) -> Any:
    if isinstance(value, Tensor):
        return value[index]
    if isinstance(value, Mapping):
        return {k: v[index] for k, v in value.items()}
    items = [v[index] for v in value]
    return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)


def _sample_count(value: Any) -> int:
    first = (
        value
        if isinstance(value, Tensor)
        else next(iter(value.values() if isinstance(value, Mapping) else value))
    )
    return first.shape[0]


@dataclass(frozen=True)
class FullBatch:
    upper: Any
    lower: Any

    def stream(
        self, seed: int, start_step: int = 0, rank: int = 0, world: int = 1
    ) -> Iterator[BilevelBatch]:
        """The same batches at every step; with ``world`` ranks, rank r holds the r-th of
        ``world`` equal slices (equal, so that the mean of the ranks' means is the full mean)."""
        parts = []
        for name, value in (("upper", self.upper), ("lower", self.lower)):
            n = _sample_count(value)
            if n % world:
                raise ConfigError(
                    f"full-batch {name} data of {n} samples cannot be split evenly over {world} "
                    f"workers; use a multiple of {world} samples or br.minibatches"
                )
            size = n // world
            parts.append(
                _take(value, torch.arange(rank * size, (rank + 1) * size)) if world > 1 else value
            )
        return itertools.repeat(BilevelBatch(*parts))


def full_batch(upper: Any, lower: Any) -> FullBatch:
    """Use all of ``upper`` and all of ``lower`` at every step (checked for shape and NaN/Inf)."""
    _tensors("upper", upper)
    _tensors("lower", lower)
    return FullBatch(upper, lower)


@dataclass(frozen=True)
class Minibatches:
    upper: Any
    lower: Any
    upper_batch_size: int
    lower_batch_size: int
    sizes: tuple[int, int]

    def stream(
        self, seed: int, start_step: int = 0, rank: int = 0, world: int = 1
    ) -> Iterator[BilevelBatch]:
        """Batches from step ``start_step`` on; a resumed run gets exactly the batches it missed.

        With ``world`` data-parallel ranks every rank draws the same global batch of
        ``world * batch_size`` samples and keeps its own slice, so W workers with batch B see
        exactly the samples one worker with batch W * B sees.
        """
        generator = torch.Generator().manual_seed(int(seed))
        bu, bl = self.upper_batch_size, self.lower_batch_size
        for name, size, n in (("upper", bu, self.sizes[0]), ("lower", bl, self.sizes[1])):
            if size * world > n:
                raise ConfigError(
                    f"{world} workers x batch {size} = {size * world} exceeds the {n} {name}-level "
                    "samples; use a smaller batch_size or fewer workers"
                )
        up = _index_stream(self.sizes[0], bu * world, generator)
        low = _index_stream(self.sizes[1], bl * world, generator)
        for _ in range(start_step):
            next(up), next(low)
        while True:
            iu, il = next(up), next(low)
            yield BilevelBatch(
                _take(self.upper, iu[rank * bu : (rank + 1) * bu]),
                _take(self.lower, il[rank * bl : (rank + 1) * bl]),
            )


def _index_stream(n: int, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
    # Without replacement within an epoch; the tail shorter than a batch is dropped so every step
    # sees the same batch size (a data-parallel all-reduce mean then weights samples equally).
    while True:
        perm = torch.randperm(n, generator=generator)
        for start in range(0, n - batch_size + 1, batch_size):
            yield perm[start : start + batch_size]


def minibatches(upper: Any, lower: Any, batch_size: int | tuple[int, int]) -> Minibatches:
    """Random minibatches of in-memory data; ``batch_size`` is one size or (upper, lower)."""
    n_up, n_low = _tensors("upper", upper)[0].shape[0], _tensors("lower", lower)[0].shape[0]
    sizes = batch_size if isinstance(batch_size, (tuple, list)) else (batch_size, batch_size)
    if len(sizes) != 2:
        raise ConfigError(f"batch_size={batch_size!r}: give one size or a pair (upper, lower)")
    for level, size, n in (("upper", sizes[0], n_up), ("lower", sizes[1], n_low)):
        if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= n:
            raise ConfigError(
                f"batch_size for {level}={size!r}: must be an integer in [1, {n}] "
                f"(the {level}-level data has {n} samples)"
            )
    return Minibatches(upper, lower, sizes[0], sizes[1], (n_up, n_low))


def _cycle(source: Iterable[Any], name: str) -> Iterator[Any]:
    while True:
        empty = True
        for item in source:
            empty = False
            yield item
        if empty:
            raise ConfigError(f"data {name} yielded no batch; it must yield at least one")


def _holds_tensors(value: Any) -> bool:
    """A tensor, or a tuple / list / dict whose first item is one (level data, not a source)."""
    if isinstance(value, Tensor):
        return True
    if isinstance(value, Mapping):
        value = list(value.values())
    return isinstance(value, (tuple, list)) and bool(value) and isinstance(value[0], Tensor)


def as_batches(
    data: Any, seed: int, start_step: int = 0, rank: int = 0, world: int = 1
) -> Iterator[BilevelBatch]:
    """Normalise ``solve(data=...)`` into an endless iterator of :class:`BilevelBatch`: this
    rank's share when there are ``world`` data-parallel ranks."""
    if data is None:
        return itertools.repeat(BilevelBatch(None, None))
    if isinstance(data, (FullBatch, Minibatches)):
        return data.stream(seed, start_step, rank, world)
    if isinstance(data, (tuple, list)) and len(data) == 2 and world > 1:
        raise ConfigError(
            "data given as a pair of batch sources cannot be sharded across workers (each would "
            "read the same batches); use br.minibatches, br.table_minibatches or Ray Data"
        )
    if isinstance(data, (tuple, list)) and len(data) == 2:
        upper, lower = data
        if _holds_tensors(upper) or _holds_tensors(lower):
            raise ConfigError(
                "data=(upper, lower) of in-memory tensors is ambiguous (a pair of batch sources "
                "is expected there; a list of batches must hold tuples or dicts): for tensors pass "
                "br.full_batch(upper=..., lower=...) or br.minibatches(upper=..., lower=..., "
                "batch_size=...)"
            )
        for name, source in (("upper", upper), ("lower", lower)):
            if not isinstance(source, Iterable):
                raise ConfigError(
                    f"data {name} source is a {type(source).__name__}: must be re-iterable "
                    "(e.g. a DataLoader or a list of batches)"
                )
            if iter(source) is source:
                raise ConfigError(
                    f"data {name} source is a one-shot iterator: it cannot restart for a second "
                    "epoch; pass a list or a DataLoader instead"
                )
        stream = (
            BilevelBatch(u, v) for u, v in zip(_cycle(upper, "upper"), _cycle(lower, "lower"))
        )
        for _ in range(start_step):  # now, not lazily: the caller then restores its RNG
            next(stream)
        return stream
    raise ConfigError(
        f"data is a {type(data).__name__}: pass None, br.full_batch(...), br.minibatches(...) or "
        "a pair (upper_batches, lower_batches) of re-iterable batch sources"
    )
