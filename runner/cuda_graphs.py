"""Decode steps replayed from CUDA graphs, one graph per batch-size bucket.

A decode step of a small model is hundreds of kernel launches of a few microseconds each; launched one
by one from Python, the GPU waits on the host. A graph replays the whole forward with one launch.

Each graph reads its inputs from static buffers sized for the largest bucket. A step of n decodes runs
in the smallest bucket B >= its rows; rows and sequences n..B-1 are padding: token 0, slot -1 (writes
nothing), context length 0 (the decode kernel gives zeros), so they cost a little compute and touch no
page. Only pure-decode steps replay: prefill shapes vary too much to capture.

    buffer          shape                      filled per step
    input_ids       [1, B]                     rows 0..R-1
    positions       [1, B]                     rows 0..R-1
    slot_mapping    [B] int64                  -1, then rows 0..R-1
    seq_lens        [B] int32                  0, then seqs 0..n-1
    block_tables    [B, max_blocks] int32      seqs 0..n-1, columns 0..w-1 (stale columns are never read)
    query_start_loc [B + 1] int32              fixed: 0..B
    logits_rows     [B] int64                  fixed: 0..B-1
    shared_prefix   [1] int32                  the cascade graphs' shared prefix length

With the prefix cache on, a second set of graphs runs the cascade decode (cache/attention_triton_cascade.py)
for steps whose decodes share a cached prefix; the plain set skips its extra launches when they do not.

With LoRA adapters on their Triton kernels, each set has a twin that also runs the adapted layers' updates, for
steps where some decode runs an adapter; its tiles (runner/lora/step.py) come from one more buffer:

    lora_tiles      [max_tiles(B), 3] int32    the step's tiles, then empty ones (0 rows)

A step whose adapters run the torch path (no Triton) goes eagerly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from kvbatch.cache.metadata import AttentionMetadata

from .lora.step import LoraStep, max_tiles
from .model_runner import ModelRunner, StepInputs

logger = logging.getLogger(__name__)


def bucket_sizes(max_num_seqs: int, min_rows: int) -> list[int]:
    """min_rows, then steps of 16 up to 256, of 64 beyond: small batches waste little on padding."""
    sizes, size = [], min_rows
    while size < max_num_seqs:
        sizes.append(size)
        size += 16 if size < 256 else 64
    return sizes + [max(max_num_seqs, min_rows)]


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    logits: torch.Tensor  # [B, vocab] as the runner returns them (model dtype, or float32), written by every replay


class DecodeGraphs:
    def __init__(
        self,
        runner: ModelRunner,
        max_num_seqs: int,
        max_blocks_per_seq: int,
        block_size: int,
        min_rows: int,
        cascade: bool = False,
    ) -> None:
        self.runner = runner
        self.cascade = cascade
        self.block_size = block_size
        self.buckets = bucket_sizes(max_num_seqs, min_rows)
        device, largest = runner.device, self.buckets[-1]
        self.input_ids = torch.zeros(1, largest, dtype=torch.int64, device=device)
        self.positions = torch.zeros(1, largest, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((largest,), -1, dtype=torch.int64, device=device)
        self.seq_lens = torch.zeros(largest, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(largest, max_blocks_per_seq, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(largest + 1, dtype=torch.int32, device=device)
        self.logits_rows = torch.arange(largest, dtype=torch.int64, device=device)
        self.shared_prefix_len = torch.zeros(1, dtype=torch.int32, device=device)
        adapters = runner.adapters
        self.max_runs = adapters.max_loras if adapters is not None and adapters.use_triton else 0
        self.lora_tiles = torch.zeros(max_tiles(largest, self.max_runs), 3, dtype=torch.int32, device=device)
        self.graphs: dict[tuple[int, bool, bool], _Graph] = {}
        self._pool = None

    def _inputs(self, size: int, cascade: bool, lora: bool) -> StepInputs:
        meta = AttentionMetadata(
            query_start_loc=self.query_start_loc[: size + 1],
            seq_lens=self.seq_lens[:size],
            block_tables=self.block_tables[:size],
            slot_mapping=self.slot_mapping[:size],
            num_decodes=size,
            max_query_len=1,
            max_seq_len=self.block_tables.shape[1] * self.block_size,
            block_size=self.block_size,
            shared_prefix_len=self.shared_prefix_len if cascade else None,
        )
        inputs = StepInputs(self.input_ids[:, :size], self.positions[:, :size], self.logits_rows[:size], size, meta)
        if lora:
            tiles = self.lora_tiles[: max_tiles(size, self.max_runs)]
            inputs.lora = LoraStep(size, [], _device_tiles=tiles)
        return inputs

    def capture(self) -> None:
        """Capture every bucket, largest first, sharing one memory pool (smaller graphs reuse its blocks)."""
        stream = torch.cuda.Stream(self.runner.device)
        stream.wait_stream(torch.cuda.current_stream(self.runner.device))
        with torch.cuda.stream(stream):
            for lora in (False, True) if self.max_runs else (False,):
                for cascade in (False, True) if self.cascade else (False,):
                    for size in reversed(self.buckets):
                        inputs = self._inputs(size, cascade, lora)
                        # Warm-up outside the graph: kernels compile, memory allocates.
                        self.runner.forward_eager(inputs)
                        graph = torch.cuda.CUDAGraph()
                        with torch.cuda.graph(graph, pool=self._pool, stream=stream):
                            logits = self.runner.forward_eager(inputs)
                        self._pool = graph.pool()
                        self.graphs[size, cascade, lora] = _Graph(graph, logits)
        torch.cuda.current_stream(self.runner.device).wait_stream(stream)
        torch.cuda.synchronize(self.runner.device)
        logger.info(
            "captured decode CUDA graphs for batch sizes %s%s%s",
            self.buckets,
            " (plain and cascade)" if self.cascade else "",
            ", with and without LoRA updates" if self.max_runs else "",
        )

    def fits(self, inputs: StepInputs) -> bool:
        meta, lora = inputs.meta, inputs.lora
        if lora is not None and (lora.tiles is None or len(lora.tiles) > max_tiles(meta.num_seqs, self.max_runs)):
            return False  # the torch path (no Triton), or more runs than a decode step has (never, by the scheduler)
        return meta.num_decodes == meta.num_seqs and inputs.input_ids.shape[1] <= self.buckets[-1] and bool(self.graphs)

    def forward(self, inputs: StepInputs) -> torch.Tensor:
        """Logits of the sampling rows, [num_sampling, vocab] (a view into the graph's output)."""
        meta = inputs.meta
        num_rows, num_seqs = inputs.input_ids.shape[1], meta.num_seqs
        size = next(b for b in self.buckets if b >= num_rows)
        width = meta.block_tables.shape[1]
        if width > self.block_tables.shape[1]:
            raise ValueError(
                f"a sequence holds {width} blocks; the graphs were captured for {self.block_tables.shape[1]}"
            )
        self.slot_mapping.fill_(-1)
        self.seq_lens.zero_()
        self.input_ids[:, :num_rows].copy_(inputs.input_ids)
        self.positions[:, :num_rows].copy_(inputs.positions)
        self.slot_mapping[:num_rows].copy_(meta.slot_mapping)
        self.seq_lens[:num_seqs].copy_(meta.seq_lens)
        self.block_tables[:num_seqs, :width].copy_(meta.block_tables)
        cascade = meta.shared_prefix_len is not None and self.cascade
        if cascade:
            self.shared_prefix_len.copy_(meta.shared_prefix_len)
        lora = inputs.lora
        if lora is not None:
            num_tiles = len(lora.tiles)
            self.lora_tiles[:num_tiles].copy_(lora.device_tiles())
            self.lora_tiles[num_tiles : max_tiles(size, self.max_runs)].zero_()  # past the step's tiles: 0 rows
        entry = self.graphs[size, cascade, lora is not None]
        entry.graph.replay()
        # Decode i is row i, so the first num_sampling rows are the sampling rows in order.
        return entry.logits[: inputs.num_sampling]
