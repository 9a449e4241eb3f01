"""The paper's Table 2 protocol on text: bilevel LoRA (DPO) over the head (SFT) under one wall-clock
budget per method (phase S1), then a fresh head fitted on the frozen backbone (phase S2).

Setting: ``peft-dpo-sft`` on a user's text, here the local sample corpus
(``bilevel_ray.text.samples.write_samples``: templated questions about a table of fruits,
vegetables and animals, each preference row with a right and a wrong answer; its byte-level BPE
tokenizer; a seeded random Llama whose head is tied to its embeddings, as Llama-3.2's is). x =
LoRA adapters (rank 8 on q_proj / v_proj), f = DPO (beta 0.1) against the initial model; y = the
output head (untied by the problem), g = the SFT token NLL. Defaults: 2000 rows per set, a Llama
of width 128 with 4 layers and 4 heads (1.2 M parameters; the paper's Llama-3.2-3B at toy
scale), batch 16, Adam with one step size for both levels and every method (the paper does the
same), gamma 10, the paper script's inner loop length 3 for V-PBGD, BOME and ALT-PBGD and K = 1
for PBGD-Free, one torch thread per run.

The data is split once: 10 % of each set is held out (eval DPO, eval SFT), and the instruction
rows left are cut into two disjoint halves. S1 trains on the preference rows and instruction half
A; S2 fits on half B, as the paper's S2 fits a new head on a different SFT set: a disjoint half
of its instruction samples.

* S1: each of pbgd_free, pbgd (V-PBGD), bome and alt_pbgd (the library's ALT-PBGD, compared with
  the paper's ALRIGHT row: both keep two heads) runs from the same start (x0, y0), batches and
  seed for ``--budget-s`` seconds of step time; each completes a different number of steps, which
  is the point: a cheaper step buys more of them. At the end (x_T, y_T): eval DPO f on the
  held-out preferences, eval SFT (NLL per completion token) on the held-out instructions, and
  the problem's ``eval_metrics`` (reward accuracy, reward margin, perplexity).
* S2: the backbone x_T is frozen and a fresh head y~ (the base model's head, the same start for
  every method) is fitted by Adam on g over half B for ``--s2-steps`` steps (every method's
  backbone has the same shape, so equal steps are equal time). Reported: eval DPO f(x_T, y~) and
  the training SFT of y~ (NLL per completion token over all of half B).

Printed: the four columns per method with the paper's figure beside each, steps done, tokens per
second (non-pad preference and instruction tokens a step consumes), peak RSS growth, and, per
column, whether the ordering matches the paper's (which method is lowest; the whole ranking).
Each method runs in a fresh subprocess. Equal time is only fair on an otherwise idle machine:
the 1-minute load average at each run's start is printed.

Run from the repository root (about 7 minutes on 2 CPU cores; ``--quick`` about 1 minute)::

    .venv/bin/python benchmarks/peft_two_phase.py
    .venv/bin/python benchmarks/peft_two_phase.py --quick
    .venv/bin/python benchmarks/peft_two_phase.py --budget-s 120 --out two_phase.parquet
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from isolated_runs import reset_peak, run_child, status_mib

METHODS = ("pbgd_free", "pbgd", "bome", "alt_pbgd")
# The paper script's inner_stepsize (3) for the methods with an inner loop; PBGD-Free K = 1.
INNER_STEPS = {"pbgd_free": 1, "pbgd": 3, "bome": 3, "alt_pbgd": 3}
# Table 2 of the paper (Jiang et al., NeurIPS 2025), per method: (x_T, y_T) eval DPO, eval SFT;
# after S2 (x_T, y~) eval DPO, training SFT.
PAPER_NAME = {"pbgd_free": "PBGD-Free", "pbgd": "V-PBGD", "bome": "BOME", "alt_pbgd": "ALRIGHT"}
PAPER = {
    "pbgd": (0.8180, 1.0309, 0.8423, 0.9533),
    "bome": (0.8332, 1.1552, 0.8402, 0.9842),
    "alt_pbgd": (0.8055, 0.8656, 0.8201, 0.7855),
    "pbgd_free": (0.7837, 0.8516, 0.8088, 0.6688),
}
COLUMNS = (
    ("s1_eval_dpo", "S1 eval DPO"),
    ("s1_eval_sft", "S1 eval SFT"),
    ("s2_eval_dpo", "S2 eval DPO"),
    ("s2_train_sft", "S2 train SFT"),
)
GAMMA = 10.0
EVAL_FRACTION = 0.1
DEFAULTS = {"rows": 2000, "hidden": 128, "layers": 4, "heads": 4, "budget_s": 60.0}
DEFAULTS.update(s2_steps=600)
QUICK = {"rows": 400, "hidden": 64, "layers": 2, "heads": 4, "budget_s": 8.0, "s2_steps": 200}


# ---------------------------------------------------------------------------------------------
# The data: the sample corpus, split once into held-out rows and the two instruction halves.


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _write(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def write_data(folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The sample corpus in ``folder`` and the files of the split; returns the problem settings
    of S1 (``instruction`` = half A) and the path of half B."""
    from bilevel_ray.text.samples import write_samples

    samples = write_samples(
        folder / "samples",
        rows=args.rows,
        seed=args.seed,
        hidden=args.hidden,
        layers=args.layers,
        heads=args.heads,
    )
    rng = random.Random(args.seed)
    sets = {}
    for name, path in (("preference", samples.preference), ("instruction", samples.instruction)):
        rows = _read(path)
        rng.shuffle(rows)
        held = max(1, round(EVAL_FRACTION * len(rows)))
        sets[name], sets[f"eval_{name}"] = rows[held:], rows[:held]
    half = len(sets["instruction"]) // 2
    files = {
        "preference": _write(folder / "preference.jsonl", sets["preference"]),
        "eval_preference": _write(folder / "eval_preference.jsonl", sets["eval_preference"]),
        "instruction": _write(folder / "instruction_a.jsonl", sets["instruction"][:half]),
        "eval_instruction": _write(folder / "eval_instruction.jsonl", sets["eval_instruction"]),
    }
    return {
        "problem": {
            "model": str(samples.model),
            **files,
            "batch": args.batch,
            "seed": args.seed,
            "cache_dir": str(folder / "cache"),
        },
        "half_b": _write(folder / "instruction_b.jsonl", sets["instruction"][half:]),
        "sizes": {
            "preference": len(sets["preference"]),
            "eval_preference": len(sets["eval_preference"]),
            "half_a": half,
            "half_b": len(sets["instruction"]) - half,
            "eval_instruction": len(sets["eval_instruction"]),
        },
    }


