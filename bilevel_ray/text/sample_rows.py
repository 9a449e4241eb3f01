"""The sample text's rows: questions about a fixed table of fruits, vegetables and animals,
each answered from the table (the rule a small model can learn), with a dispreferred answer that
states a wrong value of the same attribute.

:func:`draw_rows` draws the preference and the instruction rows (standard format: strings);
:func:`preference_chat` and :func:`instruction_messages` give the same rows as conversations;
:func:`corpus` is every sentence the templates can make, what the sample tokenizer learns.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

__all__ = ["corpus", "draw_rows", "instruction_messages", "preference_chat"]

# name: (kind, colour, size, taste or sound)
_ITEMS = {
    "apple": ("fruit", "red", "small", "sweet"),
    "banana": ("fruit", "yellow", "medium", "sweet"),
    "lemon": ("fruit", "yellow", "small", "sour"),
    "cherry": ("fruit", "red", "small", "sweet"),
    "grape": ("fruit", "purple", "small", "sweet"),
    "orange": ("fruit", "orange", "medium", "sweet"),
    "lime": ("fruit", "green", "small", "sour"),
    "plum": ("fruit", "purple", "small", "sweet"),
    "pear": ("fruit", "green", "medium", "sweet"),
    "melon": ("fruit", "yellow", "large", "sweet"),
    "watermelon": ("fruit", "green", "large", "sweet"),
    "peach": ("fruit", "orange", "medium", "sweet"),
    "coconut": ("fruit", "brown", "large", "mild"),
    "strawberry": ("fruit", "red", "small", "sweet"),
    "carrot": ("vegetable", "orange", "medium", "sweet"),
    "potato": ("vegetable", "brown", "medium", "mild"),
    "onion": ("vegetable", "white", "small", "spicy"),
    "chili": ("vegetable", "red", "small", "spicy"),
    "cabbage": ("vegetable", "green", "large", "mild"),
    "broccoli": ("vegetable", "green", "medium", "bitter"),
    "pumpkin": ("vegetable", "orange", "large", "sweet"),
    "cucumber": ("vegetable", "green", "medium", "mild"),
    "eggplant": ("vegetable", "purple", "medium", "bitter"),
    "radish": ("vegetable", "red", "small", "spicy"),
    "garlic": ("vegetable", "white", "small", "spicy"),
    "lettuce": ("vegetable", "green", "medium", "mild"),
    "kale": ("vegetable", "green", "medium", "bitter"),
    "cat": ("animal", "grey", "small", "meow"),
    "dog": ("animal", "brown", "medium", "woof"),
    "cow": ("animal", "black", "large", "moo"),
    "sheep": ("animal", "white", "medium", "baa"),
    "pig": ("animal", "pink", "medium", "oink"),
    "duck": ("animal", "white", "small", "quack"),
    "horse": ("animal", "brown", "large", "neigh"),
    "lion": ("animal", "yellow", "large", "roar"),
    "frog": ("animal", "green", "small", "croak"),
    "owl": ("animal", "brown", "small", "hoot"),
    "mouse": ("animal", "grey", "small", "squeak"),
    "crow": ("animal", "black", "small", "caw"),
    "bee": ("animal", "yellow", "small", "buzz"),
    "snake": ("animal", "green", "medium", "hiss"),
    "wolf": ("animal", "grey", "large", "howl"),
    "goat": ("animal", "white", "medium", "bleat"),
}

# {a}: "a banana", {A}: "A banana", {v}: the value, {av}: the value with its article.
_QUESTIONS = {
    "colour": (
        "What colour is {a}?",
        "Which colour does {a} have?",
        "Tell me the colour of {a}.",
        "What is the colour of {a}?",
    ),
    "size": (
        "How big is {a}?",
        "What size is {a}?",
        "Is {a} small, medium or large?",
        "Tell me the size of {a}.",
    ),
    "kind": (
        "What kind of thing is {a}?",
        "Is {a} a fruit, a vegetable or an animal?",
        "What is {a}?",
        "Which group does {a} belong to?",
    ),
    "taste": (
        "How does {a} taste?",
        "What does {a} taste like?",
        "What is the taste of {a}?",
        "Tell me how {a} tastes.",
    ),
    "sound": (
        "What sound does {a} make?",
        "What does {a} say?",
        "Which noise does {a} make?",
        "Tell me the sound of {a}.",
    ),
}
_ANSWERS = {
    "colour": ("{A} is {v}.", "The colour of {a} is {v}.", "It is {v}."),
    "size": ("{A} is {v}.", "The size of {a} is {v}.", "It is {v} in size."),
    "kind": ("{A} is {av}.", "It is {av}.", "{A} belongs to the {v}s."),
    "taste": ("{A} tastes {v}.", "It tastes {v}.", "The taste of {a} is {v}."),
    "sound": ("{A} says {v}.", "It says {v}.", "The sound of {a} is {v}."),
}


def _attributes(name: str) -> dict[str, str]:
    kind, colour, size, last = _ITEMS[name]
    return {"colour": colour, "size": size, "kind": kind, _last_attribute(kind): last}


def _last_attribute(kind: str) -> str:
    return "sound" if kind == "animal" else "taste"


def _family(attribute: str) -> list[str]:
    """Every value the table gives ``attribute``: a rejected answer draws a wrong one here."""
    values = {v for name in _ITEMS for a, v in _attributes(name).items() if a == attribute}
    return sorted(values)


def _with_article(word: str) -> str:
    return ("an " if word.startswith(tuple("aeiou")) else "a ") + word


def _fill(template: str, name: str, value: str) -> str:
    a = _with_article(name)
    return template.format(a=a, A=a[0].upper() + a[1:], v=value, av=_with_article(value))


def draw_rows(rows: int, rng: random.Random) -> tuple[list[dict], list[dict]]:
    """``rows`` preference rows and ``rows`` instruction rows. The pool of (item, attribute,
    question wording) is shuffled and split in two, so the sets never share a question text;
    each set cycles through its half, reshuffled on every pass."""
    pool = [
        (name, attribute, question)
        for name in _ITEMS
        for attribute in _attributes(name)
        for question in _QUESTIONS[attribute]
    ]
    rng.shuffle(pool)
    halves = pool[: len(pool) // 2], pool[len(pool) // 2 :]
    preference = []
    for name, attribute, question in _cycle(halves[0], rows, rng):
        right = _attributes(name)[attribute]
        wrong = rng.choice([v for v in _family(attribute) if v != right])
        answer = rng.choice(_ANSWERS[attribute])
        preference.append(
            {
                "prompt": _fill(question, name, right),
                # A leading space: the standard format joins prompt and response as they are.
                "chosen": " " + _fill(answer, name, right),
                "rejected": " " + _fill(answer, name, wrong),
            }
        )
    instruction = []
    for name, attribute, question in _cycle(halves[1], rows, rng):
        right = _attributes(name)[attribute]
        answer = rng.choice(_ANSWERS[attribute])
        instruction.append(
            {"prompt": _fill(question, name, right), "completion": " " + _fill(answer, name, right)}
        )
    return preference, instruction


def _cycle(pool: list, count: int, rng: random.Random) -> Iterator:
    """``count`` draws from ``pool``: all of it in a shuffled order, then again, reshuffled."""
    order: list = []
    for _ in range(count):
        if not order:
            order = pool[:]
            rng.shuffle(order)
        yield order.pop()


def preference_chat(row: dict) -> dict:
    return {
        "prompt": [{"role": "user", "content": row["prompt"]}],
        "chosen": [{"role": "assistant", "content": row["chosen"].lstrip()}],
        "rejected": [{"role": "assistant", "content": row["rejected"].lstrip()}],
    }


def instruction_messages(row: dict) -> dict:
    return {
        "messages": [
            {"role": "user", "content": row["prompt"]},
            {"role": "assistant", "content": row["completion"].lstrip()},
        ]
    }


def corpus() -> list[str]:
    """Every question and every answer (right or wrong) the table can give: the tokenizer does
    not depend on ``rows`` or ``seed``, and every word of the data is one of its tokens."""
    texts = []
    for name in _ITEMS:
        for attribute in _attributes(name):
            texts += [_fill(q, name, "?") for q in _QUESTIONS[attribute]]
            answers = [_fill(a, name, v) for a in _ANSWERS[attribute] for v in _family(attribute)]
            # With a leading space as in the standard rows, without as in chat messages.
            texts += answers + [" " + answer for answer in answers]
    return texts
