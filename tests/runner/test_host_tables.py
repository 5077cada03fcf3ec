"""The host block tables kept between steps (runner/host_tables.py) equal tables built afresh, whatever the
sequences do between steps: grow, lose their pages to a new list, swap rows, leave, arrive."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from kvbatch.runner.config import SamplingParams
from kvbatch.runner.host_tables import HostBlockTables
from kvbatch.runner.request import GenerationRequest
from kvbatch.runner.sequence import Sequence


def fresh(seqs: list[Sequence], width: int) -> np.ndarray:
    table = np.zeros((len(seqs), width), np.int32)
    for i, seq in enumerate(seqs):
        table[i, : len(seq.block_ids)] = seq.block_ids
    return table


def new_seq(seq_id: int, num_blocks: int, first_block: int) -> Sequence:
    seq = Sequence(seq_id, GenerationRequest(seq_id, [1, 2], SamplingParams()), 0, 8, seed=0)
    seq.block_ids = list(range(first_block, first_block + num_blocks))
    return seq


# One change to the running set between two steps: (kind, which sequence, how many blocks)
changes = st.lists(
    st.tuples(st.sampled_from(["grow", "replace", "swap", "leave", "arrive"]), st.integers(0, 50), st.integers(1, 6)),
    max_size=12,
)


@settings(max_examples=150, deadline=None)
@given(st.lists(changes, min_size=1, max_size=12), st.integers(1, 8))
def test_kept_tables_equal_fresh_ones(steps, num_start):
    tables = HostBlockTables()
    next_block = 1000
    seqs = [new_seq(i, 1 + i % 3, 10 * i) for i in range(num_start)]
    for step_changes in steps:
        for kind, k, amount in step_changes:
            if kind == "arrive" or not seqs:
                seqs.append(new_seq(len(seqs) + 100, amount, next_block))
                next_block += amount
                continue
            seq = seqs[k % len(seqs)]
            if kind == "grow":  # the scheduler's extend
                seq.block_ids.extend(range(next_block, next_block + amount))
            elif kind == "replace":  # preempted and readmitted: a new list, maybe as long as the old one
                seq.block_ids = list(range(next_block, next_block + len(seq.block_ids)))
            elif kind == "swap":
                j = (k + amount) % len(seqs)
                seqs[k % len(seqs)], seqs[j] = seqs[j], seqs[k % len(seqs)]
            elif kind == "leave":
                seqs.remove(seq)
            next_block += amount
        if not seqs:
            continue
        width = max(len(s.block_ids) for s in seqs) + 1  # a wider step (a prefill's longer table) pads with zeros
        out = np.full((len(seqs), width), -7, np.int32)
        counts = tables.fill(seqs, out)
        np.testing.assert_array_equal(out, fresh(seqs, width))
        assert counts.tolist() == [len(s.block_ids) for s in seqs]


def test_a_row_built_from_a_longer_list_is_cleared_to_the_right():
    tables = HostBlockTables()
    long, short = new_seq(0, 5, 0), new_seq(1, 2, 50)
    out = np.zeros((1, 5), np.int32)
    tables.fill([long], out)
    tables.fill([short], out)
    assert out.tolist() == [[50, 51, 0, 0, 0]]
