"""Turn rows read from a user's file into canonical preference and instruction rows.

Preference rows (the upper level, DPO), in the formats TRL accepts:

* standard: columns ``prompt``, ``chosen``, ``rejected``, all strings;
* conversational: the same columns, each a list of ``{"role", "content"}`` messages (the prompt
  usually ends with a user message; ``chosen`` and ``rejected`` usually hold one assistant
  message);
* implicit prompt: ``chosen`` and ``rejected`` alone, each holding the prompt too. For strings
  the prompt is their longest common prefix cut back to its last whitespace, so that no word is
  split (the whitespace goes with the responses, as in TRL's ``extract_prompt``); for message
  lists it is the leading messages both share. When nothing is shared the prompt is ``""`` or
  ``[]``.

Instruction rows (the lower level, SFT), from the first of these column sets a file holds:

* ``prompt`` / ``completion``: strings (standard) or message lists (conversational);
* ``messages``: one conversation per row (conversational); the prompt is every message before
  the last assistant message, the completion is that message alone (any after it are dropped);
* ``text``: plain text, all of it trained on (standard; the prompt is ``""``).

Roles are system, user, assistant and tool; contents are strings (a message's other keys are
kept unless null). Other columns are ignored. A CSV file holds strings only: its rows are
standard. Rows with an empty or whitespace-only field (a null or missing field counts as
empty), preference rows whose ``chosen`` equals ``rejected``, and conversations without an
assistant message are skipped and counted in :class:`Handling`; wrong types are refused with a
:class:`~bilevel_ray.errors.ConfigError`. Row numbers count from 0, as ``datasets`` and pandas
number rows.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from bilevel_ray.errors import ConfigError

__all__ = [
    "ROLES",
    "Handling",
    "InstructionRow",
    "Message",
    "PreferenceRow",
    "instruction_rows",
    "preference_rows",
    "split_rows",
]

Message = dict  # {"role": str, "content": str}

ROLES = ("system", "user", "assistant", "tool")
_SHOWN_PROBLEMS = 5
_SHOWN_ROWS = 5
# Roles of other chat formats (ShareGPT, Gemini), and what they are called here.
_ROLE_NAMES = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant"}


@dataclass(frozen=True)
class PreferenceRow:
    """One preference pair: a string each (standard) or a list of messages each."""

    prompt: str | list[dict]
    chosen: str | list[dict]
    rejected: str | list[dict]


@dataclass(frozen=True)
class InstructionRow:
    """One instruction example; the prompt is ``""`` (or ``[]``) for plain text."""

    prompt: str | list[dict]
    completion: str | list[dict]


@dataclass
class Handling:
    """What was done to rows instead of refusing them, for the caller to print."""

    source: str
    skipped: dict[str, list[int]] = field(default_factory=dict)  # reason -> row numbers
    total: int = 0  # rows read

    def skip(self, reason: str, row: int) -> None:
        self.skipped.setdefault(reason, []).append(row)

    @property
    def kept(self) -> int:
        return self.total - sum(len(rows) for rows in self.skipped.values())

    def lines(self) -> list[str]:
        """One line per reason, e.g. "pref.jsonl: skipped 2 of 500 rows with an empty 'chosen'
        (rows 3, 9)"."""
        out = []
        for reason, rows in self.skipped.items():
            shown = ", ".join(str(r) for r in rows[:_SHOWN_ROWS])
            if len(rows) > _SHOWN_ROWS:
                shown += ", ..."
            noun = "row" if len(rows) == 1 else "rows"
            out.append(
                f"{self.source}: skipped {len(rows)} of {self.total} rows {_with(reason)} "
                f"({noun} {shown})"
            )
        return out


def _with(reason: str) -> str:
    return f"with an {reason}" if reason[:1] in ("a", "e", "i", "o", "u") else f"with {reason}"


class _Bad(Exception):
    """A field of the wrong type; the message says where, what, and the fix."""


