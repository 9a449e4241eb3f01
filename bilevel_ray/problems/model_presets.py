"""Model shapes for the ``peft-dpo-sft`` problem, built from a config with random weights.

``model`` (a setting of the problem) picks one:

* ``None``: the tiny Llama of the problem's ``vocab`` / ``hidden`` / ``layers`` / ``heads``
  settings (64 tokens, 32 hidden units by default: tests and examples stay fast);
* a preset name below: the shape of a small production model;
* a dict of ``transformers.LlamaConfig`` fields: any other Llama shape;
* a local directory: a saved Hugging Face causal LM (see the problem's module).

``llama-100m`` is a Llama-style decoder of 105.8 M parameters with a 32 000-token vocabulary
(the Llama-2 tokenizer's size): hidden 768, 8 layers of 12 heads of 64, MLP 2048, untied
head. Its head, y in the PEFT problem, is 32 000 x 768 = 24.6 M parameters (98 MB in float32)
and so is its input embedding; the 8 layers hold 56.6 M. No weights are downloaded.
"""

from __future__ import annotations

from typing import Any

__all__ = ["PRESETS", "llama_config"]

PRESETS: dict[str, dict[str, Any]] = {
    "llama-100m": {
        "vocab_size": 32000,
        "hidden_size": 768,
        "intermediate_size": 2048,
        "num_hidden_layers": 8,
        "num_attention_heads": 12,
        "num_key_value_heads": 12,
        "max_position_embeddings": 2048,
    },
}


def llama_config(fields: dict[str, Any], transformers: Any) -> Any:
    """A ``LlamaConfig`` of ``fields`` with the head untied from the input embeddings (y is the
    head alone)."""
    return transformers.LlamaConfig(**{**fields, "tie_word_embeddings": False})
