"""``br.export`` / ``bilevel-ray export``: a peft-dpo-sft run's adapter (peft's format), head
and base model, loaded back with transformers and peft alone by the README's own lines."""

from __future__ import annotations

import json
import math
import re
import shutil
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch

if find_spec("peft") is None or find_spec("transformers") is None:
    pytest.skip("needs pip install 'bilevel_ray[peft]'", allow_module_level=True)

from llama_files import tiny_llama_config

import bilevel_ray as br
from bilevel_ray.cli import main
from bilevel_ray.problems.dpo_sft_losses import dpo_loss, sft_loss
from bilevel_ray.problems.peft_dpo_sft import peft_dpo_sft, peft_model
from bilevel_ray.runtime.local.export import export

TINY = {
    "vocab": 16,
    "hidden": 8,
    "heads": 2,
    "layers": 2,
    "lora_rank": 4,
    "n_pref": 32,
    "n_sft": 32,
    "n_eval": 16,
    "batch": 8,
    "dtype": "float32",
}
HEAD = "base_model.model.lm_head.weight"


def _solve(out: Path, config: dict) -> Path:
    """A finished run of a few large steps (x and y move well away from x0, y0)."""
    argv = ["solve", "peft-dpo-sft", "--steps", "4", "--out", str(out), "--quiet"]
    argv += ["--set", "lr_x=0.05", "--set", "lr_y=0.05"]
    argv += [f"--config={k}={v}" for k, v in config.items()]
    assert main(argv) == 0
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two finished runs: on the built tiny Llama, and on a saved Llama folder whose head is
    tied to its input embeddings (the problem unties it)."""
    import transformers

    root = tmp_path_factory.mktemp("runs")
    folder = root / "tied-llama"
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=True)).save_pretrained(
        folder
    )
    on_folder = {k: v for k, v in TINY.items() if k not in ("hidden", "heads", "layers")}
    return {
        "built": _solve(root / "built", TINY),
        "folder": _solve(root / "folder", {**on_folder, "model": str(folder)}),
        "model": folder,
    }


def _load_as_readme_says(out: Path) -> dict:
    """Run the README's code block: what a user copies."""
    text = (out / "README.md").read_text()
    code = text.split("```python\n", 1)[1].split("\n```", 1)[0]
    scope: dict = {}
    exec(code, scope)
    return scope


def _run_losses(run: Path):
    """The run's own f and g at its final x, y on its held-out rows, and that spec."""
    record = json.loads((run / "run.json").read_text())
    spec = peft_dpo_sft(record["problem_config"])
    saved = torch.load(run / "result.pt", weights_only=True)
    with torch.no_grad():
        f = spec.problem.upper_loss(saved["x"], saved["y"], spec.eval_data.upper)
        g = spec.problem.lower_loss(saved["x"], saved["y"], spec.eval_data.lower)
    return spec, saved, float(f), float(g)


@pytest.mark.parametrize("kind", ["built", "folder"])
def test_the_export_loads_with_peft_and_is_the_run_s_model(runs, tmp_path, kind):
    run, out = runs[kind], tmp_path / "adapter"
    assert br.export is export and "export" in br.__all__
    assert br.export(run, out) == out
    built = kind == "built"
    names = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "head.safetensors"} <= names
    assert {"export.json", "README.md"} <= names and ("base_model" in names) == built
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary left
    base = out.resolve() / "base_model" if built else runs["model"].resolve()
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(base)
    summary = json.loads((out / "export.json").read_text())
    assert summary["base_model"] == str(base) and summary["base_model_in_export"] == built
    assert summary["head"]["tensors"] == {"weight": "lm_head.weight"}
    assert summary["steps"] == 4 and summary["method"] == "pbgd_free"
    readme = (out / "README.md").read_text()
    assert "separately from the input embeddings" in readme and str(base) in readme

    spec, saved, f, g = _run_losses(run)
    assert abs(f - math.log(2)) > 1e-3  # the run moved: the comparison below means something
    loaded = _load_as_readme_says(out)["model"]
    inner = loaded.get_base_model()
    assert inner.lm_head.weight is not inner.model.embed_tokens.weight  # untied
    torch.testing.assert_close(inner.lm_head.weight, saved["y"][HEAD], rtol=0, atol=0)

    def forward(**kw):
        return loaded(**kw)

    with torch.no_grad():
        assert float(dpo_loss(forward, spec.eval_data.upper, 0.1)) == pytest.approx(f, abs=1e-5)
        assert float(sft_loss(forward, spec.eval_data.lower)) == pytest.approx(g, abs=1e-5)
        ids = spec.eval_data.lower["ids"][:2, :6]
        new = loaded.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, pad_token_id=0
        )
    assert new.shape == (2, 11) and torch.equal(new[:, :6], ids)
    assert int(new.max()) < inner.config.vocab_size


