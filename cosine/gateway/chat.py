"""The model's own chat template (stored at export, cosine.export.chat_template), rendered
the way transformers' ``apply_chat_template`` renders it: a sandboxed jinja2 environment
with ``trim_blocks``/``lstrip_blocks``, loop controls, ``raise_exception``, ``strftime_now``,
a ``tojson`` that keeps non-ASCII text, the tokenizer's special tokens as variables and
``add_generation_prompt=True``; the result is tokenized without adding special tokens."""

from __future__ import annotations

import json
import logging
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from cosine.export.chat_template import ChatTemplateMissing, load
from cosine.gateway.errors import ApiError, bad

log = logging.getLogger("cosine.gateway")


def _raise(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def compile_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


class ChatTemplate:
    """Messages -> prompt token ids for one engine."""

    def __init__(self, source: str, tokenizer: Tokenizer, special: dict[str, str]):
        self.template = compile_template(source)
        self.tokenizer = tokenizer
        self.special = special

    @classmethod
    def for_engine(cls, engine_dir: Path) -> "ChatTemplate":
        """Raises ChatTemplateMissing (the message says how to fix it)."""
        source, where = load(engine_dir)
        tok = Tokenizer.from_file(str(engine_dir / "tokenizer.json"))
        man = json.loads((engine_dir / "manifest.json").read_text())
        special = {}
        for key, ids in (("bos_token", [man.get("bos_token_id")]), ("eos_token", man.get("eos_token_ids") or [])):
            name = tok.id_to_token(int(ids[0])) if ids and ids[0] is not None else None
            if name is not None:
                special[key] = name
        log.info("chat template of %s from %s", engine_dir, where)
        return cls(source, tok, special)

    def render(self, messages: list[dict[str, str]]) -> str:
        try:
            return self.template.render(messages=messages, add_generation_prompt=True, tools=None, documents=None,
                                        **self.special)
        except jinja2.exceptions.TemplateError as e:
            raise bad(f"the model's chat template refused these messages: {e}", "messages") from None

    def token_ids(self, messages: list[dict[str, str]]) -> list[int]:
        return self.tokenizer.encode(self.render(messages), add_special_tokens=False).ids


class LazyChatTemplate:
    """Loaded on the first chat request (the gateway may run where engines are not)."""

    def __init__(self, engine_dir: Path):
        self.engine_dir = engine_dir
        self._t: ChatTemplate | None = None

    def get(self) -> ChatTemplate:
        if self._t is None:
            try:
                self._t = ChatTemplate.for_engine(self.engine_dir)
            except ChatTemplateMissing as e:
                raise ApiError(501, f"chat completions need the model's chat template: {e}", None,
                               "chat_template_missing") from None
            except (OSError, ValueError, jinja2.exceptions.TemplateError) as e:
                raise ApiError(503, f"cannot load the chat template or tokenizer of {self.engine_dir}: {e}",
                               None, "chat_template_unavailable") from None
        return self._t
