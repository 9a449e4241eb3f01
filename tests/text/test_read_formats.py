"""Reading a user's text data and normalising its format: every accepted format in every file
type gives the same canonical rows; every refusal says where, what, and the fix; skipped rows
are counted and described."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bilevel_ray.errors import ConfigError
from bilevel_ray.text import read
from bilevel_ray.text.formats import (
    Handling,
    InstructionRow,
    PreferenceRow,
    instruction_rows,
    preference_rows,
    split_rows,
)
from bilevel_ray.text.read import read_rows


def refused(call, *parts: str) -> str:
    """Run ``call``; it must raise ConfigError whose message holds every one of ``parts``."""
    with pytest.raises(ConfigError) as info:
        call()
    message = str(info.value)
    for part in parts:
        assert part in message, f"{part!r} not in {message!r}"
    return message


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def system(text: str) -> dict[str, str]:
    return {"role": "system", "content": text}


def datasets_or_skip():
    return pytest.importorskip("datasets")


def write(folder: Path, rows: list[dict[str, Any]], kind: str, name: str = "data") -> Path:
    """``rows`` saved as a ``kind`` file (jsonl, json, parquet, csv) or a datasets folder."""
    if kind == "jsonl":
        path = folder / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    elif kind == "json":
        path = folder / f"{name}.json"
        path.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    elif kind == "parquet":
        path = folder / f"{name}.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif kind == "csv":
        path = folder / f"{name}.csv"
        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        path = folder / name
        datasets_or_skip().Dataset.from_list(rows).save_to_disk(str(path))
    return path


def arrow_folder(folder: Path, shards: list[list[dict[str, Any]]]) -> Path:
    """A folder laid out as save_to_disk lays it out, written with pyarrow alone."""
    folder.mkdir()
    names = []
    for i, rows in enumerate(shards):
        name = f"data-{i:05d}-of-{len(shards):05d}.arrow"
        table = pa.Table.from_pylist(rows)
        with pa.OSFile(str(folder / name), "wb") as f, pa.ipc.new_stream(f, table.schema) as w:
            w.write_table(table)
        names.append(name)
    (folder / "dataset_info.json").write_text("{}")
    state = {"_data_files": [{"filename": n} for n in names], "_split": None}
    (folder / "state.json").write_text(json.dumps(state))
    return folder


ALL_FILES = ["jsonl", "json", "parquet", "csv", "folder"]
LIST_FILES = ["jsonl", "json", "parquet", "folder"]  # CSV holds strings only

# -- preference formats ----------------------------------------------------------------------

STANDARD = (
    [
        {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5", "score": "9"},
        {"prompt": "Capital of France?", "chosen": "Paris", "rejected": "Rome", "score": "1"},
    ],
    [
        PreferenceRow("What is 2+2?", "4", "5"),
        PreferenceRow("Capital of France?", "Paris", "Rome"),
    ],
    "standard",
)
CONVERSATIONAL = (
    [
        {
            "prompt": [system("Be brief."), user("What is 2+2?")],
            "chosen": [assistant("4")],
            "rejected": [assistant("5")],
            "id": 7,
        }
    ],
    [
        PreferenceRow(
            [system("Be brief."), user("What is 2+2?")], [assistant("4")], [assistant("5")]
        )
    ],
    "conversational",
)
# Hand-checked: the shared prefix "Q: Capital of Italy? A: Ro" is cut back to its last
# whitespace, so "Rome" and "Rovigo" stay whole and the space goes with the responses.
IMPLICIT_TEXT = (
    [
        {"chosen": "Q: Capital of Italy? A: Rome", "rejected": "Q: Capital of Italy? A: Rovigo"},
        {"chosen": "Yes, indeed", "rejected": "Yesterday"},  # shares "Yes", no whitespace
    ],
    [
        PreferenceRow("Q: Capital of Italy? A:", " Rome", " Rovigo"),
        PreferenceRow("", "Yes, indeed", "Yesterday"),
    ],
    "standard",
)
# Hand-checked: the first two messages are shared, the third differs.
IMPLICIT_CHAT = (
    [
        {
            "chosen": [system("Be brief."), user("2+2?"), assistant("4")],
            "rejected": [system("Be brief."), user("2+2?"), assistant("5")],
        },
        {"chosen": [user("Hi"), assistant("Hello")], "rejected": [user("Hey"), assistant("Yo")]},
    ],
    [
        PreferenceRow([system("Be brief."), user("2+2?")], [assistant("4")], [assistant("5")]),
        PreferenceRow([], [user("Hi"), assistant("Hello")], [user("Hey"), assistant("Yo")]),
    ],
    "conversational",
)


@pytest.mark.parametrize("kind", ALL_FILES)
@pytest.mark.parametrize("case", [STANDARD, IMPLICIT_TEXT], ids=["standard", "implicit"])
def test_preference_text_formats_in_every_file_type(tmp_path, kind, case):
    rows, expected, expected_kind = case
    path = write(tmp_path, rows, kind)
    got, got_kind, handling = preference_rows(read_rows(path, f"preference={path}"), "pref")
    assert got == expected
    assert got_kind == expected_kind
    assert handling.skipped == {} and handling.lines() == []


@pytest.mark.parametrize("kind", LIST_FILES)
@pytest.mark.parametrize("case", [CONVERSATIONAL, IMPLICIT_CHAT], ids=["chat", "implicit_chat"])
def test_preference_conversational_formats_in_every_file_type(tmp_path, kind, case):
    rows, expected, expected_kind = case
    path = write(tmp_path, rows, kind)
    got, got_kind, _ = preference_rows(read_rows(path, f"preference={path}"), "pref")
    assert got == expected
    assert got_kind == expected_kind


def test_implicit_prompt_by_hand():
    rows = [
        {"chosen": "The capital is Paris.", "rejected": "The capital is Parma."},
        {"chosen": "Answer: 4", "rejected": "Answer: 4 or 5"},
    ]
    got, _, _ = preference_rows(rows, "pref")
    # "The capital is Par" is shared; cutting at the last space keeps "Paris" / "Parma" whole.
    assert got[0] == PreferenceRow("The capital is", " Paris.", " Parma.")
    # One response is a prefix of the other: still cut at a space, so neither is empty.
    assert got[1] == PreferenceRow("Answer:", " 4", " 4 or 5")


def test_csv_cells_stay_strings(tmp_path):
    # A CSV cell that holds a JSON list of messages is text, not a conversation.
    cell = json.dumps([user("hi")])
    path = write(tmp_path, [{"prompt": cell, "chosen": "a", "rejected": "b"}], "csv")
    got, kind, _ = preference_rows(read_rows(path, "pref"), "pref")
    assert got == [PreferenceRow(cell, "a", "b")] and kind == "standard"


# -- instruction formats ---------------------------------------------------------------------

PROMPT_COMPLETION = (
    [{"prompt": "Say hi", "completion": "hi", "extra": "x"}],
    [InstructionRow("Say hi", "hi")],
    "standard",
)
PROMPT_COMPLETION_CHAT = (
    [{"prompt": [user("Say hi")], "completion": [assistant("hi")]}],
    [InstructionRow([user("Say hi")], [assistant("hi")])],
    "conversational",
)
MESSAGES = (
    [{"messages": [system("Be kind."), user("Say hi"), assistant("hi")]}],
    [InstructionRow([system("Be kind."), user("Say hi")], [assistant("hi")])],
    "conversational",
)
TEXT = (
    [{"text": "Once upon a time."}, {"text": "The end."}],
    [InstructionRow("", "Once upon a time."), InstructionRow("", "The end.")],
    "standard",
)


@pytest.mark.parametrize("kind", ALL_FILES)
@pytest.mark.parametrize("case", [PROMPT_COMPLETION, TEXT], ids=["prompt_completion", "text"])
def test_instruction_text_formats_in_every_file_type(tmp_path, kind, case):
    rows, expected, expected_kind = case
    path = write(tmp_path, rows, kind)
    got, got_kind, handling = instruction_rows(read_rows(path, f"sft={path}"), "sft")
    assert (got, got_kind, handling.skipped) == (expected, expected_kind, {})


@pytest.mark.parametrize("kind", LIST_FILES)
@pytest.mark.parametrize("case", [PROMPT_COMPLETION_CHAT, MESSAGES], ids=["chat", "messages"])
def test_instruction_conversational_formats_in_every_file_type(tmp_path, kind, case):
    rows, expected, expected_kind = case
    path = write(tmp_path, rows, kind)
    got, got_kind, _ = instruction_rows(read_rows(path, f"sft={path}"), "sft")
    assert (got, got_kind) == (expected, expected_kind)


def test_messages_split_at_the_last_assistant_message():
    conversation = [
        user("Hi"),
        assistant("Hello"),
        user("2+2?"),
        assistant("4"),
        user("thanks"),  # after the last assistant message: dropped
    ]
    got, kind, _ = instruction_rows([{"messages": conversation}], "sft")
    assert got == [InstructionRow(conversation[:3], [assistant("4")])]
    assert kind == "conversational"


def test_first_column_set_wins():
    row = {"text": "t", "messages": [user("u"), assistant("a")], "prompt": "p", "completion": "c"}
    assert instruction_rows([row], "sft")[0] == [InstructionRow("p", "c")]
    del row["prompt"]  # a lone 'completion' is not a column set
    assert instruction_rows([row], "sft")[0] == [InstructionRow([user("u")], [assistant("a")])]
    del row["messages"]
    assert instruction_rows([row], "sft")[0] == [InstructionRow("", "t")]


def test_message_nulls_are_dropped_other_keys_kept():
    # Arrow gives every message of a column the union of their keys, null where one is absent.
    rows = [{"messages": [user("u") | {"name": None}, assistant("a") | {"name": "bot"}]}]
    got, _, _ = instruction_rows(rows, "sft")
    assert got == [InstructionRow([user("u")], [assistant("a") | {"name": "bot"}])]


# -- skipped rows and their description ------------------------------------------------------


def test_preference_skips_are_counted_and_described():
    rows = [
        {"prompt": "p", "chosen": "a", "rejected": "b"},
        {"prompt": "p", "chosen": "", "rejected": "b"},
        {"prompt": "p", "chosen": None, "rejected": "b"},
        {"prompt": "p", "rejected": "b"},  # a missing field counts as empty
        {"prompt": "p", "chosen": "  \n", "rejected": "b"},
        {"prompt": "p", "chosen": "same", "rejected": "same"},
        {"prompt": " ", "chosen": "a", "rejected": "b"},
    ]
    got, _, handling = preference_rows(rows, "preference=pref.jsonl")
    assert got == [PreferenceRow("p", "a", "b")]
    assert handling.skipped == {
        "empty 'chosen'": [1, 2, 3, 4],
        "'chosen' equal to 'rejected'": [5],
        "empty 'prompt'": [6],
    }
    assert handling.kept == 1
    assert handling.lines() == [
        "preference=pref.jsonl: skipped 4 of 7 rows with an empty 'chosen' (rows 1, 2, 3, 4)",
        "preference=pref.jsonl: skipped 1 of 7 rows with 'chosen' equal to 'rejected' (row 5)",
        "preference=pref.jsonl: skipped 1 of 7 rows with an empty 'prompt' (row 6)",
    ]


def test_handling_shows_at_most_five_rows():
    handling = Handling("preference=pref.jsonl", {"empty 'chosen'": [3, 9, 11, 12, 40, 41]}, 500)
    assert handling.lines() == [
        "preference=pref.jsonl: skipped 6 of 500 rows with an empty 'chosen' "
        "(rows 3, 9, 11, 12, 40, ...)"
    ]


def test_conversational_skips():
    rows = [
        {"chosen": [user("q"), assistant("a")], "rejected": [user("q"), assistant("b")]},
        {"chosen": [], "rejected": [user("q"), assistant("b")]},
        {"chosen": [user(" "), assistant("")], "rejected": [user("q"), assistant("b")]},
        # Everything of 'chosen' is shared: nothing of it is left once the prompt is cut off.
        {"chosen": [user("q")], "rejected": [user("q"), assistant("b")]},
    ]
    got, kind, handling = preference_rows(rows, "pref")
    assert kind == "conversational" and len(got) == 1
    assert handling.skipped == {
        "empty 'chosen'": [1, 2],
        "empty 'chosen' once the shared prompt is cut off": [3],
    }


def test_instruction_skips():
    rows = [
        {"messages": [user("q"), assistant("a")]},
        {"messages": [system("s"), user("q")]},
        {"messages": [user("q"), assistant(" ")]},
        {"messages": []},
        {"messages": None},
    ]
    got, _, handling = instruction_rows(rows, "sft=chat.jsonl")
    assert got == [InstructionRow([user("q")], [assistant("a")])]
    assert handling.lines() == [
        "sft=chat.jsonl: skipped 1 of 5 rows with no assistant message in 'messages' (row 1)",
        "sft=chat.jsonl: skipped 1 of 5 rows with an empty last assistant message in "
        "'messages' (row 2)",
        "sft=chat.jsonl: skipped 2 of 5 rows with an empty 'messages' (rows 3, 4)",
    ]
    _, _, handling = instruction_rows([{"text": "t"}, {"text": ""}], "sft")
    assert handling.skipped == {"empty 'text'": [1]}


def test_every_row_skipped_is_refused():
    rows = [{"prompt": "p", "chosen": "", "rejected": "b"}, {"prompt": "p", "chosen": "x"}]
    refused(
        lambda: preference_rows(rows, "preference=pref.jsonl"),
        "preference=pref.jsonl: all 2 rows were skipped",
        "(1 with an empty 'chosen'; 1 with an empty 'rejected')",
        "fill in the empty fields",
    )
    refused(
        lambda: instruction_rows([{"messages": [user("q")]}], "sft=a.jsonl"),
        "sft=a.jsonl: all 1 rows were skipped (1 with no assistant message in 'messages')",
    )


# -- format refusals -------------------------------------------------------------------------


def test_missing_columns_are_refused():
    refused(
        lambda: preference_rows([{"prompt": "p", "chosen": "a", "answer": "b"}], "pref=p.jsonl"),
        "pref=p.jsonl: no 'rejected' column",
        "columns found: 'prompt', 'chosen', 'answer'",
        "needs 'prompt', 'chosen' and 'rejected'",
        "or 'chosen' and 'rejected' alone",
    )
    refused(
        lambda: instruction_rows([{"question": "q", "answer": "a"}], "sft=s.jsonl"),
        "sft=s.jsonl: no instruction columns (columns found: 'question', 'answer')",
        "'prompt' and 'completion'",
        "'messages'",
        "'text'",
    )


@pytest.mark.parametrize(
    ("columns", "hint"),
    [
        (["instruction", "input", "output"], "Alpaca-style"),
        (["conversations"], "rename 'conversations' to 'messages'"),
        (["prompt"], "'prompt' and 'completion' go together"),
    ],
)
def test_missing_instruction_columns_hint_at_the_fix(columns, hint):
    refused(lambda: instruction_rows([dict.fromkeys(columns, "x")], "sft"), hint)


def test_rows_that_are_not_objects_or_no_rows_are_refused():
    refused(
        lambda: preference_rows([{"chosen": "a", "rejected": "b"}, ["a", "b"]], "pref"),
        "pref: row 1 is a list, not an object of columns",
        "give one object per row",
    )
    refused(lambda: instruction_rows([], "sft=s.jsonl"), "sft=s.jsonl: holds no rows")


def test_mixed_kinds_name_the_first_row_of_each():
    rows = [
        {"prompt": "p", "chosen": "a", "rejected": "b"},
        {"prompt": "p", "chosen": "a", "rejected": "b"},
        {"prompt": [user("p")], "chosen": [assistant("a")], "rejected": [assistant("b")]},
    ]
    refused(
        lambda: preference_rows(rows, "pref=p.jsonl"),
        "pref=p.jsonl: mixes standard and conversational rows",
        "row 0 column 'prompt' is a string",
        "row 2 column 'prompt' is a list of messages",
        "make every field of every row one kind",
    )
    # A string prompt with whole conversations: the usual cause, and its fix.
    rows = [{"prompt": "q", "chosen": [user("q"), assistant("a")], "rejected": [user("q")]}]
    refused(
        lambda: preference_rows(rows, "pref"),
        "row 0 column 'chosen' is a list of messages",
        "drop the 'prompt' column",
    )
    rows = [{"prompt": "q", "completion": [assistant("a")]}]
    refused(lambda: instruction_rows(rows, "sft"), "mixes standard and conversational rows")


@pytest.mark.parametrize(
    ("value", "parts"),
    [
        (3, ["row 0 column 'chosen' is a number (3), not a string or a list of"]),
        ({"a": 1}, ["row 0 column 'chosen' is an object ({'a': 1})"]),
        (assistant("a"), ["is one message, not a list of messages: wrap it in [...]"]),
        (["a"], ["row 0 column 'chosen' message 0 is a string ('a'), not a {'role', 'content'}"]),
        ([{"role": "assistant"}], ["message 0 has no 'content' (keys: 'role')"]),
        ([{"from": "gpt", "value": "a"}], ["has no 'role' or 'content'", "ShareGPT style"]),
        ([{"role": "human", "content": "a"}], ["has the role 'human'", "rename 'human' to 'user'"]),
        ([{"role": 1, "content": "a"}], ["message 0 has the role 1; roles are system, user"]),
        (
            [{"role": "assistant", "content": [{"type": "text", "text": "a"}]}],
            ["message 0 has a list as 'content'", "join its text parts into one string"],
        ),
        (
            [{"role": "assistant", "content": None}],
            ["message 0 has null as 'content' (None)", "give the text as a string"],
        ),
    ],
)
def test_wrong_types_name_row_and_column(value, parts):
    refused(lambda: preference_rows([{"chosen": value, "rejected": "b"}], "pref"), *parts)


def test_wrong_types_in_instruction_columns():
    refused(
        lambda: instruction_rows([{"messages": "hi"}], "sft"),
        "sft: row 0 column 'messages' is a string, not a list of {'role', 'content'} messages",
    )
    refused(
        lambda: instruction_rows([{"text": [user("hi")]}], "sft"),
        "sft: row 0 column 'text' is a list, not a string",
    )


def test_up_to_five_type_problems_in_one_error():
    rows = [{"chosen": i, "rejected": "b"} for i in range(8)]
    with pytest.raises(ConfigError) as info:
        preference_rows(rows, "pref=p.jsonl")
    problems = info.value.problems
    assert [p.split(" is ")[0] for p in problems[:5]] == [
        f"pref=p.jsonl: row {i} column 'chosen'" for i in range(5)
    ]
    assert problems[5] == "pref=p.jsonl: and 3 more like these in later rows"


# -- split -----------------------------------------------------------------------------------


def test_split_is_reproducible_and_sized():
    rows = list(range(100))
    train, held = split_rows(rows, 0.1, seed=3)
    assert len(held) == 10 and len(train) == 90
    assert sorted(train + held) == rows
    assert train == sorted(train) and held == sorted(held)  # each keeps the rows' order
    assert split_rows(rows, 0.1, seed=3) == (train, held)
    assert split_rows(rows, 0.1, seed=4) != (train, held)
    assert [len(p) for p in split_rows(rows[:3], 0.01, 0)] == [2, 1]  # at least one held out
    assert [len(p) for p in split_rows(rows[:3], 0.99, 0)] == [1, 2]  # at least one kept


@pytest.mark.parametrize("fraction", [0, 1, 1.5, -0.1, math.nan])
def test_split_refuses_a_fraction_outside_zero_one(fraction):
    refused(lambda: split_rows([1, 2, 3], fraction, 0), "eval_fraction=", "between 0 and 1")


@pytest.mark.parametrize("fraction", [True, "0.1", None])
def test_split_refuses_a_fraction_that_is_not_a_number(fraction):
    refused(lambda: split_rows([1, 2, 3], fraction, 0), "eval_fraction=", "must be a number")


def test_split_refuses_fewer_than_two_rows():
    refused(
        lambda: split_rows([1], 0.5, 0),
        "eval_fraction=0.5: holding rows out needs at least 2 rows, but there is 1",
    )


# -- reading: what is accepted ---------------------------------------------------------------


def test_jsonl_details(tmp_path):
    path = tmp_path / "A.JSONL"
    # A byte-order mark, blank lines, CRLF line ends, and U+2028 inside a string.
    path.write_bytes(b'\xef\xbb\xbf{"text": "a\xe2\x80\xa8b"}\r\n\n  \n{"text": "c"}\n')
    assert read_rows(path, "sft") == [{"text": "a\u2028b"}, {"text": "c"}]


def test_json_holding_lines_and_csv_with_a_bom(tmp_path):
    path = tmp_path / "a.json"
    path.write_text('{"text": "a"}\n{"text": "b"}\n')
    assert read_rows(path, "sft") == [{"text": "a"}, {"text": "b"}]
    path = tmp_path / "a.csv"
    path.write_bytes(b'\xef\xbb\xbftext,n\r\n"x, y",1\r\n\r\n"multi\nline",2\r\n')
    assert read_rows(path, "sft") == [{"text": "x, y", "n": "1"}, {"text": "multi\nline", "n": "2"}]


def test_nesting_up_to_the_limit_is_read(tmp_path):
    path = tmp_path / "deep.jsonl"
    value: Any = "x"
    for _ in range(read.MAX_DEPTH - 1):  # the row itself is the last level
        value = [value]
    path.write_text(json.dumps({"a": value}) + "\n")
    assert len(read_rows(path, "sft")) == 1


def test_datasets_folder_shards_are_read_in_state_order(tmp_path):
    folder = arrow_folder(tmp_path / "ds", [[{"text": "a"}, {"text": "b"}], [{"text": "c"}]])
    assert [r["text"] for r in read_rows(folder, "sft")] == ["a", "b", "c"]
    state = json.loads((folder / "state.json").read_text())
    state["_data_files"].reverse()
    (folder / "state.json").write_text(json.dumps(state))
    assert [r["text"] for r in read_rows(folder, "sft")] == ["c", "a", "b"]


def test_datasets_shards_written_by_datasets(tmp_path):
    rows = [{"text": str(i)} for i in range(7)]
    datasets_or_skip().Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"), num_shards=3)
    assert read_rows(tmp_path / "ds", "sft") == rows


# -- reading: refusals -----------------------------------------------------------------------


def test_missing_path_is_refused(tmp_path):
    (tmp_path / "pref.json").write_text("[]")
    refused(
        lambda: read_rows(tmp_path / "pref.jsonl", "preference=pref.jsonl"),
        "preference=pref.jsonl",
        "no such file or folder",
        "its folder holds pref.json: did you mean one of these?",
    )
    refused(
        lambda: read_rows(tmp_path / "other.jsonl", "preference=other.jsonl"),
        "no such file or folder",
        "check the path",
    )
    refused(
        lambda: read_rows(tmp_path / "nowhere" / "a.jsonl", "sft"),
        "its folder",
        "does not exist either",
    )


def test_where_names_the_path_when_the_label_does_not(tmp_path):
    refused(lambda: read_rows(tmp_path / "x.jsonl", "sft"), f"sft ({tmp_path / 'x.jsonl'}):")


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_empty_file_is_refused(tmp_path, suffix):
    path = tmp_path / f"a{suffix}"
    path.write_bytes(b"")
    refused(lambda: read_rows(path, f"sft={path.name}"), "sft=a", "the file is empty (0 bytes)")


@pytest.mark.parametrize("kind", ["jsonl", "json", "csv", "blank_csv", "parquet", "folder"])
def test_zero_rows_are_refused(tmp_path, kind):
    if kind == "jsonl":
        path = tmp_path / "a.jsonl"
        path.write_text("\n  \n")
    elif kind == "json":
        path = tmp_path / "a.json"
        path.write_text("[ ]")
    elif kind == "csv":
        path = tmp_path / "a.csv"
        path.write_text("prompt,completion\n")
    elif kind == "blank_csv":
        path = tmp_path / "a.csv"
        path.write_text("\n\r\n")
    elif kind == "parquet":
        path = tmp_path / "a.parquet"
        pq.write_table(pa.table({"text": pa.array([], pa.string())}), path)
    else:
        path = arrow_folder(tmp_path / "ds", [[]])
    refused(lambda: read_rows(path, "sft=x"), "sft=x", "holds no rows")


@pytest.mark.parametrize(
    ("name", "fix"),
    [
        ("a.txt", "convert the file to one of these"),
        ("a", "no extension"),
        ("data-00000-of-00001.arrow", "give the folder datasets' save_to_disk wrote"),
        ("a.jsonl.gz", "decompress it first"),
    ],
)
def test_unknown_extension_is_refused(tmp_path, name, fix):
    path = tmp_path / name
    path.write_text("x")
    refused(
        lambda: read_rows(path, "sft=x"),
        "sft=x",
        "unknown file type",
        "accepted: .jsonl, .json, .parquet, .csv, or a folder written by datasets' save_to_disk",
        fix,
    )


@pytest.mark.parametrize(
    ("content", "fix"),
    [
        (b'{"text": "a"}\n', "it looks like JSON: give it the extension .jsonl or .json"),
        (b"text\nhello\n", "it looks like text"),
        (b"\x00\x01\x02\x03\x04\x05\x06\x07\x08", "write it again with pyarrow.parquet"),
        (b"PAR1", "it looks like text"),  # too short to be Parquet
    ],
)
def test_parquet_without_its_magic_is_refused(tmp_path, content, fix):
    path = tmp_path / "a.parquet"
    path.write_bytes(content)
    refused(lambda: read_rows(path, "sft"), "is not a Parquet file", "PAR1", fix)


def test_damaged_parquet_is_refused(tmp_path):
    path = tmp_path / "a.parquet"
    path.write_bytes(b"PAR1" + b"garbage" * 5 + b"PAR1")
    refused(lambda: read_rows(path, "sft"), "is a damaged Parquet file", "write it again")


def test_jsonl_line_that_is_not_an_object_is_refused(tmp_path):
    path = tmp_path / "a.jsonl"
    bad = '{"text": "b", ' + "x" * 100
    path.write_text('{"text": "a"}\n\n' + bad + "\n")
    message = refused(
        lambda: read_rows(path, "sft=a.jsonl"),
        "sft=a.jsonl (",
        "): line 3 is not valid JSON",
        repr(bad[:80]) + "...",
        "write one JSON object per line",
    )
    assert "x" * 81 not in message
    path.write_text('{"text": "a"}\n[1, 2]\n')
    refused(lambda: read_rows(path, "sft"), "line 2 is a JSON array, not an object: '[1, 2]'")
    path.write_text('"just a string"\n')
    refused(lambda: read_rows(path, "sft"), "line 1 is a JSON string, not an object")


def test_jsonl_holding_one_json_document_says_rename(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps([{"text": "a"}], indent=2))
    refused(
        lambda: read_rows(path, "sft"),
        "line 1 is not valid JSON",
        "the file holds one JSON document, not JSON Lines: name it .json",
    )


def test_control_characters_in_a_bad_line_are_escaped(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text("\x1b[31mred\n")
    message = refused(lambda: read_rows(path, "sft"), "line 1 is not valid JSON", "\\x1b[31mred")
    assert "\x1b" not in message


@pytest.mark.parametrize(
    ("content", "parts"),
    [
        (b"PAR1xxxxPAR1", ["is not CSV text but a Parquet file: rename it to .parquet"]),
        (b"PK\x03\x04xx", ["is not CSV text but a zip archive", "export it as CSV UTF-8"]),
        (b"a,b\n1,\x002\n", ["is binary, not CSV text (a NUL byte at byte offset 6)"]),
        ("text\nh\u00e9\n".encode("utf-16"), ["is UTF-16 text; save it as UTF-8"]),
    ],
)
def test_binary_csv_is_refused(tmp_path, content, parts):
    path = tmp_path / "a.csv"
    path.write_bytes(content)
    refused(lambda: read_rows(path, "sft=a.csv"), "sft=a.csv", *parts)


def test_invalid_utf8_names_the_offset_and_line(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'{"text": "a"}\n{"text": "\xe9t\xe9"}\n')
    refused(
        lambda: read_rows(path, "sft"),
        "is not valid UTF-8: byte 0xe9 at byte offset 24 (line 2)",
        "save the file with the UTF-8 encoding",
    )


def test_json_that_is_neither_lines_nor_an_array_is_refused(tmp_path):
    path = tmp_path / "a.json"
    path.write_text('{"text": "a"}\nhello world\n')
    refused(
        lambda: read_rows(path, "sft=a.json"),
        "sft=a.json (",
        "): is neither JSON Lines nor one JSON array of objects",
        "line 2 is not valid JSON",
    )
    path.write_text(json.dumps({"text": "a", "n": 1}, indent=2))
    refused(
        lambda: read_rows(path, "sft"), "holds one JSON object, not rows", "one object per line"
    )
    path.write_text(json.dumps({"version": 1, "data": [{"text": "a"}]}, indent=2))
    refused(lambda: read_rows(path, "sft"), "its key 'data' holds a list of 1 objects")


def test_json_array_refusals(tmp_path):
    path = tmp_path / "a.json"
    path.write_text('[{"text": "a"},\n "b"]')
    refused(
        lambda: read_rows(path, "sft=a.json"),
        "sft=a.json (",
        "): item 1 of the JSON array is a string, not an object",
    )
    path.write_text('[{"text": "a"},\n {"text": }]')
    refused(lambda: read_rows(path, "sft"), "is not valid JSON: Expecting value at line 2, column")


def test_json_array_that_is_not_an_array_is_refused(tmp_path, monkeypatch):
    # json.loads cannot return anything but a list for text starting with "[": a safeguard.
    path = tmp_path / "a.json"
    path.write_text("[1]")
    monkeypatch.setattr(read.json, "loads", lambda text: {"a": 1})
    refused(lambda: read_rows(path, "sft"), "is a JSON object, not an array of objects; give")


@pytest.mark.parametrize(
    ("name", "text", "part"),
    [
        ("a.jsonl", "[" * 100_000 + "]" * 100_000, "line 1 nests deeper than 64 levels; flatten"),
        ("a.jsonl", '{"a": ' + "[" * 64 + "]" * 64 + "}", "line 1 nests deeper than 64 levels"),
        ("a.json", "[" + "[" * 100_000 + "]" * 100_000 + "]", "nests deeper than 64 levels"),
        ("a.json", '[{"a": ' + "[" * 64 + "]" * 64 + "}]", "item 0 of the JSON array nests"),
        ("a.json", '{"a": 1}\n{"a": ' + "[" * 64 + "]" * 64 + "}", "line 2 nests deeper than 64"),
    ],
)
def test_deep_nesting_is_refused_without_a_traceback(tmp_path, name, text, part):
    path = tmp_path / name
    path.write_text(text)
    refused(lambda: read_rows(path, "sft"), part)


def test_oversized_file_and_folder_are_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(read, "MAX_FILE_BYTES", 10)
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "a long enough row"}\n')
    refused(
        lambda: read_rows(path, "sft=a.jsonl"),
        f"sft=a.jsonl ({path}): 30 bytes is over the 10 bytes limit",
        "MAX_FILE_BYTES",
        "keep a subset of its rows in a smaller file",
    )
    folder = arrow_folder(tmp_path / "ds", [[{"text": "a"}]])
    refused(lambda: read_rows(folder, "sft"), "is over the 10 bytes limit")
    monkeypatch.setattr(read, "MAX_FILE_BYTES", 2**10)
    path.write_text('{"text": "' + "x" * (1536 - 13) + '"}\n')
    refused(lambda: read_rows(path, "sft"), "1.5 KiB is over the 1.0 KiB limit")


@pytest.mark.parametrize(
    ("text", "parts"),
    [
        ("prompt,,rejected\na,b,c\n", ["column 2 of the header (line 1) has no name"]),
        ("text,n,text\na,b,c\n", ["the header (line 1) names 'text' twice (columns 1 and 3)"]),
        ('prompt,completion\n"a",b\nx, y, z\n', ["line 3 has 3 fields but the header has 2"]),
        ('prompt,completion\n"a,b"\n', ["line 2 has 1 field but the header has 2"]),
    ],
)
def test_malformed_csv_is_refused(tmp_path, text, parts):
    path = tmp_path / "a.csv"
    path.write_text(text)
    refused(lambda: read_rows(path, "sft=a.csv"), "sft=a.csv", *parts)


def test_csv_the_csv_module_refuses_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(read, "_CSV_FIELD_LIMIT", 5)
    limit = csv.field_size_limit()
    path = tmp_path / "a.csv"
    path.write_text("text\nshort\nmuch too long\n")
    refused(
        lambda: read_rows(path, "sft"),
        "line 3 is not valid CSV (field larger than field limit (5))",
        "write the file again with a CSV writer",
    )
    assert csv.field_size_limit() == limit  # the process-wide limit is put back


def test_datasets_dict_folder_is_refused(tmp_path):
    datasets = datasets_or_skip()
    one = datasets.Dataset.from_list([{"text": "a"}])
    datasets.DatasetDict(train=one, test=one).save_to_disk(str(tmp_path / "dd"))
    refused(
        lambda: read_rows(tmp_path / "dd", "sft=dd"),
        "sft=dd",
        "is a DatasetDict folder (splits: 'train', 'test')",
        f"give the folder of one split, e.g. {tmp_path / 'dd' / 'train'}",
    )
    assert read_rows(tmp_path / "dd" / "train", "sft") == [{"text": "a"}]


def test_datasets_dict_folder_without_a_readable_list_names_its_sub_folders(tmp_path):
    folder = tmp_path / "dd"
    folder.mkdir()
    arrow_folder(folder / "validation", [[{"text": "a"}]])
    (folder / "dataset_dict.json").write_text("not json")
    refused(
        lambda: read_rows(folder, "sft"),
        "(splits: 'validation')",
        f"e.g. {folder / 'validation'}",
    )


def test_other_folders_are_refused(tmp_path):
    folder = tmp_path / "hub"
    folder.mkdir()
    (folder / "train-00000.parquet").write_bytes(b"x")
    refused(
        lambda: read_rows(folder, "sft=hub"),
        f"sft=hub ({folder}): is a folder but not one written by datasets' save_to_disk",
        "it holds train-00000.parquet",
        "give a file (.jsonl, .json, .parquet, .csv) or such a folder",
    )


@pytest.mark.parametrize(
    ("state", "part"),
    [
        ("not json", "state.json does not list the data files"),
        ('{"_split": null}', "state.json does not list the data files"),
        ('{"_data_files": []}', "state.json lists no data files"),
        (
            '{"_data_files": [{"filename": "gone.arrow"}]}',
            "lists the data file 'gone.arrow', absent",
        ),
        (
            '{"_data_files": [{"filename": "../x.arrow"}]}',
            "lists the data file '../x.arrow', absent",
        ),
    ],
)
def test_damaged_datasets_folder_is_refused(tmp_path, state, part):
    folder = arrow_folder(tmp_path / "ds", [[{"text": "a"}]])
    (tmp_path / "x.arrow").write_bytes((folder / "data-00000-of-00001.arrow").read_bytes())
    (folder / "state.json").write_text(state)
    refused(lambda: read_rows(folder, "sft"), part, "save the dataset again with save_to_disk")


def test_damaged_arrow_file_is_refused(tmp_path):
    folder = arrow_folder(tmp_path / "ds", [[{"text": "a"}]])
    (folder / "data-00000-of-00001.arrow").write_bytes(b"not arrow at all")
    refused(
        lambda: read_rows(folder, "sft"),
        "data-00000-of-00001.arrow is not an Arrow stream that pyarrow can read",
        "save the dataset again with save_to_disk",
    )
