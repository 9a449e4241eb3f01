"""br.train on a Ray Train worker group (2 CPUs): equivalence, faults, divergence, Ray Data.

Each fit() costs 20-30 s here, so these few tests each check one whole capability.
"""

from __future__ import annotations

import pyarrow as pa
import pytest
import torch

import bilevel_ray as br

pytestmark = pytest.mark.ray

COMMON = dict(steps=20, report_every=5, lr_y=0.1, gamma=10.0)


def _one_worker_reference(method, tmp_path, **options):
    """One worker, batch 2B: the in-process runtime (no worker group)."""
    return br.train(
        "regression",
        problem_config={"n": 400, "batch_size": 50},
        method=method,
        storage_path=tmp_path,
        name=f"ref-{method}",
        **COMMON,
        **options,
    )


@pytest.mark.parametrize(
    ("method", "options"),
    [("pbgd_free", {"lr_x": 0.02}), ("pbgd", {"lr_x": 0.005, "inner_steps": 2})],
)
@pytest.mark.slow
def test_two_workers_with_batch_b_equal_one_worker_with_batch_2b(
    ray_2cpu, tmp_path, method, options
):
    two = br.train(
        "regression",
        problem_config={"n": 400, "batch_size": 25},
        method=method,
        num_workers=2,
        storage_path=tmp_path,
        name=f"dp-{method}",
        **COMMON,
        **options,
    )
    one = _one_worker_reference(method, tmp_path, **options)
    for got, want in ((two.x, one.x), (two.y, one.y)):
        for k in want:
            assert (got[k] - want[k]).abs().max() <= 1e-5
    assert two.history["step"].to_pylist() == [5, 10, 15, 20]
    upper_two, upper_one = two.history["upper/loss"], one.history["upper/loss"]
    assert upper_two.to_pylist() == pytest.approx(upper_one.to_pylist(), rel=1e-9)


@pytest.mark.slow
def test_killed_worker_resumes_from_its_last_checkpoint(ray_2cpu, tmp_path):
    options = {"lr_x": 0.005, "inner_steps": 2, "optimizer": "adam"}
    run = br.train(
        "regression",
        problem_config={"n": 400, "batch_size": 25},
        method="pbgd",
        num_workers=2,
        checkpoint_every=5,
        max_failures=1,
        fault={"rank": 1, "step": 12},
        storage_path=tmp_path,
        name="fault",
        **COMMON,
        **options,
    )
    marker = tmp_path / "fault" / ".bilevel_ray_fault_injected"
    assert marker.read_text() == "rank 1 killed at step 12\n"  # the crash did happen
    reference = _one_worker_reference("pbgd", tmp_path, **options)
    for k in reference.x:
        assert (run.x[k] - reference.x[k]).abs().max() <= 1e-6
    for k in reference.y:
        assert (run.y[k] - reference.y[k]).abs().max() <= 1e-6
    assert run.history["step"].to_pylist() == [5, 10, 15, 20]  # no row lost or repeated
    # The run resumes only as it was started: other settings are refused before any work.
    with pytest.raises(br.ConfigError, match="was started with other solver settings"):
        br.train(
            "regression",
            problem_config={"n": 400, "batch_size": 25},
            method="pbgd",
            num_workers=2,
            max_failures=1,
            storage_path=tmp_path,
            name="fault",
            **{**COMMON, "lr_y": 0.2},
            **options,
        )
    with pytest.raises(br.ConfigError, match="was started with a worker group"):
        br.train(
            "regression",
            problem_config={"n": 400, "batch_size": 25},
            method="pbgd",
            storage_path=tmp_path,
            name="fault",
            **COMMON,
            **options,
        )


@pytest.mark.slow
def test_divergence_in_workers_stops_the_run_with_a_clear_status(ray_2cpu, tmp_path):
    options = dict(
        problem_config={},
        num_workers=2,
        steps=400,
        report_every=50,
        storage_path=tmp_path,
        name="diverge",
        resources_per_worker={"CPU": 0.5},
    )
    with pytest.raises(
        br.DivergenceError,
        match=r"^diverged at step \d+: lower/loss (is not finite|grew from 1 to)",
    ):
        br.train("toy-negative", lr_y=5.0, **options)
    # Its last state is not finite: the name cannot be resumed, even with safe settings.
    with pytest.raises(br.ConfigError, match="diverged; its last state is not finite"):
        br.train("toy-negative", lr_y=0.1, **options)


def test_a_group_the_cluster_cannot_hold_is_refused_before_it_waits(ray_2cpu, tmp_path):
    with pytest.raises(br.ConfigError, match=r"3 workers x 1 CPU = 3 CPUs, the cluster has 2"):
        br.train("regression", num_workers=3, storage_path=tmp_path, name="big")
    with pytest.raises(br.ConfigError, match=r"2 GPU workers, the cluster has 0 GPUs"):
        br.train(
            "regression",
            num_workers=2,
            use_gpu=True,
            storage_path=tmp_path,
            name="gpu",
            resources_per_worker={"CPU": 0.5},
        )


@pytest.mark.slow
def test_ray_data_datasets_feed_the_workers(ray_2cpu, tmp_path):
    import sys

    import ray.data
    from ray import cloudpickle

    # Workers cannot import this test module: ship the factory by value, as for a user's script.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])

    upper, lower = br.problems.make_regression_data(n=200)

    def table(group):
        inputs, targets = group
        return pa.table(
            {
                "inputs": pa.FixedSizeListArray.from_arrays(
                    pa.array(inputs.reshape(-1).numpy()), inputs.shape[1]
                ),
                "targets": targets.numpy(),
            }
        )

    run = br.train(
        _dict_regression,
        num_workers=2,
        datasets={
            "upper": ray.data.from_arrow(table(upper)),
            "lower": ray.data.from_arrow(table(lower)),
        },
        batch_size=20,
        resources_per_worker={"CPU": 0.5},  # Ray Data needs a CPU of its own
        storage_path=tmp_path,
        name="raydata",
        steps=30,
        report_every=10,
        lr_x=0.02,
        lr_y=0.1,
        gamma=10.0,
    )
    losses = run.history["upper/loss"].to_pylist()
    assert len(losses) == 3 and losses[-1] < losses[0]


def _dict_regression(config):
    """The regression problem reading {"inputs", "targets"} batches (Ray Data's form)."""
    spec = br.problems.BUILTIN_PROBLEMS["regression"]({**config, "batch_size": None})

    class DictBatches:
        def upper_loss(self, x, y, batch):
            return spec.problem.upper_loss(x, y, (batch["inputs"], batch["targets"]))

        def lower_loss(self, x, y, batch):
            return spec.problem.lower_loss(x, y, (batch["inputs"], batch["targets"]))

    return br.ProblemSpec(DictBatches(), spec.x0, spec.y0, None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU on this machine")
@pytest.mark.slow
def test_gpu_workers(ray_2cpu, tmp_path):
    run = br.train(
        "quadratic",
        problem_config={},
        num_workers=1,
        use_gpu=True,
        steps=200,
        storage_path=tmp_path,
        name="gpu",
    )
    assert run.x["x"].device.type == "cpu"  # results come back as plain CPU tensors
