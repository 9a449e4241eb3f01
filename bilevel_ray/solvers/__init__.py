"""One solver per file, all of the same ``(init, step)`` shape; chosen by name through SOLVERS."""

from __future__ import annotations

from bilevel_ray.solvers.alt_pbgd import SETTINGS as ALT_PBGD_SETTINGS
from bilevel_ray.solvers.alt_pbgd import alt_pbgd
from bilevel_ray.solvers.base import (
    BilevelSolver,
    Setting,
    SolverState,
    state_from_dict,
    state_to_dict,
)
from bilevel_ray.solvers.bome import SETTINGS as BOME_SETTINGS
from bilevel_ray.solvers.bome import bome
from bilevel_ray.solvers.f2sa import SETTINGS as F2SA_SETTINGS
from bilevel_ray.solvers.f2sa import f2sa
from bilevel_ray.solvers.hypergradient import implicit_hypergradient
from bilevel_ray.solvers.implicit_cg import SETTINGS as IMPLICIT_CG_SETTINGS
from bilevel_ray.solvers.implicit_cg import implicit_cg
from bilevel_ray.solvers.pbgd import SETTINGS as PBGD_SETTINGS
from bilevel_ray.solvers.pbgd import pbgd
from bilevel_ray.solvers.pbgd_free import SETTINGS as PBGD_FREE_SETTINGS
from bilevel_ray.solvers.pbgd_free import pbgd_free

__all__ = [
    "SOLVERS",
    "SOLVER_SETTINGS",
    "BilevelSolver",
    "Setting",
    "SolverState",
    "alt_pbgd",
    "bome",
    "f2sa",
    "implicit_cg",
    "implicit_hypergradient",
    "pbgd",
    "pbgd_free",
    "state_from_dict",
    "state_to_dict",
]

SOLVERS = {
    "pbgd_free": pbgd_free,
    "pbgd": pbgd,
    "alt_pbgd": alt_pbgd,
    "f2sa": f2sa,
    "bome": bome,
    "implicit_cg": implicit_cg,
}

# Each method's own settings, as its file declares them (name -> Setting).
SOLVER_SETTINGS: dict[str, dict[str, Setting]] = {
    "pbgd_free": PBGD_FREE_SETTINGS,
    "pbgd": PBGD_SETTINGS,
    "alt_pbgd": ALT_PBGD_SETTINGS,
    "f2sa": F2SA_SETTINGS,
    "bome": BOME_SETTINGS,
    "implicit_cg": IMPLICIT_CG_SETTINGS,
}
