"""A strongly convex quadratic bilevel family with every answer in closed form.

    f(x, y) = 1/2 x'Px + x'Qy + 1/2 y'Ry + p'x + r'y
    g(x, y) = 1/2 y'Ay - y'Bx - b'y                      (A symmetric positive definite)

    y*(x)        = A^{-1}(Bx + b) = Mx + m
    grad phi(x)  = grad_x f + M' grad_y f   at y = y*(x)
    x*           = -H^{-1}(p + Qm + M'(Rm + r)),  H = P + QM + M'Q' + M'RM  (made positive definite)
    y_gamma(x)   = argmin_y f/gamma + g = (A + R/gamma)^{-1}(Bx + b - (Q'x + r)/gamma)

and the penalty problem min_x F_gamma(x), F_gamma = min_y f + gamma (g - v), is quadratic too, so
its minimiser x_gamma (where PBGD, ALT-PBGD and F2SA converge at a fixed gamma) is exact:
||x_gamma - x*|| = O(1/gamma).

``flat=True`` builds the member in which f depends on y only through (y - y*(x))^2 (Q = -M'R,
r = -Rm): grad_y f(x, y*(x)) = 0, the upper level is flat at the lower solution, and PBGD-Free
converges to x* itself.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from bilevel_ray.data import BilevelBatch
from bilevel_ray.problem import ProblemSpec, factory_config
from bilevel_ray.problems.limits import MAX_SEED, SEED_RANGE, Limit, check_limits
from bilevel_ray.tree import Params

__all__ = ["LIMITS", "QuadraticProblem", "quadratic"]

# The closed forms solve dense dim x dim systems: at 4096 one float64 matrix is 128 MiB and a
# solve takes seconds; a larger member tests nothing a smaller one does not.
MAX_DIM = 4096
LIMITS = {
    "dim_x": Limit(1, MAX_DIM, 3, "the closed forms solve dense dim x dim systems"),
    "dim_y": Limit(1, MAX_DIM, 4, "the closed forms solve dense dim x dim systems"),
    "seed": Limit(0, MAX_SEED, 0, SEED_RANGE),
}


class QuadraticProblem:
    def __init__(
        self,
        dim_x: int = 3,
        dim_y: int = 4,
        seed: int = 0,
        flat: bool = False,
        dtype: torch.dtype = torch.float64,
        device: str | torch.device | None = None,
    ):
        gen = torch.Generator().manual_seed(seed)

        def rand(*shape: int) -> Tensor:
            # Drawn in float64 and cast: every dtype gets the same problem.
            return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

        eye_y = torch.eye(dim_y, dtype=dtype)
        a = rand(dim_y, dim_y)
        self.A = a @ a.T / dim_y + eye_y  # eigenvalues >= 1
        self.B = rand(dim_y, dim_x) / dim_x**0.5
        self.b = rand(dim_y)
        rr = rand(dim_y, dim_y)
        self.R = rr @ rr.T / dim_y  # positive semidefinite
        M, m = self.M, self.m
        if flat:
            self.Q = -M.T @ self.R
            self.r = -self.R @ m
        else:
            self.Q = rand(dim_x, dim_y) / dim_y**0.5
            self.r = rand(dim_y)
        curvature = self.Q @ M + M.T @ self.Q.T + M.T @ self.R @ M
        shift = max(0.0, -float(torch.linalg.eigvalsh(curvature).min())) + 1.0
        self.P = shift * torch.eye(dim_x, dtype=dtype)
        self.p = rand(dim_x)
        for name in ("A", "B", "b", "R", "Q", "r", "P", "p"):  # drawn on the CPU: same numbers
            setattr(self, name, getattr(self, name).to(device))

    @property
    def M(self) -> Tensor:
        return torch.linalg.solve(self.A, self.B)

    @property
    def m(self) -> Tensor:
        return torch.linalg.solve(self.A, self.b)

    def upper_loss(self, x: Params, y: Params, batch: Any) -> Tensor:
        xv, yv = x["x"], y["y"]
        return (
            0.5 * xv @ self.P @ xv
            + xv @ self.Q @ yv
            + 0.5 * yv @ self.R @ yv
            + self.p @ xv
            + self.r @ yv
        )

    def lower_loss(self, x: Params, y: Params, batch: Any) -> Tensor:
        yv = y["y"]
        return 0.5 * yv @ self.A @ yv - yv @ self.B @ x["x"] - self.b @ yv

    def lower_solution(self, x: Params) -> Params:
        return {"y": self.M @ x["x"] + self.m}

    def perturbed_solution(self, x: Params, gamma: float) -> Params:
        rhs = self.B @ x["x"] + self.b - (self.Q.T @ x["x"] + self.r) / gamma
        return {"y": torch.linalg.solve(self.A + self.R / gamma, rhs)}

    def hypergradient(self, x: Params) -> Params:
        y = self.lower_solution(x)["y"]
        grad_x_f = self.P @ x["x"] + self.Q @ y + self.p
        grad_y_f = self.Q.T @ x["x"] + self.R @ y + self.r
        return {"x": grad_x_f + self.M.T @ grad_y_f}

    def solution(self) -> Params:
        M, m = self.M, self.m
        hessian = self.P + self.Q @ M + M.T @ self.Q.T + M.T @ self.R @ M
        linear = self.p + self.Q @ m + M.T @ (self.R @ m + self.r)
        return {"x": -torch.linalg.solve(hessian, linear)}

    def penalty_solution(self, gamma: float) -> Params:
        """argmin_x F_gamma(x): F_gamma is quadratic, so exact gradients at 0 and e_i suffice."""
        dim_x = self.P.shape[0]
        grad0 = self._penalty_gradient(torch.zeros(dim_x, dtype=self.P.dtype), gamma)
        cols = [
            self._penalty_gradient(e, gamma) - grad0 for e in torch.eye(dim_x, dtype=self.P.dtype)
        ]
        return {"x": -torch.linalg.solve(torch.stack(cols, dim=1), grad0)}

    def _penalty_gradient(self, x: Tensor, gamma: float) -> Tensor:
        """grad F_gamma(x) = grad_x f(x, y_gam) + gamma (grad_x g(x, y_gam) - grad_x g(x, y*))."""
        y_gam = self.perturbed_solution({"x": x}, gamma)["y"]
        y_s = self.lower_solution({"x": x})["y"]
        return self.P @ x + self.Q @ y_gam + self.p + gamma * self.B.T @ (y_s - y_gam)


def quadratic(config: dict[str, Any] | None = None) -> ProblemSpec:
    c = factory_config(
        "quadratic", config, {"dtype": "float64", "dim_x": 3, "dim_y": 4, "seed": 0, "flat": False}
    )
    check_limits("quadratic", c, LIMITS)
    like = {"dtype": c.pop("dtype"), "device": c.pop("device")}
    problem = QuadraticProblem(**like, **c)
    return ProblemSpec(
        problem,
        {"x": torch.zeros(c["dim_x"], **like)},
        {"y": torch.zeros(c["dim_y"], **like)},
        defaults={"steps": 3000, "lr_x": 0.05, "lr_y": 0.2, "gamma": 10.0},
        eval_data=BilevelBatch(None, None),
    )
