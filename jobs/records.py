"""One output row, and the Arrow schema of the output table.

Columns, in order: row, the id column, kept input columns, text, finish_reason, [finish_reasons], stop_reason,
error, error_kind, prompt_tokens, output_tokens, [logprobs], [token_bytes], [top_logprobs], [prompt_logprobs],
[scores], [reasoning]. With n > 1 samples (or OpenAI output) `text` is a list of strings, one per sample,
`finish_reasons` lists each sample's reason and `stop_reason` each sample's stop (the stop string, a stop token id
as decimal text, or null). `token_bytes` (OpenAI output
only) holds each generated token's bytes beside its logprob, null for a special token the text leaves out: the
tokenizer is gone by the time the OpenAI lines are assembled from the parts.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from . import json_text
from .nano_time import holds_time_ns, time_ns_array
from .rows import RowError

if TYPE_CHECKING:
    from kvbatch.runner.config import SamplingParams

# One alternative at a generated position: the token's id, its text (U+FFFD for part of a character; a special
# token's own text) and bytes (null for a special token), and its log-probability.
TOP_LOGPROB = pa.struct(
    [
        pa.field("token_id", pa.int64()),
        pa.field("token", pa.string()),
        pa.field("bytes", pa.binary()),
        pa.field("logprob", pa.float32()),
    ]
)
# An interval kept from the input, as its rows read in Python (pa.MonthDayNano): datasets has no interval type.
INTERVAL = pa.struct(
    [pa.field("months", pa.int32()), pa.field("days", pa.int32()), pa.field("nanoseconds", pa.int64())]
)
# One scored continuation (task score): lm-eval's (logprob, is_greedy), with its token count.
SCORE = pa.struct(
    [pa.field("logprob", pa.float64()), pa.field("num_tokens", pa.int64()), pa.field("is_greedy", pa.bool_())]
)


@dataclass(frozen=True)
class RowResult:
    row: int
    id: Any = None
    kept: dict[str, Any] = field(default_factory=dict)
    texts: list[str] = field(default_factory=list)  # one per sample; empty for an error row
    finish_reasons: list[str] = field(default_factory=list)
    stop_reasons: list[str | int | None] = field(default_factory=list)  # per sample, as Completion.stop_reason
    error: RowError | None = None
    prompt_tokens: int | None = None  # None when the row never got as far as tokenizing
    output_tokens: int = 0
    logprobs: list[list[float]] | None = None  # per sample, per token
    token_bytes: list[list[bytes | None]] | None = None  # per sample, per token, beside logprobs; None = special token
    top_logprobs: list[list[list[dict[str, Any]]]] | None = None  # per sample, per token: TOP_LOGPROB structs
    prompt_logprobs: list[float | None] | None = None  # per prompt token; the first is None
    scores: list[dict[str, Any]] | None = None  # task score: a SCORE struct per continuation
    reasonings: list[str | None] | None = None  # per sample: the thinking text split off `texts` (jobs/reasoning.py)
    json_output: bool = False  # generated under a json or json_object constraint: only such a row fills `parsed`

    @property
    def finish_reason(self) -> str:
        if self.error is not None:
            return "error"
        return self.finish_reasons[0] if self.finish_reasons else "error"


@dataclass(frozen=True)
class Layout:
    """Which columns an output has; fixed per job so every part has the same shape."""

    id_column: str | None = None
    keep_columns: tuple[str, ...] = ()
    multi: bool = False  # text is list<string>
    logprobs: bool = False
    token_bytes: bool = False  # OpenAI output: the tokens that go with the logprobs
    top_logprobs: bool = False
    prompt_logprobs: bool = False
    scores: bool = False  # task score
    reasoning: bool = False  # a reasoning model's thinking, apart from `text`
    parsed: Any = None  # output.parsed: the column's ParsedColumn (jobs/parsed.py); None: no such column
    input_types: dict[str, pa.DataType] = field(default_factory=dict)  # known types of id/kept columns
    input_features: dict[str, Any] = field(default_factory=dict)  # their `datasets` features (ClassLabel names)

    def unplaced(self, params: SamplingParams) -> str | None:
        """What a row's own sampling settings ask that this output has no column for (None: nothing). The layout
        is the job's, fixed before any row is read; a row cannot widen it, and must not lose what it asked."""
        wanted = (
            (params.n > 1 and not self.multi, f"n {params.n}", "sampling.n above 1 (a list of texts per row)"),
            (params.logprobs and not self.logprobs, "logprobs", "sampling.logprobs: true"),
            (params.top_logprobs > 0 and not self.top_logprobs, "top_logprobs", "sampling.top_logprobs above 0"),
            (params.prompt_logprobs and not self.prompt_logprobs, "prompt_logprobs", "sampling.prompt_logprobs: true"),
        )
        for missing, what, setting in wanted:
            if missing:
                return f"{what} needs a column this job's output does not have: set the job's {setting}"
        return None

    def fixed_fields(self) -> list[pa.Field]:
        text_type = pa.list_(pa.string()) if self.multi else pa.string()
        fields = [pa.field("text", text_type), pa.field("finish_reason", pa.string())]
        if self.multi:
            fields.append(pa.field("finish_reasons", pa.list_(pa.string())))
        fields.append(pa.field("stop_reason", pa.list_(pa.string()) if self.multi else pa.string()))
        fields += [
            pa.field("error", pa.string()),
            pa.field("error_kind", pa.string()),
            pa.field("prompt_tokens", pa.int64()),
            pa.field("output_tokens", pa.int64()),
        ]
        if self.logprobs:
            lp = pa.list_(pa.list_(pa.float32())) if self.multi else pa.list_(pa.float32())
            fields.append(pa.field("logprobs", lp))
        if self.token_bytes:
            tb = pa.list_(pa.list_(pa.binary())) if self.multi else pa.list_(pa.binary())
            fields.append(pa.field("token_bytes", tb))
        if self.top_logprobs:
            per_token = pa.list_(pa.list_(TOP_LOGPROB))
            fields.append(pa.field("top_logprobs", pa.list_(per_token) if self.multi else per_token))
        if self.prompt_logprobs:
            fields.append(pa.field("prompt_logprobs", pa.list_(pa.float32())))
        if self.scores:
            fields.append(pa.field("scores", pa.list_(SCORE)))
        if self.reasoning:
            fields.append(pa.field("reasoning", pa.list_(pa.string()) if self.multi else pa.string()))
        if self.parsed is not None:
            fields.append(pa.field("parsed", pa.list_(self.parsed.type) if self.multi else self.parsed.type))
        return fields

    def features_metadata(self) -> dict[str, str]:
        """The id and kept columns' `datasets` features as an Arrow or Parquet schema carries them, so `datasets`
        reads a ClassLabel back with its names (its other columns it types from their Arrow types)."""
        if not self.input_features:
            return {}
        return {"huggingface": json.dumps({"info": {"features": self.input_features}}, sort_keys=True)}

    def data_columns(self) -> list[str]:
        return ([self.id_column] if self.id_column else []) + list(self.keep_columns)

    def to_table(self, results: list[RowResult]) -> pa.Table:
        columns: dict[str, pa.Array] = {"row": pa.array([r.row for r in results], pa.int64())}
        for name in self.data_columns():
            values = [r.id if name == self.id_column else r.kept.get(name) for r in results]
            columns[name] = _array(values, self.input_types.get(name))
        text = [r.texts if self.multi else (r.texts[0] if r.texts else None) for r in results]
        if self.multi:
            text = [t if t else None for t in text]
        values: dict[str, list[Any]] = {
            "text": text,
            "finish_reason": [r.finish_reason for r in results],
            "finish_reasons": [r.finish_reasons or None for r in results],
            "stop_reason": [_stop_reasons(r.stop_reasons, self.multi) for r in results],
            "error": [r.error.message if r.error else None for r in results],
            "error_kind": [r.error.kind if r.error else None for r in results],
            "prompt_tokens": [r.prompt_tokens for r in results],
            "output_tokens": [r.output_tokens for r in results],
            "logprobs": [(r.logprobs if self.multi else r.logprobs[0]) if r.logprobs else None for r in results],
            "token_bytes": [
                (r.token_bytes if self.multi else r.token_bytes[0]) if r.token_bytes else None for r in results
            ],
            "top_logprobs": [
                (r.top_logprobs if self.multi else r.top_logprobs[0]) if r.top_logprobs else None for r in results
            ],
            "prompt_logprobs": [r.prompt_logprobs for r in results],
            "scores": [r.scores for r in results],
            "reasoning": [(r.reasonings if self.multi else r.reasonings[0]) if r.reasonings else None for r in results],
            "parsed": [_parsed_values(self, r) for r in results] if self.parsed is not None else [],
        }
        for f in self.fixed_fields():
            columns[f.name] = pa.array(values[f.name], f.type)
        return pa.table(columns)