def preference_rows(
    rows: Sequence[dict[str, Any]], source: str
) -> tuple[list[PreferenceRow], str, Handling]:
    """The preference rows of ``rows``, their kind ("standard" or "conversational"), and what was
    skipped; ``source`` names the file in messages."""
    columns = _columns(rows, source)
    if "chosen" not in columns or "rejected" not in columns:
        missing = [c for c in ("chosen", "rejected") if c not in columns]
        raise ConfigError(
            f"{source}: no {' or '.join(repr(c) for c in missing)} column (columns found: "
            f"{_names(columns)}); a preference set needs 'prompt', 'chosen' and 'rejected' "
            "(strings, or lists of {'role', 'content'} messages), or 'chosen' and 'rejected' "
            "alone, each holding the prompt too"
        )
    explicit = "prompt" in columns
    needed = ("prompt", "chosen", "rejected") if explicit else ("chosen", "rejected")
    both = {"standard", "conversational"}
    values, kind = _checked(rows, source, {c: both for c in needed}, preference=True)
    handling = Handling(source, total=len(rows))
    out = []
    for i, row in enumerate(values):
        reason = _empty_field(row, needed)
        if reason is None and row["chosen"] == row["rejected"]:
            reason = "'chosen' equal to 'rejected'"
        if reason is None and not explicit:
            row = dict(zip(("prompt", "chosen", "rejected"), _extract_prompt(row)))
            reason = _empty_field(row, ("chosen", "rejected"))
            if reason is not None:
                reason += " once the shared prompt is cut off"
        if reason is not None:
            handling.skip(reason, i)
            continue
        out.append(PreferenceRow(row["prompt"], row["chosen"], row["rejected"]))
    _refuse_all_skipped(out, handling)
    return out, kind, handling


def instruction_rows(
    rows: Sequence[dict[str, Any]], source: str
) -> tuple[list[InstructionRow], str, Handling]:
    """The instruction rows of ``rows``, their kind ("standard" or "conversational"), and what
    was skipped; ``source`` names the file in messages."""
    columns = _columns(rows, source)
    if "prompt" in columns and "completion" in columns:
        needed, allowed = ("prompt", "completion"), {"standard", "conversational"}
    elif "messages" in columns:
        needed, allowed = ("messages",), {"conversational"}
    elif "text" in columns:
        needed, allowed = ("text",), {"standard"}
    else:
        raise ConfigError(
            f"{source}: no instruction columns (columns found: {_names(columns)}); an "
            "instruction set needs 'prompt' and 'completion' (strings, or lists of {'role', "
            "'content'} messages), 'messages' (a conversation), or 'text' (plain text)"
            + _instruction_hint(columns)
        )
    values, kind = _checked(rows, source, {c: allowed for c in needed})
    handling = Handling(source, total=len(rows))
    out = []
    for i, row in enumerate(values):
        reason = _empty_field(row, needed)
        if reason is None and needed == ("messages",):
            messages = row["messages"]
            last = _last_assistant(messages)
            if last is None:
                reason = "no assistant message in 'messages'"
            elif not messages[last]["content"].strip():
                reason = "empty last assistant message in 'messages'"
            else:
                row = {"prompt": messages[:last], "completion": [messages[last]]}
        if reason is not None:
            handling.skip(reason, i)
            continue
        if needed == ("text",):
            out.append(InstructionRow("", row["text"]))
        else:
            out.append(InstructionRow(row["prompt"], row["completion"]))
    _refuse_all_skipped(out, handling)
    if needed == ("messages",):
        kind = "conversational"
    return out, kind, handling


