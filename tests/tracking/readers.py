"""Reading the trackers back with their own readers: MLflow's client, TensorBoard's
EventAccumulator."""

from __future__ import annotations

from pathlib import Path


def metric_points(client, run_id: str, key: str) -> list[tuple[int, float]]:
    """A metric's history as (step, value), in the order of step."""
    history = client.get_metric_history(run_id, key)
    return [(m.step, m.value) for m in sorted(history, key=lambda m: (m.step, m.timestamp))]


def scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in a TensorBoard run folder, as TensorBoard itself reads it."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return {
        tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
    }


def artifact_paths(client, run_id: str, path: str | None = None) -> set[str]:
    """Every artifact file of a run (folders walked)."""
    found: set[str] = set()
    for item in client.list_artifacts(run_id, path):
        if item.is_dir:
            found |= artifact_paths(client, run_id, item.path)
        else:
            found.add(item.path)
    return found


def same_points(actual: list[tuple[int, float]], expected: list[tuple[int, float]]) -> bool:
    """The same steps, in order, and the same values up to float32 (TensorBoard's precision)."""
    import math

    return [s for s, _ in actual] == [s for s, _ in expected] and all(
        math.isclose(a, b, rel_tol=1e-6) for (_, a), (_, b) in zip(actual, expected)
    )


MLFLOW_EXTRA = "needs the [mlflow] extra: pip install 'bilevel_ray[mlflow]'"
TENSORBOARD_EXTRA = "needs the [tensorboard] extra: pip install 'bilevel_ray[tensorboard]'"
