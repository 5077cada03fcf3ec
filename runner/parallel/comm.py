"""What rank 0 tells the other tensor-parallel ranks, over torch.distributed broadcasts from rank 0.

Every message starts with a fixed header, int64[HEADER_LEN]:

    [command, engine_id, num_rows, num_logits_rows, num_sampling, num_seqs, table_width,
     num_decodes, max_query_len, max_seq_len, block_size]

    STEP   then one int64 payload: input_ids | positions | logits_rows | query_start_loc | seq_lens |
           block_tables (row-major) | slot_mapping   -> every rank runs the same forward on its own pages
    LOAD   then one pickled (model, settings) object -> every rank builds its share of that engine
    CLOSE  engine_id is dropped
    EXIT   the worker loop ends

Two broadcasts per step whatever the batch: the header (fixed size) tells the receivers how big the payload is.
Messages travel on a gloo group on the CPU with a long timeout (`control`): a worker may wait for rank 0's next
step for as long as rank 0 likes (reading input, another job), which NCCL's watchdog would not allow. The layers'
all-reduces stay on the default group (NCCL on GPUs).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from kvbatch.cache.metadata import AttentionMetadata
from kvbatch.runner.model_runner import StepInputs

STEP, LOAD, CLOSE, EXIT = 1, 2, 3, 4
HEADER_LEN = 11


def send_command(command: int, engine_id: int, control: dist.ProcessGroup, obj: Any = None) -> None:
    header = torch.zeros(HEADER_LEN, dtype=torch.int64)
    header[0], header[1] = command, engine_id
    dist.broadcast(header, src=0, group=control)
    if command == LOAD:
        dist.broadcast_object_list([obj], src=0, group=control)


def receive(control: dist.ProcessGroup) -> tuple[int, int, torch.Tensor]:
    """(command, engine_id, header): blocks until rank 0 sends something."""
    header = torch.empty(HEADER_LEN, dtype=torch.int64)
    dist.broadcast(header, src=0, group=control)
    return int(header[0]), int(header[1]), header


def receive_object(control: dist.ProcessGroup) -> Any:
    box: list[Any] = [None]
    dist.broadcast_object_list(box, src=0, group=control)
    return box[0]


def send_step(engine_id: int, inputs: StepInputs, control: dist.ProcessGroup) -> None:
    meta = inputs.meta
    num_rows = inputs.input_ids.shape[1]
    num_seqs, width = meta.block_tables.shape
    header = torch.tensor(
        [
            STEP,
            engine_id,
            num_rows,
            inputs.logits_rows.shape[0],
            inputs.num_sampling,
            num_seqs,
            width,
            meta.num_decodes,
            meta.max_query_len,
            meta.max_seq_len,
            meta.block_size,
        ],
        dtype=torch.int64,
    )
    payload = torch.cat(
        [
            inputs.input_ids[0],
            inputs.positions[0],
            inputs.logits_rows,
            meta.query_start_loc.long(),
            meta.seq_lens.long(),
            meta.block_tables.long().flatten(),
            meta.slot_mapping.long(),
        ]
    ).cpu()
    dist.broadcast(header, src=0, group=control)
    dist.broadcast(payload, src=0, group=control)


def receive_step(header: torch.Tensor, device: torch.device, control: dist.ProcessGroup) -> StepInputs:
    num_rows, num_logits, num_sampling, num_seqs, width, num_decodes, max_query_len, max_seq_len, block_size = (
        int(v) for v in header[2:].tolist()
    )
    sizes = [num_rows, num_rows, num_logits, num_seqs + 1, num_seqs, num_seqs * width, num_rows]
    payload = torch.empty(sum(sizes), dtype=torch.int64)
    dist.broadcast(payload, src=0, group=control)
    payload = payload.to(device)
    ids, positions, logits_rows, query_start_loc, seq_lens, tables, slots = payload.split(sizes)
    meta = AttentionMetadata(
        query_start_loc=query_start_loc.int(),
        seq_lens=seq_lens.int(),
        block_tables=tables.view(num_seqs, width).int(),
        slot_mapping=slots.contiguous(),
        num_decodes=num_decodes,
        max_query_len=max_query_len,
        max_seq_len=max_seq_len,
        block_size=block_size,
    )
    return StepInputs(
        ids[None].contiguous(), positions[None].contiguous(), logits_rows.contiguous(), num_sampling, meta
    )
