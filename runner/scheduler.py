"""The scheduler: which sequences run this step, and how many of their tokens.

It never calls the model. `schedule()` returns a `SchedulerOutput`; the engine runs it and calls
`advance()` with what happened. Admission is decided from the blocks actually free, every step:

    running (oldest first)                         waiting (preempted first, then longest first)
    +-----------------------------+                +------------------------------------------+
    | each gets its next tokens:  |   token budget | admitted while the budget lasts, a seq    |
    | 1 for a decode, a chunk for | -------------> | slot is free and its blocks fit:          |
    | an unfinished prefill       |   left over    |   reserve:    blocks(prompt + max_new)    |
    | growing pages as needed;    |                |   optimistic: blocks(this chunk), keeping |
    | no room -> preempt newest   |                |               a watermark for decodes     |
    +-----------------------------+                +------------------------------------------+

Under `reserve` a sequence holds every block it can ever need, so it is never preempted. Under
`optimistic` pages grow with the tokens; when the pool runs dry the most recently admitted sequence
is preempted (pages freed, recomputed later). The oldest running sequence can always proceed,
because every admitted sequence fits the pool alone (`max_new_tokens` is capped at admission), so
the loop never deadlocks and never asks the pool for more than it has.

Prefix cache: every full block a step computes is registered under its chained hash when the step is
scheduled (the step writes a layer's K/V for all its rows before any row attends, so a sequence admitted
later in the same step may already read them); a failed step's registrations are withdrawn. Admission
looks up the longest cached prefix of the sequence's tokens, takes those blocks (a holder more each),
and starts the prefill after them:

    token_ids   | h0 | h1 | h2 | h3 |..partial..|     h0..h2 cached -> block_ids = [hit, hit, hit, new...]
                  shared, never written            num_computed_tokens = 3 * block_size

Cached blocks nobody holds count as free for admission; taking one of them as a hit uses up a free block.

Async scheduling: `schedule_ahead()` plans the next step while the last one still runs on the device,
before the host has its tokens. Decodes read their pending token on the device; prefill chunks and admissions
read only prompt tokens, which the host holds, so it plans those too. Anything that needs the tokens on the
host first (a preemption, a sequence that must run alone, a repetition penalty) makes it decline, and the
engine drains and calls `schedule()`. Blocks holding a pending token are registered in the prefix cache by a
later step. A decode planned ahead for a sequence that then turns out to have stopped is wasted, never
wrong: its token is dropped and its pages freed.
"""

from __future__ import annotations

import bisect
import math
import operator
from collections.abc import Iterable
from dataclasses import dataclass, field

from kvbatch.cache.block_pool import BlockPool
from kvbatch.cache.block_table import num_blocks_for
from kvbatch.cache.prefix_cache import max_cached_blocks

from .config import POLICIES, Policy
from .sequence import SeqStatus, Sequence

# A sequence that has been in this many failed steps runs alone from then on: it still gets an error only if it
# fails alone, and a failure that only a batch triggers cannot send it round failing and recomputing forever.
MAX_ISOLATIONS = 3


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int
    max_num_batched_tokens: int
    block_size: int
    policy: Policy = "optimistic"
    # Optimistic admission leaves this share of the pool free so running decodes can grow
    # without an immediate preemption.
    watermark: float = 0.01
    prefix_cache: bool = True
    # LoRA adapters: at most this many distinct ones run at once (the engine's device slots); None: no adapters.
    max_loras: int | None = None

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"unknown admission policy {self.policy!r}; choose one of {', '.join(POLICIES)}")
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_seqs ({self.max_num_seqs}) and max_num_batched_tokens "
                f"({self.max_num_batched_tokens}) must be >= 1"
            )


@dataclass(slots=True)
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int  # tokens computed this step, from seq.num_computed_tokens on
    samples: (
        bool  # the chunk reaches the end of the sequence, so its last row yields the next token (not if score_only)
    )


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq]  # single-token (decode) rows first, then prefill chunks
    preempted: list[Sequence] = field(default_factory=list)
    # Prefix-cache lookups of the sequences admitted this step: tokens they had to compute before the
    # lookup, and how many of those the cache held.
    num_queried_tokens: int = 0
    num_cached_tokens: int = 0
    # Prompt tokens the step computes (progress's prefill rate); counted per chunk, not per row: a decode planned
    # ahead adds none and is not visited.
    num_prefill_tokens: int = 0

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


def _waiting_key(seq: Sequence) -> tuple[int, int, int]:
    # Isolated work first (it gets a step of its own), then preempted work (it was admitted before),
    # then the longest: long requests get room while the pool is emptiest, and neighbours in the
    # queue have similar lengths. A scoring request's continuations queue together (Sequence.queue_tokens).
    rank = 0 if seq.isolate else 1 if seq.num_preemptions else 2
    return (rank, -(seq.queue_tokens or seq.num_tokens), seq.seq_id)


