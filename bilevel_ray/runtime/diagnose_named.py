"""``br.diagnose`` on a problem named as on the command line (a built-in, ``file.py:factory``
or ``package.module:factory``), with the problem's own suggested warm-up settings: what
``bilevel-ray diagnose`` and ``bilevel-ray compare`` run. No Ray."""

from __future__ import annotations

import inspect
from typing import Any

from bilevel_ray.config import SolverConfig
from bilevel_ray.diagnostics import diagnose
from bilevel_ray.errors import ConfigError
from bilevel_ray.problems import build_spec

__all__ = ["diagnose_problem"]


def diagnose_problem(
    problem: str, problem_config: dict[str, Any], gamma: float | None, **options: Any
) -> tuple[Any, dict[str, Any]]:
    """``br.diagnose`` on a problem named as on the command line, with the problem's suggested
    warm-up settings (its step sizes, optimizer and gamma) unless given. Returns the verdict and
    the settings it ran with (every option of ``br.diagnose``, defaults included).

    ``progress=True`` shows progress lines when this version of ``br.diagnose`` has them."""
    progress = bool(options.pop("progress", False))
    allowed = [
        p.name
        for p in inspect.signature(diagnose).parameters.values()
        if p.kind == p.KEYWORD_ONLY and p.name != "progress"
    ]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ConfigError(
            f"unknown option(s) {unknown}; br.diagnose takes: {', '.join(allowed)} (and --gamma)"
        )
    spec = build_spec(problem, problem_config)
    suggested = SolverConfig.applicable("pbgd_free", spec.defaults)
    warmup = {
        k: v
        for k, v in suggested.items()
        if k in ("lr_x", "lr_y", "inner_steps", "optimizer") and isinstance(v, (int, float, str))
    }
    gamma = gamma if gamma is not None else suggested.get("gamma", 10.0)
    parameters = inspect.signature(diagnose).parameters
    if progress and "progress" in parameters:
        options["progress"] = True
    chosen = {**warmup, **options}
    if "eval_data" in parameters and getattr(spec, "eval_data", None) is not None:
        chosen.setdefault("eval_data", spec.eval_data)  # the outcome is judged on held-out data
    verdict = diagnose(spec.problem, spec.x0, spec.y0, gamma, data=spec.data, **chosen)
    used = {"gamma": gamma}
    used.update({k: p.default for k in allowed if (p := parameters[k]).default is not p.empty})
    used.update(chosen)
    used.pop("progress", None)
    used.pop("eval_data", None)
    return verdict, used
