"""Token ids and completion masks of preference and instruction rows, their truncation, and the
on-disk cache of tensors, on a word-level tokenizer of 19 tokens saved to a temporary folder."""

from __future__ import annotations

import os
import sys
import tempfile
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from bilevel_ray.errors import ConfigError
from bilevel_ray.text.cache import (
    cached_tensors,
    default_cache_dir,
    file_fingerprint,
    fingerprint,
    tokenizer_fingerprint,
)
from bilevel_ray.text.formats import InstructionRow, PreferenceRow
from bilevel_ray.text.tokenize import (
    ensure_pad,
    load_tokenizer,
    tokenize_instructions,
    tokenize_preferences,
)

SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>"]
WORDS = ["what", "is", "red", "a", "color", "the", "sky", "blue", "green", "fruit"]
WORDS += ["hi", "hello", "there"]
# Ids: <pad> 0, <unk> 1, <s> 2, </s> 3, <|user|> 4, <|assistant|> 5, then the words from 6.
ID = {token: i for i, token in enumerate(SPECIALS + WORDS)}
CHAT = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
T, F = True, False


def ids(text: str) -> list[int]:
    return [ID[word] for word in text.split()]


def save_tokenizer(
    folder: Path,
    *,
    words: list[str] = WORDS,
    pad: bool = True,
    bos: bool = True,
    eos: bool = True,
    unk: bool = True,
    chat: str | None = CHAT,
) -> Path:
    """A word-level tokenizer (one id per whitespace-separated word) saved in ``folder``; it
    puts ``<s>`` before every text when ``bos``."""
    pytest.importorskip("transformers")
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {token: i for i, token in enumerate(SPECIALS + list(words))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if bos:
        backend.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", ID["<s>"])]
        )
    tokens = {"pad_token": "<pad>" if pad else None, "bos_token": "<s>" if bos else None}
    tokens |= {"eos_token": "</s>" if eos else None, "unk_token": "<unk>" if unk else None}
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, **{k: v for k, v in tokens.items() if v is not None}
    )
    tokenizer.chat_template = chat
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def tokenizer(tmp_path):
    return load_tokenizer(str(save_tokenizer(tmp_path / "tok")), "tokenizer")


def rows_of(result):
    """The tensors as lists, for comparing with hand-written ids and masks."""
    return {name: tensor.tolist() for name, tensor in result.items()}


# --- ids and masks, checked by hand --------------------------------------------------------


def test_standard_preference_ids_and_masks(tokenizer):
    row = PreferenceRow(prompt="what is red", chosen="a color", rejected="the sky is blue")
    out, cut = tokenize_preferences([row], "standard", tokenizer, 64, None)
    assert {k: v.dtype for k, v in out.items()} == {
        "chosen": torch.int64,
        "chosen_mask": torch.bool,
        "rejected": torch.int64,
        "rejected_mask": torch.bool,
    }
    # <s> what is red | a color </s>, padded with <pad> to the rejected row's 9 tokens.
    assert rows_of(out) == {
        "chosen": [[2, 6, 7, 8, 9, 10, 3, 0, 0]],
        "chosen_mask": [[F, F, F, F, T, T, T, F, F]],
        "rejected": [[2, 6, 7, 8, 11, 12, 7, 13, 3]],
        "rejected_mask": [[F, F, F, F, T, T, T, T, T]],
    }
    assert cut.lines("preference=pref.jsonl") == []
    assert (cut.longest_prompt, cut.longest_sequence) == (4, 9)


def test_standard_instruction_ids_and_masks(tokenizer):
    rows = [
        InstructionRow(prompt="what is red", completion="a color"),
        # Plain text: only the start token is prompt; every word and the </s> are scored.
        InstructionRow(prompt="", completion="the sky is blue"),
    ]
    out, _ = tokenize_instructions(rows, "standard", tokenizer, 64, None)
    assert rows_of(out) == {
        "ids": [[2, 6, 7, 8, 9, 10, 3], [2, 11, 12, 7, 13, 3, 0]],
        "mask": [[F, F, F, F, T, T, T], [F, T, T, T, T, T, F]],
    }