def _parsed_values(layout: Layout, result: RowResult) -> Any:
    if not result.json_output:  # a regex, choice or grammar row's text may read as JSON by chance
        return None
    values = [layout.parsed.value(t, f) for t, f in zip(result.texts, result.finish_reasons)]
    if layout.multi:
        return values or None
    return values[0] if values else None


def _stop_reasons(reasons: list[str | int | None], multi: bool) -> list[str | None] | str | None:
    """One string column for both kinds of stop: a token id is written as its decimal text."""
    text = [None if r is None else str(r) for r in reasons]
    if multi:
        return text or None
    return text[0] if text else None


# Deeper nesting than this is refused by Arrow IPC (64) or by pyarrow's Parquet reader (about 50), so it is
# kept as JSON text like mixed types. (An empty object, {}, which Parquet alone cannot hold, is turned into text
# only there: assemble._parquet_safe.)
MAX_NESTING = 32


def _array(values: list[Any], known: pa.DataType | None) -> pa.Array:
    """Input values as Arrow: the input's own type when known, else inferred; values the parts cannot hold as they
    are (mixed types, very deep nesting) fall back to JSON text. So do mappings and lists of a schema-less input
    (JSONL): a struct inferred from them holds every key of any row (each row reads back with the others' keys as
    nulls), and parts written apart (a Ray run's blocks) would infer structs that no one schema joins."""
    if known is None and (any(isinstance(v, (dict, list)) for v in values) or _bools_among_others(values)):
        return _as_text(values)
    if known is not None and holds_time_ns(known):
        with contextlib.suppress(TypeError, AttributeError, KeyError, pa.ArrowException):
            return time_ns_array(values, known)  # pa.array would take each time's microseconds alone
    for kind in ([known] if known is not None else []) + [None]:
        try:
            array = pa.array(values, kind)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, TypeError, OverflowError):
            continue
        if array.type != output_type(array.type):  # inferred from Python objects an output cannot hold (a UUID)
            continue
        if max(depth for _, depth in nested_types(array.type)) <= MAX_NESTING:
            return array
    return _as_text(values)


