"""The engine: one model, one KV pool, any number of `generate` calls, one at a time.

Each step is three calls: the scheduler picks tokens, the model runner computes them, the engine
samples and retires finished sequences. A step that raises does not lose its batch: every
sequence in it is recomputed in a step of its own, and only one that fails alone, twice, gets an error.

Async scheduling (on by default on a GPU): the host plans and launches step N+1 before it waits for
step N's tokens, so scheduling, building inputs and bookkeeping overlap the GPU's work instead of
leaving it idle between steps:

    host:  plan N+1 | launch N+1 | wait N, append, retire | plan N+2 | launch N+2 | wait N+1 ...
    GPU:   .... step N .........|........ step N+1 ..................|...... step N+2 ......

Step N+1's inputs that are step N's tokens are copied on the device (see Sequence.num_pending). The
scheduler plans decodes, prompt chunks and admissions ahead; a step that would preempt, or a sequence that
must run alone or reads its own output (penalties, bad words), drains first.
"""

from __future__ import annotations

import atexit
import functools
import gc
import hashlib
import logging
import math
import os
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, wait
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from kvbatch.cache.backends import select_backend
from kvbatch.cache.block_pool import BlockPool
from kvbatch.cache.block_table import num_blocks_for
from kvbatch.cache.budget import PoolSize
from kvbatch.cache.kv_cache import KVCache
from kvbatch.cache.prefix_cache import BlockHash, chain_hashes
from kvbatch.errors import BackendUnavailableError, ErrorKind, KVBudgetError
from kvbatch.runner.config import EngineConfig

from .admission import AdmissionLimits, never_fits
from .attention_hook import layer_options
from .float32_logits import use_float32_logits
from .fused_forward import fused_decoder_for
from .logits_processors import RowLogits, banned_token_ids, row_logits
from .lora.adapters import Adapters
from .lora.weights import AdapterError
from .model_loader import LoadedModel, length_dependent_rope, load_model
from .model_runner import MIN_ROWS, ModelRunner, prepare_inputs
from .pool_sizing import fixed_pool_size, kv_cache_spec, profile_gpu_pool
from .request import (
    Completion,
    ContinuationScore,
    EngineStats,
    FinishReason,
    GenerationRequest,
    GenerationResult,
    TopLogprobs,
)
from .rolling import rolling_windows
from .sampling import SampledTokens, SamplingRow, sample_on_device, sequence_seed
from .scheduler import ScheduledSeq, Scheduler, SchedulerConfig, SchedulerOutput
from .scoring import ScoredRows, score_on_device
from .scoring import warm_up as warm_up_scoring
from .sequence import Sequence, capacity_tokens, capped_new_tokens
from .stopping import StopChecker
from .structured import GrammarCache, accept_tokens, dead_end, first_token_problem, new_matcher, step_mask
from .structured_outputs import ConstraintError, StructuredOutputs

logger = logging.getLogger(__name__)

# A sequence that fails this many times running alone gets an error (once could be a transient fault, an OOM).
FAILURES_ALONE_TO_ERROR = 2
# Below this many shared tokens, reading the prefix once per sequence costs less than the cascade's extra launches.
CASCADE_MIN_TOKENS = 256


@dataclass(eq=False)
class _InFlight:
    """A launched step whose tokens the host has not seen yet."""

    out: SchedulerOutput
    sampling_items: list[ScheduledSeq]
    sampled: SampledTokens | None  # None until launched: a step with constrained rows samples after the drain
    registered: list[int]  # blocks it registered in the prefix cache: withdrawn if reading its tokens fails
    scored: ScoredRows | None = None  # its scored rows, whose they are in score_spans
    score_spans: list[tuple[Sequence, int, int]] = field(default_factory=list)
    score_done: list[Sequence] = field(default_factory=list)  # scored continuations it computes to their end


@dataclass(eq=False)
class _RequestState:
    request: GenerationRequest
    seqs: list[Sequence] = field(default_factory=list)
    num_unfinished: int = 0
    logits_info: RowLogits | None = None  # bad words' token ids, the ids min_tokens masks
    scoring: bool = False  # counted in Engine._num_scoring (it has scored rows) until it ends


def _sampling_rows(items: list[ScheduledSeq]) -> list[SamplingRow] | None:
    """What sampling needs of each sampling row; None when every row takes the plain argmax (the usual
    greedy batch job), which needs nothing per row."""
    if all(item.seq.plain_greedy for item in items):
        return None
    return [
        SamplingRow(
            item.seq.request.sampling,
            item.seq.seed,
            item.seq.all_token_ids if item.seq.penalised else [],
            len(item.seq.output_token_ids) + item.seq.num_pending,
            item.seq.group.logits_info,
        )
        for item in items
    ]


def _stable_hash(request_id: object) -> int:
    """56 bits from the request id, the same in every process (unlike hash()): an unseeded row of a job (its id
    is its input row) samples the same tokens in a resumed, sharded or data-parallel run as in one run."""
    return int.from_bytes(hashlib.blake2b(repr(request_id).encode(), digest_size=7).digest(), "little")


