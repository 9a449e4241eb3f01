"""Refusals of the tracking keywords and flags (``mlflow=``, ``tensorboard=``, ``experiment=``,
``--mlflow``, ...) and of Ray's own objects passed through (``callbacks=``, ``stop=``,
``runtime_env=``): each before any run starts and before Ray starts, naming the keyword and
the fix. (The tracking room's own checks of URIs, folders and tags: tests/tracking.)
"""

from __future__ import annotations

import pytest

import bilevel_ray as br

from .catalogue import SOLVE, TUNE, api, cli, params, run_case
from .support import solve


def _tune(tmp, **kw):
    return br.tune(
        "toy-negative", search_space={"gamma": 5.0}, storage_path=tmp / "sweeps", steps=5, **kw
    )


def _train(tmp, **kw):
    return br.train("toy-negative", steps=3, storage_path=tmp / "runs", name="run", **kw)


def _tune_callback():
    from ray import tune

    return tune.Callback()


def _mlflow_logger(tmp):
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    return MLflowLoggerCallback(tracking_uri=f"sqlite:///{tmp}/store/m.db")


CASES = [
    api(
        "api-experiment-without-tracker",
        "API",
        "br.solve experiment='exp' without mlflow= or tensorboard=",
        lambda tmp: solve(experiment="exp"),
        r"^experiment='exp' names where a tracker logs, and no tracker is asked for: pass "
        r"mlflow='sqlite:///mlflow\.db' \(or tensorboard='runs/tb'\) too",
    ),
    api(
        "api-mlflow-in-memory",
        "API",
        "br.solve mlflow='sqlite:///:memory:'",
        lambda tmp: solve(mlflow="sqlite:///:memory:"),
        r"^mlflow='sqlite:///:memory:': an in-memory SQLite database lives in one process "
        r"only.*give a file: sqlite:///path/mlflow\.db$",
    ),
    api(
        "api-tune-callbacks-not-list",
        "API",
        "br.tune callbacks=<a Callback, not in a list>",
        lambda tmp: _tune(tmp, callbacks=_tune_callback()),
        r"^callbacks=<.*>: must be a list of ray\.tune\.Callback objects \(e\.g\. "
        r"callbacks=\[WandbLoggerCallback\(project='bilevel'\)\]\); got a Callback$",
        writes=("sweeps",),
    ),
    api(
        "api-tune-stop-unreported",
        "API",
        "br.tune stop={'stpe': 5} (a metric the trials do not report)",
        lambda tmp: _tune(tmp, stop={"stpe": 5}),
        r"^stop\['stpe'\]: the trials do not report 'stpe'; they report: .*\bstep\b",
        writes=("sweeps",),
    ),
    api(
        "api-tune-mlflow-twice",
        "API",
        "br.tune mlflow=... and callbacks=[MLflowLoggerCallback(...)]",
        lambda tmp: _tune(
            tmp, mlflow=f"sqlite:///{tmp}/store/m.db", callbacks=[_mlflow_logger(tmp)]
        ),
        r"^callbacks holds an MLflowLoggerCallback and mlflow='sqlite:///.*' is given: each "
        r"trial would be logged twice",
        writes=("sweeps",),
    ),
    api(
        "api-train-tune-callback",
        "API",
        "br.train callbacks=[a ray.tune.Callback]",
        lambda tmp: _train(tmp, callbacks=[_tune_callback()]),
        r"^callbacks\[0\]=.*: a Ray Tune callback, and br\.train runs a Ray Train worker group, "
        r"which takes ray\.train\.UserCallback objects",
        writes=("runs",),
    ),
    api(
        "api-train-runtime-env-typo",
        "API",
        "br.train runtime_env={'env_var': {...}} (misspelt field)",
        lambda tmp: _train(tmp, runtime_env={"env_var": {"A": "1"}}),
        r"^runtime_env: unknown field\(s\) \['env_var'\]; Ray's fields are .*\benv_vars\b",
        writes=("runs",),
    ),
    cli(
        "cli-experiment-without-tracker",
        "CLI",
        "solve --experiment exp (no --mlflow, no --tensorboard)",
        SOLVE + " --experiment exp --out {tmp}/out",
        r"^error: experiment='exp' names where a tracker logs, and no tracker is asked for",
        writes=("out",),
    ),
    cli(
        "cli-mlflow-unknown-scheme",
        "CLI",
        "tune --mlflow bogus://host/x",
        TUNE + " --mlflow bogus://host/x --out {tmp}/sweeps",
        r"^error: mlflow='bogus://host/x': unknown tracking URI scheme 'bogus:'",
        writes=("sweeps",),
    ),
    cli(
        "cli-mlflow-server-refuses",
        "CLI",
        "solve --mlflow http://127.0.0.1:1 (no server listens there; hung for minutes)",
        "solve quadratic --steps 20 --mlflow http://127.0.0.1:1 --quiet --out {tmp}/out",
        r"^error: mlflow='http://127\.0\.0\.1:1': no tracking server answers at 127\.0\.0\.1:1 "
        r"\(.*\); start the server \(mlflow server .*\) or correct the address, or track into a "
        r"local store instead: mlflow='mlruns' or mlflow='sqlite:///mlflow\.db'$",
        writes=("out",),
    ),
    api(
        "api-mlflow-host-unknown",
        "API",
        "br.solve mlflow='http://nosuchhost.invalid:5000' (a host no resolver knows)",
        lambda tmp: solve(mlflow="http://nosuchhost.invalid:5000"),
        r"^mlflow='http://nosuchhost\.invalid:5000': the host 'nosuchhost\.invalid' (cannot be "
        r"resolved|was not resolved within \d+ s).*; start the server",
    ),
    api(
        "api-mlflow-port-not-a-number",
        "API",
        "br.solve mlflow='http://localhost:99999'",
        lambda tmp: solve(mlflow="http://localhost:99999"),
        r"^mlflow='http://localhost:99999': the port is not a number in 1\.\.65535; start the "
        r"server",
    ),
]


@pytest.mark.parametrize("case", params(CASES))
def test_bad_input(case, tmp_path, request, no_compare_ray):
    run_case(case, tmp_path, request, CASES)
