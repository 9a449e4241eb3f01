"""Quick start: PBGD-Free where it works, where it does not, and how to tell them apart.

1. The paper's negative toy (f = 10y + x^2, g = (y - x + 1)^2): PBGD-Free stops at the biased point
   x = 0 while a value-function method (ALT-PBGD) reaches the bilevel solution x* = -5.
2. A quadratic bilevel problem whose upper level is flat at the lower solution: PBGD-Free reaches
   x* exactly, with one lower and one upper gradient per step.
3. The same solver on nn.Modules: a feature extractor (x) and a linear head (y), minibatches.

Run:  python examples/quickstart.py     (about 10 s on a 2-CPU machine; see README.md)

The tensors here are tiny, so the script runs torch on one thread: a second one only adds
synchronisation (on a busy 2-CPU machine it made the run several times slower).
"""

from __future__ import annotations

import time

import torch
from torch import nn

import bilevel_ray as br


def negative_toy() -> None:
    spec = br.problems.BUILTIN_PROBLEMS["toy-negative"]({})
    print("1. negative toy: f = 10y + x^2, g = (y - x + 1)^2, bilevel solution x* = -5")
    for method, options in (("pbgd_free", {}), ("alt_pbgd", {"inner_steps": 10})):
        start = time.perf_counter()
        res = br.solve(
            spec.problem,
            spec.x0,
            spec.y0,
            method=method,
            steps=1000,
            lr_x=0.01,
            lr_y=0.1,
            gamma=10.0,
            **options,
        )
        x = float(res.x["x"])
        took = time.perf_counter() - start
        print(f"   {method:10s} x = {x:+.4f}   phi'(x) = {2 * x + 10:+.4f}  ({took:.2f} s)")
    print("   PBGD-Free drops gamma * (grad_x g(x, y_gamma) - grad_x g(x, y*)) = 10 here: f is")
    print("   linear in y (not flat), so the bias stays at any gamma.\n")


def flat_quadratic() -> None:
    problem = br.problems.QuadraticProblem(dim_x=5, dim_y=8, seed=1, flat=True)
    x0, y0 = {"x": torch.zeros(5, dtype=torch.float64)}, {"y": torch.zeros(8, dtype=torch.float64)}
    print("2. a quadratic whose upper level depends on y only through (y - y*(x))^2 (flat)")
    for method in ("pbgd_free", "implicit_cg"):
        start = time.perf_counter()
        res = br.solve(
            problem,
            x0,
            y0,
            method=method,
            steps=1000,
            lr_x=0.05,
            lr_y=0.2,
            **({"gamma": 10.0} if method == "pbgd_free" else {}),
        )
        error = float((res.x["x"] - problem.solution()["x"]).norm())
        print(f"   {method:11s} ||x - x*|| = {error:.1e}  ({time.perf_counter() - start:.2f} s)")
    print()


def modules() -> None:
    print("3. nn.Modules: x = an MLP feature extractor, y = a linear head, minibatches of 64")
    torch.manual_seed(0)
    extractor = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU())
    head = nn.Linear(16, 1)

    def mse(features, predict, batch):
        inputs, targets = batch
        return ((predict(features(inputs)).squeeze(-1) - targets) ** 2).mean()

    problem, x0, y0 = br.split_module_problem(extractor, head, upper_loss=mse, lower_loss=mse)
    weights = torch.randn(8)
    groups = []
    for shift in (0.0, 0.3):
        inputs = torch.randn(1024, 8)
        groups.append((inputs, torch.tanh(inputs @ (weights + shift)) + 0.05 * torch.randn(1024)))
    res = br.solve(
        problem,
        x0,
        y0,
        data=br.minibatches(groups[0], groups[1], batch_size=64),
        steps=600,
        lr_x=1e-3,
        lr_y=1e-2,
        gamma=10.0,
        optimizer="adam",
        report_every=100,
        progress=True,
    )
    first, last = res.history.to_pylist()[0], res.history.to_pylist()[-1]
    print(
        f"   upper loss {first['upper/loss']:.4f} -> {last['upper/loss']:.4f} "
        f"in {last['time/elapsed_s']:.1f} s"
    )


if __name__ == "__main__":
    torch.set_num_threads(1)
    started = time.perf_counter()
    negative_toy()
    flat_quadratic()
    modules()
    print(f"\nquick start done in {time.perf_counter() - started:.1f} s")
