"""Runtimes, one room each: ``local`` (the in-process run, no Ray), ``cluster`` (reaching Ray),
``train`` (Ray Train), ``tune`` (Ray Tune), ``compare`` and ``report``. Only the local room is
imported here; the Ray rooms load on use."""

from __future__ import annotations

from bilevel_ray.runtime.local.solve import SolveResult, solve

__all__ = ["SolveResult", "solve"]