def test_the_saved_base_model_is_the_run_s_initial_model(runs, tmp_path):
    import transformers

    out = br.export(runs["built"], tmp_path / "adapter")
    saved = transformers.AutoModelForCausalLM.from_pretrained(out / "base_model")
    model, _, _, _ = peft_model(TINY)  # the model the run started from, LoRA taken out
    initial = model.unload().state_dict()
    got = saved.state_dict()
    assert set(got) == set(initial) and not saved.config.tie_word_embeddings
    for name, value in initial.items():
        assert torch.equal(got[name], value), name


def test_the_tokenizer_is_saved_when_the_run_had_one(runs, tmp_path, monkeypatch):
    # The run's data is generated; a tokenizer handed back by the rebuilt model (as for text
    # data) must be saved and named in the load lines.
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<pad>", "<unk>", "a", "b", "c"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>"
    )
    factory = sys.modules["bilevel_ray.problems.peft_dpo_sft"]  # the package's name is the factory
    real = factory.peft_model

    def with_tokenizer(config):
        model, head, _, c = real(config)
        return model, head, tokenizer, c

    monkeypatch.setattr(factory, "peft_model", with_tokenizer)
    out = br.export(runs["built"], tmp_path / "adapter")
    assert (out / "tokenizer.json").is_file()
    summary = json.loads((out / "export.json").read_text())
    assert summary["tokenizer"] and "tokenizer.json" in summary["files"]
    scope = _load_as_readme_says(out)
    assert scope["tokenizer"]("a b c")["input_ids"] == [2, 3, 4]


def test_a_failure_while_writing_leaves_no_half_export(runs, tmp_path, monkeypatch):
    import safetensors.torch

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        br.export(runs["built"], tmp_path / "adapter")
    assert list(tmp_path.iterdir()) == []


def _copy(run: Path, to: Path) -> Path:
    shutil.copytree(run, to)
    return to


def _fake_run(folder: Path, **record) -> Path:
    folder.mkdir()
    text = {"problem": "peft-dpo-sft", "settings": {}, "method": "pbgd_free", **record}
    (folder / "run.json").write_text(json.dumps(text))
    return folder


def _resave(run: Path, change) -> None:
    """result.pt changed, in a folder from before manifests (so that export's own checks of
    the file are what refuses it; with its manifest, the change itself is refused)."""
    saved = torch.load(run / "result.pt", weights_only=True)
    change(saved)
    torch.save(saved, run / "result.pt")
    (run / "manifest.json").unlink()


def _nan_in_x(saved: dict) -> None:
    next(iter(saved["x"].values()))[0, 0] = math.nan


