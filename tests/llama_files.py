"""Tiny Llama model folders on disk, for the tests of loading a user's model: a good one, one
whose weights file would run code if unpickled, and one whose weights file is cut short."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def tiny_llama_config(**overrides: Any) -> Any:
    """A 1-layer Llama config of 20 tokens and width 8 (transformers must be installed)."""
    import transformers

    shape = dict(
        vocab_size=20,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    return transformers.LlamaConfig(**{**shape, **overrides})


def save_code_weights(folder: Path, said: str) -> None:
    """folder: the tiny config and a pytorch_model.bin that pickles ``print(said)``: loading it
    with torch.load(weights_only=False) would run it."""

    class Code:
        def __reduce__(self):
            return (print, (said,))

    tiny_llama_config().save_pretrained(folder)
    torch.save({"model.embed_tokens.weight": Code()}, Path(folder) / "pytorch_model.bin")


def save_truncated_weights(folder: Path) -> None:
    """folder: the tiny config and a pytorch_model.bin cut in half (a copy cut short)."""
    tiny_llama_config().save_pretrained(folder)
    weights = Path(folder) / "pytorch_model.bin"
    torch.save({"w": torch.zeros(1000)}, weights)
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
