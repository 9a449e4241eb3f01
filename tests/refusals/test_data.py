"""Refusals of data, batches and tensors: the ``data`` argument, ``br.full_batch``,
``br.minibatches``, ``br.table_minibatches`` (Arrow tables, Parquet files), data sharded across
workers, Ray Data ``datasets``, the representation problem's CSV, and x0 / y0.

Empty or 0-d tensors, NaN / Inf values, levels whose tensors disagree on the number of samples,
batch sizes larger than the data, columns that cannot become tensors, data that cannot restart
or be sharded, and x0 / y0 that are not dicts of floating tensors, or that share memory, are
refused with a message that names the level, the item or the tensor and the fix. Each has a
positive control.
"""

from __future__ import annotations

import math
import os
from collections import namedtuple

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import bilevel_ray as br
from bilevel_ray.data import BilevelBatch, as_batches
from bilevel_ray.problems.peft_dpo_sft import peft_dpo_sft
from bilevel_ray.problems.toys import NegativeToy
from bilevel_ray.tables import read_table, table_to_tensors
from bilevel_ray.text.read import read_rows

from .catalogue import api, cli, fifo_at, params, run_case
from .support import (
    DATASETS,
    F64,
    LINEAR_X0,
    LINEAR_Y0,
    LinearFit,
    assert_refused_before_start,
    assert_train_refused,
    rows,
    solve,
    solve_args,
    t64,
    train_args,
)

X4 = torch.zeros(4, 1, dtype=F64)
X3 = torch.zeros(3, 1, dtype=F64)
_IN_TARGETS = (X4, X4[:, 0])


# --- br.solve: the data argument (data.py as_batches / _cycle) ---------------------------------


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (
            (torch.zeros(3), torch.zeros(3)),
            r"^data=\(upper, lower\) of in-memory tensors is ambiguous \(a pair of batch sources "
            r"is expected there; a list of batches must hold tuples or dicts\): for tensors pass "
            r"br\.full_batch\(upper=\.\.\., lower=\.\.\.\) "
            r"or br\.minibatches\(upper=\.\.\., lower=\.\.\., batch_size=\.\.\.\)$",
        ),
        # level data as (inputs, targets), a dict of columns, or only one side of the pair
        ((_IN_TARGETS, _IN_TARGETS), r"^data=\(upper, lower\) of in-memory tensors is ambiguous"),
        (({"a": torch.zeros(3)}, [None]), r"^data=\(upper, lower\) of in-memory tensors is "),
        (([None], [torch.zeros(3)]), r"^data=\(upper, lower\) of in-memory tensors is "),
        (([None], 5), r"data lower source is a int: must be re-iterable"),
        ((iter([None]), [None]), r"data upper source is a one-shot iterator: it cannot restart"),
        (([], [None]), r"data upper yielded no batch; it must yield at least one"),
        (([None], []), r"data lower yielded no batch; it must yield at least one"),
        ("batches", r"data is a str: pass None, br\.full_batch\(\.\.\.\), br\.minibatches"),
        ([[None], [None], [None]], r"data is a list: pass None, br\.full_batch"),
    ],
)
def test_solve_refuses_bad_data(data, match):
    assert_refused_before_start(match, data=data)


def test_solve_accepts_a_pair_of_batch_lists():
    """The counterpart of the ambiguity above: lists of batches (tuples, dicts) are sources."""
    batch = torch.zeros(2, dtype=F64)
    result = br.solve(**solve_args(data=([(batch, batch)], [{"a": batch}, {"a": batch}])))
    assert result.state.step == 3