# ---------------------------------------------------------------------------------------------
# One method, in its own process.


def _rows(batch: dict, start: int, stop: int) -> dict:
    return {k: v[start:stop] for k, v in batch.items()}


def eval_dpo(problem: Any, x: dict, y: dict, pref: dict, chunk: int) -> float:
    """f on the held-out preferences (a mean over rows), in chunks of ``chunk`` rows so that an
    evaluation never needs more memory than a training step."""
    import torch

    n, total = len(pref["chosen"]), 0.0
    with torch.no_grad():
        for i in range(0, n, chunk):
            part = _rows(pref, i, i + chunk)
            total += float(problem.upper_loss(x, y, part)) * len(part["chosen"])
    return total / n


def _token_nll(logits: Any, batch: dict) -> tuple[float, float]:
    """(sum of the completion tokens' NLL, their count) of one instruction batch."""
    from bilevel_ray.problems.dpo_sft_losses import sequence_logprob

    logp = sequence_logprob(logits, batch["ids"], batch["mask"])
    return -float(logp.double().sum()), float(batch["mask"][:, 1:].sum())


class HeadFit:
    """S2: a fresh head fitted by Adam on g over fixed batches of half B, the backbone x_T frozen.
    With the problem's features path the backbone runs once per batch (its output does not
    change); otherwise every step runs the whole model."""

    def __init__(self, problem: Any, x: dict, sft: dict, batch: int, seed: int):
        import torch

        from bilevel_ray.problems.dpo_sft_losses import trimmed

        self.problem, self.x = problem, x
        order = torch.randperm(len(sft["ids"]), generator=torch.Generator().manual_seed(seed))
        # Each batch is cut to its longest row, as a training step cuts it.
        self.batches = [
            trimmed({k: v[order[i : i + batch]] for k, v in sft.items()})
            for i in range(0, len(order), batch)
        ]
        self.features = None
        if hasattr(problem, "features"):
            with torch.no_grad():
                self.features = [problem.features(x, b, "lower") for b in self.batches]

    def loss(self, y: dict, i: int) -> Any:
        if self.features is None:
            return self.problem.lower_loss(self.x, y, self.batches[i])
        return self.problem.head_loss(y, self.features[i], self.batches[i], "lower")

    def fit(self, y0: dict, steps: int, lr: float, seed: int) -> dict:
        import torch

        y = {k: v.detach().clone().requires_grad_(True) for k, v in y0.items()}
        opt = torch.optim.Adam(list(y.values()), lr=lr)
        rng = random.Random(seed)
        order: list[int] = []
        for _ in range(steps):
            if not order:  # an epoch: every batch once, in a fresh order
                order = list(range(len(self.batches)))
                rng.shuffle(order)
            opt.zero_grad(set_to_none=True)
            loss = self.loss(y, order.pop())
            loss.backward()
            opt.step()
        return {k: v.detach() for k, v in y.items()}

    def train_sft(self, y: dict) -> float:
        """NLL per completion token of ``y`` over all of half B."""
        import torch
        import torch.nn.functional as F

        nll = tokens = 0.0
        with torch.no_grad():
            for i, b in enumerate(self.batches):
                if self.features is None:
                    forward = self.problem.inner._forward(self.x, y)
                    logits = forward(input_ids=b["ids"], use_cache=False).logits
                else:
                    name = self.problem.head_name
                    w, bias = y[f"{name}.weight"], y.get(f"{name}.bias")
                    logits = F.linear(self.features[i], w, bias)
                got = _token_nll(logits, b)
                nll, tokens = nll + got[0], tokens + got[1]
        return nll / max(tokens, 1.0)


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    """S1 for ``job["budget_s"]`` seconds of steps, then S2; one row of numbers."""
    import torch

    import bilevel_ray as br
    from bilevel_ray.data import as_batches
    from bilevel_ray.evaluation import held_out_metrics
    from bilevel_ray.problems.peft_dpo_sft import peft_dpo_sft

    method, seed = job["method"], job["seed"]
    torch.set_num_threads(job["threads"])
    load = os.getloadavg()[0]
    spec = peft_dpo_sft(job["problem"])
    # Half B through the same tokenizer and cache (only its data is used: its model is dropped).
    half_b = peft_dpo_sft({**job["problem"], "instruction": job["half_b"]}).data.lower
    problem, pref_eval = spec.problem, spec.eval_data.upper
    fresh_head = {k: v.detach().clone() for k, v in spec.y0.items()}
    chunk = job["problem"]["batch"]
    start = {
        "start_eval_dpo": eval_dpo(problem, spec.x0, spec.y0, pref_eval, chunk),
        "start_eval_sft": held_out_metrics(problem, spec.x0, spec.y0, spec.eval_data)[
            "eval/sft_loss"
        ],
    }

    options: dict[str, Any] = {"optimizer": "adam", "lr_x": job["lr"], "lr_y": job["lr"]}
    options["inner_steps"] = INNER_STEPS[method]
    if method != "bome":
        options["gamma"] = GAMMA
    solver = br.SolverConfig(method=method, **options).build(problem)
    state = solver.init(spec.x0, spec.y0)
    torch.manual_seed(seed)
    batches = as_batches(spec.data, seed)
    gc.collect()
    reset = reset_peak()
    base_mb = status_mib("VmRSS" if reset else "VmHWM")
    steps, tokens, finite = 0, torch.zeros((), dtype=torch.int64), True
    started = time.perf_counter()
    while time.perf_counter() - started < job["budget_s"]:
        batch = next(batches)
        state, metrics = solver.step(state, batch)
        tokens += problem.batch_tokens(batch)
        steps += 1
    train_s = time.perf_counter() - started
    finite = all(math.isfinite(float(v)) for k, v in metrics.items() if "loss" in k)
    peak_mb = status_mib("VmHWM")

    x_t = {k: v.detach() for k, v in state.x.items()}
    s1 = held_out_metrics(problem, x_t, state.y, spec.eval_data)
    row = {
        "method": method,
        "paper_name": PAPER_NAME[method],
        "inner_steps": INNER_STEPS[method],
        "steps": steps,
        "train_s": train_s,
        "ms_per_step": 1e3 * train_s / max(steps, 1),
        "tokens_per_s": int(tokens) / train_s,
        "finite": finite,
        "s1_eval_dpo": eval_dpo(problem, x_t, state.y, pref_eval, chunk),
        "s1_eval_sft": s1["eval/sft_loss"],
        "s1_reward_accuracy": s1["eval/reward_accuracy"],
        "s1_reward_margin": s1["eval/reward_margin"],
        "s1_sft_perplexity": s1["eval/sft_perplexity"],
        "peak_rss_growth_mb": max(peak_mb - base_mb, 0.0),
        "peak_reset": reset,
        "load_avg": load,
        **start,
    }

    fit_started = time.perf_counter()
    head = HeadFit(problem, x_t, half_b, chunk, seed)
    y_new = head.fit(fresh_head, job["s2_steps"], job["s2_lr"], seed)
    s2 = held_out_metrics(problem, x_t, y_new, spec.eval_data)
    row.update(
        s2_s=time.perf_counter() - fit_started,
        s2_eval_dpo=eval_dpo(problem, x_t, y_new, pref_eval, chunk),
        s2_train_sft=head.train_sft(y_new),
        s2_start_train_sft=head.train_sft(fresh_head),
        s2_eval_sft=s2["eval/sft_loss"],
        s2_reward_accuracy=s2["eval/reward_accuracy"],
    )
    return row


