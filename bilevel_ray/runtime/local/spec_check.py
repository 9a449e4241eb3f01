"""What every run needs of a factory's ``ProblemSpec``, checked on the driver before any work
starts (``br.train``, ``br.tune`` and ``br.compare`` share it)."""

from __future__ import annotations

from collections.abc import Mapping

from bilevel_ray.data import BilevelBatch
from bilevel_ray.errors import ConfigError
from bilevel_ray.problem import ProblemSpec, check_params, check_problem

__all__ = ["check_spec"]


def check_spec(spec: ProblemSpec, *, needs_eval: bool) -> None:
    """Each field of the factory's ProblemSpec has the type a run needs."""
    check_problem(spec.problem)
    check_params(spec.x0, spec.y0)
    if not isinstance(spec.defaults, Mapping):
        raise ConfigError(
            f"ProblemSpec.defaults is a {type(spec.defaults).__name__}: it must be a dict of "
            "solver settings, e.g. defaults={'lr_y': 0.01, 'steps': 500}, or left out"
        )
    if spec.eval_data is None and needs_eval:
        raise ConfigError(
            "tune scores trials on held-out data: the factory must return eval_data="
            "br.BilevelBatch(upper_heldout, lower_sample) in its ProblemSpec"
        )
    if spec.eval_data is not None and not isinstance(spec.eval_data, BilevelBatch):
        raise ConfigError(
            f"ProblemSpec.eval_data is a {type(spec.eval_data).__name__}: it must be "
            "br.BilevelBatch(upper_heldout, lower_sample), the held-out upper-level batch and a "
            "lower-level sample, e.g. eval_data=br.BilevelBatch(*eval_data)"
        )