# --- data shared across data-parallel workers (data.py, as br.train's workers call it) ----------


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (
            lambda: as_batches(br.full_batch(X3, X4), 0, world=2),
            r"^full-batch upper data of 3 samples cannot be split evenly over 2 workers; use a "
            r"multiple of 2 samples or br\.minibatches$",
        ),
        (
            lambda: as_batches(br.full_batch(X4, X3), 0, rank=1, world=2),
            r"^full-batch lower data of 3 samples cannot be split evenly over 2 workers",
        ),
        (
            lambda: next(as_batches(br.minibatches(X4, X3, 2), 0, world=2)),
            r"^2 workers x batch 2 = 4 exceeds the 3 lower-level samples; use a smaller "
            r"batch_size or fewer workers$",
        ),
        (
            lambda: next(as_batches(br.minibatches(X4, X4, (3, 1)), 0, world=2)),
            r"^2 workers x batch 3 = 6 exceeds the 4 upper-level samples",
        ),
        (
            lambda: as_batches(([None], [None]), 0, world=2),
            r"^data given as a pair of batch sources cannot be sharded across workers \(each "
            r"would read the same batches\); use br\.minibatches, br\.table_minibatches or Ray "
            r"Data$",
        ),
    ],
)
def test_sharded_data_refuses(make, match):
    with pytest.raises(br.ConfigError, match=match):
        make()


def test_sharded_data_accepts_even_splits():
    """The counterpart of the refusals above: each rank gets its own equal share."""
    data = torch.arange(4, dtype=F64).unsqueeze(1)
    full = [next(as_batches(br.full_batch(data, data), 0, rank=r, world=2)) for r in (0, 1)]
    assert [b.upper[:, 0].tolist() for b in full] == [[0.0, 1.0], [2.0, 3.0]]
    mini = [next(as_batches(br.minibatches(data, data, 2), 0, rank=r, world=2)) for r in (0, 1)]
    assert sorted(v for b in mini for v in b.upper[:, 0].tolist()) == [0.0, 1.0, 2.0, 3.0]
    assert next(as_batches(([None], [None]), 0, world=1)) == BilevelBatch(None, None)


# --- br.solve: x0 / y0 (problem.py check_params) ----------------------------------------------

_W = torch.zeros(2, dtype=F64)
_BUF = torch.zeros(3, dtype=F64)


@pytest.mark.parametrize(
    ("x0", "y0", "match"),
    [
        ("x", {"y": t64(0.0)}, r"^x0 is a str: must be a dict of tensors such as \{'w': "),
        ([2.0], {"y": t64(0.0)}, r"^x0 is a list: must be a dict of tensors"),
        ({"x": t64(2.0)}, {}, r"^y0 is empty: each level needs at least one tensor"),
        ({"x": t64(1.0)}, {}, r"^y0 is empty: each level needs at least one tensor to optimize$"),
        ({1: t64(1.0)}, {"y": t64(0.0)}, r"^x0 key 1: names must be strings$"),
        (
            {"x": 1.5},
            {"y": t64(0.0)},
            r"^x0\['x'\] is a float: must be a torch\.Tensor \(wrap it: torch\.tensor\(1\.5\)\)$",
        ),
        (
            {"x": t64(1.0)},
            {"y": torch.tensor([1])},
            r"^y0\['y'\] has dtype torch\.int64: must be floating point",
        ),
        (
            {"w": t64(1.0)},
            {"w": t64(2.0)},
            r"^x0 and y0 share the names \['w'\]: each tensor belongs to exactly one level",
        ),
        (
            {"x": _W},
            {"y": _W},
            r"^x0\['x'\] and y0\['y'\] share a memory range \(the same tensor, tied weights or "
            r"interleaved views\): "
            r"each level needs its own; pass a \.clone\(\) or untie the weights$",
        ),
        # overlapping views of one buffer share memory too
        (
            {"x": _BUF[:2]},
            {"y": _BUF[1:]},
            r"^x0\['x'\] and y0\['y'\] share a memory range \(the same tensor",
        ),
        ({"x": _W}, {"y": _W.view(1, 2)}, r"^x0\['x'\] and y0\['y'\] share a memory range"),
        (
            [1.0],
            {},
            r"^2 problems:\n  - x0 is a list: must be a dict.*\n  - y0 is empty",
        ),
    ],
)
def test_solve_refuses_bad_x0_y0(x0, y0, match):
    assert_refused_before_start(match, x0=x0, y0=y0)