class Engine:
    def __init__(
        self,
        config: EngineConfig = EngineConfig(),
        loaded: LoadedModel | None = None,
        adapters: Mapping[str, str] | None = None,
    ) -> None:
        """`adapters`: LoRA adapters (name -> PEFT folder or cached hub name) to serve; the device slots are sized
        from them. None: the base model only (add_adapter then refuses)."""
        self.config = config
        self.loaded = loaded or load_model(
            config.model,
            config.device,
            config.dtype,
            config.max_model_len,
            config.trust_remote_code,
            config.allow_pickle,
            config.allow_download,
        )
        self.model = self.loaded.model
        self.tokenizer = self.loaded.tokenizer
        self.vocab_size: int = self.model.config.get_text_config().vocab_size
        self.device = self.loaded.device
        # A preloaded model keeps its loader's context unless the config asks for less.
        self.max_model_len = min(self.loaded.max_model_len, config.max_model_len or self.loaded.max_model_len)
        # A preloaded LongRoPE model too: past this length its rope would follow the step, not the row.
        rope_limit = length_dependent_rope(self.model.config)
        if rope_limit is not None:
            self.max_model_len = min(self.max_model_len, rope_limit)
        self.max_num_batched_tokens = config.max_num_batched_tokens or (16384 if self.device.type == "cuda" else 4096)
        try:
            self.backend = select_backend(config.attention_backend, self.device, config.block_size, self._plain_layers)
        except ValueError as exc:  # a backend asked for by name that cannot run here: cache/ says why
            raise BackendUnavailableError(str(exc)) from None
        num_heads = self.model.config.get_text_config().num_attention_heads
        self.kv_spec = kv_cache_spec(self.model.config, config.block_size, self.backend.name, self.loaded.dtype)
        self.fused = fused_decoder_for(self.model, config.fused_layers, self.device)
        self.adapters = self._make_adapters(adapters) if adapters is not None else None
        if self.fused is not None:
            self.fused.adapters = self.adapters
        self.float32_logits = use_float32_logits(self.model, config.float32_logits, self.device)
        self.pool_size = self._size_pool()
        try:
            self.kv_cache = KVCache(self.kv_spec, self.pool_size.num_blocks, self.device)
        # torch.OutOfMemoryError; a CPU pool's map the host refuses; a size past ssize_t (num_blocks_override)
        except (RuntimeError, OSError, OverflowError) as exc:
            raise KVBudgetError(
                f"cannot allocate the KV pool ({self.pool_size.describe()}) on {self.device}: "
                f"{str(exc).splitlines()[0]}; lower engine.kv_cache_gib or gpu_memory_utilization"
            ) from exc
        self.pool = BlockPool(self.pool_size.num_blocks)
        self.runner = ModelRunner(self.model, self.kv_cache, self.backend, self.fused, self.loaded.layers)
        self.runner.adapters = self.adapters
        # Decodes sharing this many cached prefix tokens read them once, together (the cascade decode).
        self.cascade_min_tokens = CASCADE_MIN_TOKENS if self.backend.cascade and config.prefix_cache else 0
        if self.backend.warm_up is not None:
            self.backend.warm_up(self.kv_cache.key[0], self.kv_cache.value[0], num_heads, self.loaded.dtype)
        if self.config.cuda_graphs and self.device.type == "cuda" and self.backend.name != "torch":
            self._capture_graphs()
        warm_up_scoring(self.vocab_size, torch.float32 if self.float32_logits else self.loaded.dtype, self.device)
        self.stop_checker = StopChecker(self.tokenizer, self.loaded.eos_token_ids)
        self.stats = EngineStats()
        self.timer = StepTimer(self.device)  # `timer.enabled = True` for a per-phase breakdown
        self._next_seq_id = 0
        self._generating = False
        self._grammars: GrammarCache | None = None  # made at the first constrained request
        self._num_scoring = 0  # requests in flight with scored rows: while 0, steps gather no scored rows
        self.async_scheduling = (
            config.async_scheduling if config.async_scheduling is not None else self.device.type == "cuda"
        )
        freeze_gc()
        logger.info(
            "engine ready: %s on %s (%s), attention %s, KV pool %s, context %d tokens",
            self.loaded.source,
            self.device,
            self.loaded.dtype,
            self.backend.name,
            self.pool_size.describe(),
            self.max_model_len,
        )

    def _plain_layers(self) -> bool:
        """Whether every layer is plain causal attention (flash-attn computes no other), asked only where flash-attn
        could otherwise serve the model: the load check's record, or a probe forward of one token for a model built
        in code."""
        layers = self.loaded.layers
        if layers is None:
            layers = layer_options(self.model, self.loaded.source)
        return all(layer.is_plain for layer in layers.values())

    @classmethod
    def from_loaded(cls, loaded: LoadedModel, config: EngineConfig = EngineConfig()) -> Engine:
        return cls(config, loaded)

    def _size_pool(self) -> PoolSize:
        if self.device.type == "cuda" and not self.config.num_blocks_override:
            return profile_gpu_pool(
                self.model,
                self.kv_spec,
                self.backend,
                self.fused,
                self.config,
                self.max_num_batched_tokens,
                self.max_model_len,
                self.device,
            )
        reserved = self.adapters.host_bytes if self.adapters is not None else 0
        return fixed_pool_size(self.kv_spec, self.config, reserved)

    # ---- adapters ----------------------------------------------------------------------------

    def _make_adapters(self, adapters: Mapping[str, str]) -> Adapters:
        from .model_loader import DEFAULT_HUB_NAME

        config = self.config
        if config.max_loras < 1:
            raise ValueError(f"engine.max_loras must be >= 1 to serve adapters, got {config.max_loras}")
        name = self.loaded.source
        return Adapters(
            self.model,
            adapters,
            self.device,
            self.loaded.dtype,
            config.max_loras,
            config.max_cpu_loras or config.max_loras,
            config.allow_pickle,
            DEFAULT_HUB_NAME if name.startswith("default") else name,
            use_triton=self.device.type == "cuda" or (self.fused is not None and self.fused.triton),
            packed=self.fused.packed_linears() if self.fused is not None else (),
        )

    def add_adapter(self, name: str, path: str) -> None:
        """Serve LoRA adapter `name` from `path` (a PEFT folder or a cached hub name). A bad adapter does not
        raise: requests naming it get `bad_adapter` results."""
        if self.adapters is None:
            raise RuntimeError("this engine was built without adapters; pass adapters= to Engine() to serve them")
        if self._generating:
            raise RuntimeError("adapters cannot change during a generate() call")
        self.adapters.add(name, path)

    def adapter_problem(self, name: str) -> str | None:
        """Why every request on adapter `name` would fail as bad_adapter (unregistered, missing, unreadable, of
        another model), or None."""
        if self.adapters is None:
            return f"adapter {name!r} asked of an engine that serves no adapters"
        return self.adapters.problem(name)

    def _adapter_problem(self, request: GenerationRequest) -> tuple[ErrorKind, str] | None:
        if request.adapter is None:
            return None
        problem = self.adapter_problem(request.adapter)
        return (ErrorKind.BAD_ADAPTER, problem) if problem else None

    def _capture_graphs(self) -> None:
        from .cuda_graphs import DecodeGraphs

        max_blocks_per_seq = num_blocks_for(self.max_model_len, self.config.block_size)
        graphs = DecodeGraphs(
            self.runner,
            self.config.max_num_seqs,
            max_blocks_per_seq,
            self.config.block_size,
            MIN_ROWS,
            cascade=bool(self.cascade_min_tokens),
        )
        try:
            graphs.capture()
        except Exception as exc:  # noqa: BLE001 - eager steps give the same tokens, only slower
            logger.warning(
                "decode CUDA graphs could not be captured (%s: %s); running eagerly", type(exc).__name__, exc
            )
            return
        self.runner.graphs = graphs

    @property
    def source(self) -> str:
        return self.loaded.source

    def kv_usage(self) -> float:
        return self.pool.usage()

    @property
    def uses_cuda_graphs(self) -> bool:
        return self.runner.graphs is not None

    def close(self) -> None:
        """Give the KV pages and graphs back to the device; the engine cannot generate afterwards."""
        self.runner.graphs = None
        self.runner.kv_cache = self.kv_cache = None  # type: ignore[assignment]
        if self._grammars is not None:
            self._grammars.close()
        if self.adapters is not None:
            self.adapters.close()  # the model may serve another engine: its layers lose this one's hooks
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    @property
    def capacity_tokens(self) -> int:
        """The longest sequence (prompt + output) that can ever run: the context, or the pool if smaller."""
        return capacity_tokens(self.max_model_len, self.pool_size.num_tokens)

    # ---- admission ---------------------------------------------------------------------------

    @functools.cached_property
    def _admission(self) -> AdmissionLimits:
        """The limits the admission rule reads, fixed once the engine is built (asked of every request)."""
        return AdmissionLimits(
            self.max_model_len, self.pool_size.num_tokens, self.vocab_size, self.tokenizer, self.loaded.eos_token_ids
        )

    def _never_fits(self, request: GenerationRequest) -> tuple[ErrorKind, str] | None:
        return never_fits(request, self._admission)

    def _add_scoring(self, scheduler: Scheduler, request: GenerationRequest) -> _RequestState:
        """One score-only sequence per continuation: prompt + continuation less its last token (never input).

        The prompt's last row predicts every continuation's first token, so the first continuation scores it
        against all of them (and, with prompt_logprobs, scores the prompt's own rows); the others score only
        their later tokens, so their cached prefix may take the whole prompt, and a one-token continuation needs
        no sequence at all:

            prompt p0 .. p9 | continuations [a0 a1 a2], [b0 b1], [c0]
            first   p0 .. p9 a0 a1      row 9 scored against a0, b0, c0; rows 10, 11 against a1, a2
            second  p0 .. p9 b0         p0 .. p9 from the prefix cache (whole blocks); row 10 against b1
        """
        state = _RequestState(request)
        prompt = request.prompt_token_ids
        last = len(prompt) - 1
        continuations = request.continuations or []
        firsts = [c[0] for c in continuations]
        adapter_key = self.adapters.key(request.adapter) if self.adapters is not None else b""
        hashes = self._prompt_hashes(prompt, adapter_key, len(continuations))
        for i, continuation in enumerate(continuations):
            rows = list(range(last + 1, last + len(continuation)))
            targets = continuation[1:]
            if i == 0:
                rows = [last] * len(firsts) + rows
                targets = firsts + targets
                if request.sampling.prompt_logprobs:
                    rows = list(range(last)) + rows
                    targets = prompt[1:] + targets
            elif not rows:
                continue
            tokens = prompt + continuation[:-1]
            scored = GenerationRequest(request.request_id, tokens, request.sampling, request.adapter)
            self._queue_scored(
                scheduler, state, scored, i, rows, targets, adapter_key, queue_tokens=len(prompt),
                block_hashes=list(hashes),
            )  # fmt: skip
        return self._scoring_admitted(state)

    def _add_rolling(self, scheduler: Scheduler, request: GenerationRequest) -> _RequestState:
        """One score-only sequence per window of the context over the prompt (runner/rolling.py): each scores
        the tokens its window predicts. Windows share no prefix, so each hashes its own blocks."""
        state = _RequestState(request)
        adapter_key = self.adapters.key(request.adapter) if self.adapters is not None else b""
        assert request.rolling_prefix is not None
        windows = rolling_windows(request.prompt_token_ids, request.rolling_prefix, self.max_model_len)
        for i, (context, predicted) in enumerate(windows):
            window = replace(request, prompt_token_ids=context + predicted[:-1], rolling_prefix=None)
            rows = list(range(len(context) - 1, len(context) - 1 + len(predicted)))
            self._queue_scored(scheduler, state, window, i, rows, predicted, adapter_key)
        return self._scoring_admitted(state)

    def _queue_scored(
        self,
        scheduler: Scheduler,
        state: _RequestState,
        request: GenerationRequest,  # its prompt_token_ids: the sequence's tokens
        index: int,
        rows: list[int],
        targets: list[int],
        adapter_key: bytes,
        queue_tokens: int = 0,
        block_hashes: list[BlockHash] | None = None,  # None: hashed as it is computed
    ) -> None:
        """Queue one score-only sequence of a scoring request: rows[j] of its tokens scored against targets[j]."""
        seq = Sequence(
            self._next_seq_id,
            request,
            index,
            0,
            seed=0,
            group=state,
            score_rows=rows,
            score_targets=targets,
            score_only=True,
            adapter_key=adapter_key,
            queue_tokens=queue_tokens,
            block_hashes=block_hashes if block_hashes is not None else [],
        )
        self._next_seq_id += 1
        state.seqs.append(seq)
        scheduler.add(seq)

    def _scoring_admitted(self, state: _RequestState) -> _RequestState:
        state.num_unfinished = len(state.seqs)
        self.stats.num_requests += 1
        self._count_scoring(state)
        return state

    def _add(
        self, scheduler: Scheduler, request: GenerationRequest, seed_base: int, grammar: object = None
    ) -> _RequestState:
        if request.continuations is not None:
            return self._add_scoring(scheduler, request)
        if request.rolling_prefix is not None:
            return self._add_rolling(scheduler, request)
        params = request.sampling
        logits_info = row_logits(params, self.tokenizer, self.loaded.eos_token_ids, self.vocab_size)
        state = _RequestState(request, logits_info=logits_info)
        max_new = capped_new_tokens(params.max_new_tokens, len(request.prompt_token_ids), self.capacity_tokens)
        request_seed = params.seed if params.seed is not None else seed_base ^ _stable_hash(request.request_id)
        prompt = request.prompt_token_ids
        scores_prompt = params.prompt_logprobs and len(prompt) > 1
        adapter_key = self.adapters.key(request.adapter) if self.adapters is not None else b""
        hashes = self._prompt_hashes(prompt, adapter_key, params.n)
        for i in range(params.n):
            # The prompt's logprobs are computed once, by the first sample.
            scored = {}
            if scores_prompt and i == 0:
                scored = {"score_rows": list(range(len(prompt) - 1)), "score_targets": prompt[1:]}
            seed = sequence_seed(request_seed, i)
            seq = Sequence(
                self._next_seq_id,
                request,
                i,
                max_new,
                seed=seed,
                group=state,
                adapter_key=adapter_key,
                block_hashes=list(hashes),
                **scored,
            )
            seq.matcher = new_matcher(grammar) if grammar is not None else None
            self._next_seq_id += 1
            state.seqs.append(seq)
            scheduler.add(seq)
        state.num_unfinished = params.n
        self.stats.num_requests += 1
        if scores_prompt:
            self._count_scoring(state)
        return state

    def _count_scoring(self, state: _RequestState) -> None:
        state.scoring = True
        self._num_scoring += 1

    def _end(self, state: _RequestState) -> None:
        """A request leaves the engine, finished or failed: the one place it stops counting as scoring. Each
        sequence points at its request's state, and the state at its sequences: left so, a finished request (its
        tokens, sequences, lists) is freed only by a full pass of the cyclic collector, which walks all those
        still held. One such pass stalled an H100 host for 77 ms with the GPU idle, in the scoring bench. Without
        the cycle, the last reference going frees it at once."""
        if state.scoring:
            state.scoring = False
            self._num_scoring -= 1
        state.seqs.clear()

    def _prompt_hashes(self, prompt: list[int], adapter_key: bytes, num_seqs: int) -> list[BlockHash]:
        """The prompt's full-block prefix-cache hashes, computed once for a request's several sequences (samples or
        continuations, which all begin with the prompt); [] for one sequence, which hashes its blocks as it goes."""
        if num_seqs < 2 or not self.config.prefix_cache:
            return []
        return chain_hashes(None, prompt, self.config.block_size, adapter_key)

    def _error_result(self, request: GenerationRequest, kind: ErrorKind, message: str) -> GenerationResult:
        self.stats.num_errors += 1
        return GenerationResult(request.request_id, len(request.prompt_token_ids), [], error=message, error_kind=kind)

    def constraint_problem(self, constraint: StructuredOutputs) -> str | None:
        """Why every row under `constraint` would fail as bad_constraint before its first token, or None. It is
        compiled into this engine's cache, so the rows under it find it compiled."""
        return first_token_problem(self.grammars(), constraint)

    def grammars(self) -> GrammarCache:
        """The compile cache of structured-output constraints, for this engine's tokenizer and vocabulary."""
        if self._grammars is None:
            self._grammars = GrammarCache(self.tokenizer, self.vocab_size, self.loaded.eos_token_ids)
        return self._grammars

    def _admit_compiled(
        self, scheduler: Scheduler, compiling: list[tuple[GenerationRequest, Future]], seed_base: int, block: bool
    ) -> list[GenerationResult]:
        """Hand requests whose grammar is ready to the scheduler (in arrival order among the ready ones); a
        constraint that failed to compile is its request's error. `block`: wait until one is ready."""
        if block:
            wait([future for _, future in compiling], return_when=FIRST_COMPLETED)
        results = []
        for entry in [entry for entry in compiling if entry[1].done()]:
            compiling.remove(entry)
            request, future = entry
            try:
                grammar = future.result()
            except ConstraintError as exc:
                message = f"bad constraint ({request.sampling.structured_outputs.describe()}): {exc}"
                results.append(self._error_result(request, ErrorKind.BAD_CONSTRAINT, message))
                continue
            self._add(scheduler, request, seed_base, grammar)
        return results

    # ---- the loop ----------------------------------------------------------------------------

    def generate(
        self, requests: Iterable[GenerationRequest], on_step: Callable[[], None] | None = None
    ) -> Iterator[GenerationResult]:
        """Run requests through the pool, yielding each result as it finishes (not in input order).

        Requests are pulled lazily, keeping a bounded window of waiting work, so an unbounded
        stream runs in bounded memory. Closing the generator early frees every page it held.
        `on_step` runs after every step, also when no result finished (a caller's timed commits).
        """
        if self.kv_cache is None:
            raise RuntimeError("this engine was closed (Engine.close gave its KV pages back); make a new one")
        if self._generating:  # two schedulers over one pool cannot preempt each other's rows
            raise RuntimeError("this engine is running another generate() call; finish or close that one first")
        scheduler = Scheduler(
            SchedulerConfig(
                self.config.max_num_seqs,
                self.max_num_batched_tokens,
                self.config.block_size,
                self.config.policy,
                prefix_cache=self.config.prefix_cache,
                max_loras=self.config.max_loras if self.adapters is not None else None,
            ),
            self.pool,
        )
        source = iter(requests)
        # engine.seed makes unseeded rows reproducible by id; without it each call (job) draws a fresh base. A
        # negative engine.seed is itself plus 2**64, as in torch.
        seed_base = (
            self.config.seed % (1 << 64) if self.config.seed is not None else int.from_bytes(os.urandom(7), "little")
        )
        exhausted = False
        num_intakes = 0
        in_flight: _InFlight | None = None
        # Constrained requests whose grammar is still compiling: they join the scheduler once it is ready.
        compiling: list[tuple[GenerationRequest, Future]] = []
        refused: list[GenerationResult] = []  # requests refused on arrival, yielded after the intake
        failed: Exception | None = None  # what the intake raised (the caller's iterator), raised between steps

        def take_in() -> None:
            """Pull requests until `lookahead` of them wait (or compile, or were refused), or `token_cap` tokens.
            The first two intakes take one step's tokens each, for the step the device waits for next: the first
            before anything runs, the second while the first step runs with nothing queued behind it (on an
            H100 host the second took 41 ms to fill the queue and the device idled 18 ms of it). Later ones take
            two steps' sequences, while the device has two steps to run."""
            nonlocal exhausted, failed, num_intakes
            lookahead = self.config.max_num_seqs * (1 if num_intakes == 0 else 2)
            token_cap = self.max_num_batched_tokens if num_intakes < 2 else math.inf
            num_intakes += 1
            taken_tokens = 0
            with self.timer.phase("intake"):
                try:
                    while (
                        not exhausted
                        and taken_tokens < token_cap
                        and len(scheduler.waiting) + len(compiling) + len(refused) < lookahead
                    ):
                        request = next(source, None)
                        if request is None:
                            exhausted = True
                            break
                        taken_tokens += request.num_input_tokens
                        refusal = self._adapter_problem(request) or self._never_fits(request)
                        if refusal:
                            refused.append(self._error_result(request, *refusal))
                        elif request.sampling.structured_outputs is not None:
                            compiling.append((request, self.grammars().submit(request.sampling.structured_outputs)))
                        else:
                            self._add(scheduler, request, seed_base)
                except Exception as exc:  # noqa: BLE001 - raised once the step being launched is in flight
                    exhausted = True
                    failed = exc

        self._generating = True
        self._num_scoring = 0
        try:
            while True:
                # With a step in flight _step takes requests in once it launched the next, but the first intake held
                # one step: the second, while the device runs that step, fills the queue the next is planned from.
                if in_flight is None or num_intakes == 1:
                    take_in()
                if failed is not None:
                    raise failed
                yield from refused
                refused.clear()
                if compiling:
                    idle = in_flight is None and not scheduler.has_work()
                    yield from self._admit_compiled(scheduler, compiling, seed_base, block=idle)
                if in_flight is None and not scheduler.has_work():
                    if exhausted and not compiling:
                        break
                    continue
                results, in_flight = self._step(scheduler, in_flight, take_in)
                yield from results
                if failed is not None:
                    raise failed
                if on_step is not None:
                    on_step()
        finally:
            # A step still in flight may yet fail on the device: its prefix blocks are never confirmed.
            scheduler.abort_all(in_flight.registered if in_flight is not None else ())
            self._generating = False
            self._num_scoring = 0

    def _step(
        self, scheduler: Scheduler, in_flight: _InFlight | None, take_in: Callable[[], None]
    ) -> tuple[list[GenerationResult], _InFlight | None]:
        """Launch the next step (planned ahead when one is in flight, else after draining it). With one in
        flight, `take_in` runs once this step is launched: the host pulls new requests while the device has two
        steps to run, not while it waits for the next (an H100 profile of scoring had a 41 ms gap, 32 of it
        taking in requests with the device idle)."""
        if in_flight is None:
            with self.timer.phase("schedule"):
                out = scheduler.schedule()
            assert out.scheduled, (
                f"nothing scheduled with {len(scheduler.running)} running, {len(scheduler.waiting)} waiting, "
                f"{self.pool.num_free_blocks}/{self.pool.num_blocks} blocks free"
            )
        else:
            with self.timer.phase("schedule"):
                out = scheduler.schedule_ahead()
            if out is None:
                return self._drain(scheduler, in_flight)[0], None
            self.stats.num_steps_ahead += 1
        self.stats.num_steps += 1
        self.stats.num_preemptions += len(out.preempted)
        self.stats.num_queried_prompt_tokens += out.num_queried_tokens
        self.stats.num_cached_prompt_tokens += out.num_cached_tokens
        self.stats.num_prefill_tokens += out.num_prefill_tokens
        self.stats.peak_kv_usage = max(self.stats.peak_kv_usage, self.pool.usage())
        sampling_items = [item for item in out.scheduled if item.samples]
        try:
            with self.timer.phase("prepare_inputs"):
                inputs = prepare_inputs(
                    out.scheduled,
                    self.config.block_size,
                    self.device,
                    self.runner.staging,
                    self.cascade_min_tokens,
                    self.runner.host_tables,
                    scoring=self._num_scoring > 0,
                )
                inputs.fill_pending(in_flight.sampled.tokens if in_flight else None)
                if self.adapters is not None:
                    inputs.lora = self.adapters.prepare(
                        [item.seq.request.adapter for item in out.scheduled],
                        np.fromiter((item.num_new_tokens for item in out.scheduled), np.int64, len(out.scheduled)),
                        inputs.input_ids.shape[1],
                    )
            with self.timer.phase("forward_decode_graph" if self.runner.replays(inputs) else "forward_eager"):
                logits, score_logits = inputs.split_logits(self.runner.forward(inputs))
            # A constrained row's mask needs the grammar past the token in flight: with one in flight, the
            # sampling waits (below) until the host has taken that step in, while the device runs this forward.
            deferred = (
                in_flight is not None
                and self._grammars is not None
                and any(item.seq.matcher is not None for item in sampling_items)
            )
            rows = _sampling_rows(sampling_items)  # now: their positions count the tokens pending before this step
            sampled = None if deferred else self._sample(sampling_items, rows, logits)
            scored = None
            if score_logits is not None:
                with self.timer.phase("score"):
                    scored = score_on_device(
                        score_logits, inputs.score_targets, inputs.score_target_rows
                    ).start_download()
        except Exception as exc:  # noqa: BLE001 - any failure of a step is contained here
            results = self._drain(scheduler, in_flight)[0] if in_flight else []
            return results + self._recover(scheduler, [item.seq for item in out.scheduled], exc), None
        score_done = [
            item.seq
            for item in out.scheduled
            if item.seq.score_only and item.seq.num_computed_tokens + item.num_new_tokens == item.seq.num_tokens
        ]
        registered = scheduler.advance(out)
        for i, item in enumerate(sampling_items):
            item.seq.num_pending += 1
            item.seq.pending_index = i
        launched = _InFlight(out, sampling_items, sampled, registered, scored, inputs.score_spans, score_done)
        if in_flight is not None:  # the device runs `launched` while the host takes in the step before
            take_in()
            results, ok = self._drain(scheduler, in_flight, launched)
            if ok and launched.sampled is None:
                try:
                    launched.sampled = self._sample(sampling_items, rows, logits)
                except Exception as exc:  # noqa: BLE001 - as a step that raised
                    lost = [item.seq for item in out.scheduled]
                    return results + self._recover(scheduler, lost, exc, registered), None
            return results, launched if ok else None
        if self.async_scheduling:
            return [], launched
        return self._drain(scheduler, launched)[0], None

    def _sample(
        self, sampling_items: list[ScheduledSeq], rows: list[SamplingRow] | None, logits: torch.Tensor
    ) -> SampledTokens:
        """Launch the choice of the step's tokens (masked by the rows' grammars) and their download."""
        with self.timer.phase("sample"):
            mask = step_mask(sampling_items, logits.shape[-1], self.device, self._grammars) if self._grammars else None
            return sample_on_device(logits, rows, mask).start_download()

    def _drain(
        self, scheduler: Scheduler, step: _InFlight, next_step: _InFlight | None = None
    ) -> tuple[list[GenerationResult], bool]:
        """Take in a launched step's tokens. If the device fails while we wait, the step (and `next_step`,
        launched after it and reading its tokens) is recomputed like a step that raised; then False."""
        try:
            waited = time.perf_counter()
            with self.timer.phase("wait_tokens"):
                tokens, logprobs = step.sampled.to_host()
                top = step.sampled.top_to_host()
                scores = step.scored.to_host() if step.scored is not None else None
            self.stats.host_wait_s += time.perf_counter() - waited
        except Exception as exc:  # noqa: BLE001 - as a step that raised
            steps = [s for s in (step, next_step) if s is not None]
            lost = [item.seq for s in steps for item in s.out.scheduled]
            registered = [block for s in steps for block in s.registered]
            return self._recover(scheduler, list(dict.fromkeys(lost)), exc, registered), False
        with self.timer.phase("postprocess"):
            results = self._take_scores(scheduler, step, scores) if scores is not None else []
            return results + self._postprocess(scheduler, step.sampling_items, tokens, logprobs, top), True

    def _take_scores(
        self, scheduler: Scheduler, step: _InFlight, scores: tuple[list[float], list[bool]]
    ) -> list[GenerationResult]:
        """Write a step's scored rows into their sequences; retire the continuations it computed to the end."""
        logprobs, greedy = scores
        row = 0
        for seq, first, count in step.score_spans:
            seq.score_logprobs[first : first + count] = logprobs[row : row + count]
            seq.score_greedy[first : first + count] = greedy[row : row + count]
            row += count
        results = []
        for seq in step.score_done:
            if seq.finish_reason is None:
                seq.finish_reason = "stop"
                result = self._retire(scheduler, seq)
                if result:
                    results.append(result)
        return results

    def _postprocess(
        self,
        scheduler: Scheduler,
        sampling_items: list,
        tokens: list[int],
        logprobs: list[float] | None,
        top: tuple[list[list[int]], list[list[float]]] | None = None,
    ) -> list[GenerationResult]:
        """Append each sampled token, check its stop conditions, retire what finished."""
        results = []
        eos = self.stop_checker.eos_token_ids
        num_spare = 0
        constrained: list[Sequence] = []  # their grammars take their tokens together, after the loop
        constrained_tokens: list[int] = []
        for i, item in enumerate(sampling_items):
            seq = item.seq
            if seq.finish_reason is not None:  # stopped on the step before: a decode planned ahead, dropped
                num_spare += 1
                continue
            seq.num_pending -= 1
            token = tokens[i]
            seq.output_token_ids.append(token)
            if logprobs is not None and seq.request.sampling.logprobs:
                seq.output_logprobs.append(logprobs[i])
            if top is not None and seq.request.sampling.top_logprobs:
                num_top = seq.request.sampling.top_logprobs
                seq.output_top_logprobs.append(TopLogprobs(top[0][i][:num_top], top[1][i][:num_top]))
            # Most rows of most steps go on: only a row that may stop pays for the full check.
            if seq.matcher is not None:  # a constrained row ends where its grammar ends, or at its limit
                constrained.append(seq)
                constrained_tokens.append(token)
                continue
            if seq.group.logits_info is not None and seq.request.sampling.allowed_token_ids:
                problem = self._no_token_was_allowed(seq)
                if problem:
                    results += self._fail(scheduler, seq, problem, ErrorKind.BAD_REQUEST)
                    continue
            if seq.custom_stops or token in eos or len(seq.output_token_ids) >= seq.max_new_tokens:
                reason = self.stop_checker.check(seq)
            else:
                continue
            if reason:
                results += self._stop(scheduler, seq, reason)
        if constrained:
            for seq, token, reason in zip(
                constrained, constrained_tokens, accept_tokens(self._grammars, constrained, constrained_tokens)
            ):
                problem = self._dead_end(seq) if reason == "error" else None
                if problem is not None:
                    results += self._fail(scheduler, seq, problem, ErrorKind.BAD_CONSTRAINT)
                elif reason == "error":  # a bug, not the row's: it ends this row, not the job
                    message = f"the constraint rejected token {token}, drawn under its own mask"
                    results += self._fail(scheduler, seq, message)
                elif reason:
                    results += self._stop(scheduler, seq, reason)
        self.stats.num_spare_tokens += num_spare
        self.stats.num_output_tokens += len(sampling_items) - num_spare
        return results

    def _dead_end(self, seq: Sequence) -> str | None:
        """Why a constrained row's newest token, rejected, was drawn from an empty mask (its grammar cannot go on),
        or None: a token its mask allowed was rejected, a bug."""
        before = seq.output_token_ids[:-1]
        text = self.tokenizer.decode(before, skip_special_tokens=True)
        constraint = seq.request.sampling.structured_outputs
        return dead_end(seq.matcher, self.vocab_size, constraint, text, len(before))

    @staticmethod
    def _no_token_was_allowed(seq: Sequence) -> str | None:
        """Why the newest token of a row with allowed_token_ids came from logits all at -inf, or None. Bad words of
        several tokens ban their last token only after the others, so a row that passed admission.py's check can
        still come to ban every token it allows; the draw then took token 0, which it may not allow."""
        params = seq.request.sampling
        before = seq.output_token_ids[:-1]
        banned = set(banned_token_ids(params, seq.group.logits_info, before, len(before)))
        if not all(token_id in banned for token_id in params.allowed_token_ids):  # stops at the first one left
            return None
        return (
            f"after {len(before)} token{'s' if len(before) != 1 else ''}, bad_words (and min_tokens) ban every token "
            "of allowed_token_ids: no token may be generated"
        )

    def _stop(self, scheduler: Scheduler, seq: Sequence, reason: FinishReason) -> list[GenerationResult]:
        seq.finish_reason = reason
        result = self._retire(scheduler, seq)
        return [result] if result else []

    def _retire(self, scheduler: Scheduler, seq: Sequence) -> GenerationResult | None:
        scheduler.finish(seq)
        state: _RequestState = seq.group
        state.num_unfinished -= 1
        if state.num_unfinished:
            return None
        request = state.request
        if request.continuations is not None:
            result = self._scoring_result(state)
        elif request.rolling_prefix is not None:
            result = self._rolling_result(state)
        else:
            result = self._result(state)
        self._end(state)
        return result

    def _result(self, state: _RequestState) -> GenerationResult:
        request = state.request
        completions = [
            Completion(
                text=self.stop_checker.text(s),
                token_ids=list(s.output_token_ids),
                finish_reason=s.finish_reason or "length",
                logprobs=list(s.output_logprobs) if s.request.sampling.logprobs else None,
                top_logprobs=list(s.output_top_logprobs) if s.request.sampling.top_logprobs else None,
                stop_reason=self.stop_checker.stop_reason(s),
            )
            for s in state.seqs
        ]
        self.stats.num_prompt_tokens += len(request.prompt_token_ids)
        first = state.seqs[0]
        return GenerationResult(
            request.request_id,
            len(request.prompt_token_ids),
            completions,
            num_preemptions=sum(s.num_preemptions for s in state.seqs),
            prompt_logprobs=[None, *first.score_logprobs] if request.sampling.prompt_logprobs else None,
        )

    def _scoring_result(self, state: _RequestState) -> GenerationResult:
        request = state.request
        num_prompt = len(request.prompt_token_ids)
        continuations = request.continuations or []
        first = state.seqs[0]
        # The first sequence's entries: the prompt's own rows (prompt_logprobs), each continuation's first
        # token, then its own later tokens; the others' hold their later tokens (_add_scoring).
        heads = num_prompt - 1 if request.sampling.prompt_logprobs else 0
        tails = {seq.sample_index: (seq.score_logprobs, seq.score_greedy) for seq in state.seqs[1:]}
        tails[0] = (
            first.score_logprobs[heads + len(continuations) :],
            first.score_greedy[heads + len(continuations) :],
        )
        scores = []
        for i in range(len(continuations)):
            tail_logprobs, tail_greedy = tails.get(i, ([], []))
            logprobs = [first.score_logprobs[heads + i], *tail_logprobs]
            greedy = first.score_greedy[heads + i] and all(tail_greedy)
            scores.append(ContinuationScore(sum(logprobs), len(logprobs), greedy, logprobs))
        self.stats.num_prompt_tokens += num_prompt + sum(len(c) for c in continuations)
        return GenerationResult(
            request.request_id,
            num_prompt,
            [],
            num_preemptions=sum(s.num_preemptions for s in state.seqs),
            prompt_logprobs=[None, *first.score_logprobs[: num_prompt - 1]]
            if request.sampling.prompt_logprobs
            else None,
            scores=scores,
        )

    def _rolling_result(self, state: _RequestState) -> GenerationResult:
        """One score for the whole prompt: its windows' tokens in order (each sequence is one window)."""
        request = state.request
        logprobs = [lp for seq in state.seqs for lp in seq.score_logprobs]
        greedy = all(g for seq in state.seqs for g in seq.score_greedy)
        self.stats.num_prompt_tokens += len(request.prompt_token_ids)
        return GenerationResult(
            request.request_id,
            len(request.prompt_token_ids),
            [],
            num_preemptions=sum(s.num_preemptions for s in state.seqs),
            scores=[ContinuationScore(sum(logprobs), len(logprobs), greedy, logprobs)],
        )

    def _fail(
        self, scheduler: Scheduler, seq: Sequence, message: str, kind: ErrorKind = ErrorKind.ENGINE
    ) -> list[GenerationResult]:
        """End `seq`'s request, all its sequences, as an error of `kind` (nothing if it has ended already)."""
        state: _RequestState = seq.group
        if state.num_unfinished == 0:
            return []
        for sibling in state.seqs:
            if sibling.finish_reason is None:
                sibling.finish_reason = "error"
                scheduler.finish(sibling)
        state.num_unfinished = 0
        self._end(state)
        return [self._error_result(state.request, kind, message)]

    def _recover(
        self, scheduler: Scheduler, seqs: list[Sequence], exc: Exception, registered: list[int] | None = None
    ) -> list[GenerationResult]:
        self.stats.num_failed_steps += 1
        if len(seqs) == 1:
            seqs[0].num_failures_alone += 1
        # Only a sequence that fails alone, and did so before, gets an error.
        culprits = [s for s in seqs if s.num_failures_alone >= FAILURES_ALONE_TO_ERROR] if len(seqs) == 1 else []
        logger.warning(
            "a step of %d sequences failed (%s); %s",
            len(seqs),
            f"{type(exc).__name__}: {exc}",  # not the exception: a kept record would keep the step's frames
            "rerunning each sequence alone"
            if len(seqs) > 1
            else "failing the request, which failed alone again"
            if culprits
            else "rerunning it alone once more",
        )
        kind, message = ErrorKind.ENGINE, f"generation failed: {type(exc).__name__}: {exc}"
        if isinstance(exc, AdapterError):  # its weights changed since the engine checked them, read again here
            kind, message = ErrorKind.BAD_ADAPTER, str(exc)
        results = []
        for seq in culprits:
            results += self._fail(scheduler, seq, message, kind)
        scheduler.requeue_isolated([s for s in seqs if s.finish_reason is None], registered or ())
        return results


