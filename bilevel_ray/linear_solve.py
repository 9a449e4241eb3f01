"""Conjugate gradients over :data:`~bilevel_ray.tree.Params`, for the implicit-gradient baseline.

Solves ``A v = b`` for a symmetric positive definite operator given only as ``matvec`` (here a
Hessian-vector product ``v -> grad_y <grad_y g, v>``), so the Hessian is never formed.

Example:
    >>> import torch
    >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
    >>> b = {"v": torch.tensor([1.0, 2.0], dtype=torch.float64)}
    >>> v = solve_cg(lambda p: {"v": A @ p["v"]}, b, maxiter=2)
    >>> [round(float(c), 6) for c in v["v"]]
    [0.090909, 0.636364]
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from bilevel_ray.errors import ConfigError
from bilevel_ray.tree import Params, add_scaled, clone, vdot, zeros_like

__all__ = ["solve_cg"]


def solve_cg(
    matvec: Callable[[Params], Params],
    b: Params,
    maxiter: int,
    rtol: float = 1e-10,
    ridge: float = 0.0,
) -> Params:
    """At most ``maxiter`` CG iterations on ``(A + ridge I) v = b`` from ``v = 0``.

    Stops early once ``||r|| <= rtol * ||b||``. Two host syncs per iteration (the curvature
    check and the residual test): this serves a baseline, where exactness matters more.

    Raises:
        ConfigError: ``p' A p <= 0`` along a search direction: A is not positive definite (an
            over-parameterised or non-convex lower level); a ridge makes it so.
    """

    def op(p: Params) -> Params:
        ap = matvec(p)
        return add_scaled(ap, p, ridge) if ridge else ap

    v = zeros_like(b)
    r, p = clone(b), clone(b)
    rs = float(vdot(r, r))
    threshold = rs * rtol**2
    if rs == 0.0:
        return v
    for _ in range(maxiter):
        ap = op(p)
        curvature, norm_p = torch.stack([vdot(p, ap), vdot(p, p)]).tolist()
        if curvature <= 1e-14 * norm_p:
            raise ConfigError(
                f"CG: the lower-level Hessian is not positive definite along a search direction "
                f"(p'Hp = {curvature:.3g}); set cg_ridge > 0 (e.g. cg_ridge=1e-3) to regularise it"
            )
        alpha = rs / curvature
        torch._foreach_add_(list(v.values()), list(p.values()), alpha=alpha)
        torch._foreach_add_(list(r.values()), [ap[k] for k in r], alpha=-alpha)
        rs_new = float(vdot(r, r))
        if rs_new <= threshold:
            break
        torch._foreach_mul_(list(p.values()), rs_new / rs)
        torch._foreach_add_(list(p.values()), [r[k] for k in p])
        rs = rs_new
    return v