def split_rows(rows: list, fraction: float, seed: int) -> tuple[list, list]:
    """``rows`` split at random, reproducibly for a ``seed``, into (train, held out); the held-out
    part has round(fraction * n) rows, at least 1 and at most n - 1. Both keep the rows' order."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
        raise ConfigError(
            f"eval_fraction={fraction!r}: must be a number between 0 and 1, e.g. 0.05"
        )
    if not 0 < fraction < 1:  # also refuses NaN
        raise ConfigError(
            f"eval_fraction={fraction!r}: must be between 0 and 1 (both excluded), e.g. 0.05 "
            "holds out 5% of the rows"
        )
    n = len(rows)
    if n < 2:
        raise ConfigError(
            f"eval_fraction={fraction!r}: holding rows out needs at least 2 rows, but there "
            f"{'is' if n == 1 else 'are'} {n}; give more rows"
        )
    held = min(max(round(fraction * n), 1), n - 1)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    out = set(order[:held])
    return (
        [row for i, row in enumerate(rows) if i not in out],
        [row for i, row in enumerate(rows) if i in out],
    )


# -- checks ---------------------------------------------------------------------------------


def _names(columns: Sequence[str]) -> str:
    return ", ".join(repr(c) for c in columns) or "none"


def _columns(rows: Sequence[Any], source: str) -> list[str]:
    """Every column of ``rows``, in the order first seen, after refusing rows that are not dicts."""
    if not rows:
        raise ConfigError(f"{source}: holds no rows; give a file with at least one row")
    columns: dict[str, None] = {}
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ConfigError(
                f"{source}: row {i} is {_a(row)}, not an object of columns; give "
                "one object per row, e.g. {'prompt': ..., 'completion': ...}"
            )
        columns.update(dict.fromkeys(row))
    return list(columns)


def _instruction_hint(columns: list[str]) -> str:
    if "instruction" in columns and "output" in columns:
        return (
            "; for Alpaca-style rows, put 'instruction' (and 'input') in a 'prompt' column and "
            "'output' in a 'completion' column"
        )
    if "conversations" in columns:
        return (
            "; for ShareGPT-style rows, rename 'conversations' to 'messages' and each message's "
            "'from' / 'value' to 'role' / 'content'"
        )
    if "prompt" in columns or "completion" in columns:
        return "; 'prompt' and 'completion' go together: add the missing one"
    return ""


def _checked(
    rows: Sequence[dict[str, Any]],
    source: str,
    allowed: dict[str, set[str]],
    preference: bool = False,
) -> tuple[list[dict[str, Any]], str]:
    """The ``allowed`` columns of every row, messages normalised, and the rows' kind; refuses
    wrong types (the first few together) and rows of both kinds."""
    problems: list[str] = []
    more = 0
    first: dict[str, tuple[int, str]] = {}  # kind -> where it was first seen
    values = []
    for i, row in enumerate(rows):
        checked = {}
        for column, kinds in allowed.items():
            try:
                kind, value = _field(row.get(column), f"{source}: row {i} column {column!r}", kinds)
            except _Bad as bad:
                if len(problems) < _SHOWN_PROBLEMS:
                    problems.append(str(bad))
                else:
                    more += 1
                continue
            if not _is_empty(value):
                first.setdefault(kind, (i, column))
            checked[column] = value
        values.append(checked)
    if problems:
        if more:
            problems.append(f"{source}: and {more} more like these in later rows")
        raise ConfigError(problems)
    if len(first) > 1:
        (i, a), (j, b) = first["standard"], first["conversational"]
        hint = ""
        if preference and a == "prompt" and b != "prompt":
            hint = (
                "; if 'chosen' and 'rejected' hold whole conversations (the prompt included), "
                "drop the 'prompt' column and the prompt is taken from them"
            )
        raise ConfigError(
            f"{source}: mixes standard and conversational rows: row {i} column {a!r} is a "
            f"string, row {j} column {b!r} is a list of messages; make every field of every "
            f"row one kind (all strings, or all lists of messages){hint}"
        )
    return values, next(iter(first), "standard")


def _field(value: Any, where: str, kinds: set[str]) -> tuple[str, Any]:
    """(kind, value) of one field; messages normalised; raises _Bad for a wrong type."""
    if value is None:
        return "standard", None
    if isinstance(value, str):
        if "standard" not in kinds:
            raise _Bad(f"{where} is a string, not a list of {{'role', 'content'}} messages")
        return "standard", value
    if isinstance(value, list):
        if "conversational" not in kinds:
            raise _Bad(
                f"{where} is a list, not a string; a conversation goes in a 'messages' column"
            )
        return "conversational", [_message(m, f"{where} message {j}") for j, m in enumerate(value)]
    if isinstance(value, dict) and "role" in value:
        raise _Bad(f"{where} is one message, not a list of messages: wrap it in [...]")
    expected = {
        "standard": "a string",
        "conversational": "a list of {'role', 'content'} messages",
    }
    wanted = " or ".join(expected[k] for k in ("standard", "conversational") if k in kinds)
    raise _Bad(f"{where} is {_a(value)} ({_shown(value)}), not {wanted}")


def _message(message: Any, where: str) -> dict[str, Any]:
    if not isinstance(message, dict):
        raise _Bad(
            f"{where} is {_a(message)} ({_shown(message)}), not a {{'role', 'content'}} object"
        )
    missing = [k for k in ("role", "content") if k not in message]
    if missing:
        hint = ""
        if "from" in message and "value" in message:
            hint = " (ShareGPT style: rename 'from' / 'value' to 'role' / 'content')"
        raise _Bad(
            f"{where} has no {' or '.join(repr(k) for k in missing)} (keys: "
            f"{_names(list(message))}); each message needs 'role' and 'content'{hint}"
        )
    role, content = message["role"], message["content"]
    if not isinstance(role, str) or role not in ROLES:
        known = isinstance(role, str) and role in _ROLE_NAMES
        hint = f" (rename {role!r} to {_ROLE_NAMES[role]!r})" if known else ""
        raise _Bad(f"{where} has the role {role!r}; roles are {', '.join(ROLES)}{hint}")
    if not isinstance(content, str):
        fix = (
            "only text is read: join its text parts into one string"
            if isinstance(content, list)
            else "give the text as a string"
        )
        raise _Bad(
            f"{where} has {_a(content)} as 'content' ({_shown(content)}), not a string; {fix}"
        )
    # Nulls are what Arrow writes for a key other messages have (a struct column's union).
    return {"role": role, "content": content} | {
        k: v for k, v in message.items() if k not in ("role", "content") and v is not None
    }


def _a(value: Any) -> str:
    """What ``value`` is, in words a user of JSON knows: "a number", "a list", "null"."""
    if value is None:
        return "null"
    names = {bool: "a boolean", int: "a number", float: "a number", str: "a string"}
    names |= {list: "a list", dict: "an object"}
    return names.get(type(value), f"a {type(value).__name__}")


def _shown(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text[:limit] + ("..." if len(text) > limit else "")


# -- rows -----------------------------------------------------------------------------------


def _is_empty(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, str):
        return not value.strip()
    return not any(m["content"].strip() for m in value)


def _empty_field(row: dict[str, Any], columns: Sequence[str]) -> str | None:
    """The skip reason of the first empty field among ``columns``, or None."""
    for column in columns:
        if _is_empty(row.get(column)):
            return f"empty {column!r}"
    return None


def _extract_prompt(row: dict[str, Any]) -> tuple[Any, Any, Any]:
    """(prompt, chosen, rejected) with the prompt both responses start with split off."""
    chosen, rejected = row["chosen"], row["rejected"]
    shared = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        shared += 1
    if isinstance(chosen, str):
        # Cut back to the last whitespace, which stays with the responses: no word is split.
        shared = next((i for i in range(shared - 1, -1, -1) if chosen[i].isspace()), 0)
    return chosen[:shared], chosen[shared:], rejected[shared:]


def _last_assistant(messages: list[dict[str, Any]]) -> int | None:
    for i in range(len(messages) - 1, -1, -1):
        if messages[i]["role"] == "assistant":
            return i
    return None


def _refuse_all_skipped(kept: list, handling: Handling) -> None:
    if kept:
        return
    reasons = "; ".join(f"{len(rows)} {_with(reason)}" for reason, rows in handling.skipped.items())
    raise ConfigError(
        f"{handling.source}: all {handling.total} rows were skipped ({reasons}); fill in the "
        "empty fields, or give the file that holds the data"
    )