def test_conversational_ids_and_masks(tokenizer):
    user = [{"role": "user", "content": "what is red"}]
    row = PreferenceRow(
        prompt=user,
        chosen=[{"role": "assistant", "content": "a color"}],
        rejected=[{"role": "assistant", "content": "green"}],
    )
    out, _ = tokenize_preferences([row], "conversational", tokenizer, 64, None)
    # <|user|> what is red </s> <|assistant|> | a color </s>: the template's own tokens, no <s>.
    prompt = ids("<|user|> what is red </s> <|assistant|>")
    assert rows_of(out) == {
        "chosen": [prompt + ids("a color </s>")],
        "chosen_mask": [[F] * 6 + [T] * 3],
        "rejected": [prompt + ids("green </s>") + [0]],
        "rejected_mask": [[F] * 6 + [T] * 2 + [F]],
    }
    sft = InstructionRow(prompt=user, completion=[{"role": "assistant", "content": "a color"}])
    out, _ = tokenize_instructions([sft], "conversational", tokenizer, 64, None)
    assert rows_of(out) == {"ids": [prompt + ids("a color </s>")], "mask": [[F] * 6 + [T] * 3]}


def test_a_template_that_is_not_prefix_consistent_is_refused(tmp_path):
    # The generation prompt "hi" is not what the conversation has after the prompt messages.
    chat = (
        "{% for m in messages %}{{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}hi{% endif %}"
    )
    tokenizer = load_tokenizer(str(save_tokenizer(tmp_path, chat=chat)), "tokenizer")
    row = InstructionRow(
        prompt=[{"role": "user", "content": "what is red"}],
        completion=[{"role": "assistant", "content": "a color"}],
    )
    with pytest.raises(
        ConfigError, match=r"the instruction set: row 0: the chat template .* prefix-consistent"
    ):
        tokenize_instructions([row], "conversational", tokenizer, 64, None)


def test_an_empty_conversational_prompt_is_the_generation_prompt(tokenizer):
    # A conversation that starts with the assistant: only the template's header is prompt.
    row = InstructionRow(prompt=[], completion=[{"role": "assistant", "content": "hello"}])
    out, _ = tokenize_instructions([row], "conversational", tokenizer, 64, None)
    assert rows_of(out) == {"ids": [ids("<|assistant|> hello </s>")], "mask": [[F, T, T]]}


def test_a_chat_template_that_fails_is_refused_naming_the_row(tmp_path):
    chat = (
        "{% for m in messages %}{% if loop.index0 == 0 and m['role'] != 'user' %}"
        "{{ raise_exception('Conversations must start with a user message') }}{% endif %}"
        "{{ m['content'] }} {% endfor %}"
    )
    tokenizer = load_tokenizer(str(save_tokenizer(tmp_path, chat=chat)), "tokenizer")
    good = [{"role": "user", "content": "hi"}]
    bad = [{"role": "system", "content": "hi"}]
    rows = [InstructionRow(p, [{"role": "assistant", "content": "hello"}]) for p in [good, bad]]
    with pytest.raises(ConfigError) as refused:
        tokenize_instructions(rows, "conversational", tokenizer, 64, None, what="instruction=x")
    message = str(refused.value)
    assert message.startswith(
        f"instruction=x: row 1: the chat template of tokenizer {str(tmp_path)!r}"
    )
    assert "Conversations must start with a user message" in message
    assert "give the data as prompt/completion strings" in message


