"""examples/finetune_text.py: from the sample files to an exported adapter, loaded back with
transformers and peft, that answers a question."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    find_spec("peft") is None or find_spec("transformers") is None,
    reason="needs pip install 'bilevel_ray[peft]'",
)

METRICS = ("reward accuracy", "reward margin", "SFT loss", "SFT perplexity")  # as printed
KEYS = ("reward_accuracy", "reward_margin", "sft_loss", "sft_perplexity")  # as logged


@pytest.mark.slow  # writes the samples, solves, exports, loads a model: about 10 s or more
def test_the_example_solves_exports_loads_and_answers(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "BILEVEL_RAY_CACHE": str(tmp_path / "cache")}
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "finetune_text.py"),
            "--steps",
            "20",
            "--rows",
            "40",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    for name in METRICS:
        line = next((ln for ln in lines if ln.startswith(f"held-out {name}:")), None)
        assert line is not None, f"no held-out {name} line in:\n{done.stdout}"
        assert re.fullmatch(r"-?\d+\.\d+", line.split(":", 1)[1].strip()), line
    assert any(ln.startswith("pbgd_free: 20 steps") for ln in lines)
    question = next(ln for ln in lines if ln.startswith("question: "))
    assert question.removeprefix("question: ").strip()  # the instruction file's first prompt
    assert any(ln.startswith("answer:") for ln in lines), done.stdout

    adapter = out / "adapter"
    names = {p.name for p in adapter.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "head.safetensors"} <= names
    assert {"tokenizer.json", "README.md", "export.json"} <= names
    summary = json.loads((adapter / "export.json").read_text())
    assert summary["steps"] == 20 and summary["method"] == "pbgd_free"
    assert summary["base_model"] == str((out / "data" / "model").resolve())
    assert set(summary["held_out"]) == {f"eval/{k}" for k in KEYS}


def test_an_out_folder_that_is_not_empty_is_refused_before_any_work(tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("")
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "finetune_text.py"), "--out", "taken"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert done.returncode != 0
    assert "--out taken: give a new or empty folder" in done.stderr
    assert not (tmp_path / "taken" / "data").exists()
