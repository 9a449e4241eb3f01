"""The sample text data, tokenizer and Llama that write_samples makes on this machine."""

from __future__ import annotations

import ast
import csv
import json
import sys
from dataclasses import replace
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch

from bilevel_ray.cli import main
from bilevel_ray.errors import ConfigError
from bilevel_ray.text import samples
from bilevel_ray.text.samples import SampleFiles, write_samples

ROWS = 40
SMALL = {"hidden": 16, "layers": 1, "heads": 2}  # for the tests that only check the folder
STRINGS = {"preference": ("prompt", "chosen", "rejected"), "instruction": ("prompt", "completion")}

needs_transformers = pytest.mark.skipif(
    find_spec("transformers") is None or find_spec("tokenizers") is None,
    reason="needs transformers and tokenizers: pip install 'bilevel_ray[peft]'",
)


def _need_transformers() -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> SampleFiles:
    _need_transformers()
    return write_samples(tmp_path_factory.mktemp("samples") / "out", rows=ROWS, seed=0)


@pytest.fixture(scope="module")
def again(tmp_path_factory) -> SampleFiles:
    """The same seed, another folder."""
    _need_transformers()
    return write_samples(tmp_path_factory.mktemp("again") / "out", rows=ROWS, seed=0)


@pytest.fixture(scope="module")
def other(tmp_path_factory) -> SampleFiles:
    """Another seed."""
    _need_transformers()
    return write_samples(tmp_path_factory.mktemp("other") / "out", rows=ROWS, seed=1)


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _tokenizer(folder: Path):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def _model(folder: Path):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True)


@needs_transformers
def test_every_file_is_written_with_its_rows_and_columns(written):
    assert written.preference_rows == written.instruction_rows == ROWS
    for field in samples.FILES:
        assert getattr(written, field).exists(), field
    assert (written.model / "model.safetensors").is_file()
    assert (written.model / "tokenizer.json").is_file()  # a checkpoint folder holds its tokenizer
    for name, columns in STRINGS.items():
        rows = _jsonl(getattr(written, name))
        assert len(rows) == ROWS
        assert all(list(row) == list(columns) for row in rows)
        assert all(isinstance(v, str) and v.strip() for row in rows for v in row.values())
    for row in _jsonl(written.preference_chat):
        assert list(row) == ["prompt", "chosen", "rejected"]
        assert [m["role"] for m in row["prompt"]] == ["user"]
        assert [m["role"] for m in row["chosen"] + row["rejected"]] == ["assistant"] * 2
    for row in _jsonl(written.instruction_messages):
        assert [m["role"] for m in row["messages"]] == ["user", "assistant"]


@needs_transformers
def test_every_format_holds_the_same_rows(written):
    import pyarrow.parquet as pq

    preference, instruction = _jsonl(written.preference), _jsonl(written.instruction)
    assert pq.read_table(written.preference_parquet).to_pylist() == preference
    with written.instruction_csv.open(encoding="utf-8", newline="") as f:
        assert list(csv.DictReader(f)) == instruction
    # Conversations hold the same texts; a standard response's leading space joins it to its
    # prompt, a message needs none.
    chat = _jsonl(written.preference_chat)
    assert len(chat) == len(preference)
    for plain, conversation in zip(preference, chat):
        assert conversation["prompt"][0]["content"] == plain["prompt"]
        assert plain["chosen"] == " " + conversation["chosen"][0]["content"]
        assert plain["rejected"] == " " + conversation["rejected"][0]["content"]
    for plain, row in zip(instruction, _jsonl(written.instruction_messages)):
        user, assistant = row["messages"]
        assert (user["content"], " " + assistant["content"]) == (
            plain["prompt"],
            plain["completion"],
        )


@needs_transformers
def test_rejected_states_a_wrong_value_in_the_same_words(written):
    for row in _jsonl(written.preference):
        chosen, rejected = row["chosen"].split(), row["rejected"].split()
        assert chosen != rejected and len(chosen) == len(rejected)
        # One value (and its article) differs: "It is a fruit." / "It is an animal."
        assert sum(a != b for a, b in zip(chosen, rejected)) <= 2
    preference = {r["prompt"] for r in _jsonl(written.preference)}
    instruction = {r["prompt"] for r in _jsonl(written.instruction)}
    assert not preference & instruction  # the sets ask differently worded questions


@needs_transformers
def test_the_data_is_fixed_by_the_seed(written, again, other):
    for name in ("preference", "instruction", "preference_chat", "instruction_csv"):
        assert getattr(written, name).read_bytes() == getattr(again, name).read_bytes()
        assert getattr(written, name).read_bytes() != getattr(other, name).read_bytes()
    # The tokenizer is trained on the whole table, whatever the seed and the rows.
    tokenizer = (written.tokenizer / "tokenizer.json").read_bytes()
    assert tokenizer == (other.tokenizer / "tokenizer.json").read_bytes()


@needs_transformers
def test_the_tokenizer_loads_and_round_trips_words(written):
    for folder in (written.tokenizer, written.model):
        tokenizer = _tokenizer(folder)
        assert 300 <= len(tokenizer) <= 1000
        assert (tokenizer.bos_token, tokenizer.eos_token) == ("<s>", "</s>")
        assert (tokenizer.pad_token, tokenizer.unk_token) == ("<pad>", "<unk>")
        text = "What colour is a banana? A banana is yellow, not turquoise!"
        ids = tokenizer(text)["input_ids"]
        assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
        assert tokenizer.unk_token_id not in ids  # a word outside the table goes by its bytes
        assert len(tokenizer(" banana", add_special_tokens=False)["input_ids"]) == 1