class StepTimer:
    """Wall-clock time per engine phase, for `kvbatch bench throughput --timing`.

    Off by default and then free; under torch.profiler it marks each phase as a `kvbatch.<phase>` range.
    On, it synchronises the device around every phase, so each phase's time includes the GPU work it launched:
    the breakdown of a step, at the price of any overlap between phases."""

    def __init__(self, device: torch.device, enabled: bool = False) -> None:
        self.device = device
        self.enabled = enabled
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if not self.enabled:
            if torch.autograd.profiler._is_profiler_enabled:  # a range per phase, for `bench throughput --profile`
                with torch.profiler.record_function(f"kvbatch.{name}"):
                    yield
            else:
                yield
            return
        self._sync()
        started = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[name] += time.perf_counter() - started
            self.calls[name] += 1

    def report(self) -> dict[str, dict[str, float]]:
        return {
            name: {
                "seconds": round(s, 3),
                "calls": self.calls[name],
                "ms_per_call": round(1e3 * s / max(self.calls[name], 1), 3),
            }
            for name, s in sorted(self.seconds.items(), key=lambda kv: -kv[1])
        }


_gc_unfreeze_at_exit = False


def freeze_gc() -> None:
    """Put every object alive now (torch, transformers, the model: about 450,000 of them) out of the cyclic
    collector's reach. A full collection walks them all: on an H200 host, 210-260 ms with the GPU idle, in two
    of four runs of workload a (2.73-3.03 s against 2.49-2.54 s without); frozen, the same collections took 5-15 ms.
    Objects made later (requests, sequences) are collected as usual."""
    global _gc_unfreeze_at_exit
    gc.collect()
    gc.freeze()
    if not _gc_unfreeze_at_exit:  # the interpreter's last collection must still free them: native bindings
        atexit.register(gc.unfreeze)  # (triton's nanobind) report frozen objects as leaks at exit
        _gc_unfreeze_at_exit = True