def test_conversational_rows_need_a_chat_template(tmp_path):
    folder = save_tokenizer(tmp_path / "plain", chat=None)
    tokenizer = load_tokenizer(str(folder), "tokenizer")
    row = InstructionRow(
        prompt=[{"role": "user", "content": "hi"}],
        completion=[{"role": "assistant", "content": "hello"}],
    )
    with pytest.raises(ConfigError) as refused:
        tokenize_instructions([row], "conversational", tokenizer, 64, None)
    message = str(refused.value)
    assert str(folder) in message and "has no chat template" in message
    assert "set tokenizer.chat_template" in message and "prompt/completion strings" in message


# --- truncation -------------------------------------------------------------------------------


def test_prompt_cut_from_the_left_and_sequence_from_the_right(tokenizer):
    rows = [
        InstructionRow(prompt="what is red what is red", completion="a color"),
        InstructionRow(prompt="hi", completion="hello"),
    ]
    out, cut = tokenize_instructions(rows, "standard", tokenizer, 6, 4)
    # Row 1: <s> what is red what is red (7) keeps its last 4; then 4 + "a color </s>" keeps 6.
    assert rows_of(out) == {
        "ids": [ids("red what is red a color"), [*ids("<s> hi hello </s>"), 0, 0]],
        "mask": [[F, F, F, F, T, T], [F, F, T, T, F, F]],
    }
    assert (cut.prompts_cut, cut.completions_cut, cut.dropped) == (1, 1, ())
    assert (cut.longest_prompt, cut.longest_sequence) == (7, 10)
    assert cut.lines("instruction=sft.jsonl") == [
        "instruction=sft.jsonl: 1 of 2 prompts cut to max_prompt_length=4 tokens; "
        "1 of 2 completions cut to max_length=6 tokens",
        "instruction=sft.jsonl: the longest prompt has 7 tokens and the longest sequence 10 tokens",
    ]


def test_preference_completions_are_cut_each_and_counted(tokenizer):
    rows = [PreferenceRow(prompt="hi", chosen="hello there", rejected="the sky is blue")]
    out, cut = tokenize_preferences(rows, "standard", tokenizer, 5, None)
    assert rows_of(out) == {
        "chosen": [ids("<s> hi hello there </s>")],
        "chosen_mask": [[F, F, T, T, T]],
        "rejected": [ids("<s> hi the sky is")],
        "rejected_mask": [[F, F, T, T, T]],
    }
    assert (cut.completions, cut.completions_cut) == (2, 1)
    assert cut.lines("preference=p.jsonl")[0] == (
        "preference=p.jsonl: 1 of 2 completions cut to max_length=5 tokens"
    )


def test_rows_whose_prompt_fills_max_length_are_dropped(tokenizer):
    long = InstructionRow(prompt="what is red what is", completion="a color")  # 6 prompt tokens
    rows = [InstructionRow(prompt="hi", completion="hello")] + [long] * 7
    out, cut = tokenize_instructions(rows, "standard", tokenizer, 6, None)
    assert rows_of(out)["ids"] == [ids("<s> hi hello </s>")]
    assert cut.dropped_long_prompt == cut.dropped == (1, 2, 3, 4, 5, 6, 7)  # counted from 0
    assert cut.lines("instruction=sft.jsonl")[0] == (
        "instruction=sft.jsonl: 7 rows dropped: the prompt alone has >= 6 tokens "
        "(rows 1, 2, 3, 4, 5 and 2 more)"
    )


def test_a_row_with_no_token_to_score_is_dropped(tmp_path):
    # No <s> and no </s>: a one-word plain text is one token at position 0, which nothing
    # predicts.
    folder = save_tokenizer(tmp_path, bos=False, eos=False)
    tokenizer = load_tokenizer(str(folder), "tokenizer")
    rows = [InstructionRow(prompt="", completion="hi"), InstructionRow("", "hello there")]
    out, cut = tokenize_instructions(rows, "standard", tokenizer, 8, None)
    assert rows_of(out) == {"ids": [ids("hello there")], "mask": [[T, T]]}
    assert cut.lines("instruction=t.txt")[0] == (
        "instruction=t.txt: 1 row dropped: no completion token to score (row 0)"
    )