# Each waiting sequence's _waiting_key, computed once as it joins the queue (nothing it reads changes while the
# sequence waits): the insertion's bisection then reads a stored tuple, not a Python call a probe.
_queue_key = operator.attrgetter("queue_key")


class Scheduler:
    def __init__(self, config: SchedulerConfig, pool: BlockPool) -> None:
        self.config = config
        self.pool = pool
        self.waiting: list[Sequence] = []  # sorted by _waiting_key (stored in Sequence.queue_key)
        self.running: list[Sequence] = []  # admission order
        self.num_preemptions = 0
        self._watermark_blocks = math.ceil(pool.num_blocks * config.watermark)
        # Blocks registered by the step scheduled last, until `advance` confirms their K/V was written.
        self._registered_this_step: list[int] = []

    def add(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        seq.queue_key = _waiting_key(seq)
        bisect.insort(self.waiting, seq, key=_queue_key)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        assert not self._registered_this_step, (
            f"schedule() called again before advance() or requeue_isolated(): "
            f"{len(self._registered_this_step)} blocks of the last step are unconfirmed"
        )
        assert not any(s.num_pending for s in self.running), "schedule() with tokens still pending: drain first"
        budget = self.config.max_num_batched_tokens
        out = SchedulerOutput(scheduled=[])

        isolated = next((s for s in self.running if s.isolate), None)
        if isolated is None and self.waiting and self.waiting[0].isolate:
            isolated = self.waiting.pop(0)
            while not self._adapter_fits(isolated) or not self._admit(isolated, budget, out, keep_watermark=False):
                # It fits the pool alone, so freeing the others always ends.
                assert self.running, (
                    f"seq {isolated.seq_id} does not fit an empty pool of {self.pool.num_blocks} blocks"
                )
                victim = self.running[-1]
                self.preempt(victim)
                out.preempted.append(victim)
            isolated.status = SeqStatus.RUNNING
            self.running.append(isolated)
        if isolated is not None:
            num_new = min(isolated.num_tokens_to_compute, budget)
            self._grow(isolated, num_new, out, protect=True)
            self._schedule(isolated, num_new, out)
            return out

        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not SeqStatus.RUNNING:  # preempted earlier in this loop
                continue
            num_new = min(seq.num_tokens_to_compute, budget)
            if num_new == 0:  # a scored continuation computed in the step in flight: it ends when that is read
                continue
            if not self._grow(seq, num_new, out):
                continue
            self._schedule(seq, num_new, out)
            budget -= num_new

        # No admission after a preemption: the pool just proved too small for what runs.
        if not out.preempted:
            self._admit_waiting(budget, out)
        self._order(out)
        return out

    def _order(self, out: SchedulerOutput) -> None:
        """Decodes first (stable); with adapters, each part grouped by adapter, so an adapter's rows are contiguous."""
        if self.config.max_loras is None:
            out.scheduled.sort(key=lambda s: s.num_new_tokens != 1)
        else:
            out.scheduled.sort(key=lambda s: (s.num_new_tokens != 1, s.seq.adapter_key))

    def _admit_waiting(self, budget: int, out: SchedulerOutput) -> None:
        """Admit from the head of the queue while the budget lasts, a slot is free and the blocks fit. A sequence
        whose adapter would be one more than max_loras waits, and those behind it go ahead."""
        adapters = self._running_adapters()
        i = 0
        while i < len(self.waiting) and budget > 0:
            seq = self.waiting[i]
            if seq.isolate or len(self.running) >= self.config.max_num_seqs:
                break  # an isolated sequence gets a step of its own next time
            if adapters is not None and seq.adapter_key and seq.adapter_key not in adapters:
                if len(adapters) >= self.config.max_loras:
                    i += 1
                    continue
                adapters.add(seq.adapter_key)
            num_new = self._admit(seq, budget, out, keep_watermark=bool(self.running))
            if not num_new:
                break
            self.waiting.pop(i)
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            self._schedule(seq, num_new, out)
            budget -= num_new

    def _running_adapters(self) -> set[bytes] | None:
        if self.config.max_loras is None:
            return None
        return {s.adapter_key for s in self.running if s.adapter_key}

    def _adapter_fits(self, seq: Sequence) -> bool:
        adapters = self._running_adapters()
        return adapters is None or not seq.adapter_key or len(adapters | {seq.adapter_key}) <= self.config.max_loras

    def schedule_ahead(self) -> SchedulerOutput | None:
        """The next step while the last still runs: what `schedule()` would plan once the host has the
        tokens that step is sampling, when no preemption is needed. Running sequences come first (a decode
        reading its pending token, or the next chunk of a prompt), then admissions. None when the step
        would preempt, or a sequence must run alone or reads its output so far (a repetition penalty).

        A sequence whose pending token is its last by length is left out (its end is known); one that
        stops on a token gets a spare decode, dropped when its stop is seen.
        """
        if self.waiting and self.waiting[0].isolate:
            return None
        block_size = self.config.block_size
        budget = self.config.max_num_batched_tokens
        # (sequence, tokens, blocks it needs, whether it samples). The host runs this loop for every row of
        # every step, ahead of the device, so it reads plain attributes and no properties.
        plan: list[tuple[Sequence, int, int, bool]] = []
        need = 0
        for seq in self.running:
            pending = seq.num_pending
            if seq.isolate or pending > 1 or seq.penalised:
                # a sequence that must run alone, or one whose penalty reads its pending token on the device
                # (a grammar's mask reads it too, on the host: the engine samples such a step after the drain)
                return None
            num_output = len(seq.output_token_ids) + pending
            if pending and num_output >= seq.max_new_tokens:
                continue
            if budget == 0:
                break
            num_tokens = seq.num_prompt_tokens + num_output
            computed = seq.num_computed_tokens
            if computed == num_tokens:  # a scored continuation computed in the step in flight
                continue
            num_new = num_tokens - computed if num_tokens - computed < budget else budget
            seq_need = -(-(computed + num_new) // block_size) - len(seq.block_ids)
            if seq_need > 0:
                need += seq_need
            plan.append((seq, num_new, seq_need, computed + num_new == num_tokens and not seq.score_only))
            budget -= num_new
        if need > self.pool.num_free_blocks:
            return None  # schedule() preempts, once the tokens in flight are in
        out = SchedulerOutput(scheduled=[])
        scheduled = out.scheduled
        for seq, num_new, seq_need, samples in plan:  # `_grow` without its preemption: the blocks were counted above
            if seq_need > 0:
                self._allocate(seq, seq_need)
            if seq.num_pending:  # a decode: its newest block holds the pending token, so nothing to register
                scheduled.append(ScheduledSeq(seq, num_new, samples))
            else:
                self._schedule(seq, num_new, out, samples=samples)
        self._admit_waiting(budget, out)
        if not out.scheduled:
            return None
        self._order(out)
        return out

    def _admit(self, seq: Sequence, budget: int, out: SchedulerOutput, keep_watermark: bool) -> int:
        """Give a waiting sequence its cached prefix and pages for its first chunk. Returns the chunk's
        tokens (at most `budget`), or 0 when the pool has no room (then nothing changed)."""
        assert not seq.block_ids and seq.num_computed_tokens == 0, (
            f"seq {seq.seq_id} is waiting with {len(seq.block_ids)} blocks, {seq.num_computed_tokens} tokens computed"
        )
        block_size = self.config.block_size
        hits = self._cached_prefix(seq)
        num_cached = len(hits) * block_size
        num_new = min(seq.num_tokens - num_cached, budget)
        if self.config.policy == "reserve":
            need = num_blocks_for(seq.max_num_tokens, block_size) - len(hits)
            reserve = 0
        else:
            need = num_blocks_for(num_cached + num_new, block_size) - len(hits)
            reserve = self._watermark_blocks if keep_watermark else 0
        # Hits nobody holds are counted among the free blocks; taking them uses those up.
        if need + self.pool.num_unreferenced(hits) + reserve > self.pool.num_free_blocks:
            return 0
        self.pool.take_cached(hits)  # before allocating, so allocation cannot evict them
        block_ids = self.pool.allocate(need)
        assert block_ids is not None, f"pool refused {need} blocks with {self.pool.num_free_blocks} free"
        seq.block_ids = hits + block_ids
        seq.num_computed_tokens = num_cached
        seq.num_registered_blocks = len(hits)
        if self.config.prefix_cache:
            out.num_queried_tokens += seq.num_tokens
            out.num_cached_tokens += num_cached
        return num_new

    def _cached_prefix(self, seq: Sequence) -> list[int]:
        """Blocks of the longest cached prefix of the sequence's tokens, leaving at least its last token."""
        if not self.config.prefix_cache:
            return []
        num_blocks = max_cached_blocks(seq.num_cacheable_tokens, self.config.block_size)
        return self.pool.match_prefix(
            seq.full_block_hashes(num_blocks * self.config.block_size, self.config.block_size)
        )

    def _schedule(self, seq: Sequence, num_new: int, out: SchedulerOutput, samples: bool | None = None) -> None:
        """Put the chunk in the step and register the blocks it fills. A decode with its token still pending
        never comes here (schedule_ahead appends it directly): its newest block is not full of known tokens."""
        num_tokens = seq.num_computed_tokens + num_new
        if samples is None:
            samples = num_tokens == seq.num_tokens and not seq.score_only
        out.scheduled.append(ScheduledSeq(seq, num_new, samples))
        if seq.num_computed_tokens < seq.num_prompt_tokens:
            out.num_prefill_tokens += min(num_new, seq.num_prompt_tokens - seq.num_computed_tokens)
        if not self.config.prefix_cache:
            return
        block_size = self.config.block_size
        num_full = num_tokens // block_size
        if num_full <= seq.num_registered_blocks:
            return
        hashes = seq.full_block_hashes(num_tokens, block_size)
        for i in range(seq.num_registered_blocks, num_full):
            if self.pool.register(seq.block_ids[i], hashes[i]):
                self._registered_this_step.append(seq.block_ids[i])
        seq.num_registered_blocks = num_full

    def _grow(self, seq: Sequence, num_new: int, out: SchedulerOutput, protect: bool = False) -> bool:
        """Give `seq` pages for `num_new` more tokens, preempting the newest sequences if needed.
        False when `seq` itself had to be preempted; with `protect`, the others go first."""
        need = num_blocks_for(seq.num_computed_tokens + num_new, self.config.block_size) - len(seq.block_ids)
        while need > self.pool.num_free_blocks:
            others = [s for s in self.running if s is not seq]
            victim = others[-1] if protect and others else self.running[-1]
            self.preempt(victim)
            out.preempted.append(victim)
            if victim is seq:
                return False
        self._allocate(seq, need)
        return True

    def _allocate(self, seq: Sequence, need: int) -> None:
        """Append `need` new blocks to the sequence's pages (nothing if need <= 0); the caller made sure they fit."""
        if need > 0:
            block_ids = self.pool.allocate(need)
            assert block_ids is not None, (
                f"seq {seq.seq_id}: pool refused {need} blocks with {self.pool.num_free_blocks} free"
            )
            seq.block_ids.extend(block_ids)

    def _release(self, seq: Sequence) -> None:
        """Drop the sequence's hold on its pages; their cached blocks stay findable until evicted."""
        self.pool.free(seq.block_ids)
        seq.block_ids = []
        seq.num_registered_blocks = 0

    def preempt(self, seq: Sequence) -> None:
        """Free the sequence's pages and queue it to be recomputed (after its cached prefix, if any)."""
        self.running.remove(seq)
        self._release(seq)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.add(seq)

    def advance(self, out: SchedulerOutput) -> list[int]:
        """Record that the step ran: the scheduled tokens are now in the pages. Returns the blocks the step
        registered in the prefix cache: a device error may show only when its tokens are read, and then the
        caller withdraws them (`requeue_isolated(..., registered)`)."""
        registered, self._registered_this_step = self._registered_this_step, []
        for item in out.scheduled:
            seq = item.seq
            seq.num_computed_tokens += item.num_new_tokens
            # An isolated sequence whose whole context ran alone without failing is not the culprit. (Asked only of
            # isolated ones: this loop runs for every row of every step.)
            if seq.isolate and seq.num_computed_tokens == seq.num_tokens and seq.num_isolations < MAX_ISOLATIONS:
                seq.isolate = False
        return registered

    def finish(self, seq: Sequence) -> None:
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SeqStatus.WAITING:
            self.waiting.remove(seq)
        self._release(seq)
        seq.status = SeqStatus.FINISHED

    def requeue_isolated(self, seqs: list[Sequence], registered: Iterable[int] = ()) -> None:
        """After a failed step: each of its sequences loses its pages and will run alone. The blocks the
        step registered (and `registered`, those of launched steps that failed when read) are withdrawn from the
        prefix cache: their K/V may be half written."""
        self._withdraw_step(registered)
        for seq in seqs:
            if seq.status is SeqStatus.RUNNING:
                self.running.remove(seq)
                self._release(seq)
                seq.num_computed_tokens = 0
                seq.num_pending = 0  # a failed step's tokens never reach the host; they are recomputed
                seq.isolate = True
                seq.num_isolations += 1
                self.add(seq)

    def abort_all(self, registered: Iterable[int] = ()) -> list[Sequence]:
        """Drop every sequence (the caller stopped consuming results); the pool is whole again. `registered`:
        prefix blocks of a launched step whose tokens were never read, withdrawn like the last step's."""
        self._withdraw_step(registered)  # the last step may not have run
        dropped = self.running + self.waiting
        for seq in dropped:
            self.finish(seq)
        return dropped

    def _withdraw_step(self, registered: Iterable[int] = ()) -> None:
        self.pool.uncache([*self._registered_this_step, *registered])
        self._registered_this_step = []
