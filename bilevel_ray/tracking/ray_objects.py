"""Ray's own objects that a Ray user passes through: ``callbacks=``, ``stop=``, ``runtime_env=``.

``br.tune`` and ``br.compare`` hand their callbacks and stopping rule to Tune's ``RunConfig``,
``br.train`` its callbacks to Train's; ``runtime_env`` goes to the Ray job (and so to every
trial and worker). They are checked here, on the driver, so that a wrong object fails with a
message naming it instead of deep inside Ray. This is how Weights & Biases works the Ray way:
``callbacks=[WandbLoggerCallback(project=...)]``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from bilevel_ray.errors import ConfigError

__all__ = ["check_runtime_env", "check_stop", "check_train_callbacks", "check_tune_callbacks"]

TUNE_EXAMPLE = "e.g. callbacks=[WandbLoggerCallback(project='bilevel')]"


def check_tune_callbacks(callbacks: Any, mlflow: str | None = None) -> list[Any]:
    """``callbacks`` as a list of ``ray.tune.Callback`` objects (None: an empty list).

    ``mlflow``: the run's own MLflow URI; with it an ``MLflowLoggerCallback`` is refused, since
    both would log each trial, as two runs."""
    from ray.tune import Callback

    items = _as_list(callbacks, "ray.tune.Callback", TUNE_EXAMPLE)
    for i, item in enumerate(items):
        if isinstance(item, Callback):
            continue
        raise ConfigError(f"callbacks[{i}]={item!r}: {_not_a('ray.tune.Callback', item)}")
    if mlflow is None or not items:
        return items
    # Imported only here: Ray's MLflow module imports mlflow, seconds a sweep without it skips.
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    if any(isinstance(c, MLflowLoggerCallback) for c in items):
        raise ConfigError(
            f"callbacks holds an MLflowLoggerCallback and mlflow={mlflow!r} is given: each trial "
            "would be logged twice, as two MLflow runs; pass one of them (mlflow= logs every "
            "history row, the callback only what the trials report to Tune)"
        )
    return items


def check_train_callbacks(callbacks: Any) -> list[Any]:
    """``callbacks`` as a list of ``ray.train.UserCallback`` objects, what Train V2's
    ``RunConfig`` takes (it refuses Tune's)."""
    from ray.train import UserCallback
    from ray.tune import Callback

    example = "e.g. a subclass of ray.train.UserCallback with after_report(...)"
    items = _as_list(callbacks, "ray.train.UserCallback", example)
    for i, item in enumerate(items):
        if isinstance(item, UserCallback):
            continue
        if isinstance(item, Callback):
            raise ConfigError(
                f"callbacks[{i}]={item!r}: a Ray Tune callback, and br.train runs a Ray Train "
                "worker group, which takes ray.train.UserCallback objects; pass Tune callbacks "
                "to br.tune or br.compare"
            )
        raise ConfigError(f"callbacks[{i}]={item!r}: {_not_a('ray.train.UserCallback', item)}")
    return items


def check_stop(stop: Any, reported: set[str] | None = None) -> Any:
    """Tune's stopping rule: None, a dict of metric -> threshold (a trial stops once a report
    reaches one), a function ``(trial_id, result) -> bool`` or a ``ray.tune.Stopper``.

    ``reported``: the metrics the trials report, to catch a misspelt name now (Tune would stop
    the sweep at the first report that lacks it)."""
    from ray.tune import Stopper

    if stop is None or isinstance(stop, Stopper):
        return stop
    if isinstance(stop, type) and issubclass(stop, Stopper):
        name = stop.__name__
        raise ConfigError(f"stop={name}: a class; pass an instance: stop={name}()")
    if isinstance(stop, Mapping):
        for key, value in stop.items():
            if not isinstance(key, str) or not key:
                raise ConfigError(f"stop: the key {key!r} must be a metric's name")
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(
                    f"stop[{key!r}]={value!r}: must be a number (a trial stops once its reported "
                    f"{key} reaches it), e.g. stop={{'step': 500}}"
                )
            if reported is not None and key not in reported:
                raise ConfigError(
                    f"stop[{key!r}]: the trials do not report {key!r}; they report: "
                    f"{', '.join(sorted(reported))}"
                )
        return dict(stop)
    if callable(stop):
        _check_arity(stop)
        return stop
    raise ConfigError(
        f"stop={stop!r}: must be a dict of metric thresholds (stop={{'step': 500}}), a function "
        "(trial_id, result) -> bool, or a ray.tune.Stopper"
    )


def check_runtime_env(runtime_env: Any) -> dict[str, Any] | None:
    """``runtime_env`` as Ray's ``RuntimeEnv`` validates it (a dict; None: none). A plain
    dict's keys must be Ray's own fields, so that a misspelt one is caught; a
    ``ray.runtime_env.RuntimeEnv`` object (a plugin's fields) is passed as it is."""
    if runtime_env is None:
        return None
    from ray.runtime_env import RuntimeEnv

    if isinstance(runtime_env, RuntimeEnv):
        return runtime_env
    if not isinstance(runtime_env, Mapping):
        raise ConfigError(
            f"runtime_env={runtime_env!r}: must be a dict, e.g. "
            "runtime_env={'env_vars': {'WANDB_API_KEY': '...'}, 'pip': ['wandb']}"
        )
    unknown = sorted(str(k) for k in runtime_env if k not in RuntimeEnv.known_fields)
    if unknown:
        raise ConfigError(
            f"runtime_env: unknown field(s) {unknown}; Ray's fields are "
            f"{', '.join(sorted(f for f in RuntimeEnv.known_fields if not f.startswith('_')))} "
            "(for a plugin's field pass a ray.runtime_env.RuntimeEnv object)"
        )
    try:
        return RuntimeEnv(**runtime_env)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"runtime_env: {err}") from None


def _as_list(callbacks: Any, kind: str, example: str) -> list[Any]:
    if callbacks is None:
        return []
    if not isinstance(callbacks, (list, tuple)):
        raise ConfigError(
            f"callbacks={callbacks!r}: must be a list of {kind} objects ({example}); got a "
            f"{type(callbacks).__name__}"
        )
    return list(callbacks)


def _not_a(kind: str, item: Any) -> str:
    if isinstance(item, type):
        return f"a class; pass an instance: {item.__name__}(...)"
    return f"not a {kind} (a {type(item).__name__}); pass {kind} objects"


def _check_arity(stop: Callable[..., Any]) -> None:
    try:
        signature = inspect.signature(stop)
    except ValueError:  # no signature to read (a builtin): let Tune call it
        return
    try:
        signature.bind("trial_id", {})
    except TypeError:
        raise ConfigError(
            f"stop={stop!r}: a stopping function takes (trial_id, result) and returns True to "
            "stop the trial"
        ) from None