def test_no_row_left_to_score_is_refused(tmp_path):
    tokenizer = load_tokenizer(str(save_tokenizer(tmp_path, bos=False, eos=False)), "tokenizer")
    with pytest.raises(ConfigError) as refused:
        tokenize_instructions([InstructionRow("", "hi")], "standard", tokenizer, 8, None)
    assert str(refused.value) == (
        "the instruction set: no row is left: 1 row dropped: no completion token to score "
        "(row 0); give completions of at least one token"
    )


def test_all_rows_dropped_is_refused(tokenizer):
    rows = [PreferenceRow(prompt="what is red", chosen="a", rejected="b")]
    with pytest.raises(ConfigError) as refused:
        tokenize_preferences(rows, "standard", tokenizer, 4, None, what="preference=p.jsonl")
    assert str(refused.value) == (
        "preference=p.jsonl: no row is left: 1 row dropped: the prompt alone has >= 4 tokens "
        "(row 0); raise max_length above the prompts' length (the longest has 4 tokens) or set "
        "max_prompt_length below max_length"
    )


@pytest.mark.parametrize(
    ("kind", "max_length", "max_prompt_length", "rows", "said"),
    [
        ("chat", 8, None, 1, "kind='chat' is not one of"),
        ("standard", 1, None, 1, "max_length=1: must be an integer >= 2"),
        ("standard", 8.0, None, 1, "max_length=8.0: must be an integer >= 2"),
        ("standard", 8, 0, 1, "max_prompt_length=0: must be an integer >= 1 or None"),
        ("standard", 8, None, 0, "the instruction set has no rows"),
    ],
)
def test_bad_arguments_are_refused(tokenizer, kind, max_length, max_prompt_length, rows, said):
    data = [InstructionRow(prompt="hi", completion="hello")] * rows
    with pytest.raises(ConfigError, match=said):
        tokenize_instructions(data, kind, tokenizer, max_length, max_prompt_length)


# --- loading and padding ----------------------------------------------------------------------


