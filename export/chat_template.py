"""The model's own chat template, stored in the engine as ``chat_template.jinja``.

Chat completions (`cosine-http`, docs/http.md) render messages with the template the model
was trained with. It comes from the export source: a GGUF file's ``tokenizer.chat_template``
metadata, or a Hugging Face directory's ``chat_template.jinja`` / ``tokenizer_config.json``.
Engines exported before templates were stored get it from their manifest's ``source``
while that file is still there (``load``), or once for good with

    python -m cosine.export.chat_template ENGINE_DIR [--source MODEL]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

log = logging.getLogger("cosine.export")

FILE = "chat_template.jinja"
GGUF_KEY = "tokenizer.chat_template"

# ChatML (Qwen2.5 Instruct's format, without its tool-calling branches): the tiny test
# models carry it so that chat completions can be tested without a download.
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class ChatTemplateMissing(LookupError):
    """The engine has no chat template and none can be read from its source."""


def from_gguf(path: Path) -> str | None:
    """``tokenizer.chat_template`` of a GGUF file (None when it has none)."""
    from gguf import GGUFReader  # export extra: only needed for GGUF sources

    field = GGUFReader(str(path)).fields.get(GGUF_KEY)
    if field is None or not field.data:
        return None
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def from_hf_dir(d: Path) -> str | None:
    """The template of a Hugging Face model directory: chat_template.jinja (transformers 5
    writes it there), else tokenizer_config.json's ``chat_template`` (a string, or a list
    of named templates of which "default" is the chat one)."""
    if (d / FILE).is_file():
        return (d / FILE).read_text(encoding="utf-8")
    cfg = d / "tokenizer_config.json"
    if not cfg.is_file():
        return None
    t = json.loads(cfg.read_text(encoding="utf-8")).get("chat_template")
    if isinstance(t, list):
        t = next((x.get("template") for x in t if isinstance(x, dict) and x.get("name") == "default"), None)
    return t if isinstance(t, str) and t else None


def from_source(source: Path) -> str | None:
    """The template of an export source: a .gguf file or a Hugging Face directory."""
    if source.is_file():
        return from_gguf(source)
    if source.is_dir():
        return from_hf_dir(source)
    return None


def store(source: str | Path, out_dir: str | Path) -> bool:
    """Export hook: write the source's template next to tokenizer.json; False when it has none."""
    out = Path(out_dir) / FILE
    out.unlink(missing_ok=True)  # a re-export must not keep an older model's template
    t = from_source(Path(source))
    if t is None:
        log.warning("%s has no chat template: chat completions will be refused for this engine", source)
        return False
    out.write_text(t, encoding="utf-8")
    return True


def load(engine_dir: str | Path) -> tuple[str, str]:
    """(template, where it came from) for an engine: its chat_template.jinja, else the export
    source named in its manifest. Raises ChatTemplateMissing saying how to fix it."""
    d = Path(engine_dir)
    if (d / FILE).is_file():
        return (d / FILE).read_text(encoding="utf-8"), str(d / FILE)
    fix = (f"re-export the engine with cosine-export, or run `python -m cosine.export.chat_template {d} "
           f"--source MODEL` with the GGUF file or Hugging Face directory it was exported from")
    try:
        source = Path(json.loads((d / "manifest.json").read_text())["source"])
    except (OSError, ValueError, KeyError, TypeError):
        raise ChatTemplateMissing(f"engine {d} has no {FILE} and no readable manifest source; {fix}") from None
    try:
        t = from_source(source)
    except ImportError:
        raise ChatTemplateMissing(f"engine {d} has no {FILE}; reading it from {source} needs the gguf package "
                                  f"(pip install 'cosine[export]'); or {fix}") from None
    if t is None:
        raise ChatTemplateMissing(f"engine {d} has no {FILE} and its source {source} "
                                  f"{'has no chat template' if source.exists() else 'is gone'}; {fix}")
    return t, str(source)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cosine.export.chat_template",
                                 description="store the model's chat template in an existing engine")
    ap.add_argument("engine", type=Path, help="engine directory (has manifest.json)")
    ap.add_argument("--source", type=Path, default=None,
                    help="GGUF file or Hugging Face directory (default: the manifest's source)")
    a = ap.parse_args(argv)
    try:
        source = a.source or Path(json.loads((a.engine / "manifest.json").read_text())["source"])
    except (OSError, ValueError, KeyError) as e:
        print(f"chat_template: cannot read {a.engine / 'manifest.json'} ({e}); pass --source", file=sys.stderr)
        return 2
    if not store(source, a.engine):
        print(f"chat_template: {source} has no chat template", file=sys.stderr)
        return 1
    print(f"wrote {a.engine / FILE} from {source}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
