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

from bilevel_ray.tree import Params, add_scaled, vdot

__all__ = ["solve_cg"]


def solve_cg(
    matvec: Callable[[Params], Params],
    b: Params,
    maxiter: int,
    rtol: float = 1e-10,
    ridge: float = 0.0,
) -> Params:
    """At most ``maxiter`` CG iterations on ``(A + ridge I) v = b`` from ``v = 0``.

    Stops early once ``||r|| <= rtol * ||b||`` (one host sync per iteration: this is a baseline,
    and exactness on small problems matters more than the sync).
    """

    def op(p: Params) -> Params:
        ap = matvec(p)
        return add_scaled(ap, p, ridge) if ridge else ap

    v = {k: torch.zeros_like(t) for k, t in b.items()}
    r = dict(b)
    p = dict(b)
    rs = vdot(r, r)
    threshold = float(rs) * rtol**2
    if float(rs) == 0.0:
        return v
    for _ in range(maxiter):
        ap = op(p)
        alpha = rs / vdot(p, ap)
        v = add_scaled(v, p, float(alpha))
        r = add_scaled(r, ap, -float(alpha))
        rs_new = vdot(r, r)
        if float(rs_new) <= threshold:
            break
        p = add_scaled(r, p, float(rs_new / rs))
        rs = rs_new
    return v
