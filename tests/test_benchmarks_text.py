"""The text benchmarks run end to end at their smallest sizes, each in a subprocess as a user
runs it: the two-phase protocol (``benchmarks/peft_two_phase.py``), the text mode of
``benchmarks/peft_scale.py`` (against TRL's DPO step when TRL is installed) and the text check
of ``benchmarks/gpu_check.py`` (rehearsed on the CPU; without a GPU its default run refuses
cleanly). Each printed table must hold its columns and finite numbers."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.slow,  # each run starts processes that import torch and transformers
    pytest.mark.skipif(
        find_spec("peft") is None or find_spec("transformers") is None,
        reason="needs pip install 'bilevel_ray[peft]'",
    ),
]

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("pbgd_free", "pbgd", "bome", "alt_pbgd")
NUMBER = r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?"


def _run(args: list[str], tmp_path: Path, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "BILEVEL_RAY_CACHE": str(tmp_path / "cache")}
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )


def _numbers(line: str) -> list[float]:
    return [float(v) for v in re.findall(NUMBER, line)]


def _row(out: str, first: str, after: str) -> str:
    """The first line starting with ``first`` after the line that contains ``after``."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if after in line)
    return next(line for line in lines[start:] if line.split()[:1] == [first])


def test_the_two_phase_benchmark_prints_the_four_columns_beside_the_paper(tmp_path):
    args = ["benchmarks/peft_two_phase.py", "--quick", "--rows", "100", "--budget-s", "1.5"]
    args += ["--s2-steps", "5", "--batch", "4", "--out", str(tmp_path / "two.parquet")]
    done = _run(args, tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    header = next(line for line in out.splitlines() if "paper row" in line)
    for column in ("S1 eval DPO", "S1 eval SFT", "S2 eval DPO", "S2 train SFT"):
        assert column in header
    paper = {"pbgd_free": 0.7837, "pbgd": 0.8180, "bome": 0.8332, "alt_pbgd": 0.8055}
    for method in METHODS:
        line = _row(out, method, "paper row")
        values = _numbers(line)
        assert len(values) == 8 and all(math.isfinite(v) for v in values), line
        assert values[1] == paper[method]  # the paper's figure beside ours
        stats = _numbers(_row(out, method, "ms/step"))
        assert stats[1] >= 1 and stats[3] > 0  # steps done, tokens/s
    assert out.count("lowest MATCH") + out.count("lowest DIFFERS") == 4  # one per column
    assert out.count("whole ranking") == 4
    assert "lowest method of every column is the paper's" in out
    pq = pytest.importorskip("pyarrow.parquet")
    table = pq.read_table(tmp_path / "two.parquet")
    assert table.num_rows == 4
    assert {"s1_eval_dpo", "s1_eval_sft", "s2_eval_dpo", "s2_train_sft"} <= set(table.column_names)


def test_the_text_mode_of_peft_scale_compares_with_trl_and_a_plain_sft_step(tmp_path):
    done = _run(["benchmarks/peft_scale.py", "--text", "--quick", "--steps", "1"], tmp_path, 900)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    header = next(line for line in out.splitlines() if "tokens/step" in line)
    for column in ("s/step", "tokens/step", "tokens/s", "peak MB", "train +MB"):
        assert column in header
    names = ["pbgd_free", "pbgd", "alt_pbgd", "sft_step"]
    have_trl = find_spec("trl") is not None
    if have_trl:
        names += ["trl_dpo", "trl_dpo_pre"]
    else:
        assert "TRL is not installed" in out
    lines = out.splitlines()
    start = lines.index(header) + 1
    table = lines[start : start + 2 * len(names)]  # with and without gradient checkpointing
    assert sorted(line.split()[0] for line in table) == sorted(names * 2), table
    for line in table:
        values = _numbers(line.split(maxsplit=2)[2])
        assert values and all(math.isfinite(v) for v in values), line
        assert line.rstrip().endswith("True"), line  # every loss finite
    # rows of ~256 tokens, none cut
    low, high = re.search(r"rows of (\d+) to (\d+) tokens", out).groups()
    assert 200 <= int(low) <= int(high) <= 256
    if have_trl:
        assert "vs TRL DPO step: tokens/s" in out and "targets:" in out
        ratios = re.findall(rf"tokens/s ({NUMBER})x", out)
        assert ratios and all(math.isfinite(float(r)) and float(r) > 0 for r in ratios)


def test_gpu_check_rehearses_the_text_path_on_the_cpu_and_refuses_cleanly_without_cuda(
    tmp_path,
):
    args = ["benchmarks/gpu_check.py", "--device", "cpu", "--quick", "--text-steps", "1"]
    done = _run([*args, "--out", str(tmp_path / "gpu.parquet")], tmp_path, 600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    row = _row(out, "text", "GPU check")
    assert "pbgd_free" in row and math.isfinite(_numbers(row)[-1])
    assert re.search(rf"text, bf16 \+ gradient checkpointing: {NUMBER} s/step, \d+ tokens/s", out)
    if find_spec("bilevel_ray.runtime.local.export") is not None:
        assert "solve+export" in out and "MISSING" not in out

    import torch

    if not torch.cuda.is_available():
        refused = _run(["benchmarks/gpu_check.py"], tmp_path, 120)
        assert refused.returncode == 2
        assert "no CUDA device" in refused.stderr and "Traceback" not in refused.stderr
