"""Reasoning models' thinking text, apart from the answer.

Templates of reasoning models (Qwen3, DeepSeek-R1) mark the thinking with <think>...</think>. Where the chat
template knows those tags (or prompt.split_reasoning says so), the output's `reasoning` column holds the thinking
and `text` the answer, as vLLM's reasoning parsers give them:

    "<think>\\nplan\\n</think>\\n\\nanswer"  ->  reasoning "plan", text "answer"
    "answer" (no </think>)                 ->  reasoning null, text "answer" (a sample cut short keeps its text)

Whether the template knows the tags is read from files only (the job's template file, the model folder's or the
local hub cache's tokenizer files), so the output's columns are known before any model loads.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)

THINK_START, THINK_END = "<think>", "</think>"


def split_reasoning(text: str) -> tuple[str | None, str]:
    """(thinking, answer) of one sample's text; (None, text) when it has no end-of-thinking tag."""
    thinking, found, answer = text.partition(THINK_END)
    if not found:
        return None, text
    return thinking.replace(THINK_START, "", 1).strip(), answer.lstrip()


def template_marks_reasoning(model: str, template_file: Path | None) -> bool:
    """Whether the chat template in use writes or reads <think> or </think>: the job's file, else the model's own.
    A template may only open the thinking (DeepSeek-R1's generation prompt ends in <think>): the output closes it."""
    text = _read(template_file) if template_file is not None else _model_template(model)
    return text is not None and (THINK_START in text or THINK_END in text)


def _model_template(model: str) -> str | None:
    folder = Path(model).expanduser()
    if folder.is_dir():
        paths = [folder / "chat_template.jinja", folder / "tokenizer_config.json"]
    elif model != "default" and not model.endswith(".gguf"):
        try:  # a hub name: its files in the local cache, never downloaded
            from huggingface_hub import try_to_load_from_cache

            found = [try_to_load_from_cache(model, name) for name in ("chat_template.jinja", "tokenizer_config.json")]
        except Exception:  # noqa: BLE001 - no cache, a name that is no repo id: no template known
            return None
        paths = [Path(p) for p in found if isinstance(p, str)]
    else:  # the embedded SmolLM2 and GGUF files: no reasoning tags
        return None
    for path in paths:
        text = _read(path)
        if text is not None and path.suffix == ".json":
            try:
                template = json.loads(text).get("chat_template")
            except (ValueError, AttributeError):
                continue
            text = json.dumps(template) if template is not None else None
        if text is not None:
            return text
    return None


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
