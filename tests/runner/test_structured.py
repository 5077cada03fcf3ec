"""Structured output in the engine: greedy constrained tokens equal transformers' generate() with xgrammar's own
logits processor (the independent oracle), under a batch mixing constrained and free rows, preemption, the prefix
cache and async scheduling; sampled and n > 1 rows stay inside their grammar; constraints that cannot compile fail
their own request only.

The model is a tiny random Llama over SmolLM2's byte-level tokenizer (a real vocabulary, so grammars over text
mean something), fast on the CPU."""

import json
import re

import pytest
import torch
import xgrammar as xgr
from tiny_models import byte_fallback_tokenizer
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
from xgrammar.contrib.hf import LogitsProcessor

from kvbatch.errors import ErrorKind
from kvbatch.runner import attention_hook
from kvbatch.runner.config import SamplingParams
from kvbatch.runner.default_model import default_model_path
from kvbatch.runner.engine import Engine, EngineConfig
from kvbatch.runner.grammar_dialect import unsupported_keyword, unsupported_regex
from kvbatch.runner.model_loader import LoadedModel
from kvbatch.runner.request import GenerationRequest
from kvbatch.runner.structured import GrammarCache, check_constraint, new_matcher
from kvbatch.runner.structured_outputs import ConstraintError, StructuredOutputs

VOCAB = 49152
EOS = 2  # <|im_end|>

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 99},
        "role": {"enum": ["admin", "user"]},
    },
    "required": ["name", "age", "role"],
}
CONSTRAINTS = [
    StructuredOutputs(json=json.dumps(PERSON)),
    StructuredOutputs(regex=r"[a-z]{2,5}-\d{1,3}"),
    StructuredOutputs(choice=("yes", "no", "maybe not")),
    StructuredOutputs(grammar='root ::= "(" [0-9]+ ("," [0-9]+)* ")"'),
]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(default_model_path())


