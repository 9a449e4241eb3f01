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

__all__ = ["PRESETS", "llama_config", "parameter_count"]

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


def parameter_count(config: Any) -> int | None:
    """About how many parameters a Llama of ``config`` holds (head untied), from its fields
    alone, before any is allocated; None when a field is not a positive integer (transformers
    then names it)."""
    names = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers")
    values = [getattr(config, n, None) for n in (*names, "num_attention_heads")]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
        return None
    vocab, hidden, mlp, layers, heads = values
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    if not all(isinstance(v, int) and v > 0 for v in (kv, head_dim)):
        return None
    # q and o: hidden x heads*head_dim each; k and v: hidden x kv*head_dim; the MLP's three
    # matrices; two norms. Then the input embeddings and the untied head, and the final norm.
    per_layer = 2 * hidden * heads * head_dim + 2 * hidden * kv * head_dim
    per_layer += 3 * hidden * mlp + 2 * hidden
    return 2 * vocab * hidden + layers * per_layer + hidden