def test_solve_accepts_disjoint_views_of_one_buffer():
    """The counterpart of the shared-memory refusal: views that do not overlap are separate
    tensors; x0 / y0 are copied, so the buffer is left as it was."""
    buffer = t64(2.0, 0.0)
    result = br.solve(**solve_args(x0={"x": buffer[:1]}, y0={"y": buffer[1:]}))
    assert result.state.step == 3
    assert buffer.tolist() == [2.0, 0.0]


def test_interleaved_views_are_refused_conservatively():
    """Views whose memory ranges interleave are refused (conservatively: they may not share an
    element), with the fix in the message."""
    buffer = t64(2.0, 0.0, 2.0, 0.0)
    with pytest.raises(br.ConfigError, match=r"share a memory range .*interleaved views.*clone"):
        br.solve(**solve_args(x0={"x": buffer[::2]}, y0={"y": buffer[1::2]}))


# --- br.full_batch / br.minibatches (data.py) --------------------------------------------------


@pytest.mark.parametrize(
    ("upper", "lower", "match"),
    [
        (
            torch.tensor(1.0),
            X4,
            r"^upper: item 0 is a 0-d tensor; data needs a leading sample dimension$",
        ),
        (
            X4,
            "text",
            r"^lower: item 0 is a str; level data must be a tensor or a tuple/list/dict of "
            r"tensors$",
        ),
        (
            (X4, torch.zeros(0)),
            X4,
            r"^upper: item 1 is empty \(0 samples\); give at least one sample$",
        ),
        (
            X4,
            {"a": t64(1.0, math.nan, math.inf)},
            r"^lower: item 0 holds 2 NaN/Inf values; clean or impute them before solving$",
        ),
        (
            [X4, X3],
            X4,
            r"^upper: tensors have different numbers of samples \[4, 3\]; every tensor of a "
            r"level must have the same leading dimension$",
        ),
        (
            ("a", torch.tensor(1.0)),
            X4,
            r"^2 problems:\n  - upper: item 0 is a str.*\n  - upper: item 1 is a 0-d tensor",
        ),
    ],
)
def test_full_batch_refuses(upper, lower, match):
    with pytest.raises(br.ConfigError, match=match):
        br.full_batch(upper, lower)


@pytest.mark.parametrize(
    ("upper", "lower", "batch_size", "match"),
    [
        (X4, X4, (1, 2, 3), r"^batch_size=\(1, 2, 3\): give one size or a pair \(upper, lower\)$"),
        (X4, X4, [2], r"^batch_size=\[2\]: give one size or a pair"),
        (
            X4,
            X3,
            0,
            r"^batch_size for upper=0: must be an integer in \[1, 4\] \(the upper-level data has "
            r"4 samples\)$",
        ),
        (
            X4,
            X3,
            (2, 5),
            r"^batch_size for lower=5: must be an integer in \[1, 3\] \(the lower-level data has "
            r"3 samples\)$",
        ),
        (X4, X4, True, r"^batch_size for upper=True: must be an integer in \[1, 4\]"),
        (X4, X4, 2.0, r"^batch_size for upper=2\.0: must be an integer in \[1, 4\]"),
        (torch.tensor(1.0), X4, 1, r"^upper: item 0 is a 0-d tensor"),
    ],
)
def test_minibatches_refuses(upper, lower, batch_size, match):
    with pytest.raises(br.ConfigError, match=match):
        br.minibatches(upper, lower, batch_size)


Pair = namedtuple("Pair", "inputs targets")


def test_minibatches_keep_namedtuples():
    """_take rebuilds a namedtuple field by field (it used to raise a raw TypeError)."""
    batches = br.minibatches(Pair(X4, X4[:, 0]), X4, 2)
    batch = next(batches.stream(seed=0))
    assert isinstance(batch.upper, Pair) and batch.upper.inputs.shape == (2, 1)
    assert batch.upper.targets.shape == (2,)


# --- br.table_minibatches: Arrow tables and Parquet files (tables.py) ---------------------------


def _table(**columns):
    return pa.table(columns or {"a": [1.0, 2.0, 3.0], "b": [0, 1, 1]})


