"""Slot math: where token t of a sequence lives in the pages.

    block_table = [7, 2, 9]          block_size = 4
    token:   0 1 2 3 | 4 5 6 7 | 8 9
    block:   7 7 7 7 | 2 2 2 2 | 9 9
    slot = block_table[t // block_size] * block_size + t % block_size   (token 9 -> 9*4 + 1 = 37)

A slot indexes the flattened [num_blocks * block_size] token axis of a page tensor.
"""

from __future__ import annotations


def num_blocks_for(num_tokens: int, block_size: int) -> int:
    """Blocks needed to hold `num_tokens` tokens."""
    return -(-num_tokens // block_size)


def slots_for(block_ids: list[int], start_token: int, end_token: int, block_size: int) -> list[int]:
    """Flat slots of tokens start_token..end_token-1 of a sequence whose pages are `block_ids`."""
    if end_token > len(block_ids) * block_size:
        raise ValueError(
            f"tokens up to {end_token} need {num_blocks_for(end_token, block_size)} blocks, "
            f"the sequence holds {len(block_ids)}"
        )
    return [block_ids[t // block_size] * block_size + t % block_size for t in range(start_token, end_token)]
