"""Generated token data for the ``peft-dpo-sft`` problem: a preference set and an instruction set.

The rule is one a small language model can learn from the prompt: the vocabulary ``0..V-1`` is
split into ``topics`` classes (token t belongs to topic ``t % topics``), a prompt is drawn from
one topic, and a good response stays in the prompt's topic::

    preference (upper level, DPO):  prompt ~ topic c,  chosen ~ topic c,  rejected ~ topic c' != c
    instruction (lower level, SFT): prompt ~ topic c,  response ~ topic c

Tokens are drawn uniformly within a topic, so the best SFT loss is log(V / topics) per response
token (against log V for a model that ignores the prompt). Every sequence is ``prompt_len +
response_len`` tokens; a boolean mask marks the response tokens, the only ones the losses score.
The losses accept right-padded sequences of other lengths too (padding is left out of the mask:
under causal attention it cannot change the scored positions).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["instruction_data", "preference_data", "response_mask"]


def _topic_tokens(
    topic: Tensor, length: int, vocab: int, topics: int, gen: torch.Generator
) -> Tensor:
    """[n, length] tokens, row i drawn uniformly from the tokens of ``topic[i]``."""
    count = ((vocab - topic + topics - 1) // topics)[:, None]  # t < vocab with t % topics == c
    index = (torch.rand(len(topic), length, generator=gen) * count).long()
    return topic[:, None] + topics * index


def response_mask(n: int, prompt_len: int, response_len: int) -> Tensor:
    """[n, prompt_len + response_len] bools, True at the response tokens."""
    mask = torch.zeros(n, prompt_len + response_len, dtype=torch.bool)
    mask[:, prompt_len:] = True
    return mask


def preference_data(
    n: int, vocab: int, topics: int, prompt_len: int, response_len: int, gen: torch.Generator
) -> dict[str, Tensor]:
    """``{"chosen", "chosen_mask", "rejected", "rejected_mask"}``: n prompts, each followed by
    an on-topic (chosen) and an off-topic (rejected) response."""
    topic = torch.randint(topics, (n,), generator=gen)
    other = (topic + torch.randint(1, topics, (n,), generator=gen)) % topics
    prompt = _topic_tokens(topic, prompt_len, vocab, topics, gen)
    chosen = _topic_tokens(topic, response_len, vocab, topics, gen)
    rejected = _topic_tokens(other, response_len, vocab, topics, gen)
    mask = response_mask(n, prompt_len, response_len)
    return {
        "chosen": torch.cat([prompt, chosen], dim=1),
        "chosen_mask": mask,
        "rejected": torch.cat([prompt, rejected], dim=1),
        "rejected_mask": mask.clone(),
    }


def instruction_data(
    n: int, vocab: int, topics: int, prompt_len: int, response_len: int, gen: torch.Generator
) -> dict[str, Tensor]:
    """``{"ids", "mask"}``: n prompts, each followed by an on-topic response."""
    topic = torch.randint(topics, (n,), generator=gen)
    ids = _topic_tokens(topic, prompt_len + response_len, vocab, topics, gen)
    return {"ids": ids, "mask": response_mask(n, prompt_len, response_len)}