# ---------------------------------------------------------------------------------------------
# The driver: the data, one subprocess per method, the table.


def _ranking(values: dict[str, float]) -> list[str]:
    return sorted(values, key=lambda m: values[m])


def report(rows: list[dict[str, Any]], args: argparse.Namespace, data: dict) -> bool:
    """The table and the ordering; True when the lowest method of every column is the paper's."""
    by = {r["method"]: r for r in rows}
    first, loads = rows[0], [r["load_avg"] for r in rows]
    sizes = data["sizes"]
    print(
        f"\nstart (every method): eval DPO {first['start_eval_dpo']:.4f} (log 2 = 0.6931), eval "
        f"SFT {first['start_eval_sft']:.4f}; rows: {sizes['preference']} preference "
        f"(+{sizes['eval_preference']} held out), instruction half A {sizes['half_a']} (S1) / "
        f"half B {sizes['half_b']} (S2) (+{sizes['eval_instruction']} held out)"
    )
    print(
        f"S1 budget {args.budget_s:g} s of steps per method; S2 {args.s2_steps} Adam steps "
        f"(lr {args.s2_lr:g}) on a fresh head; 1-min load average at the runs' starts "
        f"{min(loads):.1f} to {max(loads):.1f} on {os.cpu_count()} CPUs"
    )
    print("\nTable 2 protocol: ours (paper) per column, lower is better")
    head = f"{'method':<10} {'paper row':<9} " + " ".join(f"{label:>17}" for _, label in COLUMNS)
    print(head)
    for method in METHODS:
        r = by[method]
        cells = [f"{r[key]:>8.4f} ({PAPER[method][i]:.4f})" for i, (key, _) in enumerate(COLUMNS)]
        print(f"{method:<10} {PAPER_NAME[method]:<9} " + " ".join(cells))
    print(
        f"\n{'method':<10} {'K':>2} {'steps':>6} {'ms/step':>8} {'tokens/s':>9} "
        f"{'reward acc':>10} {'margin':>8} {'eval ppl':>9} {'S2 start SFT':>12} "
        f"{'S2 s':>5} {'peak RSS +MiB':>13}"
    )
    for method in METHODS:
        r = by[method]
        print(
            f"{method:<10} {r['inner_steps']:>2} {r['steps']:>6} {r['ms_per_step']:>8.1f} "
            f"{r['tokens_per_s']:>9.0f} {r['s1_reward_accuracy']:>10.3f} "
            f"{r['s1_reward_margin']:>8.4f} {r['s1_sft_perplexity']:>9.2f} "
            f"{r['s2_start_train_sft']:>12.4f} {r['s2_s']:>5.1f} {r['peak_rss_growth_mb']:>13.1f}"
        )
    free = by["pbgd_free"]
    print("\nsteps and tokens/s, pbgd_free / other (same budget):")
    for other in METHODS[1:]:
        print(
            f"  vs {other:<9} steps {free['steps'] / max(by[other]['steps'], 1):.2f}x, tokens/s "
            f"{free['tokens_per_s'] / by[other]['tokens_per_s']:.2f}x"
        )
    print("\nordering per column (lowest first):")
    lowest_all = True
    for i, (key, label) in enumerate(COLUMNS):
        ours = _ranking({m: by[m][key] for m in METHODS})
        paper = _ranking({m: PAPER[m][i] for m in METHODS})
        low = ours[0] == paper[0]
        lowest_all &= low
        print(
            f"  {label:<13} ours  {' < '.join(ours)}\n  {'':<13} paper {' < '.join(paper)}\n"
            f"  {'':<13} lowest {'MATCH' if low else 'DIFFERS'} ({ours[0]} vs {paper[0]}), "
            f"whole ranking {'MATCH' if ours == paper else 'DIFFERS'}"
        )
    print(
        f"lowest method of every column is the paper's (pbgd_free): "
        f"{'MATCH' if lowest_all else 'DIFFERS'}"
    )
    if not all(r["finite"] for r in rows):
        print("NOTE: a run ended with a non-finite loss")
    return lowest_all


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, about 1 minute")
    parser.add_argument("--rows", type=int, help="rows per sample set (default 2000)")
    parser.add_argument("--hidden", type=int, help="model width (default 128)")
    parser.add_argument("--layers", type=int, help="decoder layers (default 4)")
    parser.add_argument("--heads", type=int, help="attention heads (default 4)")
    parser.add_argument("--budget-s", type=float, help="S1 step time per method (default 60)")
    parser.add_argument("--s2-steps", type=int, help="S2 head steps (default 600)")
    parser.add_argument("--batch", type=int, default=16, help="rows per level and step")
    parser.add_argument("--lr", type=float, default=3e-3, help="Adam step size of S1, both levels")
    parser.add_argument("--s2-lr", type=float, default=3e-3, help="Adam step size of S2")
    parser.add_argument("--seed", type=int, default=0, help="data, model, batches")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--work", type=Path, help="folder for the data (default: a temporary one)")
    parser.add_argument("--out", type=Path, help="also write the rows to this Parquet file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        print(json.dumps(run_one(json.loads(args.worker))))
        return
    sizes = QUICK if args.quick else DEFAULTS
    for key, value in sizes.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.budget_s <= 0 or args.s2_steps < 1 or args.lr <= 0 or args.threads < 1:
        parser.error("need --budget-s > 0, --s2-steps >= 1, --lr > 0, --threads >= 1")

    import torch

    started = time.perf_counter()
    print(
        f"torch {torch.__version__}, {args.threads} thread(s) per run; sample corpus of "
        f"{args.rows} rows per set, Llama width {args.hidden}, {args.layers} layers, "
        f"{args.heads} heads; batch {args.batch}; Adam lr {args.lr:g} (both levels, every "
        f"method), gamma {GAMMA:g}",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as scratch:
        folder = args.work or Path(scratch)
        data = write_data(folder, args)
        # Tokenize and compute the reference log-probabilities once, here: every run reads them
        # from the cache, so no run's budget or start pays for them.
        from bilevel_ray.problems.peft_dpo_sft import peft_dpo_sft

        built = time.perf_counter()
        spec = peft_dpo_sft(data["problem"])
        peft_dpo_sft({**data["problem"], "instruction": data["half_b"]})
        params = sum(p.numel() for p in spec.problem.model.parameters())
        head = sum(v.numel() for v in spec.y0.values())
        print(
            f"model {params / 1e6:.2f} M parameters (head y {head:,}); data tokenized and "
            f"reference computed in {time.perf_counter() - built:.1f} s",
            flush=True,
        )
        del spec
        rows = []
        for method in METHODS:
            job = {
                "method": method,
                "problem": data["problem"],
                "half_b": data["half_b"],
                "budget_s": args.budget_s,
                "s2_steps": args.s2_steps,
                "s2_lr": args.s2_lr,
                "lr": args.lr,
                "seed": args.seed,
                "threads": args.threads,
            }
            row = run_child(__file__, job, 4 * args.budget_s + 600, method)
            print(
                f"  {method:<10} {row['steps']:>6} steps in {row['train_s']:.0f} s, S1 eval DPO "
                f"{row['s1_eval_dpo']:.4f}, eval SFT {row['s1_eval_sft']:.4f}; S2 eval DPO "
                f"{row['s2_eval_dpo']:.4f}, train SFT {row['s2_train_sft']:.4f}",
                flush=True,
            )
            rows.append(row)
    report(rows, args, data)
    if args.out is not None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        common = {k: getattr(args, k) for k in ("budget_s", "s2_steps", "lr", "s2_lr", "seed")}
        common.update(rows_per_set=args.rows, hidden=args.hidden, layers=args.layers)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist([{**r, **common} for r in rows]), args.out)
        print(f"\nwrote {args.out}")
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
