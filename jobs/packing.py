"""Order requests for the engine: sorted by length inside a bounded window.

Similar lengths side by side waste fewer padded steps and free blocks in waves, while the window keeps memory
bounded (at most `window` tokenized rows wait here) however large the input is. Pure: no engine, no IO.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def sort_window(items: Iterable[T], window: int, key: Callable[[T], int]) -> Iterator[T]:
    """Yield every item once: each consecutive run of `window` items sorted by `key` (stable)."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if window == 1:
        yield from items
        return
    buffer: list[T] = []
    for item in items:
        buffer.append(item)
        if len(buffer) >= window:
            yield from sorted(buffer, key=key)
            buffer = []
    yield from sorted(buffer, key=key)
