"""Reading a user's text data, tokenizing it, caching the result.

An LLM fine-tune trains its upper level on a preference set (DPO) and its lower level on an
instruction set (SFT), both from the user's own files. :mod:`~bilevel_ray.text.read` turns a
file, or a folder saved by ``datasets``, into rows; :mod:`~bilevel_ray.text.formats` turns rows
into canonical preference and instruction rows. Those two import neither torch nor ``datasets``.
"""

from __future__ import annotations

__all__ = []
