"""JSONL and OpenAI Batch input, line by line, in bounded memory.

Each line is read with a byte limit: a longer line is skipped to its end and becomes an error row, so one
hostile multi-gigabyte line costs no memory. Blank lines are not rows. Row indexes count rows, messages name
the 1-based line.
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from kvbatch.errors import ErrorKind, InputError, SpecError
from kvbatch.runner.structured_outputs import ConstraintError

from .compressed import open_bytes
from .constraints import response_format_constraint
from .rows import Reader, Row, RowError, line_place

_CHUNK_BYTES = 1 << 20
_BOM = b"\xef\xbb\xbf"  # UTF-8's byte-order mark, which some editors put before the first line
# The byte-order marks of the other Unicode encodings, UTF-32 first (its little-endian mark begins with UTF-16's).
# Windows PowerShell writes text files as UTF-16 with a mark: read as UTF-8, its lines split inside characters and
# each becomes a junk error row, so such a file is refused whole, naming its encoding.
_OTHER_BOMS = (
    (b"\xff\xfe\x00\x00", "UTF-32"),
    (b"\x00\x00\xfe\xff", "UTF-32"),
    (b"\xff\xfe", "UTF-16"),
    (b"\xfe\xff", "UTF-16"),
)
# JSON may escape half of a UTF-16 surrogate pair on its own ("\udc80"): json.loads accepts it, but no output
# format can hold the string it makes, so such a line is an invalid_utf8 row rather than a crash at write time.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


class _RepeatedKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """An object's members as a dict, refusing a key given twice: json.loads keeps the last value without a word
    (`{"prompt": "a", "prompt": "z"}` asked "z"), where pyarrow's and `datasets`' JSON readers refuse the line."""
    value = dict(pairs)
    if len(value) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _RepeatedKey(key)
            seen.add(key)
    return value


# About 2 us a line more than json.loads (312 bytes: 4.9 -> 7.1 us).
_DECODER = json.JSONDecoder(object_pairs_hook=_unique_keys)
OPENAI_ENDPOINT = "/v1/chat/completions"
# body fields of an OpenAI chat completion request that map onto our sampling; others are ignored
OPENAI_SAMPLING = {
    "max_tokens": "max_new_tokens",
    "max_completion_tokens": "max_new_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "seed": "seed",
    "stop": "stop",
    "n": "n",
    "logprobs": "logprobs",
    "top_logprobs": "top_logprobs",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "logit_bias": "logit_bias",  # {"50256": -100}: string keys, as JSON has them
}
# vLLM's OpenAI server takes these sampling fields in the same body (its "extra parameters"), under kvbatch's own
# names: a batch file written for vLLM keeps them (top_k -1, vLLM's off, is 0 as SamplingParams reads it).
VLLM_SAMPLING = (
    "top_k", "min_p", "repetition_penalty", "min_tokens", "ignore_eos", "stop_token_ids", "bad_words",
    "allowed_token_ids", "include_stop_str_in_output", "truncate_prompt_tokens",
)  # fmt: skip
# vLLM's guided_json, guided_regex, guided_choice and guided_grammar: the structured_outputs kinds they became.
VLLM_GUIDED = ("json", "regex", "choice", "grammar")
OPENAI_MAX_TOP_LOGPROBS = 20  # the API's own limit
_PROMPT_CONTROLS = frozenset({"continue_final_message", "add_generation_prompt"})
# The API's temperature range, where kvbatch's setting takes any (temperature 5 is a setting, not a chat request): a
# body outside it is refused there, so it fails its line here. The other numbers' ranges are the settings' own.
OPENAI_MAX_TEMPERATURE = 2


def open_jsonl(path: Path, max_line_bytes: int, openai: bool = False):

    try:
        handle = open_bytes(path)
    except FileNotFoundError:
        raise InputError(f"input not found: {path}") from None
    except OSError as exc:
        raise InputError(f"cannot open {path}: {exc}") from None
    try:
        num_rows = count_rows(path)  # a compressed file is read whole here: a corrupt one stops the job now
    except OSError as exc:
        handle.close()
        raise InputError(f"cannot read {path}: {exc}") from None
    with open_bytes(path) as head:
        problem = not_json_lines(path.name, head, num_rows, max_line_bytes)
    if problem is not None:
        handle.close()
        raise SpecError(problem, field="input.path")
    rows = jsonl_rows(handle, max_line_bytes)
    if openai:
        rows = (openai_row(row) for row in rows)
    return Reader(rows, num_rows, None)


def open_jsonl_files(files: list[Path], root: Path, max_line_bytes: int) -> Reader | None:
    """JSON lines files read as one input, one after the other (the data files of a folder's split): row indexes
    go on from file to file, and messages name a row's file (from `root`) beside its line. None where a file is no
    JSON lines (one JSON array, objects over several lines), which only `datasets` reads, or one that cannot be
    read."""
    try:
        counts = [count_rows(file) for file in files]
        for file, num_rows in zip(files, counts):
            with open_bytes(file) as head:
                if not_json_lines(file.name, head, num_rows, max_line_bytes) is not None:
                    return None
    except OSError:  # a compressed file that does not decompress: what `datasets` said of the split stands
        return None
    return Reader(_rows_of_files(files, counts, root, max_line_bytes), sum(counts), None)


def _rows_of_files(files: list[Path], counts: list[int], root: Path, max_line_bytes: int) -> Iterator[Row]:
    first = 0
    for file, num_rows in zip(files, counts):
        with open_bytes(file) as handle:  # closed as the next file opens, not when the collector comes by
            yield from jsonl_rows(handle, max_line_bytes, first, _shown(file, root))
        first += num_rows


def _shown(file: Path, root: Path) -> str:
    """The file's path from the folder `root` (`data/train-00000-of-00002.jsonl`: two configurations' folders may
    hold files of one name), or the whole path for a file outside it (a README's data_files may name one)."""
    try:
        return file.relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(file)


def not_json_lines(name: str, f: BinaryIO, num_rows: int, max_line_bytes: int) -> str | None:
    """What makes the file `name` (open at its start, `num_rows` non-blank lines) no JSON lines, with the command
    that rewrites it as JSON lines; None for JSON lines. Read as JSON lines, each such file became junk error rows
    after the model loaded: it is refused whole, before, in a local run and a Ray run alike."""
    line = f.readline(_line_limit(max_line_bytes + len(_BOM) + 2))
    encoding = next((encoding for mark, encoding in _OTHER_BOMS if line.startswith(mark)), None)
    if encoding is not None:
        return (
            f"{name} is {encoding} text (its byte-order mark says so); kvbatch reads JSON lines in UTF-8: convert it "
            f"first (iconv -f {encoding} -t UTF-8 {name} > {Path(name).with_suffix('.utf8.jsonl')})"
        )
    first = _first_line(line, f, max_line_bytes)
    if _is_json_array(first, num_rows):
        return (
            f"{name} holds one JSON array, not JSON lines (one object a line), which kvbatch reads: write it as JSON "
            f"lines first (jq -c '.[]' {name} > {lines_name(name)})"
        )
    # What json.dumps(indent=...) and jq without -c write: a first line that is a lone `{`, which no JSON line is
    if first.strip() == b"{":
        return (
            f"{name} holds JSON objects written over several lines, not JSON lines (one object a line), which kvbatch "
            f"reads: write it as JSON lines first (jq -c . {name} > {lines_name(name)})"
        )
    return None


def lines_name(name: str) -> str:
    """A name for the JSON lines a refused file is to be rewritten as, never its own: a shell truncates the target
    of `>` before the command reads its input, so `jq ... rows.jsonl > rows.jsonl` would empty the file."""
    path = Path(name)
    return str(path.with_name(f"{path.stem}.lines.jsonl" if path.suffix == ".jsonl" else f"{path.stem}.jsonl"))


def _first_line(line: bytes, f: BinaryIO, max_line_bytes: int) -> bytes:
    """The file's first non-blank line (without a byte-order mark), or b"" for a file of blank lines; `line` is its
    first line, `f` open after it."""
    first = line.removeprefix(_BOM)
    while first and not first.strip():
        first = f.readline(_line_limit(max_line_bytes + 2))
    return first


def _is_json_array(first: bytes, num_rows: int) -> bool:
    """Whether a file whose first non-blank line is `first` is one JSON array of rows (as a `.json` file often is,
    and `datasets` reads it) rather than JSON lines: its first line opens an array that goes on past it, or its
    only line is an array of objects. A JSON lines file whose lines are arrays stays rows (not_an_object errors)."""
    if not first.lstrip().startswith(b"["):
        return False
    try:
        value = json.loads(first)
    except (ValueError, RecursionError):  # no JSON alone: an array that goes on over lines, or past max_line_bytes
        return num_rows > 1 or not first.endswith(b"\n")
    return num_rows == 1 and isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def count_rows(path: Path) -> int:
    """Non-blank lines, counted in 1 MiB chunks (fast, bounded memory), for the progress bar's total."""
    with open_bytes(path) as f:
        return count_rows_in(f)


def count_rows_in(f: BinaryIO) -> int:
    """count_rows of an open file (a Ray task counts a file in object storage this way). It counts the rows
    jsonl_rows yields: a Ray run numbers each file's rows from the counts of the files before it."""
    count = 0
    pending = False  # the current line has a non-blank byte
    first = True
    while chunk := f.read(_CHUNK_BYTES):
        if first and chunk.startswith(_BOM):
            chunk = chunk[len(_BOM) :]
        first = False
        lines = chunk.split(b"\n")
        for i, piece in enumerate(lines):
            pending = pending or bool(piece.strip())
            if i < len(lines) - 1:  # a newline ends this line
                count += pending
                pending = False
    return count + pending


def jsonl_rows(handle: BinaryIO, max_line_bytes: int, first_index: int = 0, file: str | None = None) -> Iterator[Row]:
    """The file's rows, numbered from `first_index` (a file after others in a Ray run's input starts there), their
    messages naming `file` beside the line where the input is several files.

    max_line_bytes bounds a line's content: its ending (LF or CRLF) and a first line's byte-order mark are not
    counted, so a file reads the same whichever ending it was written with."""
    index = first_index
    line_no = 0
    with handle:
        while True:
            # room for the content, a CRLF, and on the first line a byte-order mark
            raw = handle.readline(_line_limit(max_line_bytes + 2 + (len(_BOM) if line_no == 0 else 0)))
            if not raw:
                return
            line_no += 1
            if line_no == 1 and raw.startswith(_BOM):
                raw = raw[len(_BOM) :]  # a UTF-8 byte-order mark is not part of the first object
            ended = raw.endswith(b"\n")
            if _content_bytes(raw) > max_line_bytes:
                if (ended or _skip_to_newline(handle)) and not raw.strip():
                    continue  # a blank line, however long, is no row
                yield Row(
                    index,
                    None,
                    RowError(
                        ErrorKind.LINE_TOO_LONG,
                        f"{line_place(index, line_no, file)}: line is over max_line_bytes ({max_line_bytes} bytes); "
                        "raise input.max_line_bytes to read it",
                    ),
                    line_no,
                    file=file,
                )
                index += 1
                continue
            if not raw.strip():
                continue
            yield parse_line(raw, index, line_no, file)
            index += 1


def _line_limit(size: int) -> int:
    """`size` as readline takes it: an index size at most (max_line_bytes goes up to 2**63 - 2, and a line's
    ending and byte-order mark come on top)."""
    return min(size, sys.maxsize)


def _content_bytes(raw: bytes) -> int:
    """The bytes of a line read by jsonl_rows, without its ending: CRLF, LF, or the CR of a CRLF cut after it."""
    for ending in (b"\r\n", b"\n", b"\r"):
        if raw.endswith(ending):
            return len(raw) - len(ending)
    return len(raw)


def _skip_to_newline(handle: BinaryIO) -> bool:
    """Skip the rest of the line; return whether it was blank."""
    blank = True
    while chunk := handle.readline(_CHUNK_BYTES):
        blank = blank and not chunk.strip()
        if chunk.endswith(b"\n"):
            break
    return blank


def parse_line(raw: bytes, index: int, line_no: int, file: str | None = None) -> Row:
    def failed(kind: ErrorKind, message: str) -> Row:
        return Row(index, None, RowError(kind, f"{line_place(index, line_no, file)}: {message}"), line_no, file=file)

    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return failed(ErrorKind.INVALID_UTF8, f"invalid UTF-8 at byte {exc.start}: {raw[exc.start : exc.start + 4]!r}")
    try:
        value = _DECODER.decode(text.rstrip("\r\n"))  # without the newline, an unclosed object's column is on this line
    except json.JSONDecodeError as exc:
        return failed(ErrorKind.BAD_JSON, f"invalid JSON at column {exc.colno}: {exc.msg}")
    except RecursionError:
        return failed(ErrorKind.BAD_JSON, "invalid JSON: nested too deeply")
    except _RepeatedKey as exc:
        return failed(ErrorKind.BAD_JSON, f"invalid JSON: key {exc.key!r} appears twice in one object")
    except ValueError:  # the only other ValueError of json.loads: an integer past Python's int-from-text limit
        return failed(ErrorKind.BAD_JSON, f"invalid JSON: an integer of over {sys.get_int_max_str_digits():,} digits")
    if not isinstance(value, dict):
        got = "null" if value is None else type(value).__name__
        return failed(ErrorKind.NOT_AN_OBJECT, f"expected a JSON object, got {got}")
    if _SURROGATE_ESCAPE.search(raw):  # rare, so only such lines pay for the check
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as exc:
            lone = exc.object[exc.start : exc.end].encode("utf-16-be", "surrogatepass").hex()
            return failed(ErrorKind.INVALID_UTF8, f"a string holds a lone surrogate (\\u{lone}), which is not text")
    return Row(index, value, None, line_no, file=file)


def openai_row(row: Row) -> Row:
    """An OpenAI Batch request line -> a row with `custom_id`, `messages` and per-row sampling overrides."""
    if row.error is not None or row.data is None:
        return row
    data = row.data
    custom_id = data.get("custom_id")
    # A number for an id is refused, but written back as text so the error line can be matched to its request.
    shown_id = custom_id if isinstance(custom_id, str) else _id_text(custom_id)
    bad = Row(row.index, {"custom_id": shown_id, "messages": None}, None, row.line)
    if not isinstance(custom_id, str) or not custom_id:
        return bad.failed(ErrorKind.BAD_REQUEST, "an OpenAI Batch request needs a non-empty string `custom_id`")
    url = data.get("url", OPENAI_ENDPOINT)
    if url != OPENAI_ENDPOINT:
        return bad.failed(ErrorKind.BAD_REQUEST, f"url {url!r} is not supported (only {OPENAI_ENDPOINT})")
    method = data.get("method", "POST")
    if method != "POST":
        return bad.failed(ErrorKind.BAD_REQUEST, f"method {method!r} is not supported (a Batch request is a POST)")
    body = data.get("body")
    if not isinstance(body, dict):
        return bad.failed(ErrorKind.BAD_REQUEST, "an OpenAI Batch request needs a `body` object")
    if body.get("messages") is None:
        return bad.failed(ErrorKind.BAD_REQUEST, "an OpenAI Batch request's body needs `messages`")
    problem = (
        _logprobs_problem(body)
        or _temperature_problem(body)
        or _max_tokens_problem(body)
        or _tool_choice_problem(body)
        or _prompt_control_problem(body)
        or _unfollowed_problem(body)
    )
    if problem:
        return bad.failed(ErrorKind.BAD_REQUEST, problem)
    overrides: dict[str, Any] = {}
    for key, ours in OPENAI_SAMPLING.items():
        if body.get(key) is not None:
            overrides[ours] = body[key]
    for key in VLLM_SAMPLING:
        if body.get(key) is not None:
            overrides[key] = body[key]
    if body.get("response_format") is not None:
        try:
            constraint = response_format_constraint(body["response_format"])
        except ConstraintError as exc:
            return bad.failed(ErrorKind.BAD_CONSTRAINT, str(exc))
        if constraint is not None:
            overrides["structured_outputs"] = constraint
    # vLLM's own field in the same body (`{"choice": [...]}`, ...), checked as the row's sampling is built; or its
    # older guided_* fields, which batch files written for it still carry: ignored, the row ran unconstrained.
    guided = {ours: body[f"guided_{ours}"] for ours in VLLM_GUIDED if body.get(f"guided_{ours}") is not None}
    sources = ["response_format"] if "structured_outputs" in overrides else []
    sources += ["structured_outputs"] if body.get("structured_outputs") is not None else []
    sources += ["guided_*"] if guided else []  # several guided_* fields are refused as the constraint is built
    if len(sources) > 1:
        message = f"the body sets a constraint twice, in {' and in '.join(sources)}; give one"
        return bad.failed(ErrorKind.BAD_CONSTRAINT, message)
    if body.get("structured_outputs") is not None:
        overrides["structured_outputs"] = body["structured_outputs"]
    elif guided:
        overrides["structured_outputs"] = guided
    return Row(
        row.index,
        {"custom_id": custom_id, "messages": body.get("messages"), "model": body.get("model")}
        # given to the chat template: tools, and vLLM's chat_template_kwargs ({"enable_thinking": false})
        | {key: body[key] for key in ("tools", "chat_template_kwargs") if body.get(key) is not None}
        | ({"tools": _function_tools(body["functions"])} if body.get("functions") is not None else {})
        # vLLM's prompt controls, where a body sets them: the pipeline holds them against the job's prompt settings
        | ({"continue_final_message": _continues(body)} if _PROMPT_CONTROLS & body.keys() else {}),
        None,
        row.line,
        overrides,
    )


def _continues(body: dict[str, Any]) -> bool:
    return body.get("continue_final_message") is True


def _prompt_control_problem(body: dict[str, Any]) -> str | None:
    """Why a body's vLLM prompt controls ask for a prompt kvbatch would not build, or None. vLLM's server takes
    continue_final_message and add_generation_prompt per request; kvbatch builds the prompt one way per job
    (prompt.continue_final_message), so a body may only restate it (checked against the job by the pipeline)."""
    for key in _PROMPT_CONTROLS:
        if key in body and not isinstance(body[key], bool):
            return f"{key} must be true or false, got {body[key]!r}"
    if body.get("continue_final_message") is True and body.get("add_generation_prompt", True) is not False:
        return "continue_final_message: true needs add_generation_prompt: false (as vLLM has it)"
    if body.get("add_generation_prompt") is False and body.get("continue_final_message") is not True:
        return "add_generation_prompt: false without continue_final_message: true is not supported"
    if body.get("chat_template") is not None:
        return "a body's own chat_template is not supported; set prompt.chat_template_file for the job"
    if body.get("echo") is True:
        return "echo: true is not supported (the output holds the generated text only)"
    if body.get("add_special_tokens") is True:
        return "add_special_tokens: true is not supported (the chat template places the special tokens)"
    return None


def _logprobs_problem(body: dict[str, Any]) -> str | None:
    """Why a body's logprobs settings are not the API's, or None: top_logprobs is 0 to 20, and as the API has it,
    only with logprobs true (the body's, or where it sets none the job's: the pipeline checks that one)."""
    logprobs, top = body.get("logprobs"), body.get("top_logprobs")
    if logprobs is not None and not isinstance(logprobs, bool):
        return f"logprobs must be true or false, got {logprobs!r}"
    if top is not None and (
        isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= OPENAI_MAX_TOP_LOGPROBS
    ):
        return f"top_logprobs must be an integer from 0 to {OPENAI_MAX_TOP_LOGPROBS}, got {top!r}"
    if top and logprobs is False:
        return "top_logprobs needs logprobs: true"
    return None


def _max_tokens_problem(body: dict[str, Any]) -> str | None:
    """Why a body's max_tokens or max_completion_tokens is not a positive integer, or None; named as the body has
    it, not as the setting it becomes (max_new_tokens)."""
    for key in ("max_tokens", "max_completion_tokens"):
        value = body.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            return f"{key} must be an integer of at least 1, got {value!r}"
    return None


def _id_text(value: Any) -> str | None:
    return str(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _unfollowed_problem(body: dict[str, Any]) -> str | None:
    """A field of vLLM's body that would change the answer and that kvbatch does not follow: left to be ignored, the
    line ran as if it had not been asked."""
    if body.get("stream") is True:  # batch gateways refuse it as well: a line's response is one object
        return "stream: true is not supported (a Batch request's response is one object, not events); leave it out"
    if body.get("use_beam_search") is True:
        return "use_beam_search: true is not supported (samples are drawn, not searched); leave it out"
    best_of, n = body.get("best_of"), body.get("n", 1)
    if best_of is not None and best_of != (1 if n is None else n):
        return f"best_of {best_of!r} is not supported (only best_of = n, the samples returned); leave it out"
    if body.get("prompt_logprobs") is not None:
        return "prompt_logprobs is not supported in an OpenAI Batch output, which has no place for them"
    if body.get("skip_special_tokens") is False:
        return "skip_special_tokens: false is not supported (the text leaves special tokens out); leave it out"
    if body.get("guided_whitespace_pattern") is not None:  # vLLM's, beside guided_json: JSON whitespace it allows
        return (
            "guided_whitespace_pattern is not supported (JSON is written compactly: one space after ':' and ','); "
            "leave it out"
        )
    return None


def _tool_choice_problem(body: dict[str, Any]) -> str | None:
    """A tool_choice that asks for a call, which nothing would enforce: the tools go to the chat template, the
    output is not constrained to a call. The same for the API's older `functions` and `function_call`, which are
    tools and tool_choice by another name."""
    functions = body.get("functions")
    if functions is not None:
        if body.get("tools") is not None:
            return "the body gives both tools and functions (their older form); give one"
        if not isinstance(functions, list) or not all(isinstance(f, dict) for f in functions):
            return "functions must be a list of function objects"
    for key in ("tool_choice", "function_call"):
        choice = body.get(key)
        if choice is not None and choice not in ("auto", "none"):
            return (
                f"{key} {choice!r} is not supported: the tools are given to the chat template, and nothing makes "
                "the model call one; use 'auto' or leave it out"
            )
    return None


def _function_tools(functions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The older `functions` as the tools they are: ignored, the row ran as if the model had been told of none."""
    return [{"type": "function", "function": function} for function in functions]


def _temperature_problem(body: dict[str, Any]) -> str | None:
    """Why the body's temperature is over the API's, or None (a wrong type, inf or NaN fails later, by name)."""
    value = body.get("temperature")
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if (isinstance(value, int) or math.isfinite(value)) and value > OPENAI_MAX_TEMPERATURE:
        return f"temperature must be from 0 to {OPENAI_MAX_TEMPERATURE}, got {value!r}"
    return None
