"""transformers' progress bars off while a model or tokenizer is loaded or saved: a run prints
its own lines, and a bar per file is noise (and a bar for a file of a few hundred kilobytes is
nothing to wait for)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

__all__ = ["no_progress_bars"]


@contextlib.contextmanager
def no_progress_bars() -> Iterator[None]:
    """transformers' progress bars off inside the block, as they were after it."""
    from transformers.utils import logging

    shown = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            logging.enable_progress_bar()