def _model(attn: str) -> LlamaForCausalLM:
    attention_hook.register()
    torch.manual_seed(5)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=EOS,
        pad_token_id=0,
        initializer_range=0.2,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM._from_config(config, attn_implementation=attn, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def loaded(tokenizer) -> LoadedModel:
    model = _model(attention_hook.ATTN_IMPLEMENTATION)
    return LoadedModel(model, tokenizer, "tiny-smollm2-vocab", (EOS,), 512, torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def reference():
    return _model("sdpa")


@pytest.fixture(scope="module")
def compiler(tokenizer):
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=VOCAB, stop_token_ids=[EOS])
    return xgr.GrammarCompiler(info)


def _oracle_grammar(compiler, constraint: StructuredOutputs):
    """The same grammar, compiled here from the constraint's own text (not through kvbatch)."""
    if constraint.json is not None:
        return compiler.compile_json_schema(constraint.json, any_whitespace=False)
    if constraint.regex is not None:
        return compiler.compile_regex(constraint.regex)
    if constraint.choice is not None:
        return compiler.compile_grammar("root ::= " + " | ".join(json.dumps(c) for c in constraint.choice))
    return compiler.compile_grammar(constraint.grammar)


def hf_constrained(reference, compiler, prompt: list[int], constraint, max_new_tokens: int) -> list[int]:
    out = reference.generate(
        torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=EOS,
        pad_token_id=0,
        logits_processor=[LogitsProcessor(_oracle_grammar(compiler, constraint))] if constraint else None,
    )
    return out[0, len(prompt) :].tolist()


def prompts(tokenizer, count: int) -> list[list[int]]:
    shared = "You fill in records. Answer with the record only, nothing else at all. "
    return [tokenizer.encode(f"{shared}Record number {i}: item {i * 7 % 13}.") for i in range(count)]


def requests_for(tokenizer, count: int, max_new_tokens: int = 24) -> list[GenerationRequest]:
    out = []
    for i, prompt in enumerate(prompts(tokenizer, count)):
        constraint = CONSTRAINTS[i % 5] if i % 5 < len(CONSTRAINTS) else None  # every fifth row is free
        out.append(GenerationRequest(i, prompt, SamplingParams(max_new_tokens, structured_outputs=constraint)))
    return out


def make_engine(loaded, **overrides) -> Engine:
    config = dict(block_size=4, num_blocks_override=256, max_num_batched_tokens=64, max_num_seqs=8, seed=1)
    return Engine.from_loaded(loaded, EngineConfig(**{**config, **overrides}))


def outcome(engine: Engine, requests) -> dict:
    return {
        r.request_id: (r.error, [(c.token_ids, c.finish_reason) for c in r.completions])
        for r in engine.generate(requests)
    }


def test_constraint_shape_is_checked() -> None:
    # the key order is kept: properties are generated in the schema's order
    assert StructuredOutputs.from_value({"json": {"b": 1, "a": 2}}) == StructuredOutputs(json='{"b":1,"a":2}')
    assert StructuredOutputs.from_value({"json": '{"b": 1, "a": 2}'}) == StructuredOutputs(json='{"b":1,"a":2}')
    assert StructuredOutputs.from_value({"choice": ["x"]}).choice == ("x",)
    with pytest.raises(ConstraintError, match="exactly one"):
        StructuredOutputs(regex="a", grammar="root ::= 'a'")
    with pytest.raises(ConstraintError, match="unknown constraint field"):
        StructuredOutputs.from_value({"json_schema": {}})
    with pytest.raises(ConstraintError, match="not valid JSON"):
        StructuredOutputs.from_value({"json": "{oops"})
    # a Lark grammar (vLLM's other backends take one) failed as "EBNF lexer error" alone
    with pytest.raises(ConstraintError, match=r"does not compile: .*; it reads as a Lark grammar"):
        check_constraint(StructuredOutputs(grammar='start: "a" | b\nb: "c"'))
    with pytest.raises(ConstraintError, match="does not compile") as info:
        check_constraint(StructuredOutputs(grammar='root ::= "a" | b'))  # EBNF with an undefined rule
    assert "Lark" not in str(info.value)
    # llama.cpp's GBNF writes an empty alternative bare (its json.gbnf: `ws ::= | " " | ...`), which the grammar
    # engine refuses, naming only the bar it stopped at; written `""` it compiles
    gbnf = 'root ::= "[" ws "]"\nws ::= | " " | "\\n" [ \\t]{0,20}'
    with pytest.raises(RuntimeError, match=r"Expect element, but got \|"):
        xgr.Grammar.from_ebnf(gbnf)
    with pytest.raises(ConstraintError, match=r'got \|; an empty alternative is written `""` for the grammar engine'):
        check_constraint(StructuredOutputs(grammar=gbnf))
    check_constraint(StructuredOutputs(grammar=gbnf.replace("::= |", '::= "" |')))
    for grammar in ('root ::= "a" | ', 'root ::= ("a" | )'):
        with pytest.raises(ConstraintError, match="an empty alternative"):
            check_constraint(StructuredOutputs(grammar=grammar))
    with pytest.raises(ConstraintError, match="does not compile") as info:  # bars in a literal, a class, a comment
        check_constraint(StructuredOutputs(grammar='root ::= "|" [|] x  # ( |\nx ::= "a" |\ny ::= "b"'))
    assert "empty alternative" not in str(info.value)
    # OpenAI's response_format.json_schema ({name, schema, strict}) given as the schema: its keys are no JSON Schema
    # keywords, so it allowed any JSON and the row's constraint was dropped
    wrapper = {"name": "person", "schema": {"type": "object"}, "strict": True}
    for value in (wrapper, json.dumps(wrapper), {"schema": {"type": "object"}}):
        with pytest.raises(
            ConstraintError, match="OpenAI's json_schema wrapper .* give its 'schema' as the JSON Schema"
        ):
            StructuredOutputs.from_value({"json": value})
    assert StructuredOutputs.from_value({"json": {"type": "object", "properties": {"schema": {}}}}).json
    with pytest.raises(ConstraintError, match="choice must hold strings"):
        SamplingParams(structured_outputs={"choice": ["a", 3]})
    with pytest.raises(ConstraintError, match=r"^choice must be a non-empty list of strings, got \[\]$"):
        StructuredOutputs.from_value({"choice": []})  # named as given, not as the tuple it is held in
    for name in ("json", "grammar"):
        with pytest.raises(ConstraintError, match=f"{name} must be a non-empty string"):
            StructuredOutputs(**{name: ""})
    assert unsupported_keyword({"properties": {"not": {"type": "string"}}}) is None  # a property named "not"
    assert "'not' at #/properties/x" in unsupported_keyword({"properties": {"x": {"not": {"type": "string"}}}})
    assert "uniqueItems" in unsupported_keyword({"items": {"type": "array", "uniqueItems": True}})
    # xgrammar lets anything through for these, so they are refused rather than left unenforced
    assert "'pattern' at #/properties/zip needs a \"type\"" in unsupported_keyword(
        {"type": "object", "properties": {"zip": {"pattern": "^[0-9]{5}$"}}}
    )
    assert "required field 'b'" in unsupported_keyword({"type": "object", "properties": {"a": {}}, "required": ["b"]})
    assert unsupported_keyword({"type": "string", "pattern": "^[0-9]{5}$"}) is None
    named = {
        "type": "object",
        "properties": {"ab": {"type": "integer"}},
        "propertyNames": {"type": "string", "pattern": "^[a-z]+$"},
    }
    assert unsupported_keyword(named) is None  # its declared names keep to propertyNames
    # classes, `.` and other escapes are kept inside the JSON string: only a character named alone is refused
    assert unsupported_keyword({"type": "string", "pattern": '^[^"\\\\][\\n"]\\.\\d.\\W\\x41$'}) is None


def _beside(names: str, path: str, alone: str, instead: str) -> str:
    return (
        f"{names} at {path} beside {alone!r} would not be enforced (the grammar engine generates from {alone!r} "
        f"alone); {instead}"
    )


_ANCHOR_HINT = "; the whole output matches the regex already, no anchor needed"


def _unsupported(keyword: str, path: str) -> str:
    return f"unsupported JSON Schema keyword {keyword!r} at {path}"


@pytest.mark.parametrize(
    ("schema", "message"),
    [
        # oneOf is generated as anyOf: where a value may match two schemas, one that oneOf refuses passed
        (
            {"oneOf": [{"type": "integer"}, {"type": "number"}]},
            "'oneOf' at # is generated as 'anyOf', and a value may match more than one of its schemas; use 'anyOf', "
            "or give each schema a required property of its own const value (a discriminator)",
        ),
        (
            {
                "type": "object",
                "properties": {
                    "pet": {
                        "oneOf": [
                            {"type": "object", "properties": {"k": {"const": "a"}}, "required": ["k"]},
                            {"type": "object", "properties": {"k": {"enum": ["a", "b"]}}, "required": ["k"]},
                        ]
                    }
                },
            },
            "'oneOf' at #/properties/pet is generated as 'anyOf', and a value may match more than one of its schemas; "
            "use 'anyOf', or give each schema a required property of its own const value (a discriminator)",
        ),
        # xgrammar let {"a": 1} through the first, and a declared name that breaks propertyNames through the second
        (
            {"type": "object", "propertyNames": {"pattern": "^[a-z]$"}, "additionalProperties": False},
            "'propertyNames' at # beside 'additionalProperties': false would let any key through (the grammar engine "
            "drops the false); leave one of them out",
        ),
        (
            {"type": "object", "properties": {"xy": {"type": "integer"}}, "propertyNames": {"maxLength": 1}},
            "property 'xy' at # breaks its 'propertyNames', which the grammar engine does not apply to the "
            "properties it names; rename it or widen 'propertyNames'",
        ),
        # xgrammar writes an integer past 64 bits in a const or enum as a float (1.2345678901234567e+19)
        (
            {"type": "object", "properties": {"id": {"const": 12345678901234567890}}},
            "integer 12345678901234567890 in 'const' at #/properties/id is past 64 bits, which the grammar engine "
            "writes as a float; give it as a string",
        ),
        (
            {"enum": ["x", {"n": [-(2**63) - 1]}]},
            "integer -9223372036854775809 in 'enum' at # is past 64 bits, which the grammar engine writes as a "
            "float; give it as a string",
        ),
        # xgrammar let `[]` through for `contains`, and any number for a fractional or `number` multipleOf
        ({"type": "array", "contains": {"type": "integer"}}, "unsupported JSON Schema keyword 'contains' at #"),
        ({"type": "array", "minContains": 1}, "unsupported JSON Schema keyword 'minContains' at #"),
        (
            {"type": "number", "multipleOf": 0.5},
            "'multipleOf' at # is not enforced on type 'number' (only on 'integer')",
        ),
        ({"type": "number", "multipleOf": 3}, "'multipleOf' at # is not enforced on type 'number' (only on 'integer')"),
        (
            {"type": "integer", "multipleOf": 1.5},
            "'multipleOf' 1.5 at # is not enforced: only a whole number up to 1024 is",
        ),
        (
            {"type": "integer", "multipleOf": 1025},
            "'multipleOf' 1025 at # is not enforced: only a whole number up to 1024 is",
        ),
        ({"type": "integer", "multipleOf": 2, "minimum": 0}, "'multipleOf' at # is not enforced beside 'minimum'"),
        # beside anyOf, allOf, $ref, enum and const xgrammar dropped these: each let a value through that breaks them
        (
            {"anyOf": [{"type": "integer"}], "minimum": 5},
            _beside("'minimum'", "#", "anyOf", "move it into each of its schemas"),
        ),
        ({"allOf": [{"type": "integer"}], "minimum": 5}, _beside("'minimum'", "#", "allOf", "move it into its schema")),
        (
            {"$defs": {"i": {"type": "integer"}}, "$ref": "#/$defs/i", "minimum": 5},
            _beside("'minimum'", "#", "$ref", "move it into the schema it references"),
        ),
        (
            {"$defs": {"s": {"type": "string"}}, "$ref": "#/$defs/s", "maxLength": 2},
            _beside("'maxLength'", "#", "$ref", "move it into the schema it references"),
        ),
        ({"enum": [1, 2, 30], "maximum": 10}, _beside("'maximum'", "#", "enum", "list only values that satisfy it")),
        (
            {"type": "string", "enum": ["a", "b"], "maxLength": 0},
            _beside("'maxLength'", "#", "enum", "list only values that satisfy it"),
        ),
        (
            {"type": "string", "enum": ["a", 1]},
            _beside("'type'", "#", "enum", "list only values that satisfy it"),
        ),
        (
            {"type": "string", "const": "abcdef", "maxLength": 2},
            _beside("'maxLength'", "#", "const", "give a value that satisfies it"),
        ),
        (
            {"const": "c", "enum": ["a", "b"]},
            _beside("'enum'", "#", "const", "give a value that satisfies it"),
        ),
        (
            {"type": "string", "maxLength": 2, "anyOf": [{"type": "string"}]},
            _beside("'maxLength'", "#", "anyOf", "move it into each of its schemas"),
        ),
        (
            {"type": "integer", "anyOf": [{"type": "string"}, {"type": "integer"}]},
            _beside("'type'", "#", "anyOf", "move it into each of its schemas"),
        ),
        (
            {"anyOf": [{"type": "integer"}], "allOf": [{"type": "integer"}]},
            _beside("'allOf'", "#", "anyOf", "move it into each of its schemas"),
        ),
        # a branch's `required` is not enforced either (`{}` got through): the parent's keywords are what is refused
        (
            {"type": "object", "properties": {"a": {"type": "string"}}, "anyOf": [{"required": ["a"]}]},
            _beside("'type', 'properties'", "#", "anyOf", "move them into each of its schemas"),
        ),
        # of format, pattern and the lengths xgrammar kept the first and let a value through that breaks the others
        (
            {"type": "string", "pattern": "[a-z]+", "maxLength": 3},
            _beside("'maxLength'", "#", "pattern", "write the lengths into the pattern"),
        ),
        (
            {"type": "string", "format": "date", "pattern": "2.*", "minLength": 1},
            _beside("'pattern', 'minLength'", "#", "format", "give a 'pattern' alone instead"),
        ),
        (
            {"type": "string", "format": "idn-email"},
            "format 'idn-email' at # is not enforced by the grammar engine; give a 'pattern' instead",
        ),
        # references it does not resolve, and a regex key it misreads, left any value through
        (
            {
                "$defs": {"i": {"$anchor": "i", "type": "integer"}},
                "type": "object",
                "properties": {"a": {"$ref": "#i"}},
            },
            "'$ref' '#i' at #/properties/a is not supported: only references into the schema itself ('#/...') are "
            "resolved; inline the schema or put it under '$defs'",
        ),
        ({"type": "object", "properties": {"a": {"$dynamicRef": "#x"}}}, _unsupported("$dynamicRef", "#/properties/a")),
        (
            {"type": "object", "patternProperties": {"^k\\Z": {"type": "integer"}}, "additionalProperties": False},
            "unsupported 'patternProperties' regex '^k\\\\Z' at #: escape \\Z at position 2 of the regex is not "
            "supported (the grammar engine would read it as the letter 'Z')" + _ANCHOR_HINT,
        ),
        (
            {"type": "object", "properties": {"v": {"type": "string", "pattern": "\\Aabc\\Z"}}},
            "unsupported 'pattern' at #/properties/v: escape \\A at position 0 of the regex is not supported (the "
            "grammar engine would read it as the letter 'A')" + _ANCHOR_HINT,
        ),
    ],
)
def test_keywords_the_engine_would_not_enforce_are_refused(schema, message) -> None:
    assert unsupported_keyword(schema) == message


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "integer", "multipleOf": 3},
        {"type": "string", "minLength": 1, "maxLength": 3},
        {"type": "string", "format": "password"},  # not a format JSON Schema defines: an annotation
        {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"$ref": "#/properties/a"}}},
        {"type": ["integer", "null"], "multipleOf": 1024},
        {"type": "integer", "multipleOf": 1, "minimum": 0},
        {"type": "string", "enum": ["a", "b"]},
        {"type": "number", "enum": [1, 2.5]},
        {"type": "string", "const": "a", "enum": ["a", "b"]},
        {"type": "integer", "anyOf": [{"type": "integer", "minimum": 5}, {"enum": [0]}]},
        {"anyOf": [{"type": "integer"}, {"type": "null"}], "default": None, "title": "X", "description": "d"},
        {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "$id": "x",
            "$comment": "c",
            "examples": [1],
            "$defs": {"i": {"type": "integer"}},
            "$ref": "#/$defs/i",
        },
    ],
)
def test_annotations_and_a_type_the_values_have_are_accepted_beside_a_combinator(schema) -> None:
    assert unsupported_keyword(schema) is None