@pytest.mark.parametrize(
    ("source", "columns", "match"),
    [
        ("{tmp}/missing.parquet", None, r"^Parquet source '.*missing\.parquet' does not exist$"),
        (
            "{tmp}/junk.parquet",
            None,
            r"^cannot read Parquet '.*junk\.parquet': .*Parquet",
        ),
        ({"a": [1.0]}, None, r"^table data is a dict: pass a pyarrow\.Table or a Parquet path$"),
        (torch.zeros(3), None, r"^table data is a Tensor: pass a pyarrow\.Table or a Parquet"),
        (
            _table(),
            ["a", "z", "c"],
            r"^columns \['c', 'z'\] are not in the table; it has: a, b$",
        ),
        (
            _table(a=[1.0, None, 3.0]),
            None,
            r"^column 'a' has 1 missing values; fill or drop them first$",
        ),
        (
            _table(a=[1.0, 2.0], name=["u", "v"]),
            None,
            r"^column 'name' has type string: only numeric, boolean and fixed-size list columns "
            r"can become tensors; select other columns with columns=\[\.\.\.\]$",
        ),
        (
            _table(a=pa.array([[1.0], [2.0, 3.0]])),
            None,
            r"^column 'a' has type list<.*>: only numeric, boolean and fixed-size list",
        ),
    ],
)
def test_table_minibatches_refuses(tmp_path, source, columns, match):
    (tmp_path / "junk.parquet").write_text("not parquet")
    if isinstance(source, str):
        source = source.format(tmp=tmp_path)
    with pytest.raises(br.ConfigError, match=match):
        br.table_minibatches(source, _table(), 1, columns=columns)
    with pytest.raises(br.ConfigError, match=match):  # either level
        br.table_minibatches(_table(), source, 1, columns=columns)


def test_table_minibatches_accepts_tables_and_parquet(tmp_path):
    """The counterpart of the refusals above: a table, a Parquet file, selected columns, a
    fixed-size list column (one 2-d tensor) and a dtype for the floating columns."""
    table = pa.table(
        {
            "a": [1.0, 2.0, 3.0],
            "b": [0, 1, 1],
            "ok": [True, False, True],
            "v": pa.array([[1.0, 2.0]] * 3, type=pa.list_(pa.float64(), 2)),
        }
    )
    pq.write_table(table, tmp_path / "t.parquet")
    data = br.table_minibatches(table, tmp_path / "t.parquet", 2, dtype=torch.float32)
    batch = next(data.stream(seed=0))
    assert batch.upper["v"].shape == (2, 2) and batch.lower["a"].dtype == torch.float32
    assert batch.upper["b"].dtype == torch.int64 and batch.upper["ok"].dtype == torch.bool
    assert list(read_table(str(tmp_path / "t.parquet"), ["b", "a"]).column_names) == ["b", "a"]
    assert table_to_tensors(read_table(table, ["a"]))["a"].dtype == torch.float64


# --- br.train: Ray Data datasets (_check_datasets), before any worker starts --------------------


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (
            {"batch_size": 4},
            r"^batch_size is for datasets=\.\.\.; the factory's data sets its own size$",
        ),
        (
            {"datasets": {"upper": object()}, "batch_size": 2},
            r"^datasets must be \{'upper': ray\.data\.Dataset, 'lower': ray\.data\.Dataset\}, got "
            r"\['upper'\]$",
        ),
        ({"datasets": [1, 2], "batch_size": 2}, r"^datasets must be \{.*\}, got list$"),
        (
            {"datasets": DATASETS},
            r"^batch_size=None: datasets need a per-worker batch size >= 1 \(one integer or a "
            r"pair \(upper, lower\)\)$",
        ),
        ({"datasets": DATASETS, "batch_size": 0}, r"^batch_size=0: datasets need a per-worker"),
        ({"datasets": DATASETS, "batch_size": True}, r"^batch_size=True: datasets need a "),
        ({"datasets": DATASETS, "batch_size": (2, 0)}, r"^batch_size=\(2, 0\): datasets need "),
        ({"datasets": DATASETS, "batch_size": [1, 2, 3]}, r"^batch_size=\[1, 2, 3\]: datasets"),
        ({"datasets": DATASETS, "batch_size": 2.0}, r"^batch_size=2\.0: datasets need a "),
        (
            {"factory": "regression", "datasets": DATASETS, "batch_size": 2},
            r"^the factory returned data and datasets=\.\.\. was given too: use one source of data "
            r"\(return data=None from the factory\)$",
        ),
    ],
)
def test_train_refuses_bad_datasets_before_any_worker_starts(tmp_path, no_ray, overrides, match):
    assert_train_refused(tmp_path, overrides, match)