@needs_transformers
def test_the_generation_prompt_is_a_prefix_of_the_conversation(written):
    tokenizer = _tokenizer(written.tokenizer)
    for row in _jsonl(written.preference_chat)[:10]:
        for answer in (row["chosen"], row["rejected"]):
            for tokenize in (False, True):
                prompt = tokenizer.apply_chat_template(
                    row["prompt"], add_generation_prompt=True, tokenize=tokenize, return_dict=False
                )
                full = tokenizer.apply_chat_template(
                    row["prompt"] + answer, tokenize=tokenize, return_dict=False
                )
                assert full[: len(prompt)] == prompt and len(full) > len(prompt)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}],
        tokenize=False,
    )
    assert text == "<s><|user|>Hi?</s><|assistant|>Hello.</s>"
    system = [{"role": "system", "content": "Be brief."}]
    assert tokenizer.apply_chat_template(system, tokenize=False) == "<s><|system|>Be brief.</s>"


@needs_transformers
def test_the_model_loads_tied_and_sized_to_the_tokenizer(written):
    model, tokenizer = _model(written.model), _tokenizer(written.model)
    config = model.config
    assert config.model_type == "llama" and config.vocab_size == len(tokenizer)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (64, 2, 4)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert config.tie_word_embeddings
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
    )
    ids = torch.tensor([tokenizer("A cow says moo.")["input_ids"]])
    assert torch.isfinite(model(ids).logits).all()


@needs_transformers
def test_the_same_seed_gives_the_same_weights(written, again, other):
    weights = _model(written.model).state_dict()
    same, different = _model(again.model).state_dict(), _model(other.model).state_dict()
    assert list(weights) == list(same)
    assert all(torch.equal(weights[k], same[k]) for k in weights)
    embed = "model.embed_tokens.weight"
    assert not torch.equal(weights[embed], different[embed])
    assert 0.01 < float(weights[embed].std()) < 0.05  # a fresh init: normal, std 0.02


@pytest.mark.parametrize("rows", [19, 1_000_001, 2.5])
def test_rows_out_of_range_are_refused(tmp_path, rows):
    with pytest.raises(ConfigError, match=r"rows=.*from 20 to 1000000.*--rows 600"):
        write_samples(tmp_path / "out", rows=rows)
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_a_folder_with_other_files_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"holds files that write_samples did not write \(notes"):
        write_samples(tmp_path, rows=20)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        write_samples(tmp_path / "notes.txt", rows=20)


def test_missing_libraries_are_refused_before_writing(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec

    def without_transformers(name, *args):
        return None if name == "transformers" else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", without_transformers)
    with pytest.raises(
        ConfigError, match=r"needs transformers .*pip install 'bilevel_ray\[peft\]'"
    ):
        write_samples(tmp_path / "out", rows=20)
    assert not (tmp_path / "out").exists()


@needs_transformers
def test_its_own_output_is_replaced_and_the_callers_random_state_kept(tmp_path):
    first = write_samples(tmp_path, rows=30, **SMALL)
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    second = write_samples(tmp_path, rows=20, seed=2, **SMALL)
    assert torch.equal(torch.rand(3), expected)
    assert second == replace(first, preference_rows=20, instruction_rows=20)
    assert len(_jsonl(second.preference)) == 20
    marker = json.loads((tmp_path / samples.MARKER).read_text())
    assert (marker["rows"], marker["seed"]) == (20, 2)
    # A file of someone else's among them: the folder is no longer only write_samples' output.
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(ConfigError, match=r"\(mine\.txt\)"):
        write_samples(tmp_path, rows=20, **SMALL)
    assert (tmp_path / "mine.txt").read_text() == "keep me" and second.model.is_dir()


def test_settings_of_the_model_are_checked(tmp_path):
    with pytest.raises(ConfigError, match=r"(?s)2 problems:.*seed=-1.*hidden=30, heads=4"):
        write_samples(tmp_path / "out", seed=-1, hidden=30, heads=4)


@needs_transformers
def test_the_command_prints_each_file_and_the_next_command(tmp_path, capsys):
    folder = tmp_path / "out"
    argv = [str(folder), "--rows", "20", "--seed", "3", "--hidden", "16", "--heads", "2"]
    assert main(["text-samples", *argv]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(samples.FILES) + 1
    for line, name in zip(lines, samples.FILES.values()):
        assert line.startswith(f"wrote {folder / name}: ")
    assert lines[-1] == (
        f"next: bilevel-ray solve peft-dpo-sft --config model={folder / 'model'} "
        f"--config preference={folder / 'preference.jsonl'} "
        f"--config instruction={folder / 'instruction.jsonl'} --steps 200 --out runs/text"
    )
    assert len(_jsonl(folder / "instruction.jsonl")) == 20
    # its own output may be written over
    assert main(["text-samples", *argv]) == 0
    assert write_samples(folder, rows=25, **SMALL).preference_rows == 25


def test_the_command_reports_a_refusal(tmp_path, capsys):
    assert main(["text-samples", str(tmp_path / "out"), "--rows", "5"]) == 2
    err = capsys.readouterr().err
    assert "rows=5: must be" in err and "--rows 600" in err


def test_the_module_imports_without_transformers():
    # Only the standard library and bilevel_ray at the top: transformers, tokenizers, torch and
    # pyarrow are imported inside the functions that use them.
    tree = ast.parse(Path(samples.__file__).read_text())
    top = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
    names = {a.name for n in top if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module for n in top if isinstance(n, ast.ImportFrom)}
    assert not names & {"transformers", "tokenizers", "torch", "pyarrow"}
    assert {n.split(".")[0] for n in names} <= {*sys.stdlib_module_names, "bilevel_ray"}