@pytest.mark.parametrize(
    ("regex", "message"),
    [
        (
            r"\Aabc\Z",
            "escape \\A at position 0 of the regex is not supported (the grammar engine would read it as the letter "
            "'A')" + _ANCHOR_HINT,
        ),
        (
            r"abc\z",
            "escape \\z at position 3 of the regex is not supported (the grammar engine would read it as the letter "
            "'z')" + _ANCHOR_HINT,
        ),
        (
            r"[\h]",
            "escape \\h at position 1 of the regex is not supported (the grammar engine would read it as the letter "
            "'h')",
        ),
        (r"x(^a)", "'^' at position 2 of the regex is not at its start (the grammar engine would drop it)"),
        (
            r"(a$|b)c",
            "'$' in the regex is followed by more of it, at position 6 (the grammar engine would drop the '$')",
        ),
        (r"[^]a]", "']' first in the character class at position 0 of the regex is not supported; write \\]"),
        # Python's possessive quantifiers: xgrammar read `a?+b` in a schema's pattern as `(a?)+b`, letting "aab" through
        *[
            (
                regex,
                f"'+' after a repetition at position {position} of the regex is not supported (a possessive "
                "quantifier in Python's re; the grammar engine would repeat the repetition)",
            )
            for regex, position in ((r"a?+b", 2), (r"a*+", 2), (r"(ab)++", 5), (r"a{1,2}+", 6), (r"\d+?x++", 6))
        ],
        # Python's octal escapes: xgrammar matched "\x0012" for \012 and "1" for [\1]
        *[
            (
                regex,
                f"escape \\{digits} at position {position} of the regex is not supported (the grammar engine would "
                "not read it as an octal escape); write \\x and two hex digits",
            )
            for regex, digits, position in (
                (r"a\012", "012", 1),
                (r"\00", "00", 0),
                (r"[\1]", "1", 1),
                (r"[a\12]", "12", 2),
            )
        ],
        # xgrammar read \x{41} as 41 x's, \u004 as "u004"
        *[
            (
                regex,
                f"escape \\{letter} at position 0 of the regex is not followed by {size} hex digits (the grammar "
                f"engine would read it as the letter '{letter}')",
            )
            for regex, letter, size in ((r"\x{41}", "x", 2), (r"\xZZ", "x", 2), (r"\u004", "u", 4))
        ],
    ],
)
def test_regex_constructs_the_engine_misreads_are_refused(regex, message) -> None:
    assert unsupported_regex(regex) == message


@pytest.mark.parametrize(
    "regex",
    [
        r"^[a-z]{2,5}-\d{1,3}$",
        r"(^a|b)c",
        r"(?:^a|^b)c$",
        r"a|^b",
        r"[\b\d\w\s\]-]+",
        r"\u00e9\x41\.",
        r"(?<n>a)",
        r"[\0]\08",
        r"\u{e9}",
        r"a*?b+?c??d{1,2}?\++[+]",  # lazy repetitions, and a `+` that repeats an escaped or classed plus
    ],
)
def test_regex_constructs_the_engine_reads_alike_pass(regex) -> None:
    assert unsupported_regex(regex) is None


def _accepts(compiled, text: str) -> bool:
    matcher = new_matcher(compiled)
    return matcher.accept_string(text) and matcher.accept_token(EOS) and matcher.is_terminated()


