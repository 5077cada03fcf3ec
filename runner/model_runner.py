"""Turning a scheduled step into one forward pass of the transformers model over packed tokens.

All of a step's tokens go in as one row of a batch of one (input_ids [1, num_rows]), with their
true positions, so the model sees no padding between sequences; the attention hook keeps
sequences apart through the step's block tables. Logits are computed only for the rows that
sample (the last row of each sequence that reaches its end this step) and, in steps that score, the rows
being scored (runner/scoring.py): a step without scored rows gathers and pays for nothing more.

Batch invariance: CPU BLAS takes a different reduction path for GEMMs of fewer than about a dozen
rows, so a prompt would get other bits alone than in a crowd. The runner pads every step, and the
rows it computes logits for, to at least MIN_ROWS; padding rows write no K/V and attend to nothing.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import numpy as np
import torch

from kvbatch.cache.backends import AttentionBackend
from kvbatch.cache.kv_cache import KVCache
from kvbatch.cache.metadata import AttentionMetadata, LayerAttention

from .attention_hook import StepContext
from .fused_forward import FusedDecoder
from .host_tables import HostBlockTables
from .lora.step import LoraStep
from .scheduler import ScheduledSeq
from .sequence import Sequence

MIN_ROWS = 16


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [1, num_rows] int64
    positions: torch.Tensor  # [1, num_rows] int64
    logits_rows: torch.Tensor  # [num_logits_rows] int64, rows whose logits are kept (padded)
    num_sampling: int  # the first num_sampling entries of logits_rows are real
    meta: AttentionMetadata
    # Rows whose token is still pending (async scheduling): input_ids[0, pending_rows[i]] is filled on the
    # device from row pending_from[i] of the step in flight's sampled tokens.
    pending_rows: torch.Tensor | None = None
    pending_from: torch.Tensor | None = None
    # Scored rows: the last num_score_rows entries of logits_rows, each once; target i (score_targets
    # [num_targets] int64) is scored on row score_target_rows[i] of them ([num_targets] int64). score_spans says
    # whose the targets are, in order: (sequence, first index into its score_targets, count).
    num_score_rows: int = 0
    score_targets: torch.Tensor | None = None
    score_target_rows: torch.Tensor | None = None
    score_spans: list[tuple[Sequence, int, int]] = field(default_factory=list)

    @property
    def num_logits(self) -> int:
        """How many rows' logits the forward returns: the sampling rows, or all kept rows when some score."""
        return self.logits_rows.shape[0] if self.num_score_rows else self.num_sampling

    def split_logits(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """logits: [num_logits, vocab] -> (sampling rows [num_sampling, vocab], scored rows or None)."""
        if not self.num_score_rows:
            return logits, None
        return logits[: self.num_sampling], logits[logits.shape[0] - self.num_score_rows :]

    lora: LoraStep | None = None  # rows that run a LoRA adapter (runner/lora/adapters.py); None: all the base model

    def fill_pending(self, sampled: torch.Tensor | None) -> None:
        if self.pending_rows is None:
            return
        assert sampled is not None, "a step reads pending tokens but no step is in flight"
        self.input_ids[0].index_copy_(0, self.pending_rows, sampled.index_select(0, self.pending_from))


def _padded(n: int) -> int:
    return max(n, MIN_ROWS)


class HostStaging:
    """Pinned host buffers reused from step to step, so the step's uploads run asynchronously.

    A copy from pageable memory makes the host wait for the device; from pinned memory it is queued.
    Two sets of buffers alternate: with async scheduling a step is built while the one before it may
    still be waiting to upload, and a set is refilled only once its last upload has run (its event).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._sets: list[list[torch.Tensor]] = [[], []]
        self._uploaded: list[torch.cuda.Event | None] = [None, None]
        self._turn = 0

    def upload(self, *arrays: np.ndarray) -> list[torch.Tensor]:
        if self.device.type != "cuda":
            return [torch.from_numpy(a).to(self.device) for a in arrays]
        turn = self._turn
        self._turn ^= 1
        if self._uploaded[turn] is not None:
            self._uploaded[turn].synchronize()
        pinned = self._sets[turn]
        out = []
        for i, array in enumerate(arrays):
            if i == len(pinned):
                pinned.append(torch.empty(0, dtype=torch.int64).pin_memory())
            if pinned[i].numel() * 8 < array.nbytes:
                pinned[i] = torch.empty(
                    max(array.nbytes // 8 + 1, 2 * pinned[i].numel()), dtype=torch.int64
                ).pin_memory()
            staged = pinned[i].view(torch.uint8)[: array.nbytes]
            staged.numpy()[:] = array.view(np.uint8)
            out.append(staged.to(self.device, non_blocking=True).view(torch.from_numpy(array[:0]).dtype))
        self._uploaded[turn] = torch.cuda.Event()
        self._uploaded[turn].record()
        return out


def shared_prefix_tokens(tables: np.ndarray, seq_lens: np.ndarray, block_size: int) -> int:
    """Leading tokens whose pages every row of `tables` shares (the decodes of a step), leaving each its newest
    token: the cascade decode reads those pages once for all of them. Whole blocks only; 0 if none."""
    if len(tables) < 2:
        return 0
    same = (tables[1:] == tables[0]).all(axis=0)
    num_blocks = int(same.argmin()) if not same.all() else len(same)
    return min(num_blocks, int(seq_lens.min() - 1) // block_size) * block_size


def prepare_inputs(
    scheduled: list[ScheduledSeq],
    block_size: int,
    device: torch.device,
    staging: HostStaging | None = None,
    cascade_min_tokens: int = 0,
    host_tables: HostBlockTables | None = None,
    scoring: bool = False,
) -> StepInputs:
    """Lay the step's tokens end to end, decodes first (the scheduler already ordered them).

    Built in two host arrays (int64 rows, int32 per-sequence data) and copied to the device in two
    transfers (a third, small one when tokens are pending): per-step host work is O(tokens) numpy, not
    O(tokens) small tensors.

    With cascade_min_tokens > 0, decodes sharing at least that many leading tokens' pages (a cached system
    prompt) get meta.shared_prefix_len, so the attention reads those pages once for all of them.

    With `scoring` (some sequence of the step may have scored rows), those rows follow the sampling rows in
    logits_rows, and score-only sequences sample nothing.
    """
    num_seqs = len(scheduled)
    counts = np.fromiter((item.num_new_tokens for item in scheduled), np.int64, num_seqs)
    num_rows = int(counts.sum())
    num_rows_padded = _padded(num_rows)
    score_rows, score_targets, score_spans = _score_rows(scheduled, counts) if scoring else (None, None, [])
    num_score = num_targets = 0
    if score_rows is not None and len(score_rows):
        # A row scored against several targets (a prompt's last, against each continuation's first token) is
        # computed once: in a four-choice scoring step one kept row in ten repeated another. The rows are
        # nondecreasing (sequences in step order, each one's ascending), so repeats are neighbours.
        first = np.empty(len(score_rows), bool)
        first[0], first[1:] = True, score_rows[1:] != score_rows[:-1]
        target_rows = np.cumsum(first) - 1
        score_rows = score_rows[first]
        num_score, num_targets = len(score_rows), len(target_rows)
    # int64 rows: token ids | positions | slots | logits rows (sampling, padding, scored)
    rows, (ids_at, pos_at, slots_at, logits_at) = _aligned(
        np.int64, num_rows_padded, num_rows_padded, num_rows_padded, _padded(num_seqs) + num_score
    )
    token_ids = rows[ids_at : ids_at + num_rows_padded]
    positions = rows[pos_at : pos_at + num_rows_padded]
    slots = rows[slots_at : slots_at + num_rows_padded]
    logits_rows = rows[logits_at : logits_at + _padded(num_seqs) + num_score]
    slots[num_rows:] = -1  # padding rows write nothing

    width = max(len(item.seq.block_ids) for item in scheduled)
    # int32 per sequence: query_start_loc (num_seqs + 1) | seq_lens | block tables | shared prefix length | prompt
    # lengths (the CPU backend's, see AttentionMetadata.num_prompt_tokens)
    per_seq, (starts_at, lens_at, tables_at, shared_at, prompts_at) = _aligned(
        np.int32, num_seqs + 1, num_seqs, num_seqs * width, 1, num_seqs
    )
    query_start_loc = per_seq[starts_at : starts_at + num_seqs + 1]
    seq_lens = per_seq[lens_at : lens_at + num_seqs]
    tables = per_seq[tables_at : tables_at + num_seqs * width].reshape(num_seqs, width)

    pending_rows: list[int] = []
    pending_from: list[int] = []
    one_row = counts == 1
    num_decodes = num_seqs if one_row.all() else int(one_row.argmin())  # the leading one-row sequences
    num_sampling = _fill_decodes(
        scheduled[:num_decodes],
        block_size,
        token_ids,
        positions,
        slots,
        tables,
        query_start_loc,
        seq_lens,
        logits_rows,
        pending_rows,
        pending_from,
        host_tables or HostBlockTables(),
        scoring,
    )
    num_sampling = _fill_prefills(
        scheduled[num_decodes:],
        counts[num_decodes:],
        num_decodes,
        block_size,
        token_ids,
        positions,
        slots,
        tables[num_decodes:],
        query_start_loc[num_decodes + 1 :],
        seq_lens[num_decodes:],
        logits_rows,
        num_sampling,
        pending_rows,
        pending_from,
    )
    if device.type == "cpu":  # a one-row chunk can be a prompt's last token (its earlier ones were cached)
        per_seq[prompts_at : prompts_at + num_seqs] = np.fromiter(
            (item.seq.num_prompt_tokens for item in scheduled), np.int64, num_seqs
        )
    # The lm_head GEMM covers at least MIN_ROWS rows, sampling and scored together (batch invariance).
    num_kept_sampling = max(num_sampling, MIN_ROWS - num_score)
    if num_score:
        logits_rows[num_kept_sampling : num_kept_sampling + num_score] = score_rows
    shared = 0
    if cascade_min_tokens and num_decodes >= 2:
        shared = shared_prefix_tokens(tables[:num_decodes], seq_lens[:num_decodes], block_size)
        shared = shared if shared >= cascade_min_tokens else 0
        per_seq[shared_at] = shared
    arrays = [rows, per_seq]
    if pending_rows:
        arrays.append(np.array(pending_rows + pending_from, dtype=np.int64))
    if num_score:
        # Both read by the scoring kernel: each on its own 16-byte boundary (see _aligned).
        scored, (targets_at, target_rows_at) = _aligned(np.int64, num_targets, num_targets)
        scored[targets_at : targets_at + num_targets] = score_targets
        scored[target_rows_at : target_rows_at + num_targets] = target_rows
        arrays.append(scored)
    uploaded = (staging or HostStaging(device)).upload(*arrays)
    rows_dev, per_seq_dev = uploaded[0], uploaded[1]
    meta = AttentionMetadata(
        query_start_loc=per_seq_dev[starts_at : starts_at + num_seqs + 1],
        seq_lens=per_seq_dev[lens_at : lens_at + num_seqs],
        block_tables=per_seq_dev[tables_at : tables_at + num_seqs * width].view(num_seqs, width),
        slot_mapping=rows_dev[slots_at : slots_at + num_rows_padded],
        num_decodes=num_decodes,
        max_query_len=int(counts.max()),
        max_seq_len=int(seq_lens.max()),
        block_size=block_size,
        shared_prefix_len=per_seq_dev[shared_at : shared_at + 1] if shared else None,
        num_prompt_tokens=per_seq_dev[prompts_at : prompts_at + num_seqs] if device.type == "cpu" else None,
        num_query_rows=num_rows,
    )
    return StepInputs(
        input_ids=rows_dev[ids_at : ids_at + num_rows_padded][None],
        positions=rows_dev[pos_at : pos_at + num_rows_padded][None],
        logits_rows=rows_dev[logits_at : logits_at + num_kept_sampling + num_score],
        num_sampling=num_sampling,
        meta=meta,
        pending_rows=uploaded[2][: len(pending_rows)] if pending_rows else None,
        pending_from=uploaded[2][len(pending_rows) :] if pending_rows else None,
        num_score_rows=num_score,
        score_targets=uploaded[-1][targets_at : targets_at + num_targets] if num_score else None,
        score_target_rows=uploaded[-1][target_rows_at : target_rows_at + num_targets] if num_score else None,
        score_spans=score_spans,
    )


def _score_rows(
    scheduled: list[ScheduledSeq], counts: np.ndarray
) -> tuple[np.ndarray, np.ndarray, list[tuple[Sequence, int, int]]]:
    """The step's rows that are scored, their target tokens, and whose they are: for each sequence, the entries
    of its score_rows that fall in its chunk [num_computed_tokens, + num_new_tokens)."""
    rows: list[int] = []
    targets: list[int] = []
    spans: list[tuple[Sequence, int, int]] = []
    row = 0
    for item, count in zip(scheduled, counts.tolist()):
        seq = item.seq
        if seq.score_rows:
            start = seq.num_computed_tokens
            first = bisect.bisect_left(seq.score_rows, start)
            end = bisect.bisect_left(seq.score_rows, start + count, lo=first)
            if first < end:
                rows.extend(row + r - start for r in seq.score_rows[first:end])
                targets.extend(seq.score_targets[first:end])
                spans.append((seq, first, end - first))
        row += count
    return np.array(rows, np.int64), np.array(targets, np.int64), spans


def _fill_decodes(
    items: list[ScheduledSeq],
    block_size: int,
    token_ids: np.ndarray,
    positions: np.ndarray,
    slots: np.ndarray,
    tables: np.ndarray,
    query_start_loc: np.ndarray,
    seq_lens: np.ndarray,
    logits_rows: np.ndarray,
    pending_rows: list[int],
    pending_from: list[int],
    host_tables: HostBlockTables,
    scoring: bool = False,
) -> int:
    """Rows 0..len(items)-1 of `prepare_inputs`' arrays for the step's leading one-row sequences (decodes, row i
    sequence i), column by column in numpy rather than one Python body per row: this loop is most of the host's
    work in a step of 512 decodes. Returns how many of them sample (their rows lead logits_rows)."""
    n = len(items)
    if n == 0:
        return 0
    seqs = [item.seq for item in items]
    starts = np.fromiter((seq.num_computed_tokens for seq in seqs), np.int64, n)
    num_blocks = host_tables.fill(seqs, tables[:n])
    short = np.flatnonzero(starts >= num_blocks * block_size)
    if len(short):
        seq = seqs[short[0]]
        raise ValueError(
            f"sequence {seq.seq_id} computes tokens up to {seq.num_computed_tokens + 1} but holds "
            f"{len(seq.block_ids)} blocks of {block_size}"
        )
    rows = np.arange(n)
    positions[:n] = starts
    slots[:n] = tables[rows, starts // block_size].astype(np.int64) * block_size + starts % block_size
    known = np.fromiter(
        (seq.num_prompt_tokens + len(seq.output_token_ids) for seq in seqs), np.int64, n
    )  # num_known_tokens
    for i in np.flatnonzero(starts < known).tolist():
        token_ids[i] = seqs[i].token_ids(int(starts[i]), int(starts[i]) + 1)[0]
    pending = np.flatnonzero(starts >= known).tolist()  # sampled by the step in flight: filled in on the device
    pending_rows.extend(pending)
    pending_from.extend(seqs[i].pending_index for i in pending)
    query_start_loc[1 : n + 1] = rows + 1
    seq_lens[:n] = starts + 1
    totals = known + np.fromiter((seq.num_pending for seq in seqs), np.int64, n)  # num_tokens
    ends = starts + 1 == totals  # the chunk reaches the end: its row samples, unless it is a scored continuation
    if scoring:
        ends &= np.fromiter((not seq.score_only for seq in seqs), bool, n)
    sampling = np.flatnonzero(ends)
    logits_rows[: len(sampling)] = sampling
    return len(sampling)


def _fill_prefills(
    items: list[ScheduledSeq],
    counts: np.ndarray,  # [len(items)] int64: each chunk's tokens
    first_row: int,
    block_size: int,
    token_ids: np.ndarray,
    positions: np.ndarray,
    slots: np.ndarray,
    tables: np.ndarray,  # [len(items), width]: these sequences' rows
    chunk_ends: np.ndarray,  # [len(items)]: query_start_loc's entries after these sequences' first
    seq_lens: np.ndarray,  # [len(items)]
    logits_rows: np.ndarray,
    num_sampling: int,
    pending_rows: list[int],
    pending_from: list[int],
) -> int:
    """The chunks after the decodes (sequence i's rows follow sequence i - 1's, from row first_row on), column by
    column in numpy: a step of the score workload holds some 200 chunks. Returns num_sampling with theirs added
    (each chunk that reaches its sequence's end samples from its last row)."""
    n = len(items)
    if n == 0:
        return num_sampling
    seqs = [item.seq for item in items]
    starts = np.fromiter((seq.num_computed_tokens for seq in seqs), np.int64, n)
    ends = starts + counts
    num_blocks = np.fromiter((len(seq.block_ids) for seq in seqs), np.int64, n)
    short = np.flatnonzero(ends > num_blocks * block_size)
    if len(short):
        seq = seqs[short[0]]
        raise ValueError(
            f"sequence {seq.seq_id} computes tokens up to {ends[short[0]]} but holds {len(seq.block_ids)} blocks "
            f"of {block_size}"
        )
    ids: list[int] = []
    for i, seq in enumerate(seqs):
        tables[i, : num_blocks[i]] = seq.block_ids
        start, end = int(starts[i]), int(ends[i])
        if end <= seq.num_known_tokens:
            ids += seq.token_ids(start, end)
        else:  # one token, sampled by the step in flight: filled in on the device
            assert end == start + 1, f"seq {seq.seq_id}: tokens up to {end} asked, {seq.num_known_tokens} known"
            pending_rows.append(first_row + len(ids))
            pending_from.append(seq.pending_index)
            ids.append(0)
    last_rows = first_row + np.cumsum(counts)  # one past each chunk's last row
    rows = slice(first_row, int(last_rows[-1]))
    token_ids[rows] = ids
    # Row r of chunk i sits at position starts[i] + (r - its first row).
    pos = np.arange(rows.start, rows.stop) + np.repeat(starts - (last_rows - counts), counts)
    positions[rows] = pos
    owner = np.repeat(np.arange(n), counts)
    slots[rows] = tables[owner, pos // block_size].astype(np.int64) * block_size + pos % block_size
    chunk_ends[:] = last_rows
    seq_lens[:] = ends
    samples = np.flatnonzero(np.fromiter((item.samples for item in items), bool, n))
    logits_rows[num_sampling : num_sampling + len(samples)] = last_rows[samples] - 1
    return num_sampling + len(samples)


def _aligned(dtype: type, *lengths: int) -> tuple[np.ndarray, list[int]]:
    """One zeroed array holding sub-arrays of `lengths`, each starting on a 16-byte boundary: Triton
    specialises kernels on pointer alignment, so unaligned views would compile extra variants mid-run."""
    per_16_bytes = 16 // np.dtype(dtype).itemsize
    starts, total = [], 0
    for length in lengths:
        starts.append(total)
        total += -(-length // per_16_bytes) * per_16_bytes
    return np.zeros(total, dtype), starts


class ModelRunner:
    def __init__(
        self,
        model: torch.nn.Module,
        kv_cache: KVCache,
        backend: AttentionBackend,
        fused: FusedDecoder | None = None,
        layers: dict[int, LayerAttention] | None = None,
    ) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.backend = backend
        self.fused = (
            fused  # runs the decoder layers with fused kernels instead of transformers' (runner/fused_forward.py)
        )
        self.device = next(model.parameters()).device
        self.staging = HostStaging(self.device)
        self.host_tables = HostBlockTables()  # the decodes' block tables, kept between steps
        self.graphs = None  # a DecodeGraphs once captured (runner/cuda_graphs.py): pure-decode steps replay it
        self.adapters = None  # an Adapters (runner/lora/adapters.py): its hooks read the step's LoraStep
        # Each layer's window as the load check read it from the mask transformers builds (None: unchecked, the
        # layers' own arguments)
        self.sliding_windows = {i: layer.sliding_window for i, layer in layers.items()} if layers is not None else None

    def replays(self, inputs: StepInputs) -> bool:
        """Whether this step runs from a captured CUDA graph (graphs keep the sampling rows' logits only: a step
        that scores rows goes eagerly)."""
        return self.graphs is not None and not inputs.num_score_rows and self.graphs.fits(inputs)

    def forward(self, inputs: StepInputs) -> torch.Tensor:
        """Logits of the sampling rows: [num_sampling, vocab_size], in the model's dtype (float32 under
        runner/float32_logits.py's head); in a step with scored rows, of every kept row (`split_logits`)."""
        if self.replays(inputs):
            return self.graphs.forward(inputs)
        return self.forward_eager(inputs)

    def forward_eager(self, inputs: StepInputs) -> torch.Tensor:
        if self.adapters is None:
            return self._forward_eager(inputs)
        self.adapters.current = inputs.lora  # what the adapted layers' hooks add, during this pass only
        try:
            return self._forward_eager(inputs)
        finally:
            self.adapters.current = None

    @torch.inference_mode()
    def _forward_eager(self, inputs: StepInputs) -> torch.Tensor:
        step = StepContext(inputs.meta, self.kv_cache, self.backend, self.sliding_windows)
        if self.fused is not None:
            hidden = self.fused.forward(inputs.input_ids, inputs.positions, step, inputs.logits_rows)
            return self.model.lm_head(hidden)[: inputs.num_logits]
        out = self.model(
            input_ids=inputs.input_ids,
            position_ids=inputs.positions,
            use_cache=False,
            logits_to_keep=inputs.logits_rows,
            kvbatch_step=step,
        )
        return out.logits[0, : inputs.num_logits]
