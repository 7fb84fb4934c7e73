"""Silence transformers' per-call progress bars around our own loads and saves."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import transformers


@contextlib.contextmanager
def progress_bars_disabled() -> Iterator[None]:
    """No "Loading weights" / "Writing model shards" bars: noise for sub-second, one-file I/O
    that the recipes already report in their own progress display."""
    was_enabled = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            transformers.utils.logging.enable_progress_bar()
