"""Truncation as TRL does it, counted: a prompt is cut from the left to ``max_prompt_length``
tokens (its end kept), a whole sequence from the right to ``max_length`` (its start kept), and a
row whose prompt alone fills ``max_length`` is dropped. :class:`Cutter` cuts and counts,
:class:`Truncation` is its printable report."""

from __future__ import annotations

from dataclasses import dataclass

from bilevel_ray.errors import ConfigError

__all__ = ["ROWS_SHOWN", "Cutter", "Truncation"]

ROWS_SHOWN = 5


@dataclass(frozen=True)
class Truncation:
    """What tokenizing a set cut and dropped. Counts of cuts are over the rows kept; row numbers
    count the set's rows from 0 (as datasets and pandas do); the longest prompt and sequence
    are measured before any cut."""

    rows: int
    max_length: int
    max_prompt_length: int | None
    prompts_cut: int
    completions: int
    completions_cut: int
    dropped_long_prompt: tuple[int, ...]
    dropped_nothing_scored: tuple[int, ...]
    longest_prompt: int
    longest_sequence: int

    @property
    def dropped(self) -> tuple[int, ...]:
        """Every dropped row's number, in order."""
        return tuple(sorted(self.dropped_long_prompt + self.dropped_nothing_scored))

    @property
    def kept(self) -> int:
        return self.rows - len(self.dropped)

    def lines(self, source: str) -> list[str]:
        """Printable lines saying what was cut or dropped (none when nothing was), each starting
        with ``source``, e.g. ``"preference=pref.jsonl"``."""
        parts = []
        if self.prompts_cut:
            parts.append(
                f"{self.prompts_cut} of {self.kept} prompts cut to "
                f"max_prompt_length={self.max_prompt_length} tokens"
            )
        if self.completions_cut:
            parts.append(
                f"{self.completions_cut} of {self.completions} completions cut to "
                f"max_length={self.max_length} tokens"
            )
        parts += self._drops()
        if not parts:
            return []
        return [
            f"{source}: " + "; ".join(parts),
            f"{source}: the longest prompt has {_tokens(self.longest_prompt)} and the longest "
            f"sequence {_tokens(self.longest_sequence)}",
        ]

    def _drops(self) -> list[str]:
        parts = []
        if self.dropped_long_prompt:
            parts.append(
                f"{_rows(self.dropped_long_prompt)} dropped: the prompt alone has "
                f">= {self.max_length} tokens ({_numbers(self.dropped_long_prompt)})"
            )
        if self.dropped_nothing_scored:
            parts.append(
                f"{_rows(self.dropped_nothing_scored)} dropped: no completion token to score "
                f"({_numbers(self.dropped_nothing_scored)})"
            )
        return parts


class Cutter:
    """TRL's truncation of (prompt, completion) ids, counting what it cuts."""

    def __init__(self, max_length: int, max_prompt_length: int | None):
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length
        self.prompts_cut = 0
        self.completions_cut = 0
        self.long_prompt: list[int] = []
        self.nothing_scored: list[int] = []
        self.longest_prompt = 0
        self.longest_sequence = 0

    def prompt(self, row: int, prompt: list[int], *completions: list[int]) -> list[int] | None:
        """The prompt cut to max_prompt_length from the left, or None when the row is dropped."""
        self.longest_prompt = max(self.longest_prompt, len(prompt))
        self.longest_sequence = max(
            self.longest_sequence, *(len(prompt) + len(c) for c in completions)
        )
        cut = self.max_prompt_length is not None and len(prompt) > self.max_prompt_length
        if cut:
            prompt = prompt[len(prompt) - self.max_prompt_length :]
        if len(prompt) >= self.max_length:
            self.long_prompt.append(row)
            return None
        # Position 0 is never scored (nothing predicts it): a row needs a completion token at
        # a position >= 1 inside max_length.
        if any(
            min(len(prompt) + len(c), self.max_length) <= max(len(prompt), 1) for c in completions
        ):
            self.nothing_scored.append(row)
            return None
        self.prompts_cut += cut
        return prompt

    def sequence(self, prompt: list[int], completion: list[int]) -> tuple[list[int], int]:
        """(the sequence cut to max_length from the right, where its completion starts)."""
        sequence = prompt + completion
        if len(sequence) > self.max_length:
            self.completions_cut += 1
            sequence = sequence[: self.max_length]
        return sequence, len(prompt)

    def report(self, rows: int, completions: int, what: str) -> Truncation:
        report = Truncation(
            rows=rows,
            max_length=self.max_length,
            max_prompt_length=self.max_prompt_length,
            prompts_cut=self.prompts_cut,
            completions=completions,
            completions_cut=self.completions_cut,
            dropped_long_prompt=tuple(self.long_prompt),
            dropped_nothing_scored=tuple(self.nothing_scored),
            longest_prompt=self.longest_prompt,
            longest_sequence=self.longest_sequence,
        )
        if report.kept == 0:
            fixes = []
            if report.dropped_long_prompt:
                fixes.append(
                    f"raise max_length above the prompts' length (the longest has "
                    f"{self.longest_prompt} tokens) or set max_prompt_length below max_length"
                )
            if report.dropped_nothing_scored:
                fixes.append("give completions of at least one token")
            raise ConfigError(
                f"{what}: no row is left: {'; '.join(report._drops())}; {'; '.join(fixes)}"
            )
        return report


def _rows(numbers: tuple[int, ...]) -> str:
    return f"{len(numbers)} row{'s' if len(numbers) != 1 else ''}"


def _numbers(numbers: tuple[int, ...]) -> str:
    shown = ", ".join(str(n) for n in numbers[:ROWS_SHOWN])
    more = f" and {len(numbers) - ROWS_SHOWN} more" if len(numbers) > ROWS_SHOWN else ""
    return f"row{'s' if len(numbers) != 1 else ''} {shown}{more}"


def _tokens(count: int) -> str:
    return f"{count} token{'s' if count != 1 else ''}"