def test_what_export_cannot_write_is_refused_by_name(runs, tmp_path):
    built = runs["built"]
    cases = []
    wrong = _fake_run(tmp_path / "toy", problem="toy-negative")
    cases.append(
        (
            wrong,
            "export writes the LoRA adapter and head of the language-model problem "
            "'peft-dpo-sft'; this run's problem is 'toy-negative': its x and y are in",
        )
    )
    cases.append((tmp_path / "nothing", "not a folder; give the --out folder of a finished run"))
    (tmp_path / "empty").mkdir()
    cases.append((tmp_path / "empty", "holds no run.json"))
    unfinished = _fake_run(tmp_path / "unfinished", problem_config=TINY)
    cases.append((unfinished, "holds no result.pt: the run did not finish"))
    shapes = _copy(built, tmp_path / "shapes")
    _resave(shapes, lambda saved: saved["y"].update({HEAD: torch.zeros(3, 8)}))
    cases.append((shapes, "its y does not match the problem's (y names and shapes differ)"))
    names = _copy(built, tmp_path / "names")
    _resave(names, lambda saved: saved["x"].popitem())
    cases.append((names, "its x does not match the problem's"))
    diverged = _copy(built, tmp_path / "diverged")
    _resave(diverged, _nan_in_x)
    cases.append((diverged, "holds non-finite values: the run diverged"))
    altered = _fake_run(tmp_path / "altered", problem_config=[1, 2])
    (altered / "result.pt").write_bytes(b"")
    cases.append((altered, "its run.json's problem_config is a list, not the dict"))
    moved = _fake_run(tmp_path / "moved", problem_config={**TINY, "model": str(tmp_path / "gone")})
    (moved / "result.pt").write_bytes(b"")
    cases.append(
        (
            moved,
            "the run's model cannot be rebuilt from its run.json (problem 'peft-dpo-sft': model=",
        )
    )
    for run, message in cases:
        with pytest.raises(br.ConfigError) as err:
            br.export(run, tmp_path / "out")
        assert message in str(err.value), (run.name, str(err.value))
        assert not (tmp_path / "out").exists()


def test_a_run_folder_that_does_not_match_its_manifest_is_refused(runs, tmp_path):
    edited = _copy(runs["built"], tmp_path / "edited")
    record = json.loads((edited / "run.json").read_text())
    record["problem_config"]["lora_alpha"] = 9999
    (edited / "run.json").write_text(json.dumps(record))
    with pytest.raises(br.ConfigError) as err:
        br.export(edited, tmp_path / "out")
    assert re.search(
        r"^export '.*edited' does not match its manifest \(output run\.json changed since it "
        r"was written \(sha256 .*\)\): its files are not the ones its run wrote; restore the "
        r"folder from the run's own copy, or rerun the run \(bilevel-ray show says more\)$",
        str(err.value),
    ), str(err.value)
    assert not (tmp_path / "out").exists()


def test_a_run_folder_from_before_manifests_is_exported_with_a_note(runs, tmp_path, capsys):
    old = _copy(runs["built"], tmp_path / "old")
    (old / "manifest.json").unlink()
    out = br.export(old, tmp_path / "out")
    assert json.loads((out / "adapter_config.json").read_text())["lora_alpha"] == 16  # default
    err = capsys.readouterr().err
    assert re.search(r"^note: export '.*old' has no manifest\.json \(it predates manifests\)", err)


def test_an_out_folder_that_is_not_new_and_empty_is_refused(runs, tmp_path):
    full = tmp_path / "full"
    full.mkdir()
    (full / "mine.txt").write_text("keep")
    with pytest.raises(br.ConfigError, match="exists and is not empty: export writes a new"):
        br.export(runs["built"], full)
    assert [p.name for p in full.iterdir()] == ["mine.txt"]
    (tmp_path / "file").write_text("")
    with pytest.raises(br.ConfigError, match="is a file or a link, not a folder"):
        br.export(runs["built"], tmp_path / "file")
    with pytest.raises(br.ConfigError, match=r"cannot be created \(File exists\)"):
        br.export(runs["built"], tmp_path / "file" / "inside")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert br.export(runs["built"], empty) == empty  # an empty folder is filled
    assert (empty / "adapter_model.safetensors").is_file()


def test_cli_export_prints_each_file_and_the_first_load_line(runs, tmp_path, capsys):
    out = tmp_path / "adapter"
    assert main(["export", str(runs["folder"]), "--out", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == f"exported {runs['folder']} (pbgd_free, 4 steps) to {out}"
    wrote = [line for line in printed if line.startswith("  wrote ")]
    assert [line.split(":")[0] for line in wrote] == [
        f"  wrote {out / name}"
        for name in (
            "adapter_config.json",
            "adapter_model.safetensors",
            "head.safetensors",
            "export.json",
            "README.md",
        )
    ]
    assert f"  base model: {runs['model'].resolve()} (the run's model folder)" in printed
    assert printed[-1].startswith(f"  load it (all lines in {out / 'README.md'}): base = ")
    assert main(["export", str(runs["folder"]), "--out", str(out)]) == 2
    assert "error: export --out" in capsys.readouterr().err
