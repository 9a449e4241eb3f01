"""Runtimes: the in-process loop (no Ray) here; the Ray runtimes are imported only on use."""

from __future__ import annotations

from bilevel_ray.runtime.local import SolveResult, solve

__all__ = ["SolveResult", "solve"]