def test_load_tokenizer_refusals(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.json").write_text("{}")
    for name, said in [
        ("missing", "the tokenizer folder does not exist"),
        ("file.json", "the tokenizer folder is not a folder"),
        ("empty", "no tokenizer could be loaded from this folder"),
    ]:
        with pytest.raises(ConfigError) as refused:
            load_tokenizer(str(tmp_path / name), "tokenizer")
        message = str(refused.value)
        assert message.startswith(f"tokenizer={str(tmp_path / name)!r}: {said}")
        assert "tokenizer.save_pretrained(folder)" in message


def test_load_tokenizer_needs_transformers(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers fails
    with pytest.raises(ConfigError, match="needs the transformers package; pip install"):
        load_tokenizer(str(tmp_path), "tokenizer")


def test_ensure_pad_picks_eos_then_unk(tmp_path):
    padded = load_tokenizer(str(save_tokenizer(tmp_path / "a")), "tokenizer")
    assert ensure_pad(padded) is None and padded.pad_token == "<pad>"
    tokenizer = load_tokenizer(str(save_tokenizer(tmp_path / "b", pad=False)), "tokenizer")
    assert ensure_pad(tokenizer) == (
        "the tokenizer has no pad token: using its eos token '</s>' (id 3) for padding; "
        "padded positions are never scored"
    )
    assert tokenizer.pad_token_id == 3
    folder = save_tokenizer(tmp_path / "c", pad=False, eos=False)
    tokenizer = load_tokenizer(str(folder), "tokenizer")
    assert "its unk token '<unk>' (id 1)" in ensure_pad(tokenizer)


def test_ensure_pad_refuses_a_tokenizer_with_nothing_to_pad_with(tmp_path):
    folder = save_tokenizer(tmp_path, pad=False, eos=False, unk=False)
    tokenizer = load_tokenizer(str(folder), "tokenizer")
    with pytest.raises(ConfigError) as refused:
        ensure_pad(tokenizer)
    message = str(refused.value)
    assert str(folder) in message and "has no pad, eos or unk token" in message
    assert "tokenizer.pad_token =" in message


# --- fingerprints -----------------------------------------------------------------------------


def test_fingerprint_is_canonical():
    assert fingerprint({"a": 1, "b": (2, 3)}, Path("x")) == fingerprint({"b": [2, 3], "a": 1}, "x")
    assert fingerprint({"a": 1}) != fingerprint({"a": 2})
    assert len(fingerprint("x")) == 16


def test_file_fingerprints_follow_every_byte(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.jsonl").write_bytes(b'{"prompt": "hi"}\n')
    (data / ".hidden").write_bytes(b"x")
    before, folder_before = file_fingerprint(data / "a.jsonl"), file_fingerprint(data)
    (data / "a.jsonl").write_bytes(b'{"prompt": "ho"}\n')
    assert file_fingerprint(data / "a.jsonl") != before
    assert file_fingerprint(data) != folder_before
    folder_now = file_fingerprint(data)
    (data / ".hidden").rename(data / ".other")  # a renamed file changes the folder's
    assert file_fingerprint(data) != folder_now


def test_tokenizer_fingerprint_follows_what_changes_ids(tmp_path):
    def of(name, **options):
        return tokenizer_fingerprint(
            load_tokenizer(str(save_tokenizer(tmp_path / name, **options)), "tokenizer")
        )

    same = of("a")
    assert of("b") == same
    assert of("words", words=[*WORDS[:-1], "here"]) != same
    assert of("no_bos", bos=False) != same
    assert of("no_chat", chat=None) != same
    tokenizer = load_tokenizer(str(tmp_path / "a"), "tokenizer")
    tokenizer.pad_token = "</s>"
    assert tokenizer_fingerprint(tokenizer) != same


# --- the cache ----------------------------------------------------------------------------------


def some_tensors():
    floats = torch.tensor([1 / 3, float("nan"), float("inf"), -0.0, 1e-40])
    return {
        "ids": torch.tensor([[1, 2, 3], [4, 5, 2**40], [0, 0, -7], [9, 9, 9], [1, 1, 1]]),
        "small_ids": torch.arange(15, dtype=torch.int64).reshape(5, 3),
        "mask": torch.tensor([[T, F, T], [F, F, F], [T, T, T], [F, T, F], [T, F, F]]),
        "f32": floats.float(),
        "f64": floats.double() * torch.pi,
        "bf16": floats.bfloat16(),
        "int32": torch.tensor([1, -2, 3, -4, 5], dtype=torch.int32),
        "uint8": torch.tensor([0, 255, 3, 4, 5], dtype=torch.uint8),
        "cube": torch.arange(40, dtype=torch.float32).reshape(5, 2, 4),
    }


def assert_same_bits(got, want):
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape, name
        if tensor.is_floating_point():
            bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.element_size()]
            assert torch.equal(got[name].view(bits), tensor.view(bits)), name
        else:
            assert torch.equal(got[name], tensor), name


def counting(tensors):
    calls = []

    def build():
        calls.append(1)
        return tensors

    return build, calls


def test_a_miss_then_a_hit_reads_back_every_bit(tmp_path):
    build, calls = counting(some_tensors())
    _, hit = cached_tensors(tmp_path, "k1", build, "the tokenized set")
    assert (hit, len(calls)) == (False, 1)
    second, hit = cached_tensors(tmp_path, "k1", build, "the tokenized set")
    assert (hit, len(calls)) == (True, 1)
    assert_same_bits(second, some_tensors())
    assert [p.name for p in tmp_path.iterdir()] == ["k1.parquet"]  # no temporary left behind
    columns = pq.read_schema(tmp_path / "k1.parquet")
    assert columns.field("small_ids").type == pa.list_(pa.int32(), 3)
    assert columns.field("ids").type == pa.list_(pa.int64(), 3)  # 2**40 does not fit int32
    assert columns.field("mask").type == pa.list_(pa.bool_(), 3)
    assert columns.field("f32").type == pa.float64()


def test_a_new_key_builds_again(tmp_path):
    build, calls = counting(some_tensors())
    cached_tensors(tmp_path, fingerprint("pref.jsonl", "aaaa", 512), build, "the set")
    cached_tensors(tmp_path, fingerprint("pref.jsonl", "aaab", 512), build, "the set")
    cached_tensors(tmp_path, fingerprint("pref.jsonl", "aaab", 512), build, "the set")
    assert len(calls) == 2


def corrupt_truncated(path):
    path.write_bytes(path.read_bytes()[:-100])


def corrupt_garbage(path):
    path.write_bytes(b"not parquet at all")


def corrupt_foreign(path):
    pq.write_table(pa.table({"ids": [1, 2, 3]}), path)


def corrupt_values(path):
    # A well-formed file whose data no longer matches the digests in its metadata.
    table = pq.read_table(path)
    f32 = pa.array([0.5] * table.num_rows, type=pa.float64())
    table = table.set_column(table.column_names.index("f32"), "f32", f32)
    pq.write_table(table, path)


def corrupt_shape(path):
    table = pq.read_table(path)
    pq.write_table(table.slice(0, 4), path)


@pytest.mark.parametrize(
    "corrupt",
    [corrupt_truncated, corrupt_garbage, corrupt_foreign, corrupt_values, corrupt_shape],
)
def test_a_bad_cache_file_is_rebuilt(tmp_path, corrupt):
    build, calls = counting(some_tensors())
    cached_tensors(tmp_path, "k", build, "the set")
    corrupt(tmp_path / "k.parquet")
    got, hit = cached_tensors(tmp_path, "k", build, "the set")
    assert (hit, len(calls)) == (False, 2)
    assert_same_bits(got, some_tensors())
    got, hit = cached_tensors(tmp_path, "k", build, "the set")  # rewritten whole
    assert hit
    assert_same_bits(got, some_tensors())


def test_writers_of_one_key_at_once_leave_one_good_file(tmp_path):
    errors = []

    def write():
        try:
            cached_tensors(tmp_path, "k", some_tensors, "the set")
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=write) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    got, hit = cached_tensors(tmp_path, "k", some_tensors, "the set")
    assert hit
    assert_same_bits(got, some_tensors())
    assert [p.name for p in tmp_path.iterdir()] == ["k.parquet"]


def test_a_cache_dir_under_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("")
    build, calls = counting(some_tensors())
    with pytest.raises(ConfigError) as refused:
        cached_tensors(tmp_path / "file" / "cache", "k", build, "the tokenized set")
    message = str(refused.value)
    assert message.startswith(f"cache_dir={str(tmp_path / 'file' / 'cache')!r}: cannot store")
    assert "the tokenized set" in message
    assert "set cache_dir= or BILEVEL_RAY_CACHE to a writable folder" in message
    assert calls == []  # refused before the work


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes anywhere")
def test_an_unwritable_cache_dir_is_refused(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(ConfigError, match=r"cannot store the set there .*writable folder"):
            cached_tensors(folder, "k", some_tensors, "the set")
    finally:
        folder.chmod(0o700)


def test_a_permission_error_is_refused_even_as_root(tmp_path, monkeypatch):
    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", denied)
    with pytest.raises(ConfigError) as refused:
        cached_tensors(tmp_path, "k", some_tensors, "the set")
    assert str(refused.value) == (
        f"cache_dir={str(tmp_path)!r}: cannot store the set there (PermissionError: Permission "
        "denied); set cache_dir= or BILEVEL_RAY_CACHE to a writable folder"
    )


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("BILEVEL_RAY_CACHE", str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("BILEVEL_RAY_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "bilevel_ray"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == Path.home() / ".cache" / "bilevel_ray"
