"""Arrow tables and Parquet files as level data (pyarrow, imported on use).

A table becomes a dict of tensors, one per numeric column (``columns`` selects and orders them);
the level's loss then receives a batch ``{"column": Tensor[batch, ...]}``. Fixed-size list columns
(e.g. a feature vector per row) become 2-d tensors.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from bilevel_ray.data import Minibatches, minibatches
from bilevel_ray.errors import ConfigError

__all__ = ["read_table", "table_minibatches", "table_to_tensors"]


def read_table(source: Any, columns: Sequence[str] | None = None) -> Any:
    """A ``pyarrow.Table`` from a table or a Parquet file / folder path."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if isinstance(source, pa.Table):
        table = source
    elif isinstance(source, (str, os.PathLike)):
        if not Path(source).exists():
            raise ConfigError(f"Parquet source {str(source)!r} does not exist")
        try:
            table = pq.read_table(source)
        except (OSError, pa.ArrowException) as err:
            raise ConfigError(f"cannot read Parquet {str(source)!r}: {err}") from None
    else:
        raise ConfigError(
            f"table data is a {type(source).__name__}: pass a pyarrow.Table or a Parquet path"
        )
    if columns is not None:
        missing = sorted(set(columns) - set(table.column_names))
        if missing:
            raise ConfigError(
                f"columns {missing} are not in the table; it has: {', '.join(table.column_names)}"
            )
        table = table.select(list(columns))
    return table


def table_to_tensors(table: Any, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """One tensor per column; floating columns are cast to ``dtype`` when given."""
    import pyarrow as pa

    out = {}
    for name in table.column_names:
        column = table.column(name).combine_chunks()
        if column.null_count:
            raise ConfigError(
                f"column {name!r} has {column.null_count} missing values; fill or drop them first"
            )
        if pa.types.is_fixed_size_list(column.type):
            inner = column.type.value_type
            if not (pa.types.is_integer(inner) or pa.types.is_floating(inner)):
                raise ConfigError(
                    f"column {name!r} is a list of {inner}: only lists of numbers can become "
                    "tensors; flatten it or select other columns with columns=[...]"
                )
            values = column.flatten()
            if values.null_count:
                raise ConfigError(
                    f"column {name!r} has {values.null_count} missing values inside its lists; "
                    "fill or drop them first"
                )
            array = values.to_numpy(zero_copy_only=False).reshape(
                len(column), column.type.list_size
            )
        elif (
            pa.types.is_integer(column.type)
            or pa.types.is_floating(column.type)
            or (pa.types.is_boolean(column.type))
        ):
            array = column.to_numpy(zero_copy_only=False)
        else:
            raise ConfigError(
                f"column {name!r} has type {column.type}: only numeric, boolean and fixed-size "
                "list columns can become tensors; select other columns with columns=[...]"
            )
        if array.dtype.kind == "u":  # torch has few kernels for uint32/64: widen to int64
            array = array.astype("int64")
        tensor = torch.from_numpy(array.copy())
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        out[name] = tensor
    return out


def table_minibatches(
    upper: Any,
    lower: Any,
    batch_size: int | tuple[int, int],
    *,
    columns: Sequence[str] | None = None,
    dtype: torch.dtype | None = None,
) -> Minibatches:
    """Minibatches of two Arrow tables / Parquet sources (sharded across workers like
    :func:`~bilevel_ray.data.minibatches`)."""
    return minibatches(
        table_to_tensors(read_table(upper, columns), dtype),
        table_to_tensors(read_table(lower, columns), dtype),
        batch_size,
    )