@pytest.mark.parametrize(
    ("regex", "escape", "position"),
    [(r"\ud83d\ude00", "ud83d", 0), (r"[\ud800-\udbff][\udc00-\udfff]", "ud800", 1), (r"a\u{dfff}", "u{dfff}", 1)],
)
def test_a_regex_naming_a_surrogate_is_refused(tokenizer, regex, escape, position) -> None:
    """JavaScript spells an emoji as a pair of surrogate escapes (`\\ud83d\\ude00`), and a schema written for it
    may too. xgrammar wrote each surrogate as three bytes that are no UTF-8 (0xED first), in a `regex` constraint
    and a `pattern` alike, and a row ended `stop` on text of U+FFFD. Such an escape is refused; the character
    itself, or `\\u{...}` with its code point, works."""
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=VOCAB, stop_token_ids=[EOS])
    oracle = xgr.GrammarCompiler(info)
    pattern = json.dumps({"type": "string", "pattern": regex})
    before = regex[: regex.index("\\")] if regex.startswith("a") else ""  # the text before the surrogate
    for compiled, opening in (
        (oracle.compile_regex(regex), before),
        (oracle.compile_json_schema(pattern), '"' + before),
    ):
        matcher = new_matcher(compiled)
        assert not opening or matcher.accept_string(opening)
        bitmask = xgr.allocate_token_bitmask(1, VOCAB)
        matcher.fill_next_token_bitmask(bitmask)
        allowed = [t for t in range(VOCAB) if (int(bitmask[0, t // 32]) >> (t % 32)) & 1]
        assert {info.decoded_vocab[t] for t in allowed} == {b"\xed"}  # never the first byte of UTF-8 text
    message = (
        f"escape \\{escape} at position {position} of the regex names a surrogate code point, which no UTF-8 text "
        "holds (the grammar engine would write bytes that are not UTF-8); write the character itself, or \\u{...} "
        "with its code point"
    )
    for constraint in (StructuredOutputs(regex=regex), StructuredOutputs(json=pattern)):
        with pytest.raises(ConstraintError) as refused:
            check_constraint(constraint)
        assert str(refused.value).endswith(message)
    for alike in ("\U0001f600", "\\u{1f600}"):
        check_constraint(StructuredOutputs(regex=alike))
        assert _accepts(oracle.compile_regex(alike), "\U0001f600")


_CARET_FIRST = (
    "an escaped '^' first in the character class at position 0 of the regex is not supported (the grammar engine "
    "would read it as negating the class); put it after another character, or outside a class"
)


@pytest.mark.parametrize(
    ("regex", "misread", "meant", "message"),
    [
        (
            r"\x28a\x29",
            "\u028a)",
            "(a)",
            "escape \\x28 at position 0 of the regex is followed by the hex digit 'a', which the grammar engine would "
            "read as part of it; write \\u0028",
        ),
        (
            r"[\x41B]",
            "\u041b",
            "B",
            "escape \\x41 at position 1 of the regex is followed by the hex digit 'B', which the grammar engine would "
            "read as part of it; write \\u0041",
        ),
        (r"[\^a]", "b", "a", _CARET_FIRST),
        (r"[\u005ea]", "b", "a", _CARET_FIRST),
    ],
)
def test_a_regex_constraints_hex_and_caret_misreads_are_refused(compiler, regex, misread, meant, message) -> None:
    """xgrammar parses a `regex` constraint apart from a schema's `pattern`, and there read `\\x` with every hex
    digit after it (`\\x28a` as U+028A) and an escaped `^` first in a class as negating it (`[\\^a]` as `[^a]`):
    the row ended `stop` on text the regex does not match. A schema's `pattern` reads both as Python does."""
    compiled = compiler.compile_regex(regex)  # xgrammar's own processor lets the misread text through
    assert _accepts(compiled, misread) and not re.fullmatch(regex, misread)
    assert not _accepts(compiled, meant) and re.fullmatch(regex, meant)
    with pytest.raises(ConstraintError) as refused:
        check_constraint(StructuredOutputs(regex=regex))
    assert str(refused.value) == message
    pattern = {"type": "string", "pattern": f"^{regex}$"}
    assert unsupported_keyword(pattern) is None
    in_schema = compiler.compile_json_schema(json.dumps(pattern), any_whitespace=False)
    assert _accepts(in_schema, json.dumps(meant)) and not _accepts(in_schema, json.dumps(misread, ensure_ascii=False))
    for alike, text in ((r"[a\^]", "^"), (r"[^\^a]", "b"), (r"\x41\x42", "AB"), (r"\x41g", "Ag"), (r"\u00e9a", "éa")):
        check_constraint(StructuredOutputs(regex=alike))  # read alike: they run
        assert _accepts(compiler.compile_regex(alike), text), alike


def test_compile_refuses_what_the_engine_misreads_and_enforces_what_it_accepts(tokenizer) -> None:
    cache = GrammarCache(tokenizer, VOCAB, (EOS,))
    for regex in (r"\Aabc\Z", r"(?=a)a", r"(a)\1", r"(?P<n>a)", r"x\b"):
        with pytest.raises(ConstraintError) as refused:
            cache.compile(StructuredOutputs(regex=regex))
        assert "not supported" in str(refused.value), regex
    with pytest.raises(ConstraintError, match="^'minimum' at # beside 'anyOf' would not be enforced"):
        cache.compile(StructuredOutputs.from_schema({"anyOf": [{"type": "integer"}], "minimum": 5}))
    # what stays accepted is enforced: the value that breaks the schema is refused by the grammar
    cases = [
        ({"type": "integer", "multipleOf": 3}, "6", "4"),
        ({"type": "integer", "multipleOf": 1, "minimum": 0}, "2", "-1"),
        ({"type": "string", "enum": ["a", "b"]}, '"a"', '"c"'),
        ({"type": "string", "minLength": 2, "maxLength": 3}, '"abc"', '"abcd"'),
        ({"type": "string", "pattern": "[a-z]{1,3}"}, '"ab"', '"abcd"'),
        (
            {"type": "object", "properties": {"a": {"type": "integer", "maximum": 3}, "b": {"$ref": "#/properties/a"}}},
            '{"a": 1, "b": 2}',
            '{"a": 1, "b": 9}',
        ),
        ({"type": "integer", "anyOf": [{"type": "integer", "minimum": 5}, {"enum": [0]}]}, "0", "3"),
        (
            {
                "type": "object",
                "anyOf": [{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}],
            },
            '{"a": 1}',
            "{}",
        ),
        # const and enum values are written compactly, unlike the rest of the output
        (
            {"type": "object", "properties": {"c": {"const": {"x": [1, 2]}}}, "required": ["c"]},
            '{"c": {"x":[1,2]}}',
            '{"c": {"x": [1, 2]}}',
        ),
    ]
    for schema, valid, invalid in cases:
        compiled = cache.compile(StructuredOutputs.from_schema(schema))
        assert _accepts(compiled, valid) and not _accepts(compiled, invalid), schema
    cache.close()


@pytest.mark.parametrize(
    ("schema", "unescaped", "position"),
    [
        ({"type": "string", "pattern": '^say "[a-z]+"$'}, '"say "hi""', 5),
        ({"type": "string", "pattern": "^a\\\\$"}, '"a\\"', 2),
        ({"type": "string", "pattern": "^a\\nb$"}, '"a\nb"', 2),
        ({"type": "string", "pattern": "^a\\u0022$"}, '"a""', 2),
        ({"type": "string", "pattern": "^a\\0$"}, '"a\x00"', 2),
        ({"type": "object", "patternProperties": {'^k"$': {"type": "integer"}}}, '{"k"": 1}', 2),
        (
            {
                "type": "object",
                "propertyNames": {"type": "string", "pattern": "^k\\x5c$"},
                "additionalProperties": {"type": "integer"},
            },
            '{"k\\": 1}',
            2,
        ),
    ],
)
def test_patterns_the_engine_would_write_unescaped_are_refused(tokenizer, compiler, schema, unescaped, position):
    """xgrammar matches a `pattern` against a string's raw JSON text: it keeps `"`, `\\` and control characters out
    of `.` and character classes, but writes one the pattern names as it is, so its own matcher ends on text that
    is not JSON (or decodes to another string)."""
    oracle = xgr.GrammarMatcher(compiler.compile_json_schema(json.dumps(schema), any_whitespace=False))
    assert oracle.accept_string(unescaped) and oracle.accept_token(EOS) and oracle.is_terminated()
    with pytest.raises(json.JSONDecodeError):
        json.loads(unescaped, strict=True)
    written = f"at position {position} of the regex would be written unescaped in the JSON string"
    with pytest.raises(ConstraintError, match=written):
        GrammarCache(tokenizer, VOCAB, (EOS,)).compile(StructuredOutputs.from_schema(schema))


@pytest.mark.parametrize(
    ("schema", "oracle_text", "name", "key"),
    [
        # patternProperties keys are searched, not anchored: "a" matches "name"
        (
            {
                "type": "object",
                "properties": {"name": {"type": "string"}},
                "patternProperties": {"a": {"type": "integer"}},
                "required": ["name"],
            },
            '{"name": "a"}',
            "name",
            "a",
        ),
        (
            {
                "type": "object",
                "properties": {"id": {"type": "integer"}, "x1": {"type": "string"}},
                "patternProperties": {"^x[0-9]$": {"type": "integer"}},
                "additionalProperties": False,
            },
            '{"id": 1, "x1": "b"}',
            "x1",
            "^x[0-9]$",
        ),
    ],
)
def test_a_property_a_pattern_property_also_matches_is_refused(tokenizer, compiler, schema, oracle_text, name, key):
    """JSON Schema holds a property that a patternProperties regex matches to both schemas; xgrammar's own matcher
    holds it to its `properties` schema alone, and ends on a value the pattern's schema refuses."""
    jsonschema = pytest.importorskip("jsonschema")
    oracle = xgr.GrammarMatcher(compiler.compile_json_schema(json.dumps(schema), any_whitespace=False))
    assert oracle.accept_string(oracle_text) and oracle.accept_token(EOS) and oracle.is_terminated()
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(json.loads(oracle_text), schema)
    message = (
        f"property {name!r} at # also matches 'patternProperties' regex {key!r}, whose schema the grammar engine "
        "would not apply to it; give the property one schema"
    )
    with pytest.raises(ConstraintError, match=f"^{re.escape(message)}$"):
        GrammarCache(tokenizer, VOCAB, (EOS,)).compile(StructuredOutputs.from_schema(schema))
    disjoint = {**schema, "patternProperties": {"^z$": {"type": "integer"}}}
    assert unsupported_keyword(disjoint) is None


@pytest.mark.parametrize(
    ("schema", "oracle_text", "opener"),
    [
        (
            {"type": "object", "additionalProperties": {"type": "integer"}, "minProperties": 2},
            '{"a": 1, "a": 2}',
            "additionalProperties",
        ),
        (
            {
                "type": "object",
                "properties": {"x": {"type": "integer"}},
                "additionalProperties": True,
                "minProperties": 3,
            },
            '{"x": 1, "a": 1, "a": 2}',
            "additionalProperties",
        ),
        (
            {"type": "object", "patternProperties": {"^[a-z]$": {"type": "integer"}}, "minProperties": 2},
            '{"a": 1, "a": 2}',
            "patternProperties",
        ),
        (
            {"type": "object", "propertyNames": {"type": "string", "maxLength": 1}, "minProperties": 2},
            '{"a": 1, "a": 2}',
            "propertyNames",
        ),
    ],
)
def test_min_properties_that_extra_keys_must_reach_is_refused(tokenizer, compiler, schema, oracle_text, opener):
    """xgrammar counts the keys it writes toward minProperties, a repeated key too, where JSON keeps one of each:
    its own matcher ended a value with too few properties with `stop` (a model that repeats a key of a
    `dict[str, int]` with min_length 2 writes one). Up to the number of required properties, or 1, stays enforced."""
    jsonschema = pytest.importorskip("jsonschema")
    oracle = xgr.GrammarMatcher(compiler.compile_json_schema(json.dumps(schema), any_whitespace=False))
    assert oracle.accept_string(oracle_text) and oracle.accept_token(EOS) and oracle.is_terminated()
    with pytest.raises(jsonschema.ValidationError, match="does not have enough properties"):
        jsonschema.validate(json.loads(oracle_text), schema)
    message = (
        f"'minProperties' {schema['minProperties']} at # is not enforced beside {opener!r} "
        "(the grammar engine counts a repeated key, which JSON keeps once); list that many under 'properties' and "
        "'required' instead"
    )
    with pytest.raises(ConstraintError, match=f"^{re.escape(message)}$"):
        GrammarCache(tokenizer, VOCAB, (EOS,)).compile(StructuredOutputs.from_schema(schema))
    assert unsupported_keyword({**schema, "minProperties": 1}) is None
    required = {
        "type": "object",
        "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}},
        "required": ["x", "y"],
        "additionalProperties": {"type": "integer"},
        "minProperties": 2,
    }
    assert unsupported_keyword(required) is None


@pytest.mark.parametrize(
    ("schema", "oracle_text", "message"),
    [
        ({"anyOf": []}, "", "'anyOf' at # is an empty list; JSON Schema needs at least one schema there"),
        (
            {"type": "object", "properties": {"a": {"anyOf": []}}, "required": ["a"]},
            '{"a": }',
            "'anyOf' at #/properties/a is an empty list; JSON Schema needs at least one schema there",
        ),
        ({"allOf": []}, '"x"', "'allOf' at # is an empty list; JSON Schema needs at least one schema there"),
        ({"type": []}, "1", "'type' at # is an empty list; JSON Schema needs at least one type there"),
    ],
)
def test_empty_lists_json_schema_forbids_are_refused(tokenizer, compiler, schema, oracle_text, message) -> None:
    """JSON Schema's metaschema refuses these; xgrammar compiles them, and its own matcher ends an empty `anyOf` on
    no value at all (text that is not JSON), the others on any value."""
    oracle = xgr.GrammarMatcher(compiler.compile_json_schema(json.dumps(schema), any_whitespace=False))
    assert oracle.accept_string(oracle_text) and oracle.accept_token(EOS) and oracle.is_terminated()
    assert unsupported_keyword(schema) == message
    with pytest.raises(ConstraintError, match=re.escape(message)):
        GrammarCache(tokenizer, VOCAB, (EOS,)).compile(StructuredOutputs.from_schema(schema))


def test_formats_let_days_past_the_months_end_through(tokenizer, compiler) -> None:
    """As docs/structured-output.md says: xgrammar's date formats take any day up to 31, and ipv4 leading zeros
    (JSON Schema's checkers refuse these), in its own matcher as in kvbatch's grammar."""
    cache = GrammarCache(tokenizer, VOCAB, (EOS,))
    for fmt, passes, refused in [
        ("date", '"2023-02-30"', '"2023-13-01"'),
        ("date-time", '"2023-04-31T00:00:00Z"', '"2023-04-32T00:00:00Z"'),
        ("ipv4", '"01.2.3.4"', '"256.2.3.4"'),
    ]:
        schema = json.dumps({"type": "string", "format": fmt})
        for compiled in (
            compiler.compile_json_schema(schema, any_whitespace=False),
            cache.compile(StructuredOutputs(json=schema)),
        ):
            assert _accepts(compiled, passes) and not _accepts(compiled, refused), fmt
    cache.close()


def test_an_extra_key_may_spell_a_property_with_an_escape(tokenizer, compiler) -> None:
    """As docs/structured-output.md says: an object that allows keys beyond its properties takes an extra key that
    spells a property's name with an escape, held to additionalProperties alone, in xgrammar's own matcher as in
    kvbatch's grammar; JSON reads it as the property, with the later value. Without extra keys it is refused."""
    jsonschema = pytest.importorskip("jsonschema")
    cache = GrammarCache(tokenizer, VOCAB, (EOS,))
    schema = {
        "type": "object",
        "properties": {"a": {"type": "integer"}},
        "required": ["a"],
        "additionalProperties": {"type": "string"},
    }
    text = '{"a": 1, "\\u0061": "x"}'
    for compiled in (
        compiler.compile_json_schema(json.dumps(schema), any_whitespace=False),
        cache.compile(StructuredOutputs.from_schema(schema)),
    ):
        assert _accepts(compiled, text) and not _accepts(compiled, '{"a": 1, "a": "x"}')
    assert json.loads(text) == {"a": "x"}
    with pytest.raises(jsonschema.ValidationError, match="'x' is not of type 'integer'"):
        jsonschema.validate(json.loads(text), schema)
    closed = cache.compile(StructuredOutputs.from_schema({**schema, "additionalProperties": False}))
    assert _accepts(closed, '{"a": 1}') and not _accepts(closed, text)
    cache.close()


# A discriminated union as pydantic writes one (`Union[Cat, Dog] = Field(discriminator="kind")`), and oneOfs whose
# schemas no value can match two of: by type, by const.
DISJOINT_ONE_OF = [
    {
        "$defs": {
            "Cat": {
                "type": "object",
                "properties": {"kind": {"const": "cat", "type": "string"}, "lives": {"type": "integer"}},
                "required": ["kind", "lives"],
            },
            "Dog": {
                "type": "object",
                "properties": {"kind": {"const": "dog", "type": "string"}, "good": {"type": "boolean"}},
                "required": ["kind", "good"],
            },
        },
        "type": "object",
        "properties": {
            "pet": {
                "oneOf": [{"$ref": "#/$defs/Cat"}, {"$ref": "#/$defs/Dog"}],
                "discriminator": {"propertyName": "kind", "mapping": {"cat": "#/$defs/Cat", "dog": "#/$defs/Dog"}},
            }
        },
        "required": ["pet"],
    },
    {"oneOf": [{"type": "string", "maxLength": 4}, {"type": "integer"}, {"type": "null"}]},
    {"oneOf": [{"const": 1}, {"enum": ["1", True]}]},
]


def test_a_one_of_no_value_matches_twice_runs_as_generate_with_xgrammar_processor(
    loaded, reference, compiler, tokenizer
) -> None:
    """oneOf was refused whole; where no value can match two of its schemas, anyOf (what the engine generates)
    means the same, so such a oneOf runs, token for token as xgrammar's own processor."""
    jsonschema = pytest.importorskip("jsonschema")
    constraints = [StructuredOutputs(json=json.dumps(schema)) for schema in DISJOINT_ONE_OF]
    assert [unsupported_keyword(schema) for schema in DISJOINT_ONE_OF] == [None] * len(DISJOINT_ONE_OF)
    requests = [
        GenerationRequest(i, prompt, SamplingParams(24, structured_outputs=constraints[i % len(constraints)]))
        for i, prompt in enumerate(prompts(tokenizer, 6))
    ]
    got = outcome(make_engine(loaded), requests)
    for request in requests:
        constraint = request.sampling.structured_outputs
        want = hf_constrained(reference, compiler, request.prompt_token_ids, constraint, 24)
        error, [(tokens, reason)] = got[request.request_id]
        assert error is None and tokens == want, request.request_id
        if reason == "stop":
            jsonschema.validate(json.loads(tokenizer.decode(tokens[:-1])), json.loads(constraint.json))


@pytest.mark.parametrize("policy", ["reserve", "optimistic"])
def test_greedy_constrained_equals_generate_with_xgrammar_processor(loaded, reference, compiler, tokenizer, policy):
    requests = requests_for(tokenizer, 10)
    # optimistic on a small pool preempts: the matcher must not see a recomputed sequence's output twice
    engine = make_engine(loaded, policy=policy, num_blocks_override=30 if policy == "optimistic" else 256)
    got = outcome(engine, requests)
    if policy == "optimistic":
        assert engine.stats.num_preemptions > 0
    for request in requests:
        constraint = request.sampling.structured_outputs
        want = hf_constrained(reference, compiler, request.prompt_token_ids, constraint, 24)
        error, [(tokens, reason)] = got[request.request_id]
        assert error is None
        assert tokens == want, f"request {request.request_id} ({constraint and constraint.kind}) diverged"
        assert reason == ("stop" if want[-1] == EOS else "length")
    assert engine.pool.num_free_blocks == engine.pool.num_blocks


def test_an_empty_regex_or_choice_is_met_by_the_empty_output(loaded, reference, compiler, tokenizer) -> None:
    """The empty regex matches only "", and a choice may be "": xgrammar's processor allows only EOS first there
    (an empty completion, `stop`), and beside other choices lets the model pick."""
    constraints = [
        StructuredOutputs(regex=""),
        StructuredOutputs(choice=("",)),
        StructuredOutputs(choice=("", "yes", "no")),
        StructuredOutputs(regex="(ab|)"),
    ]
    requests = [
        GenerationRequest(i, prompt, SamplingParams(8, structured_outputs=c))
        for i, (prompt, c) in enumerate(zip(prompts(tokenizer, len(constraints)), constraints))
    ]
    got = outcome(make_engine(loaded), requests)
    for request in requests:
        want = hf_constrained(reference, compiler, request.prompt_token_ids, request.sampling.structured_outputs, 8)
        assert got[request.request_id] == (None, [(want, "stop")])
    assert got[0][1][0][0] == got[1][1][0][0] == [EOS]


def test_a_sentencepiece_tokenizers_text_keeps_the_space_the_grammar_matched_first() -> None:
    """Llama 2's decoder drops the space a decoded text begins with. A row constrained to the choice " yes" wrote
    its tokens (those of xgrammar's own processor under generate), and its text read "yes", none of its choices;
    a regex that begins with a space lost its full match. The text is that of the bytes the grammar matched."""
    tokenizer = byte_fallback_tokenizer()
    eos = tokenizer.eos_token_id
    vocab = len(tokenizer)

    def model(attn: str) -> LlamaForCausalLM:
        attention_hook.register()
        torch.manual_seed(3)
        config = LlamaConfig(
            vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=eos, pad_token_id=0,
            initializer_range=0.2,
        )  # fmt: skip
        return LlamaForCausalLM._from_config(config, attn_implementation=attn, dtype=torch.float32).eval()

    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab, stop_token_ids=[eos])
    oracle = xgr.GrammarCompiler(info)
    loaded = LoadedModel(model(attention_hook.ATTN_IMPLEMENTATION), tokenizer, "sp", (eos,), 256, torch.device("cpu"),
                         torch.float32)  # fmt: skip
    constraints = [StructuredOutputs(choice=(" yes", " no", "maybe")), StructuredOutputs(regex=" [a-z]{1,3} [a-z]")]
    requests = [
        GenerationRequest(i, tokenizer.encode(f"record {'abcdefgh'[i]} is"), SamplingParams(12, structured_outputs=c))
        for i, c in enumerate(constraints * 4)
    ]
    results = {r.request_id: r.completions[0] for r in make_engine(loaded).generate(requests)}
    for request in requests:
        constraint = request.sampling.structured_outputs
        want = hf_constrained(model("sdpa"), oracle, request.prompt_token_ids, constraint, 12)
        completion = results[request.request_id]
        assert (completion.token_ids, completion.finish_reason) == (want, "stop")
        matched = b"".join(info.decoded_vocab[t] for t in want[:-1]).decode()  # the grammar's own bytes
        assert completion.text == matched and matched.startswith(" ")
        _check_text(constraint, completion.text)


def _check_text(constraint: StructuredOutputs, text: str) -> None:
    if constraint.regex is not None:
        assert re.fullmatch(constraint.regex, text), text
    elif constraint.choice is not None:
        assert text in constraint.choice
    elif constraint.json is not None:
        jsonschema = pytest.importorskip("jsonschema")
        jsonschema.validate(json.loads(text), json.loads(constraint.json))
    else:
        assert re.fullmatch(r"\(\d+(,\d+)*\)", text), text


def test_sampling_and_n_stay_in_the_grammar(loaded, tokenizer) -> None:
    requests = [
        GenerationRequest(
            i, prompt, SamplingParams(40, temperature=1.0, n=3, seed=i, structured_outputs=CONSTRAINTS[i % 4])
        )
        for i, prompt in enumerate(prompts(tokenizer, 8))
    ]
    engine = make_engine(loaded)
    num_stopped = 0
    for result in engine.generate(requests):
        constraint = requests[result.request_id].sampling.structured_outputs
        assert result.error is None and len(result.completions) == 3
        for completion in result.completions:
            if completion.finish_reason == "stop":
                num_stopped += 1
                assert completion.token_ids[-1] == EOS
                _check_text(constraint, completion.text)
    assert num_stopped >= 8  # choices and short regexes end well inside 40 tokens


def test_async_scheduling_gives_the_synchronous_result(loaded, tokenizer) -> None:
    requests = requests_for(tokenizer, 12)
    want = outcome(make_engine(loaded, async_scheduling=False), requests)
    engine = make_engine(loaded, async_scheduling=True)
    assert outcome(engine, requests) == want
    assert engine.stats.num_steps_ahead > 0  # free rows still ran ahead


def test_constrained_rows_are_planned_ahead_and_give_the_synchronous_result(loaded, tokenizer) -> None:
    """Every row constrained, greedy and sampled with n > 1: a step is planned and its forward launched before the
    host has the tokens in flight; its choice waits until the host has fed them to the grammars. Rows whose grammar
    ends while a step was planned past it drop that spare token."""
    requests = [
        GenerationRequest(i, prompt, SamplingParams(30, structured_outputs=CONSTRAINTS[i % 4]))
        if i % 2
        else GenerationRequest(
            i, prompt, SamplingParams(30, temperature=1.0, n=2, seed=i, structured_outputs=CONSTRAINTS[i % 4])
        )
        for i, prompt in enumerate(prompts(tokenizer, 10))
    ]
    want = outcome(make_engine(loaded, async_scheduling=False), requests)
    engine = make_engine(loaded, async_scheduling=True)
    assert outcome(engine, requests) == want
    assert engine.stats.num_steps_ahead > 0
    assert engine.stats.num_spare_tokens > 0
    assert engine.pool.num_free_blocks == engine.pool.num_blocks


def test_prefix_cache_and_stop_settings_do_not_cut_a_structure(loaded, tokenizer, reference, compiler) -> None:
    """Rows sharing a prompt hit the prefix cache; stop strings, stop token ids and ignore_eos, which could end or
    extend a row mid-structure, do not apply to a constrained row."""
    prompt = prompts(tokenizer, 1)[0]
    constraint = CONSTRAINTS[3]
    plain = SamplingParams(24, structured_outputs=constraint)
    odd = SamplingParams(24, structured_outputs=constraint, stop=(",", "("), ignore_eos=True, stop_token_ids=(11,))
    engine = make_engine(loaded)
    got = outcome(engine, [GenerationRequest(i, prompt, odd if i % 2 else plain) for i in range(4)])
    assert engine.stats.num_cached_prompt_tokens > 0
    want = hf_constrained(reference, compiler, prompt, constraint, 24)
    assert all(got[i][1][0][0] == want for i in range(4))


def test_a_constrained_row_has_no_stop_reason(loaded, tokenizer) -> None:
    """A constrained row ends where its grammar ends, never on a stop string or stop token id, so none is its stop
    reason, even where its whole text holds a stop string or ignore_eos is set."""
    choices = CONSTRAINTS[2].choice
    stops = dict(stop=("e", "o", "y", "a"), ignore_eos=True, stop_token_ids=(EOS,))
    params = [SamplingParams(8, structured_outputs=CONSTRAINTS[2], **stops), SamplingParams(8, **stops)]
    requests = [GenerationRequest(i, p, params[i % 2]) for i, p in enumerate(prompts(tokenizer, 6))]
    results = {r.request_id: r.completions[0] for r in make_engine(loaded).generate(requests)}
    constrained = [results[r.request_id] for r in requests if r.sampling.structured_outputs is not None]
    assert [(c.text in choices, c.finish_reason, c.stop_reason) for c in constrained] == [(True, "stop", None)] * 3
    free = [results[r.request_id] for r in requests if r.sampling.structured_outputs is None]
    assert all(c.stop_reason is not None for c in free if c.finish_reason == "stop")  # the free rows still stop


def test_min_tokens_leaves_a_constrained_rows_stop_token_ids_alone(loaded, tokenizer, reference, compiler) -> None:
    """Stop token ids do not stop a constrained row, so min_tokens has no reason to ban them there: it bans EOS
    only, and a stop id the structure wants (its first digit here) is still written, as xgrammar's processor does."""
    prompt = prompts(tokenizer, 1)[0]
    constraint = StructuredOutputs(regex="[0-9]{6}")
    want = hf_constrained(reference, compiler, prompt, constraint, 10)
    params = SamplingParams(10, structured_outputs=constraint, stop_token_ids=(want[0],), min_tokens=3)
    got = outcome(make_engine(loaded), [GenerationRequest(0, prompt, params)])
    assert got[0] == (None, [(want, "stop")])


def test_bad_constraints_fail_their_own_request(loaded, tokenizer) -> None:
    prompt = prompts(tokenizer, 1)[0]
    bad = {
        "unclosed": StructuredOutputs(regex="(ab"),
        "bad_type": StructuredOutputs.from_schema({"type": "strin"}),
        "unsupported": StructuredOutputs.from_schema({"type": "array", "uniqueItems": True}),
        "bad_rule": StructuredOutputs(grammar="root ::= missing"),
        "typographic": StructuredOutputs(grammar="root ::= “yes” | “no”"),
    }
    requests = [GenerationRequest(k, prompt, SamplingParams(8, structured_outputs=c)) for k, c in bad.items()]
    requests.append(GenerationRequest("ok", prompt, SamplingParams(8, structured_outputs=CONSTRAINTS[2])))
    results = {r.request_id: r for r in make_engine(loaded).generate(requests)}
    assert results["ok"].error is None
    assert (
        "bad constraint (regex" in results["unclosed"].error
        and "parenthesis is not closed" in results["unclosed"].error
    )
    assert 'Unsupported type "strin"' in results["bad_type"].error
    assert "unsupported JSON Schema keyword 'uniqueItems'" in results["unsupported"].error
    assert 'Rule "missing" is not defined' in results["bad_rule"].error
    # xgrammar's own message quotes the first byte of the quote, so Python could not decode it: the row failed as
    # "'utf-8' codec can't decode byte 0xe2", naming nothing of the grammar
    with pytest.raises(UnicodeDecodeError):
        xgr.Grammar.from_ebnf(bad["typographic"].grammar)
    assert results["typographic"].error == (
        'bad constraint (grammar "root ::= “yes” | “no”"): grammar does not compile: EBNF lexer error '
        "at line 1, column 10: Unexpected character: \ufffd"
    )


def test_many_rows_are_accepted_on_threads_as_one_by_one(tokenizer) -> None:
    """A step's tokens go to the matchers in chunks on several threads when there are many rows: each matcher ends
    where accepting its tokens one by one leaves it (same acceptance, same next mask)."""
    cache = GrammarCache(tokenizer, VOCAB, (EOS,))
    cache.threads.num_threads = 4  # chunks on four threads even where the machine has fewer cores
    compiled = cache.submit(CONSTRAINTS[0]).result()
    rows = 100
    texts = ['{"name": "Ann', '{"name": "Bo", "age": 4', '{"name": "C", "age": 31, "role": "us']
    steps = [tokenizer.encode(texts[i % 3], add_special_tokens=False) for i in range(rows)]
    threaded = [new_matcher(compiled) for _ in range(rows)]
    serial = [new_matcher(compiled) for _ in range(rows)]
    for position in range(max(map(len, steps))):
        live = [i for i in range(rows) if position < len(steps[i])]
        tokens = [steps[i][position] for i in live]
        assert cache.threads.accept([threaded[i] for i in live], tokens) == [True] * len(live)
        assert all(serial[i].accept_token(t) for i, t in zip(live, tokens))
    want = torch.zeros(xgr.get_bitmask_shape(rows, VOCAB), dtype=torch.int32)
    got = torch.zeros_like(want)
    for i in range(rows):
        serial[i].fill_next_token_bitmask(want, i)
        threaded[i].fill_next_token_bitmask(got, i)
    assert torch.equal(got, want)
    bad = tokenizer.encode("}", add_special_tokens=False)[0]
    assert cache.threads.accept([new_matcher(compiled) for _ in range(rows)], [bad] * rows) == [False] * rows
    cache.close()


def test_bans_that_leave_no_allowed_token_give_way_to_the_constraint(loaded, tokenizer, reference, compiler) -> None:
    """min_tokens bans EOS where the finished choice allows only EOS, and allowed_token_ids may share no token with
    the grammar: there the constraint alone decides. Where bans and grammar share tokens, both hold."""
    prompt = prompts(tokenizer, 1)[0]
    choice = CONSTRAINTS[2]
    want = hf_constrained(reference, compiler, prompt, choice, 8)
    other = next(c for c in choice.choice if tokenizer.decode(want[:-1]) != c)
    other_ids = tokenizer.encode(other)
    disjoint = tuple(tokenizer.encode(" zebra crossing"))
    settings = {
        "min_tokens": dict(min_tokens=6),
        "disjoint": dict(allowed_token_ids=disjoint),
        "both": dict(min_tokens=6, allowed_token_ids=disjoint),
        "narrowed": dict(allowed_token_ids=(*other_ids, EOS)),
    }
    requests = [
        GenerationRequest(name, prompt, SamplingParams(8, structured_outputs=choice, **extra))
        for name, extra in settings.items()
    ]
    got = outcome(make_engine(loaded), requests)
    assert want[-1] == EOS and got["min_tokens"] == got["disjoint"] == got["both"] == (None, [(want, "stop")])
    assert got["narrowed"] == (None, [([*other_ids, EOS], "stop")])


def test_a_token_the_grammar_rejects_fails_its_row_not_the_engine(loaded, tokenizer, monkeypatch) -> None:
    # A mask that misses a token is a bug; should one happen, it costs the row, and the rest of the batch finishes.
    from kvbatch.runner import structured

    monkeypatch.setattr(structured.StepMask, "__call__", lambda self, logits: None)
    prompt = prompts(tokenizer, 1)[0]
    regex = StructuredOutputs(regex="q{5}")  # a random model's first pick is never "q"
    requests = [GenerationRequest("constrained", prompt, SamplingParams(8, structured_outputs=regex))]
    requests += [GenerationRequest(i, prompt, SamplingParams(8)) for i in range(3)]
    results = {r.request_id: r for r in make_engine(loaded).generate(requests)}
    assert results["constrained"].error_kind == ErrorKind.ENGINE
    assert "the constraint rejected token" in results["constrained"].error
    assert all(results[i].error is None and len(results[i].completions[0].token_ids) == 8 for i in range(3))


def test_a_grammar_that_cannot_go_on_fails_its_row_as_a_bad_constraint(loaded, tokenizer) -> None:
    """A grammar that matches no text, or none past what it accepted, leaves its row an empty mask: xgrammar's own
    processor fails there too. It is the constraint's fault, not the engine's, greedy or sampled."""
    prompt = prompts(tokenizer, 1)[0]
    dead = {
        "nothing": StructuredOutputs(grammar="root ::= []"),
        "after_a": StructuredOutputs(grammar='root ::= "a" rest\nrest ::= [^\\x00-\\U0010ffff]'),
    }
    requests = [
        GenerationRequest(f"{name}_{i}", prompt, SamplingParams(8, structured_outputs=c, temperature=i, seed=1))
        for name, c in dead.items()
        for i in (0, 1)
    ]
    requests.append(GenerationRequest("ok", prompt, SamplingParams(8, structured_outputs=CONSTRAINTS[2])))
    results = {r.request_id: r for r in make_engine(loaded).generate(requests)}
    assert results["ok"].error is None
    for i in (0, 1):
        assert results[f"nothing_{i}"].error_kind == ErrorKind.BAD_CONSTRAINT
        assert results[f"nothing_{i}"].error == (
            "bad constraint (grammar \"root ::= []\"): after 0 tokens ('') it allows no token: no text completes "
            "it from there"
        )
        assert results[f"after_a_{i}"].error_kind == ErrorKind.BAD_CONSTRAINT
        assert "after 1 token ('a') it allows no token" in results[f"after_a_{i}"].error


def test_an_end_of_sequence_token_with_text_is_left_out_of_a_constrained_rows_text(loaded, tokenizer) -> None:
    """A model may end sequences on a token that is no special token (a generation config's EOS id that decodes
    to text). The grammar stops on it and leaves it out of what it matched, as xgrammar's own processor does, but
    the row's text kept it: a choice read "yes.", none of its choices, and a schema's JSON no longer parsed."""
    jsonschema = pytest.importorskip("jsonschema")
    dot = tokenizer.encode(".", add_special_tokens=False)[0]
    assert tokenizer.decode([dot], skip_special_tokens=True) == "."
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=VOCAB, stop_token_ids=[dot])
    oracle = xgr.GrammarCompiler(info)
    model = loaded.model
    ends_on_dot = LoadedModel(model, tokenizer, "tiny-dot-eos", (dot,), 512, torch.device("cpu"), torch.float32)
    constraints = [CONSTRAINTS[0], CONSTRAINTS[2], CONSTRAINTS[1]]
    requests = [
        GenerationRequest(i, prompt, SamplingParams(48, structured_outputs=constraints[i % 3]))
        for i, prompt in enumerate(prompts(tokenizer, 6))
    ]
    results = {r.request_id: r.completions[0] for r in make_engine(ends_on_dot).generate(requests)}
    for request in requests:
        constraint = request.sampling.structured_outputs
        prompt = request.prompt_token_ids
        out = _model("sdpa").generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=48,
            do_sample=False,
            eos_token_id=dot,
            pad_token_id=0,
            logits_processor=[LogitsProcessor(_oracle_grammar(oracle, constraint))],
        )
        want = out[0, len(prompt) :].tolist()
        completion = results[request.request_id]
        assert (completion.token_ids, completion.finish_reason) == (want, "stop")
        assert want[-1] == dot
        assert completion.text == tokenizer.decode(want[:-1])
        if constraint.json is not None:
            jsonschema.validate(json.loads(completion.text), PERSON)
        else:
            _check_text(constraint, completion.text)


def test_a_model_without_an_end_of_sequence_token_fails_its_constrained_rows(loaded, tokenizer) -> None:
    """A grammar ends on an end-of-sequence token. A model whose generation config and tokenizer name none made
    xgrammar refuse to build its token table, and that error ended the whole job as an engine bug; the constrained
    rows now fail as bad constraints saying why, and the free rows run."""
    no_eos = LoadedModel(loaded.model, tokenizer, "tiny-no-eos", (), 512, torch.device("cpu"), torch.float32)
    engine = make_engine(no_eos)
    prompt = prompts(tokenizer, 1)[0]
    requests = [
        GenerationRequest("choice", prompt, SamplingParams(8, structured_outputs=CONSTRAINTS[2])),
        GenerationRequest("free", prompt, SamplingParams(8)),
    ]
    results = {r.request_id: r for r in engine.generate(requests)}
    why = (
        "the model has no end-of-sequence token (its generation config and tokenizer name none), so no constrained "
        "row could end; give generation_config.json an eos_token_id"
    )
    assert results["choice"].error_kind == ErrorKind.BAD_CONSTRAINT
    assert results["choice"].error == f'bad constraint (choice ["yes", "no", "maybe not"]): {why}'
    assert results["free"].error is None and len(results["free"].completions[0].token_ids) == 8
    assert engine.constraint_problem(CONSTRAINTS[0]) == f"bad constraint ({CONSTRAINTS[0].describe()}): {why}"