def test_train_refuses_datasets_that_are_not_ray_datasets(tmp_path, no_ray):
    with pytest.raises(
        br.ConfigError, match=r"datasets values must be ray\.data\.Dataset .*'upper': 'list'"
    ):
        br.train(**train_args(tmp_path, datasets={"upper": [1, 2], "lower": [3]}, batch_size=1))


# --- the catalogue's cases: x0 / y0, in-memory tensors, Arrow / Parquet, the CSV ----------------


def _link_to_dev_zero(name):
    """A data file that is a link to /dev/zero (a read never ends)."""

    def setup(tmp):
        if not os.path.exists("/dev/zero"):
            return "no /dev/zero on this platform"
        os.symlink("/dev/zero", tmp / name)
        return None

    return setup


CASES = [
    api(
        "api-int-x0",
        "API",
        "x0 holds an int64 tensor",
        lambda tmp: solve(x0={"x": torch.tensor([2])}),
        r"^x0\['x'\] has dtype torch\.int64: must be floating point; use \.float\(\) or "
        r"\.double\(\)$",
    ),
    api(
        "api-nan-x0",
        "API",
        "x0 holds NaN",
        lambda tmp: solve(x0={"x": t64(math.nan)}),
        r"upper_loss is nan at the initial point: fix x0 / y0 or the data",
    ),
    api(
        "api-inf-y0",
        "API",
        "y0 holds +Inf",
        lambda tmp: solve(y0={"y": t64(math.inf)}),
        r"lower_loss is inf at the initial point: fix x0 / y0 or the data",
    ),
    api(
        "api-shared-tensor",
        "API",
        "x0 and y0 hold the same tensor",
        lambda tmp: solve(x0={"x": (w := torch.zeros(2, dtype=F64))}, y0={"y": w}),
        r"^x0\['x'\] and y0\['y'\] share a memory range .*: each level needs its own; pass a "
        r"\.clone\(\) or untie the weights$",
    ),
    api(
        "meta-tensors",
        "API",
        "x0 and y0 hold tensors on the meta device (reported as sharing memory)",
        lambda tmp: solve(
            x0={"x": torch.empty(2, dtype=F64, device="meta")},
            y0={"y": torch.empty(2, dtype=F64, device="meta")},
        ),
        r"^2 problems:\n  - x0\['x'\] is on the meta device: it holds no values; materialise it "
        r".*\n  - y0\['y'\] is on the meta device",
    ),
    api(
        "data-nan-full-batch",
        "data",
        "NaN in an upper-level feature tensor (br.full_batch)",
        lambda tmp: br.full_batch((t64(1.0, math.nan).unsqueeze(1), t64(1.0, 2.0)), rows(2)),
        r"^upper: item 0 holds 1 NaN/Inf values; clean or impute them before solving$",
    ),
    api(
        "data-inf-minibatches",
        "data",
        "+Inf in a lower-level target tensor (br.minibatches)",
        lambda tmp: br.minibatches(rows(4), (rows(4)[0], t64(1.0, 2.0, math.inf, 4.0)), 2),
        r"^lower: item 1 holds 1 NaN/Inf values; clean or impute them before solving$",
    ),
    api(
        "data-nan-parquet",
        "data",
        "NaN in a Parquet column (br.table_minibatches)",
        lambda tmp: br.table_minibatches(tmp / "nan.parquet", pa.table({"a": [1.0, 2.0]}), 1),
        r"^upper: item 0 holds 1 NaN/Inf values; clean or impute them before solving$",
    ),
    api(
        "data-parquet-missing-column",
        "data",
        "columns=['a', 'b'] where the lower table has only 'a'",
        lambda tmp: br.table_minibatches(
            pa.table({"a": [1.0, 2.0], "b": [3.0, 4.0]}),
            pa.table({"a": [1.0, 2.0]}),
            1,
            columns=["a", "b"],
        ),
        r"^columns \['b'\] are not in the table; it has: a$",
    ),
    api(
        "data-parquet-absent",
        "data",
        "a Parquet path that does not exist",
        lambda tmp: br.table_minibatches(tmp / "absent.parquet", tmp / "nan.parquet", 1),
        r"^Parquet source '.*absent\.parquet' does not exist$",
    ),
    api(
        "data-not-parquet",
        "data",
        "a CSV text file named .parquet",
        lambda tmp: br.table_minibatches(tmp / "not_parquet.parquet", tmp / "nan.parquet", 1),
        r"^cannot read Parquet '.*not_parquet\.parquet': .*Parquet",
    ),
    api(
        "data-parquet-string-column",
        "data",
        "a Parquet file with a string column",
        lambda tmp: br.table_minibatches(tmp / "labels.parquet", pa.table({"a": [1.0]}), 1),
        r"^column 'label' has type string: only numeric, boolean and fixed-size list columns can "
        r"become tensors; select other columns with columns=\[\.\.\.\]$",
    ),
    api(
        "data-empty-parquet",
        "data",
        "a Parquet file with 0 rows",
        lambda tmp: br.table_minibatches(tmp / "empty.parquet", pa.table({"a": [1.0]}), 1),
        r"^upper: item 0 is empty \(0 samples\); give at least one sample$",
    ),
    api(
        "data-empty-tensor",
        "data",
        "lower-level tensors with 0 rows (br.minibatches)",
        lambda tmp: br.minibatches(rows(4), (torch.zeros(0, 3), torch.zeros(0)), 2),
        r"^2 problems:\n  - lower: item 0 is empty \(0 samples\); give at least one sample\n  - "
        r"lower: item 1 is empty",
    ),
    api(
        "data-ul-ll-shape-mismatch",
        "data",
        "upper inputs have 3 features, lower inputs 4",
        lambda tmp: br.solve(
            LinearFit(), LINEAR_X0, LINEAR_Y0, data=br.full_batch(rows(8, 3), rows(8, 4)), steps=2
        ),
        r"^lower_loss raised RuntimeError at the initial point: .*\(check the parameter names in "
        r"x0 / y0 and the batch format the loss expects\)$",
    ),
    api(
        "data-rows-mismatch-in-level",
        "data",
        "8 lower-level inputs but 7 targets",
        lambda tmp: br.minibatches(rows(8), (rows(8)[0], rows(7)[1]), 2),
        r"^lower: tensors have different numbers of samples \[8, 7\]; every tensor of a level "
        r"must have the same leading dimension$",
    ),
    api(
        "data-int-features",
        "data",
        "int64 inputs fed to a float64 model",
        lambda tmp: br.solve(
            LinearFit(),
            LINEAR_X0,
            LINEAR_Y0,
            data=br.full_batch((torch.ones(8, 3, dtype=torch.int64), rows(8)[1]), rows(8)),
            steps=2,
        ),
        r"^upper_loss raised RuntimeError at the initial point: .*(dtype|Long).*\(check the "
        r"parameter names in x0 / y0 and the batch format the loss expects\)$",
    ),
    api(
        "data-batch-larger-than-data",
        "data",
        "batch_size=10 for 8 lower-level rows",
        lambda tmp: br.minibatches(rows(16), rows(8), 10),
        r"^batch_size for lower=10: must be an integer in \[1, 8\] \(the lower-level data has 8 "
        r"samples\)$",
    ),
    # the representation problem's CSV
    cli(
        "data-csv-absent",
        "data",
        "representation --config data=<a CSV that does not exist>",
        "solve representation --config data={tmp}/absent.csv --out {tmp}/out",
        match=r"^error: representation data '.*absent\.csv' does not exist$",
        writes=("out",),
    ),
    cli(
        "data-csv-missing-columns",
        "data",
        "representation CSV with only income and gender",
        "solve representation --config data={tmp}/short.csv",
        match=r"^error: representation data '.*short\.csv' lacks the columns \['afqt89', 'age', ",
    ),
    cli(
        "data-csv-blank-cells",
        "data",
        "representation CSV with an empty cell",
        "solve representation --config data={tmp}/blank_cells.csv",
        match=r"^error: upper: item 0 holds \d+ NaN/Inf values; clean or impute them before "
        r"solving$",
    ),
    cli(
        "data-csv-is-parquet",
        "data",
        "representation --config data=<a Parquet file>",
        "solve representation --config data={tmp}/table.parquet",
        match=r"^error: .*representation data '.*table\.parquet'.*CSV",
    ),
    cli(
        "data-csv-text-cell",
        "data",
        "representation CSV with the word 'high' in the income column",
        "solve representation --config data={tmp}/text_cell.csv",
        match=r"^error: representation data '.*text_cell\.csv': column 'income' .*(number|numeric)",
    ),
    cli(
        "data-csv-header-only",
        "data",
        "representation CSV with a header and no rows",
        "solve representation --config data={tmp}/header_only.csv",
        match=r"^error: representation data '.*header_only\.csv' has no rows",
    ),
    cli(
        "data-csv-fifo",
        "data",
        "representation --config data=<a FIFO> (the read blocked forever)",
        "solve representation --config data={tmp}/pipe.csv",
        match=r"^error: representation data '.*pipe\.csv' is not a regular file \(a folder, FIFO "
        r"or device\); give the processed NLSY79 CSV file$",
        setup=fifo_at("pipe.csv"),
    ),
    cli(
        "data-csv-dev-zero",
        "data",
        "representation --config data=<a link to /dev/zero>",
        "solve representation --config data={tmp}/zero.csv",
        match=r"^error: representation data '.*zero\.csv' is not a regular file",
        setup=_link_to_dev_zero("zero.csv"),
    ),
    api(
        "text-data-fifo-and-dev-zero",
        "data",
        "peft-dpo-sft preference=<a FIFO>, instruction=<a link to /dev/zero> (hung at full CPU)",
        lambda tmp: peft_dpo_sft(
            {"preference": tmp / "pref.jsonl", "instruction": tmp / "zero.jsonl", "tokenizer": tmp}
        ),
        r"problem 'peft-dpo-sft': preference='.*pref\.jsonl' is not a regular file \(a folder, "
        r"FIFO or device\); give a regular file \(\.jsonl, \.json, \.parquet, \.csv\) or a "
        r"datasets folder\n.*problem 'peft-dpo-sft': instruction='.*zero\.jsonl' is not a "
        r"regular file",
        setup=lambda tmp: fifo_at("pref.jsonl")(tmp) or _link_to_dev_zero("zero.jsonl")(tmp),
    ),
    api(
        "text-read-rows-fifo",
        "data",
        "read_rows of a FIFO named .jsonl",
        lambda tmp: read_rows(tmp / "rows.jsonl", "sft"),
        r"^sft \(.*rows\.jsonl\) is not a regular file \(a folder, FIFO or device\); give a "
        r"regular file",
        setup=fifo_at("rows.jsonl"),
    ),
]


@pytest.mark.parametrize("case", params(CASES))
def test_bad_input(case, tmp_path, request, no_compare_ray):
    run_case(case, tmp_path, request, CASES)


# --- round three (a hidden catalogue's classes, closed) -------------------------------


def test_an_empty_start_tensor_is_refused_before_any_step():
    with pytest.raises(br.ConfigError, match=r"x0\['x'\] is empty \(shape \(0,\)\)"):
        br.solve(NegativeToy(), {"x": torch.zeros(0)}, {"y": torch.zeros(1)}, steps=1)
