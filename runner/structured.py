"""Structured output with xgrammar: each distinct constraint compiled once, in the background; a matcher per
sequence; a token bitmask per step, applied to the logits before the choice.

    request with a constraint --submit--> compile pool (threads; xgrammar releases the GIL)
        ... the request waits outside the scheduler until its grammar is ready (other rows run meanwhile);
        a constraint that does not compile fails its request with `bad_constraint`
    admitted: each of its n sequences gets a GrammarMatcher
    step:     the host fills the bitmask of the constrained rows after the forward pass is launched (so on a
              GPU while it runs), the mask sets disallowed logits to -inf before the choice
    append:   the matcher accepts the token; once it accepts an end-of-sequence token the row ends with `stop`

The matcher holds the state after exactly `output_token_ids`: it accepts a token when the host appends it, once.
A preempted sequence keeps its output and recomputes only its K/V, so its matcher is neither rolled back nor
fed again; tokens of a failed step never reach the host, so the matcher never saw them. With async scheduling
a step with constrained rows is planned and its forward launched while the step before is in flight, as any
other; only its choice waits: the host takes in the step before (the matchers accept its tokens), fills the
mask while the device runs the forward, then launches the sampling (runner/engine.py `_step`).

Why xgrammar over llguidance: both compute masks in well under a millisecond per row; xgrammar is what vLLM and
SGLang use by default, ships a manylinux wheel whose only missing dependency is apache-tvm-ffi, compiles a
JSON schema for a 49k vocabulary in a few milliseconds, and has a transformers logits processor that serves
as the independent oracle in the tests. llguidance compiles lazily (no compile step at all), which would suit
one-off schemas per row, but brings a Rust toolchain's wheel and no such oracle.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from .grammar_dialect import unsupported_keyword, unsupported_regex
from .request import FinishReason
from .sequence import Sequence
from .structured_outputs import ConstraintError, StructuredOutputs

logger = logging.getLogger(__name__)

# Rows from which a step's accepts are split over threads (the mask filler splits its own rows).
_PARALLEL_ROWS = 64
# Distinct constraints kept compiled at once (a job with a schema per row compiles each, and keeps the newest).
MAX_CACHED_GRAMMARS = 4096
# xgrammar prefixes its messages with a timestamp and a C++ source location.
_CPP_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: (Check failed: \(.*?\) is false: )?")


def _library_message(exc: Exception) -> str:
    text = str(exc).strip()
    if isinstance(exc, UnicodeDecodeError) and isinstance(exc.object, bytes):
        # xgrammar quotes the byte it stopped at, the first of a character of several, so its message is no UTF-8:
        # a grammar in typographic quotes failed as "'utf-8' codec can't decode byte 0xe2", naming nothing of it.
        engine_text = exc.object.decode("utf-8", errors="replace").strip()
        text = engine_text if _CPP_PREFIX.match(engine_text) else text
    first = text.splitlines()[0] if text else type(exc).__name__
    return _CPP_PREFIX.sub("", first)


class GrammarThreads:
    """A step's grammar work on up to 8 threads: accepting the tokens just sampled, and filling the next mask.

    At 512 constrained rows one thread paced a GPU run: 15-30 us an accept, about 12 us a mask row, against a 5 ms
    llama-1b decode step. xgrammar's batch calls release the GIL. The mask is filled while the device runs the
    step's forward (on the CPU, between the forward and the choice, when torch's own threads are idle)."""

    def __init__(self) -> None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        self.num_threads = min(8, cores)
        self._pool: ThreadPoolExecutor | None = None  # the accepts' threads, made when a step first needs them
        self._filler = None  # xgrammar's BatchGrammarMatcher: the mask's threads

    def accept(self, matchers: list, tokens: list[int]) -> list[bool]:
        """matchers[i].accept_token(tokens[i]) for every i, in chunks on the threads from _PARALLEL_ROWS rows."""
        import xgrammar as xgr

        accept = xgr.BatchGrammarMatcher.batch_accept_token
        if len(matchers) < _PARALLEL_ROWS or self.num_threads == 1:
            return accept(matchers, tokens)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.num_threads, thread_name_prefix="kvbatch-accept")
        chunk = -(-len(matchers) // self.num_threads)
        parts = [
            self._pool.submit(accept, matchers[i : i + chunk], tokens[i : i + chunk])
            for i in range(0, len(matchers), chunk)
        ]
        return [ok for part in parts for ok in part.result()]

    def fill(self, matchers: list, bitmask: torch.Tensor, rows: list[int]) -> None:
        """Row rows[i] of bitmask: the tokens matchers[i] allows next."""
        if self._filler is None:
            import xgrammar as xgr

            self._filler = xgr.BatchGrammarMatcher(max_threads=self.num_threads)
        self._filler.batch_fill_next_token_bitmask(matchers, bitmask, rows)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)


class GrammarCache:
    """Compiles constraints for one tokenizer and vocabulary: each distinct one once, on a small thread pool.

    `submit` returns at once with a future of the compiled grammar (or of a ConstraintError). The tokenizer's
    token table is built on the first compile, in the pool too (about 0.1 s for a 49k vocabulary).
    """

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: tuple[int, ...], max_workers: int = 2) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = tuple(eos_token_ids)
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="kvbatch-grammar")
        self._futures: OrderedDict[StructuredOutputs, Future] = OrderedDict()
        self._compiler = None
        self.threads = GrammarThreads()  # the step work of the matchers made from these grammars
        self._lock = threading.Lock()
        self.compile_seconds: dict[StructuredOutputs, float] = {}

    def submit(self, constraint: StructuredOutputs) -> Future:
        with self._lock:
            future = self._futures.get(constraint)
            if future is not None:
                self._futures.move_to_end(constraint)
                return future
            future = self._pool.submit(self._compile, constraint)
            self._futures[constraint] = future
            while len(self._futures) > MAX_CACHED_GRAMMARS:
                evicted, _ = self._futures.popitem(last=False)
                self.compile_seconds.pop(evicted, None)
            return future

    def compile(self, constraint: StructuredOutputs):
        """The compiled grammar, waiting for it; raises ConstraintError."""
        return self.submit(constraint).result()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.threads.close()

    def _compiler_for(self):
        import xgrammar as xgr

        if not self.eos_token_ids:  # xgrammar refuses an empty list, and a grammar ends on one of these tokens
            raise ConstraintError(
                "the model has no end-of-sequence token (its generation config and tokenizer name none), so no "
                "constrained row could end; give generation_config.json an eos_token_id"
            )
        with self._lock:
            if self._compiler is None:
                info = xgr.TokenizerInfo.from_huggingface(
                    self.tokenizer, vocab_size=self.vocab_size, stop_token_ids=list(self.eos_token_ids)
                )
                self._compiler = xgr.GrammarCompiler(info, max_threads=1)
            return self._compiler

    def _compile(self, constraint: StructuredOutputs):
        compiler = self._compiler_for()
        started = time.perf_counter()
        try:
            _refuse_misread(constraint)
            if constraint.json is not None:
                compiled = compiler.compile_json_schema(constraint.json, any_whitespace=False)
            elif constraint.regex is not None:
                compiled = compiler.compile_regex(constraint.regex)
            elif constraint.choice is not None:
                compiled = compiler.compile_grammar(_choice_grammar(constraint.choice))
            elif constraint.grammar is not None:
                compiled = compiler.compile_grammar(constraint.grammar)
            else:
                compiled = compiler.compile_json_schema('{"type": "object"}', any_whitespace=False, strict_mode=False)
        except ConstraintError:
            raise
        except Exception as exc:  # noqa: BLE001 - xgrammar raises RuntimeError (and ValueError) for bad input
            raise _not_compiled(constraint, exc) from None
        self.compile_seconds[constraint] = time.perf_counter() - started
        return compiled


def check_constraint(constraint: StructuredOutputs) -> None:
    """Raise ConstraintError where `constraint` could never compile, for any tokenizer: a keyword or regex the
    grammar engine would misread, or a schema, regex or grammar it cannot parse. A job's own constraint is checked
    so as it is loaded, before any model: else each of its rows would fail alike."""
    _refuse_misread(constraint)
    try:
        import xgrammar as xgr
    except ImportError:  # the engine names the missing package when it compiles
        return
    try:
        if constraint.json is not None:
            xgr.Grammar.from_json_schema(constraint.json, any_whitespace=False)
        elif constraint.regex is not None:
            xgr.Grammar.from_regex(constraint.regex)
        elif constraint.choice is not None:
            xgr.Grammar.from_ebnf(_choice_grammar(constraint.choice))
        elif constraint.grammar is not None:
            xgr.Grammar.from_ebnf(constraint.grammar)
    except Exception as exc:  # noqa: BLE001 - xgrammar raises RuntimeError (and ValueError) for bad input
        raise _not_compiled(constraint, exc) from None


# A Lark rule (`start: "a" | b`), which vLLM's other grammar backends take: no EBNF rule is written so.
_LARK_RULE = re.compile(r"^\s*[?!]?[A-Za-z_]\w*(\.\d+)?\s*:(?!:=)", re.MULTILINE)
# What an EBNF grammar holds as text, not syntax: string literals, character classes, comments.
_EBNF_TEXT = re.compile(r'"(?:\\.|[^"\\])*"|\[(?:\\.|[^\]\\])*\]|#[^\n]*')
# An empty alternative, first, last or between two bars, as llama.cpp's GBNF grammars write one (`ws ::= | " "`).
_EMPTY_ALTERNATIVE = re.compile(r"(::=|\||\()\s*(\||\)|\Z)")


def _not_compiled(constraint: StructuredOutputs, exc: Exception) -> ConstraintError:
    message = f"{constraint.kind} does not compile: {_library_message(exc)}"
    if constraint.grammar is not None and "::=" not in constraint.grammar and _LARK_RULE.search(constraint.grammar):
        message += (
            "; it reads as a Lark grammar (`start: ...`), and the grammar engine takes EBNF, rules written "
            '`root ::= "a" | b` from rule `root`'
        )
    if constraint.grammar is not None and _EMPTY_ALTERNATIVE.search(_EBNF_TEXT.sub('""', constraint.grammar)):
        # xgrammar takes no empty alternative, which llama.cpp's json.gbnf has; its message names only a bar
        message += '; an empty alternative is written `""` for the grammar engine (`ws ::= "" | " "`)'
    return ConstraintError(message)


def _refuse_misread(constraint: StructuredOutputs) -> None:
    """Raise ConstraintError for a JSON Schema keyword or regex the grammar engine would not read as meant."""
    problem = None
    if constraint.json is not None:
        problem = unsupported_keyword(json.loads(constraint.json))
    elif constraint.regex is not None:
        problem = unsupported_regex(constraint.regex, constraint=True)
    if problem:
        raise ConstraintError(problem)


def _choice_grammar(choice: tuple[str, ...]) -> str:
    # JSON string literals are EBNF string literals (same escapes).
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choice)


def new_matcher(compiled) -> Any:
    import xgrammar as xgr

    return xgr.GrammarMatcher(compiled)


def dead_end(matcher, vocab_size: int, constraint: StructuredOutputs, before: str, num_tokens: int) -> str | None:
    """Why a row cannot go on where `matcher` stands after `num_tokens` tokens (text `before`), or None when some
    token may come next: the engine's message for a row drawn under an empty mask, and plan's at the first token."""
    if not allows_no_token(matcher, vocab_size):
        return None
    return (
        f"bad constraint ({constraint.describe()}): after {num_tokens} token{'s' if num_tokens != 1 else ''} "
        f"({before!r}) it allows no token: no text completes it from there"
    )


def first_token_problem(grammars: GrammarCache, constraint: StructuredOutputs) -> str | None:
    """Why a row under `constraint` fails before its first token (it does not compile for this tokenizer, or no
    token may begin it), with the message the row would fail with; None when it may begin."""
    try:
        compiled = grammars.compile(constraint)
    except ConstraintError as exc:
        return f"bad constraint ({constraint.describe()}): {exc}"
    return dead_end(new_matcher(compiled), grammars.vocab_size, constraint, "", 0)


def allows_no_token(matcher, vocab_size: int) -> bool:
    """Whether the matcher's grammar has no token to go on with: it matches no text (`root ::= []`), or none that
    starts with what it accepted so far. Its mask is then empty, and any token drawn under it is rejected."""
    import xgrammar as xgr

    bitmask = xgr.allocate_token_bitmask(1, vocab_size)  # [1, ceil(vocab / 32)] int32
    matcher.fill_next_token_bitmask(bitmask)
    return not bool(bitmask.any())


def _constrained(item) -> bool:
    # A row that stopped on the step before runs a spare decode (planned ahead of its stop), whose token is
    # dropped: its grammar has ended and masks nothing.
    return item.seq.matcher is not None and item.seq.finish_reason is None


class StepMask:
    """The bitmask of one step's sampling rows: filled on the host, applied in place to float32 logits.

    bitmask: [num_rows, ceil(vocab / 32)] int32, bit set = allowed; only the constrained rows are applied."""

    def __init__(self, items: list, vocab_size: int, device: torch.device, threads: GrammarThreads) -> None:
        import xgrammar as xgr

        self.rows = [i for i, item in enumerate(items) if _constrained(item)]
        self.vocab_size = vocab_size
        # Only the constrained rows are filled and applied, so the others need no initialising.
        shape = xgr.get_bitmask_shape(len(items), vocab_size)
        bitmask = torch.empty(shape, dtype=torch.int32, pin_memory=device.type == "cuda")
        threads.fill([items[i].seq.matcher for i in self.rows], bitmask, self.rows)
        # Queued behind the step's kernels from pinned memory: the host does not wait for the device here.
        self.bitmask = bitmask.to(device, non_blocking=True) if device.type == "cuda" else bitmask

    def __call__(self, logits: torch.Tensor) -> None:
        # logits: [num_rows, vocab] float32, written in place
        import xgrammar as xgr

        xgr.apply_token_bitmask_inplace(logits, self.bitmask, vocab_size=self.vocab_size, indices=self.rows)


def step_mask(items: list, vocab_size: int, device: torch.device, grammars: GrammarCache) -> StepMask | None:
    """The mask of a step, or None when none of its sampling rows is constrained (nothing else to do then)."""
    if not any(_constrained(item) for item in items):
        return None
    return StepMask(items, vocab_size, device, grammars.threads)


def accept_tokens(grammars: GrammarCache, seqs: list[Sequence], tokens: list[int]) -> list[FinishReason | None]:
    """Advance each sequence's matcher by its newly appended token. Per sequence: `stop` once the grammar accepted
    an end-of-sequence token; `length` at the token limit; else None; `error` if the grammar rejects the token,
    which the mask should have made impossible. A constrained row ends only there: stop strings, stop token ids and
    ignore_eos would end it, or run it on, mid-structure."""
    accepted = grammars.threads.accept([seq.matcher for seq in seqs], tokens)
    reasons: list[FinishReason | None] = []
    for seq, ok in zip(seqs, accepted):
        if not ok:
            reasons.append("error")
        elif seq.matcher.is_terminated():
            reasons.append("stop")
        elif len(seq.output_token_ids) >= seq.max_new_tokens:
            reasons.append("length")
        else:
            reasons.append(None)
    return reasons
