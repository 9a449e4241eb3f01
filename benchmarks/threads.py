"""Where does a second torch thread start to pay for an in-process run?

PBGD-Free steps (Adam, gamma 10) on MLP feature extractors under a linear head, as
``examples/sklearn_nets.py`` builds them, from a few thousand to a few million parameters, at
batch sizes 32 and 256, timed side by side with 1 and with 2 (or ``--threads``) torch threads in
one run. Prints ms per step at each count and the ratio; ``bilevel_ray.runtime.local.threads``'s
``SMALL_PROBLEM_PARAMETERS`` is set from where the ratio first favours more threads. Run it on
an idle machine and under load (e.g. ``stress --cpu 4`` beside it) to see both.

    .venv/bin/python benchmarks/threads.py [--steps 200] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import torch

import bilevel_ray as br


class HeadOnMLP:
    def upper_loss(self, x, y, batch):
        return self._loss(x, y, batch)

    def lower_loss(self, x, y, batch):
        return self._loss(x, y, batch) + 1e-3 * (y["w"] ** 2).sum()

    @staticmethod
    def _loss(x, y, batch):
        inputs, targets = batch
        h = torch.tanh(torch.tanh(inputs @ x["w0"]) @ x["w1"])
        return torch.nn.functional.cross_entropy(h @ y["w"], targets)


def step_ms(width: int, batch: int, steps: int, threads: int) -> tuple[int, float]:
    """(parameters, ms per PBGD-Free step) for a 64-width-width MLP, 10 classes."""
    gen = torch.Generator().manual_seed(0)
    inputs = torch.randn(4096, 64, generator=gen)
    targets = torch.randint(0, 10, (4096,), generator=gen)
    x0 = {
        "w0": torch.randn(64, width, generator=gen) / 8,
        "w1": torch.randn(width, width, generator=gen) / width**0.5,
    }
    y0 = {"w": torch.zeros(width, 10)}
    data = br.minibatches((inputs, targets), (inputs, targets), batch)
    size = sum(v.numel() for v in (*x0.values(), *y0.values()))
    torch.set_num_threads(threads)
    settings = {"lr_x": 1e-3, "lr_y": 1e-2, "gamma": 10.0, "optimizer": "adam"}
    br.solve(HeadOnMLP(), x0, y0, steps=10, data=data, report_every=10, **settings)  # warm up
    start = time.perf_counter()
    br.solve(HeadOnMLP(), x0, y0, steps=steps, data=data, report_every=steps, **settings)
    return size, 1e3 * (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    print(f"{'parameters':>11} {'batch':>6} {'1 thread ms':>12} {args.threads} threads ms  ratio")
    for width in (16, 64, 256, 512, 1024, 2048):
        for batch in (32, 256):
            size, one = step_ms(width, batch, args.steps, 1)
            _, many = step_ms(width, batch, args.steps, args.threads)
            print(f"{size:>11,} {batch:>6} {one:>12.3f} {many:>13.3f}  {one / many:>5.2f}x")


if __name__ == "__main__":
    main()
