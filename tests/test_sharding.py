"""Data sharding across data-parallel ranks, and Arrow / Parquet level data (no Ray needed)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import bilevel_ray as br
from bilevel_ray.data import as_batches


def _tensors(n=40):
    gen = torch.Generator().manual_seed(0)
    upper = (torch.randn(n, 3, generator=gen), torch.randn(n, generator=gen))
    lower = (torch.randn(n + 10, 3, generator=gen), torch.randn(n + 10, generator=gen))
    return upper, lower


def test_two_ranks_with_batch_b_see_the_samples_of_one_rank_with_batch_2b():
    upper, lower = _tensors()
    one = as_batches(br.minibatches(upper, lower, batch_size=8), seed=3)
    ranks = [
        as_batches(br.minibatches(upper, lower, batch_size=4), seed=3, rank=r, world=2)
        for r in (0, 1)
    ]
    for _ in range(12):  # crosses epoch boundaries (40 samples, 8 per step)
        whole = next(one)
        parts = [next(stream) for stream in ranks]
        for level in ("upper", "lower"):
            joined = torch.cat([getattr(p, level)[0] for p in parts])
            assert torch.equal(joined, getattr(whole, level)[0])


def test_resumed_stream_continues_with_the_batches_it_had_not_used():
    upper, lower = _tensors()
    data = br.minibatches(upper, lower, batch_size=4)
    full = as_batches(data, seed=1, rank=1, world=2)
    skipped = [next(full) for _ in range(7)][-1]
    resumed = as_batches(data, seed=1, start_step=6, rank=1, world=2)
    assert torch.equal(next(resumed).upper[0], skipped.upper[0])


def test_full_batch_is_split_into_equal_slices():
    upper, lower = _tensors(40)
    data = br.full_batch(upper, (lower[0][:40], lower[1][:40]))
    parts = [next(as_batches(data, 0, rank=r, world=4)).upper[0] for r in range(4)]
    assert torch.equal(torch.cat(parts), upper[0])
    with pytest.raises(br.ConfigError, match="cannot be split evenly over 3 workers"):
        next(as_batches(data, 0, rank=0, world=3))


def test_sharding_refuses_batches_larger_than_the_data_and_unshardable_sources():
    upper, lower = _tensors(40)
    with pytest.raises(br.ConfigError, match=r"2 workers x batch 30 = 60 exceeds the 40 upper"):
        next(as_batches(br.minibatches(upper, lower, 30), 0, rank=0, world=2))
    with pytest.raises(br.ConfigError, match="cannot be sharded across workers"):
        as_batches(([upper], [lower]), 0, rank=0, world=2)


def test_table_minibatches_from_arrow_and_parquet(tmp_path):
    table = pa.table(
        {
            "a": pa.array([1.0, 2.0, 3.0, 4.0]),
            "label": pa.array([0, 1, 0, 1]),
            "vec": pa.FixedSizeListArray.from_arrays(pa.array(range(8), pa.float32()), 2),
            "name": pa.array(["w", "x", "y", "z"]),
        }
    )
    pq.write_table(table, tmp_path / "lower.parquet")
    data = br.table_minibatches(
        table,
        tmp_path / "lower.parquet",
        batch_size=2,
        columns=["a", "label", "vec"],
        dtype=torch.float64,
    )
    batch = next(as_batches(data, seed=0))
    assert set(batch.upper) == {"a", "label", "vec"}
    assert batch.upper["a"].dtype == torch.float64 and batch.upper["label"].dtype == torch.int64
    assert batch.lower["vec"].shape == (2, 2)
    with pytest.raises(br.ConfigError, match="column 'name' has type string"):
        br.table_minibatches(table, table, batch_size=2)
    with pytest.raises(br.ConfigError, match=r"columns \['nope'\] are not in the table"):
        br.table_minibatches(table, table, batch_size=2, columns=["nope"])
    with pytest.raises(br.ConfigError, match="does not exist"):
        br.table_minibatches(tmp_path / "missing.parquet", table, batch_size=2)


def test_one_worker_train_runs_in_process_and_resumes_by_name(tmp_path):
    """num_workers=1 needs no worker group (no Ray start); the same (storage_path, name) resumes."""
    common = dict(
        problem_config={"n": 200, "batch_size": 20},
        lr_x=0.02,
        lr_y=0.1,
        storage_path=tmp_path,
        report_every=5,
    )
    fresh = br.train("regression", steps=20, name="fresh", **common)
    br.train("regression", steps=10, name="resumed", **common)
    resumed = br.train("regression", steps=20, name="resumed", **common)
    assert torch.equal(fresh.x["W"], resumed.x["W"])
    assert resumed.history["step"].to_pylist() == [5, 10, 15, 20]
    assert (tmp_path / "resumed" / "checkpoint.pt").exists()


def test_train_checks_the_shards_before_starting_workers(tmp_path):
    """n = 40 samples cannot give 2 workers batches of 25: refused in the driver, no Ray."""
    with pytest.raises(br.ConfigError, match=r"2 workers x batch 25 = 50 exceeds the 40"):
        br.train(
            "regression",
            problem_config={"n": 40, "batch_size": 25},
            num_workers=2,
            storage_path=tmp_path,
        )


def test_file_factories_are_shipped_by_value(tmp_path):
    from bilevel_ray.runtime.cluster.shipping import portable_factory

    source = tmp_path / "my_problem.py"
    source.write_text(
        "import bilevel_ray as br\ndef make(config):\n"
        "    return br.problems.BUILTIN_PROBLEMS['quadratic']({})\n"
    )
    shipped = portable_factory(f"{source}:make")
    assert callable(shipped) and shipped({}).x0["x"].shape == (3,)
    assert portable_factory("quadratic") == "quadratic"


def test_a_run_resumes_only_in_the_runtime_it_started_in(tmp_path):
    from bilevel_ray.runtime.train.driver import _check_run_folder

    (tmp_path / "run" / "checkpoint_step_000000010").mkdir(parents=True)
    with pytest.raises(br.ConfigError, match="was started with a worker group"):
        _check_run_folder(tmp_path / "run", in_process=True)
