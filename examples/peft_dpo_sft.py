"""Bilevel fine-tuning of a small causal LM: LoRA adapters on DPO (upper) over the head on SFT
(lower), the PBGD-Free paper's main experiment at toy scale (the ``peft-dpo-sft`` problem).

x = the LoRA adapters (q_proj, v_proj), y = the output head ``lm_head``; f = the DPO loss on a
generated preference set against the initial model, g = the SFT token NLL on a generated
instruction set. Prints progress, then the held-out DPO and SFT losses before and after.

Run (needs ``pip install 'bilevel_ray[peft]'``; a minute or two on a CPU)::

    python examples/peft_dpo_sft.py
    python examples/peft_dpo_sft.py --method pbgd --seconds 60
    python examples/peft_dpo_sft.py --config vocab=128 --config hidden=64 --steps 2000
    python examples/peft_dpo_sft.py --config model=llama-100m --config vocab=32000 \
        --config batch=8 --config n_pref=64 --config n_sft=64 --config n_eval=16 \
        --precision bf16 --grad-accumulation 2 --in-place --steps 5

The last one is the realistic shape (a 105.8 M-parameter Llama with a 32 000-token vocabulary,
random weights, no download: a few seconds per step on one CPU thread) in bfloat16 autocast,
each step's batch in 2 micro-batches, the model's own parameters as the solver's only copy.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import bilevel_ray as br
from bilevel_ray.config import METHOD_OPTIONS
from bilevel_ray.problems.peft_dpo_sft import peft_dpo_sft


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", default="pbgd_free", choices=list(br.SOLVERS))
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=int, default=1000, help="iterations (default 1000)")
    budget.add_argument("--seconds", type=float, help="run for this wall-clock time instead")
    parser.add_argument("--seed", type=int, default=0, help="model, data and run seed")
    parser.add_argument("--gamma", type=float, default=10.0, help="penalty, if the method has one")
    parser.add_argument("--lr", type=float, default=3e-3, help="Adam step size, both levels")
    parser.add_argument("--inner-steps", type=int, help="K (default: the method's own)")
    parser.add_argument("--report-every", type=int, default=50)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--grad-accumulation", type=int, default=1, help="micro-batches per step")
    parser.add_argument(
        "--in-place", action="store_true", help="update the model's parameters (one copy)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="problem setting, e.g. --config vocab=128 (VALUE read as JSON, else a string)",
    )
    return parser.parse_args()


def problem_config(pairs: list[str], seed: int) -> dict[str, Any]:
    config: dict[str, Any] = {"seed": seed}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep:
            raise SystemExit(f"--config {pair!r}: expected KEY=VALUE, e.g. --config vocab=128")
        try:
            config[key] = json.loads(raw)
        except json.JSONDecodeError:
            config[key] = raw
    return config


def run(spec: br.ProblemSpec, args: argparse.Namespace, options: dict[str, Any]) -> br.SolveResult:
    """br.solve for ``--steps``; for ``--seconds``, the same run extended block by block (each
    call resumes the previous one's checkpoint: the same batches and optimizer state as one
    uninterrupted run) until the time is spent."""
    common = {
        "method": args.method,
        "data": spec.data,
        "seed": args.seed,
        "report_every": args.report_every,
        "progress": True,
        **options,
    }
    if args.seconds is None:
        return br.solve(spec.problem, spec.x0, spec.y0, steps=args.steps, **common)
    start, steps = time.perf_counter(), args.report_every
    with tempfile.TemporaryDirectory() as folder:
        while True:
            result = br.solve(
                spec.problem,
                spec.x0,
                spec.y0,
                steps=steps,
                checkpoint_path=Path(folder) / "run.pt",
                resume=True,
                **common,
            )
            # The next block, sized from the speed so far, ends near the budget.
            elapsed = time.perf_counter() - start
            blocks = round((args.seconds - elapsed) * steps / elapsed / args.report_every)
            if blocks <= 0:
                return result
            steps += blocks * args.report_every


def eval_losses(spec: br.ProblemSpec, x: br.Params, y: br.Params) -> tuple[float, float]:
    with torch.no_grad():
        dpo = spec.problem.upper_loss(x, y, spec.eval_data.upper)
        sft = spec.problem.lower_loss(x, y, spec.eval_data.lower)
    return float(dpo), float(sft)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    try:
        spec = peft_dpo_sft(problem_config(args.config, args.seed))
    except br.ConfigError as err:
        raise SystemExit(f"error: {err}") from None
    options = {**br.SolverConfig.applicable(args.method, spec.defaults), "lr_x": args.lr}
    options["lr_y"] = args.lr
    options.pop("steps", None)
    if "gamma" in METHOD_OPTIONS[args.method]:  # BOME and implicit_cg have no penalty
        options["gamma"] = args.gamma
    if args.inner_steps is not None:
        options["inner_steps"] = args.inner_steps
    options["precision"] = args.precision
    options["grad_accumulation"] = args.grad_accumulation
    options["in_place"] = args.in_place
    n_x = sum(t.numel() for t in spec.x0.values())
    n_y = sum(t.numel() for t in spec.y0.values())
    print(f"x = LoRA adapters: {len(spec.x0)} tensors, {n_x} parameters")
    print(f"y = output head {', '.join(spec.y0)}: {n_y} parameters")
    dpo0, sft0 = eval_losses(spec, spec.x0, spec.y0)
    try:
        result = run(spec, args, options)
    except br.ConfigError as err:
        raise SystemExit(f"error: {err}") from None
    dpo, sft = eval_losses(spec, result.x, result.y)
    last = result.history.to_pylist()[-1]
    print(f"{args.method}: {last['step']} steps in {last['time/elapsed_s']:.1f} s")
    print(f"eval DPO loss: {dpo0:.4f} -> {dpo:.4f}")
    print(f"eval SFT loss: {sft0:.4f} -> {sft:.4f}")


if __name__ == "__main__":
    main()
