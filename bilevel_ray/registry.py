"""The built-in problems by name, as ``module:factory`` references: the one place a new built-in
problem is registered. Nothing here imports torch, so the command line can list the names before
it parses (:data:`bilevel_ray.problems.BUILTIN_PROBLEMS` resolves them to the factories)."""

from __future__ import annotations

__all__ = ["BUILTIN_FACTORIES"]

BUILTIN_FACTORIES: dict[str, str] = {
    "toy-negative": "bilevel_ray.problems.toys:negative_toy",
    "toy-positive": "bilevel_ray.problems.toys:positive_toy",
    "quadratic": "bilevel_ray.problems.quadratic:quadratic",
    "regression": "bilevel_ray.problems.regression:regression",
    "representation": "bilevel_ray.problems.representation:representation",
    "hyperclean": "bilevel_ray.problems.hyperclean:hyperclean",
    "peft-dpo-sft": "bilevel_ray.problems.peft_dpo_sft:peft_dpo_sft",
}