def _bools_among_others(values: list[Any]) -> bool:
    """Booleans mixed with other values: Arrow infers [0.5, True] as doubles (True as 1.0), though parts that hold
    them apart do not join (assemble.unify writes such a column as JSON text)."""
    kinds = {isinstance(v, bool) for v in values if v is not None}
    return len(kinds) > 1


def output_type(kind: pa.DataType) -> pa.DataType:
    """The type an output keeps an input column of `kind` as: the same, except for layouts that output parts cannot
    be reordered in (string and binary views, run-end encoding) or `datasets` cannot read (list views, maps,
    extension types, intervals, which Parquet cannot hold either; decimal32 and decimal64): string_view -> string,
    binary_view -> binary, a list view -> a list, run-end encoded -> its values, a map -> a list of {key, value}
    structs (how its rows read as Python), an extension -> its storage, an interval -> a {months, days, nanoseconds}
    struct (its Python fields), decimal32 and decimal64 -> decimal128 of the same precision and scale."""
    if _is("is_interval", kind):
        return INTERVAL
    if isinstance(kind, pa.BaseExtensionType):
        return output_type(kind.storage_type)
    if _is("is_string_view", kind):
        return pa.string()
    if _is("is_binary_view", kind):
        return pa.binary()
    if pa.types.is_run_end_encoded(kind):
        return output_type(kind.value_type)
    if pa.types.is_map(kind):
        entry = pa.struct([pa.field("key", output_type(kind.key_type)), pa.field("value", output_type(kind.item_type))])
        return pa.list_(entry)
    if _is("is_list_view", kind) or pa.types.is_list(kind) or pa.types.is_fixed_size_list(kind):
        item = kind.value_field.with_type(output_type(kind.value_type))
        return pa.list_(item, kind.list_size) if pa.types.is_fixed_size_list(kind) else pa.list_(item)
    if _is("is_large_list_view", kind) or pa.types.is_large_list(kind):
        return pa.large_list(kind.value_field.with_type(output_type(kind.value_type)))
    if pa.types.is_struct(kind):
        return pa.struct([kind.field(i).with_type(output_type(kind.field(i).type)) for i in range(kind.num_fields)])
    if _is("is_decimal32", kind) or _is("is_decimal64", kind):  # datasets has decimal128 and decimal256 only
        return pa.decimal128(kind.precision, kind.scale)  # type: ignore[attr-defined]
    return kind


def _is(check: str, kind: pa.DataType) -> bool:
    """pa.types' check of that name; False where this pyarrow predates the type (views came in pyarrow 16)."""
    return getattr(pa.types, check, lambda _: False)(kind)


def _as_text(values: list[Any]) -> pa.Array:
    """Strings as they are, other values as JSON text."""
    return pa.array(
        [None if v is None else json_text.value_text(v, default=str) for v in values],
        pa.string(),
    )


def nested_types(kind: pa.DataType, depth: int = 0) -> Iterator[tuple[pa.DataType, int]]:
    """The type and every type nested in it (struct fields, list values, map keys and items), with their depth;
    not below MAX_NESTING + 1, where a value is held as JSON text anyway."""
    yield kind, depth
    if depth > MAX_NESTING:
        return
    if pa.types.is_struct(kind):
        children = [kind.field(i).type for i in range(kind.num_fields)]
    elif pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
        children = [kind.value_type]
    elif pa.types.is_map(kind):
        children = [kind.key_type, kind.item_type]
    else:
        children = []
    for child in children:
        yield from nested_types(child, depth + 1)
