"""What a Ray user passes through (callbacks, stop, runtime_env): Ray's own objects accepted,
everything else refused by its message. No Ray is started."""

from __future__ import annotations

import pytest
from ray import train, tune
from ray.runtime_env import RuntimeEnv
from ray.tune.logger import TBXLoggerCallback

from bilevel_ray.errors import ConfigError
from bilevel_ray.tracking import (
    TrackingSettings,
    check_runtime_env,
    check_stop,
    check_train_callbacks,
    check_tune_callbacks,
    sweep_callbacks,
)

from .readers import MLFLOW_EXTRA


class _Count(tune.Callback):
    """A user's own Tune callback."""


class _AfterReport(train.UserCallback):
    """A user's own Train callback."""


def test_ray_objects_pass_through():
    mine = _Count()
    assert check_tune_callbacks(None) == []
    assert check_tune_callbacks((mine,)) == [mine]
    assert check_train_callbacks([_AfterReport()])[0].__class__ is _AfterReport
    stopper = tune.stopper.MaximumIterationStopper(3)
    assert check_stop(stopper) is stopper
    assert check_stop({"step": 100, "eval/upper_loss": 0.1}) == {
        "step": 100,
        "eval/upper_loss": 0.1,
    }

    def stop(trial_id, result):
        return result["step"] >= 10

    assert check_stop(stop) is stop
    assert check_stop(None) is None
    env = check_runtime_env({"env_vars": {"WANDB_MODE": "offline"}, "pip": ["wandb"]})
    assert isinstance(env, RuntimeEnv) and env["env_vars"] == {"WANDB_MODE": "offline"}
    plugin = RuntimeEnv(my_plugin={"x": 1})  # a plugin's field: Ray's object, as it is
    assert check_runtime_env(plugin) is plugin


@pytest.mark.parametrize(
    ("callbacks", "match"),
    [
        (_Count(), r"callbacks=<.*_Count.*>: must be a list of ray.tune.Callback objects \(e.g. "),
        ([_Count(), print], r"callbacks\[1\]=<built-in function print>: not a ray.tune.Callback"),
        ([_Count], r"callbacks\[0\]=<class .*_Count'>: a class; pass an instance: _Count\(...\)"),
    ],
)
def test_bad_tune_callbacks_are_refused(callbacks, match):
    with pytest.raises(ConfigError, match=match):
        check_tune_callbacks(callbacks)


def test_tune_callbacks_go_to_train_refused():
    with pytest.raises(ConfigError, match=r"callbacks\[0\]=.*a Ray Tune callback, and br.train"):
        check_train_callbacks([_Count()])
    with pytest.raises(ConfigError, match=r"callbacks\[0\]='x': not a ray.train.UserCallback"):
        check_train_callbacks(["x"])
    with pytest.raises(ConfigError, match=r"must be a list of ray.train.UserCallback objects"):
        check_train_callbacks(_AfterReport())


def test_mlflow_twice_is_refused(tmp_path):
    pytest.importorskip("mlflow", reason=MLFLOW_EXTRA)
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    uri = f"sqlite:///{tmp_path}/m.db"
    with pytest.raises(ConfigError, match=r"each trial would be logged twice, as two MLflow runs"):
        check_tune_callbacks([MLflowLoggerCallback(uri)], mlflow=uri)
    with pytest.raises(ConfigError, match=r"logged twice"):
        sweep_callbacks(TrackingSettings(mlflow=uri), [MLflowLoggerCallback(uri)])


def test_the_sweep_callbacks_follow_the_settings(tmp_path):
    pytest.importorskip("mlflow", reason=MLFLOW_EXTRA)
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    mine = _Count()
    assert sweep_callbacks(None, [mine]) == [mine]
    uri = f"sqlite:///{tmp_path}/m.db"
    both = TrackingSettings(mlflow=uri, tensorboard=tmp_path / "tb", experiment="e")
    # Trials that track their own rows: no second MLflow run per trial from the callback.
    added = sweep_callbacks(both, [mine])
    assert added[0] is mine and [type(c) for c in added[1:]] == [TBXLoggerCallback]
    logger = sweep_callbacks(both, trials_track_rows=False)[-1]
    assert isinstance(logger, MLflowLoggerCallback)
    assert logger.tracking_uri == both.mlflow and logger.experiment_name == "e"
    assert logger.should_save_artifact
    own_board = TBXLoggerCallback()
    assert sweep_callbacks(both, [own_board]) == [own_board]  # not a second TensorBoard logger


@pytest.mark.parametrize(
    ("stop", "match"),
    [
        ({"step": "ten"}, r"stop\['step'\]='ten': must be a number .*stop=\{'step': 500\}"),
        ({"step": True}, r"stop\['step'\]=True: must be a number"),
        ({3: 1}, r"stop: the key 3 must be a metric's name"),
        (
            lambda result: True,
            r"stop=<function .*>: a stopping function takes \(trial_id, result\)",
        ),
        ("step>10", r"stop='step>10': must be a dict of metric thresholds"),
        (tune.stopper.MaximumIterationStopper, r"stop=MaximumIterationStopper: a class; pass an"),
    ],
)
def test_a_bad_stopping_rule_is_refused(stop, match):
    with pytest.raises(ConfigError, match=match):
        check_stop(stop)


def test_a_stopping_metric_the_trials_do_not_report_is_refused():
    with pytest.raises(ConfigError, match=r"stop\['stpe'\]: the trials do not report 'stpe'"):
        check_stop({"stpe": 5}, reported={"step", "search/score"})
    assert check_stop({"step": 5}, reported={"step"}) == {"step": 5}


@pytest.mark.parametrize(
    ("env", "match"),
    [
        ("env_vars=A", r"runtime_env='env_vars=A': must be a dict, e.g. runtime_env="),
        ({"env_var": {"A": "1"}}, r"unknown field\(s\) \['env_var'\]; Ray's fields are .*env_vars"),
        ({"env_vars": {"A": 1}}, r"runtime_env: runtime_env\['env_vars'\] must be of type"),
        ({"working_dir": 5}, r"runtime_env: `working_dir` must be a string"),
    ],
)
def test_a_bad_runtime_env_is_refused(env, match):
    with pytest.raises(ConfigError, match=match):
        check_runtime_env(env)
