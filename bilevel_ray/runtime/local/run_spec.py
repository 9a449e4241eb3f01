"""The run's settings, typed: :class:`RunSpec` (what the step loop does), :class:`WatchSettings`
(the flatness watch's) and :class:`Placement` (where it runs); and :data:`RUN_OPTIONS`, the run
settings' one declaration (keyword, default, command-line flag, help). Every entry point
(``br.solve``, ``br.train``, ``br.tune``) takes the run settings as keywords routed by that
declaration (:func:`take_run_options`), builds them once, validated, and passes them on; a Ray
worker or trial receives them as ``to_dict()`` and rebuilds them with ``from_dict``. A new run
setting is an entry in :data:`RUN_OPTIONS` and a field here, plus its use. Nothing here imports
torch: the command line reads the declarations before it parses.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from bilevel_ray.counts import MAX_STEPS, check_count
from bilevel_ray.errors import ConfigError

__all__ = [
    "MAX_HISTORY_ROWS",
    "MAX_WORKERS",
    "ON_UNSUITABLE",
    "REPORT_INTERVAL_S",
    "RUN_OPTIONS",
    "VERBOSE_ENV",
    "WATCH_KEYS",
    "Placement",
    "RunOption",
    "RunSpec",
    "WatchSettings",
    "build_run",
    "check_count",
    "check_run_name",
    "declare_run_options",
    "take_run_options",
    "verbose",
]

# Train and Tune see a report at most this often (plus one at every checkpoint and at the end):
# a ray.train.report is a barrier over the worker group and costs about 2 s on a small machine,
# so one per logged row would cost a 3 ms-per-step run 20x its steps.
REPORT_INTERVAL_S = 5.0
# Ray's own log lines (Train's, Tune's, the cluster's) show only with BILEVEL_RAY_VERBOSE=1
# (``--verbose`` on the command line); a run's progress and the library's warnings always do.
VERBOSE_ENV = "BILEVEL_RAY_VERBOSE"


# A history row is about 1 KB in memory, so 10**7 rows is ~10 GB (MAX_STEPS, and the count
# checks, are on the floor: bilevel_ray.counts).
MAX_HISTORY_ROWS = 10_000_000
# A Train worker group of more ranks than this is a typo, not a cluster (each is a process).
MAX_WORKERS = 10_000
MAX_FAILURES = 1_000

# The flatness watch's actions (``on_unsuitable``).
ON_UNSUITABLE = ("fallback", "stop", "warn")


@dataclass(frozen=True)
class RunOption:
    """A run setting as a keyword of ``br.solve`` / ``br.train`` / ``br.tune`` (its API default)
    and, where ``flag``, a command-line option (``--report-every``; ``cli_default`` where the
    command line's differs). Declared once in :data:`RUN_OPTIONS`: a new run setting is an entry
    there and a :class:`RunSpec` field, plus its use."""

    default: Any
    help: str
    flag: bool = True
    cli_default: Any = None
    choices: tuple[str, ...] | None = None


RUN_OPTIONS: dict[str, RunOption] = {
    "seed": RunOption(0, "seeds the run's RNG and its minibatch order"),
    "report_every": RunOption(10, "log a history row every N steps", cli_default=100),
    "checkpoint_every": RunOption(0, "checkpoint every K steps (a multiple of report_every)"),
    "report_interval_s": RunOption(
        REPORT_INTERVAL_S,
        "Train and Tune receive a report at most every this many seconds (and at every "
        "checkpoint and the end); the history keeps every logged row",
    ),
    "progress": RunOption(False, "a progress line on stderr at most every 2 s", flag=False),
    "on_unsuitable": RunOption(
        None,
        "run the flatness diagnostic during the first diagnose_window steps and, if PBGD-Free "
        "is unsuitable, switch to alt_pbgd (fallback), stop, or warn; a run that stays with "
        "PBGD-Free is certified at its end",
        choices=ON_UNSUITABLE,
    ),
    "diagnose_window": RunOption(200, "the flatness diagnostic's warm-up window (steps)"),
    "diagnose_every": RunOption(50, "a flatness estimate every N steps of the window"),
    "diagnose_options": RunOption(
        None, "options of bilevel_ray.diagnostics.flatness.estimate", flag=False
    ),
}
# The run settings that build RunSpec.watch (through watch.watch_settings).
WATCH_KEYS = ("on_unsuitable", "diagnose_window", "diagnose_every", "diagnose_options")


def take_run_options(
    options: dict[str, Any],
    defaults: Mapping[str, Any] | None = None,
    exclude: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Remove the run settings from ``options`` (a caller's keywords) and return them, each as
    given or at its default (``defaults`` over :data:`RUN_OPTIONS`'s); what stays in
    ``options`` are solver settings."""
    defaults = defaults or {}
    return {
        name: options.pop(name) if name in options else defaults.get(name, option.default)
        for name, option in RUN_OPTIONS.items()
        if name not in exclude
    }


def declare_run_options(
    defaults: Mapping[str, Any] | None = None, exclude: tuple[str, ...] = ()
) -> Any:
    """Show the run settings an entry point takes through ``**options`` in its signature and
    its docstring (``help(br.solve)``), from :data:`RUN_OPTIONS`, before its ``**`` keyword."""

    def declare(function: Any) -> Any:
        signature = inspect.signature(function)
        params = list(signature.parameters.values())
        rest = [p for p in params if p.kind is not p.VAR_KEYWORD]
        named = {p.name for p in params}
        extra = [
            inspect.Parameter(
                name, inspect.Parameter.KEYWORD_ONLY, default=(defaults or {}).get(name, o.default)
            )
            for name, o in RUN_OPTIONS.items()
            if name not in exclude and name not in named
        ]
        function.__signature__ = signature.replace(
            parameters=rest + extra + [p for p in params if p.kind is p.VAR_KEYWORD]
        )
        lines = "\n".join(f"        {p.name}: {RUN_OPTIONS[p.name].help}." for p in extra)
        function.__doc__ = (function.__doc__ or "") + f"\n\n    Run settings:\n{lines}\n"
        return function

    return declare


def build_run(method: str, steps: int, options: Mapping[str, Any]) -> RunSpec:
    """The :class:`RunSpec` of ``steps`` steps and the run settings ``options``
    (:func:`take_run_options`); the watch's keys build its :class:`WatchSettings`."""
    from bilevel_ray.runtime.local.watch import watch_settings  # torch: not for --help

    own = {k: v for k, v in options.items() if k not in WATCH_KEYS}
    watch = watch_settings(
        options.get("on_unsuitable"),
        method,
        options.get("diagnose_window", RUN_OPTIONS["diagnose_window"].default),
        options.get("diagnose_every", RUN_OPTIONS["diagnose_every"].default),
        options.get("diagnose_options"),
    )
    return RunSpec(steps, watch=watch, **own)


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def check_run_name(name: Any) -> str:
    """A run or sweep name is one folder inside the storage path: no separators, no '..'
    (a name like '../x' or '/x' would put the run, and its files, outside it), not empty, and
    no control characters (they would reach the terminal raw in the resume hint)."""
    from pathlib import Path

    from bilevel_ray.runtime.local.output_files import check_output_path

    if isinstance(name, str):
        check_output_path(name, "name", is_file=False)  # a NUL byte, not UTF-8, too long
    if isinstance(name, str) and name and any(not ch.isprintable() for ch in name):
        raise ConfigError(
            f"name={name!r}: contains a control character; give a name of printable "
            "characters, e.g. name='run1'"
        )
    if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name:
        raise ConfigError(
            f"name={name!r}: must be a plain folder name, not empty (no '/' or '..'), e.g. "
            "name='run1'"
        )
    return name


@dataclass(frozen=True)
class WatchSettings:
    """The warm-up window W, the estimate interval, the action, and estimator options."""

    on_unsuitable: str
    window: int = 200
    every: int = 50
    estimator: Mapping[str, Any] = field(default_factory=dict)
    recheck_every: int | None = None  # after the window; None: every W steps
    end_check: bool = True  # certify the end point of a run that stayed with PBGD-Free

    def estimate_steps(self) -> list[int]:
        """Steps completed at which an estimate is taken: every, 2 every, ..., and W."""
        return sorted({*range(self.every, self.window, self.every), self.window})

    def rechecks(self, step: int) -> bool:
        """Whether ``step`` (after the window) is one of the cheap later checks: every
        ``recheck_every`` (default W) steps past W."""
        period = self.recheck_every or self.window
        return step > self.window and (step - self.window) % period == 0


@dataclass(frozen=True)
class RunSpec:
    """What the step loop does.

    Attributes:
        steps: total iterations (a resumed run continues up to this count).
        seed: seeds torch's RNG for the run and the minibatch sampler.
        report_every: log a history row (and check for divergence) every this many steps.
        checkpoint_every: save every K steps (0: only at the end, when there is a checkpoint).
        report_interval_s: Train and Tune receive a report at most this often (besides every
            checkpoint and the end); the history keeps every logged row regardless.
        progress: a progress line on stderr at most every 2 s.
        watch: the flatness diagnostic's settings, or None.
    """

    steps: int
    seed: int = 0
    report_every: int = 10
    checkpoint_every: int = 0
    report_interval_s: float = REPORT_INTERVAL_S
    progress: bool = False
    watch: WatchSettings | None = None

    def __post_init__(self) -> None:
        if isinstance(self.watch, Mapping):
            object.__setattr__(self, "watch", WatchSettings(**self.watch))
        problems: list[str] = []
        check_count(
            problems, "steps", self.steps, 1, MAX_STEPS,
            "a longer run takes weeks; run fewer steps, e.g. steps=100000",
        )  # fmt: skip
        check_count(problems, "seed", self.seed, 0)
        check_count(problems, "report_every", self.report_every, 1)
        check_count(problems, "checkpoint_every", self.checkpoint_every, 0)
        if not problems and self.steps // self.report_every > MAX_HISTORY_ROWS:
            least = -(-self.steps // MAX_HISTORY_ROWS)
            problems.append(
                f"steps={self.steps} with report_every={self.report_every} logs "
                f"{self.steps // self.report_every:,} history rows, more than the "
                f"{MAX_HISTORY_ROWS:,} a run keeps in memory: log less often, with "
                f"report_every >= {least} (--report-every {least})"
            )
        interval = self.report_interval_s
        if (
            isinstance(interval, bool)
            or not isinstance(interval, (int, float))
            or not (interval >= 0 and math.isfinite(interval))
        ):
            problems.append(
                f"report_interval_s={interval!r}: must be a finite number of seconds >= 0"
            )
        if not problems and self.checkpoint_every % self.report_every:
            problems.append(
                f"checkpoint_every={self.checkpoint_every} must be a multiple of report_every="
                f"{self.report_every}: a checkpoint carries the history up to a logged row"
            )
        if self.watch is not None and not problems and self.watch.window > self.steps:
            problems.append(
                f"diagnose_window={self.watch.window} is longer than the run (steps="
                f"{self.steps}): the verdict would never come; use a window of at most the "
                "run's steps"
            )
        if problems:
            raise ConfigError(problems)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if self.watch is not None:
            d["watch"] = {**d["watch"], "estimator": dict(self.watch.estimator)}
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RunSpec:
        return cls(**d)


@dataclass(frozen=True)
class Placement:
    """Where a run's workers go.

    Attributes:
        num_workers: data-parallel ranks.
        use_gpu: ``"auto"`` (GPUs whenever the cluster has them), True or False.
        resources_per_worker: e.g. ``{"CPU": 1}`` (Train's default) or ``{"CPU": 0.5}``.
        max_failures: worker-group restarts (``br.train``) or trial retries (``br.tune``).
    """

    num_workers: int = 1
    use_gpu: bool | str = "auto"
    resources_per_worker: Mapping[str, float] | None = None
    max_failures: int = 0

    def __post_init__(self) -> None:
        problems: list[str] = []
        check_count(
            problems, "num_workers", self.num_workers, 1, MAX_WORKERS,
            "one process per worker; e.g. num_workers=4",
        )  # fmt: skip
        check_count(
            problems, "max_failures", self.max_failures, 0, MAX_FAILURES,
            "restarts of a failing group; e.g. max_failures=3",
        )  # fmt: skip
        if not (self.use_gpu == "auto" or isinstance(self.use_gpu, bool)):
            problems.append(f"use_gpu={self.use_gpu!r}: must be 'auto', True or False")
        resources = self.resources_per_worker
        if resources is not None and (
            not isinstance(resources, Mapping)
            or not all(
                isinstance(k, str)
                and isinstance(v, (int, float))
                and not isinstance(v, bool)
                and 0 < v < float("inf")
                for k, v in resources.items()
            )
        ):
            problems.append(
                f"resources_per_worker={resources!r}: must map resource names to numbers > 0, "
                "e.g. {'CPU': 1} or {'CPU': 0.5}"
            )
        if problems:
            raise ConfigError(problems)
        if resources is not None:
            object.__setattr__(self, "resources_per_worker", dict(resources))

    @property
    def cpus_per_worker(self) -> float:
        return float((self.resources_per_worker or {}).get("CPU", 1.0))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Placement:
        return cls(**d)
