"""The language-model problem on a user's text: files in every format and type to the tensors
the losses read, the on-disk cache (hit, and invalidated when the data or the tokenizer
changes), what is printed, the refusals, and data-parallel training equal to one worker."""

from __future__ import annotations

import json
from importlib.util import find_spec

import pytest
import torch

import bilevel_ray as br

pytestmark = pytest.mark.skipif(
    find_spec("peft") is None or find_spec("transformers") is None,
    reason="needs pip install 'bilevel_ray[peft]'",
)


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    from bilevel_ray.text.samples import write_samples

    return write_samples(tmp_path_factory.mktemp("samples"), rows=80)


def _config(samples, tmp_path, **more):
    return {
        "model": str(samples.model),
        "preference": str(samples.preference),
        "instruction": str(samples.instruction),
        "batch": 4,
        "cache_dir": str(tmp_path / "cache"),
        **more,
    }


def _problem(config):
    from bilevel_ray.problems.peft_dpo_sft import peft_dpo_sft

    return peft_dpo_sft(config)


def _check_rows(spec, n_pref, n_sft):
    """Every set is right padded: a row's scored tokens end its row, and the reference
    log-probabilities are the initial model's (f = log 2 at the start)."""
    pref, pref_eval = spec.data.upper, spec.eval_data.upper
    sft = spec.data.lower
    assert len(pref["chosen"]) + len(pref_eval["chosen"]) == n_pref
    assert len(sft["ids"]) + len(spec.eval_data.lower["ids"]) == n_sft
    for mask in (pref["chosen_mask"], pref["rejected_mask"], sft["mask"]):
        assert bool(mask.any(1).all())  # every row scores at least one token
        assert not bool(mask[:, 0].any())  # the first token is never scored
    batch = next(iter(spec.data.stream(0)))
    f = float(spec.problem.upper_loss(spec.x0, spec.y0, batch.upper))
    assert f == pytest.approx(float(torch.log(torch.tensor(2.0))), abs=1e-6)


@pytest.mark.parametrize(
    ("preference", "instruction"),
    [
        ("preference", "instruction"),  # standard strings, JSON Lines
        ("preference_chat", "instruction_messages"),  # conversational, chat template
        ("preference_parquet", "instruction_csv"),  # Parquet and CSV
    ],
)
def test_every_format_and_file_type_builds_the_problem(samples, tmp_path, preference, instruction):
    config = _config(
        samples,
        tmp_path,
        preference=str(getattr(samples, preference)),
        instruction=str(getattr(samples, instruction)),
    )
    _check_rows(_problem(config), samples.preference_rows, samples.instruction_rows)


def test_a_datasets_folder_and_separate_held_out_files(samples, tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [json.loads(line) for line in samples.preference.read_text().splitlines()]
    folder = tmp_path / "pref_ds"
    datasets.Dataset.from_list(rows[:60]).save_to_disk(str(folder))
    held = tmp_path / "pref_eval.jsonl"
    held.write_text("".join(json.dumps(r) + "\n" for r in rows[60:]))
    spec = _problem(_config(samples, tmp_path, preference=str(folder), eval_preference=str(held)))
    assert len(spec.data.upper["chosen"]) == 60
    assert len(spec.eval_data.upper["chosen"]) == len(rows) - 60


def test_the_tokenized_sets_are_cached_and_rebuilt_when_data_or_tokenizer_change(
    samples, tmp_path, capsys
):
    config = _config(samples, tmp_path)
    first = _problem(config)
    made = capsys.readouterr().err
    assert "training and" in made and "read from the cache" not in made
    again = _problem(config)
    hit = capsys.readouterr().err
    assert hit.count("read from the cache") == 2 and "training and" not in hit
    for key in ("chosen", "chosen_mask", "ref_chosen", "ref_rejected"):
        assert torch.equal(first.data.upper[key], again.data.upper[key])

    # one more row in the data file: a new key, tokenized again
    changed = tmp_path / "pref.jsonl"
    changed.write_text(
        samples.preference.read_text() + samples.preference.read_text().splitlines()[0] + "\n"
    )
    _problem({**config, "preference": str(changed)})
    assert "preference: " in capsys.readouterr().err

    # another tokenizer (one more token): tokenized again
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(samples.tokenizer), local_files_only=True)
    tokenizer.add_tokens(["zzzunseen"])
    tokenizer.save_pretrained(str(tmp_path / "tok2"))
    with pytest.raises(br.ConfigError, match="fewer than the tokenizer's"):
        _problem({**config, "tokenizer": str(tmp_path / "tok2")})  # the model lacks the token


def test_the_model_folder_vocabulary_must_hold_the_tokenizer(samples, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(samples.tokenizer), local_files_only=True)
    tokenizer.add_tokens([f"extra{i}" for i in range(5)])
    tokenizer.save_pretrained(str(tmp_path / "bigger"))
    with pytest.raises(br.ConfigError) as err:
        _problem(_config(samples, tmp_path, tokenizer=str(tmp_path / "bigger")))
    message = str(err.value)
    assert (
        f"holds {len(tokenizer) - 5} tokens, fewer than the tokenizer's {len(tokenizer)}" in message
    )
    assert "resize_token_embeddings" in message


def test_a_built_model_is_sized_to_the_tokenizer(samples, tmp_path):
    config = _config(samples, tmp_path, model=None, tokenizer=str(samples.tokenizer))
    spec = _problem(config)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(samples.tokenizer), local_files_only=True)
    head = next(iter(spec.y0.values()))
    assert head.shape[0] == len(tokenizer)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"instruction": None}, "instruction= is missing: text data needs both files"),
        ({"model": None}, "text data needs a tokenizer: give model=DIR"),
        ({"preference": "no/such.jsonl"}, "preference='no/such.jsonl' does not exist"),
        ({"eval_fraction": 1.5}, "eval_fraction=1.5: must be a number in (0, 1)"),
        (
            {"max_prompt_length": 2048},
            "max_prompt_length=2048: must be an integer in [1, max_length - 1]",
        ),
        ({"batch": 500}, "batch=500 exceeds the"),
    ],
)
def test_bad_text_settings_are_refused(samples, tmp_path, change, message):
    with pytest.raises(br.ConfigError) as err:
        _problem(_config(samples, tmp_path, **change))
    assert message in str(err.value)


def test_text_settings_without_data_files_are_refused(tmp_path):
    with pytest.raises(br.ConfigError) as err:
        _problem({"tokenizer": str(tmp_path)})
    assert "tokenizer given without preference= and instruction=" in str(err.value)


@pytest.mark.slow
@pytest.mark.ray
def test_two_workers_equal_one_with_the_same_global_batch(samples, tmp_path, ray_2cpu):
    """Rows of unequal length: each rank cuts its own slice to its longest row and the SFT
    loss is a mean over rows (sft_from_logits), so 2 workers x batch 4 = 1 worker x batch 8."""
    config = _config(samples, tmp_path, dtype="float64")
    one = br.train(
        "peft-dpo-sft",
        problem_config={**config, "batch": 8},
        num_workers=1,
        steps=4,
        storage_path=str(tmp_path / "runs"),
        name="one",
    )
    two = br.train(
        "peft-dpo-sft",
        problem_config={**config, "batch": 4},
        num_workers=2,
        steps=4,
        storage_path=str(tmp_path / "runs"),
        name="two",
        resources_per_worker={"CPU": 0.5},
    )
    for level in ("x", "y"):
        a, b = getattr(one, level), getattr(two, level)
        assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6
    assert one.held_out["eval/sft_loss"] == pytest.approx(two.held_out["eval/sft_loss"], rel=1e-9)
