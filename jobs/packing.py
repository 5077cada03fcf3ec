"""Order requests for the engine: sorted by length inside a bounded window, rows sharing a prefix kept together.

Similar lengths side by side waste fewer padded steps and free blocks in waves, while the window keeps memory
bounded (at most `window` tokenized rows wait here) however large the input is. Pure: no engine, no IO.

With the prefix cache, rows that share a prompt prefix (a system prompt, few-shot examples, one document asked
several questions) should also reach the engine together, so the prefix is computed once and reused while its
blocks are still cached. Each row's group is its longest block-aligned prefix that another row of the window
shares (or the row alone); groups keep their rows together and are ordered by their shortest row, rows by length
inside. Without shared prefixes every row is its own group and the order is the plain length sort.

    window (key = length)            groups (longest shared prefix)          output
    r0 S+q 40   r1 T+q 20            S: r0 r2    T: r1 r3    r4 alone          r2 10, r0 40 | r1 20, r3 30 | r4 25
    r2 S+q 10   r3 T+q 30
    r4 25                            (plain length sort: r2 10, r1 20, r4 25, r3 30, r0 40)
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from typing import TypeVar

T = TypeVar("T")


def sort_window(
    items: Iterable[T],
    window: int,
    key: Callable[[T], int],
    tokens: Callable[[T], Sequence[int]] | None = None,
    block_size: int = 16,
) -> Iterator[T]:
    """Yield every item once: each consecutive run of `window` items sorted by `key` (stable); with `tokens`,
    grouped by shared prefix of full `block_size`-token blocks first (see the module docstring)."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if window == 1:
        yield from items
        return
    buffer: list[T] = []
    for item in items:
        buffer.append(item)
        if len(buffer) >= window:
            yield from _ordered(buffer, key, tokens, block_size)
            buffer = []
    yield from _ordered(buffer, key, tokens, block_size)


def _ordered(
    buffer: list[T], key: Callable[[T], int], tokens: Callable[[T], Sequence[int]] | None, block_size: int
) -> list[T]:
    if tokens is None:
        return sorted(buffer, key=key)
    chains = [prefix_chain(tokens(item), block_size) for item in buffer]
    counts = Counter(h for chain in chains for h in chain)
    groups: dict[Hashable, list[T]] = {}
    for i, (item, chain) in enumerate(zip(buffer, chains)):
        shared = next((h for h in reversed(chain) if counts[h] > 1), None)
        groups.setdefault(shared if shared is not None else ("alone", i), []).append(item)
    members = [sorted(group, key=key) for group in groups.values()]
    members.sort(key=lambda group: key(group[0]))  # stable: equal groups keep their order of first appearance
    return [item for group in members for item in group]


def prefix_chain(token_ids: Sequence[int], block_size: int) -> list[int]:
    """A key per full block naming the block and everything before it (a 64-bit hash: good enough for ordering
    rows; the engine's cache uses its own collision-proof keys)."""
    chain: list[int] = []
    parent = 0
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash((parent, tuple(token_ids[start : start + block_size])))
        chain.append(parent)
    return chain
