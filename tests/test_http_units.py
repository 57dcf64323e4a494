"""cosine-http's parts alone: [http] config errors, request validation, chat templates
(rendered as transformers renders them; stored at export; read back for older engines)."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cosine import config
from cosine.config import ConfigError
from cosine.client import Chunk, GenerateResult
from cosine.export import chat_template as ct
from cosine.gateway.chat import ChatTemplate, compile_template
from cosine.gateway.errors import ApiError
from cosine.gateway.generate import DONE, _events
from cosine.gateway.responses import Shape
from cosine.gateway.requests import chat_args, completion_args

REPO = Path(__file__).resolve().parents[1]
BASE = (REPO / "config.toml").read_text()
CFG = config.load(REPO / "config.toml", check_engines=False)
MSGS = [{"role": "system", "content": "Sé breve."}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"}, {"role": "user", "content": "again"}]


def test_shipped_config_turns_the_gateway_on():
    assert CFG.http is not None and (CFG.http.host, CFG.http.port) == ("127.0.0.1", 8000)
    assert config.load(_write_without_http(), check_engines=False).http is None


def _write_without_http() -> Path:
    import tempfile

    d = Path(tempfile.mkdtemp())
    text = BASE.split("[http]")[0] + "[[models]]" + BASE.split("[http]")[1].split("[[models]]", 1)[1]
    (d / "config.toml").write_text(text)
    return d / "config.toml"


@pytest.mark.parametrize("old,new,pattern", [
    ("port = 8000", "port = 80000", r"line \d+: port 80000 must be 1..65535"),
    ("port = 8000", "port = 5601", r"line \d+: 127.0.0.1:5601 is also used by verifier-0"),
    ("api_keys = []", 'api_keys = ["has space"]', r"line \d+: every API key must be a non-empty string"),
    ("api_keys = []", "api_keys = [1]", r"api_keys must be a list of str"),
    ("body_timeout_s = 30.0", "body_timeout_s = 0.0", r"line \d+: body_timeout_s must be > 0"),
    ("port = 8000", "prot = 8000", r"line \d+: unknown key 'prot' in \[http\]"),
])
def test_bad_http_config_is_a_clear_error(tmp_path: Path, old: str, new: str, pattern: str) -> None:
    assert old in BASE
    p = tmp_path / "config.toml"
    p.write_text(BASE.replace(old, new, 1))
    with pytest.raises(ConfigError, match=pattern):
        config.load(p, check_engines=False)


@pytest.mark.parametrize("body,fn,match", [
    ({"prompt": "a", "n": 3}, completion_args, "n must be 1"),
    ({"prompt": "a", "logit_bias": {"5": 1}}, completion_args, "logit_bias"),
    ({"prompt": "a", "echo": True}, completion_args, "echo"),
    ({"prompt": "a", "temperature": "hot"}, completion_args, "temperature must be a number"),
    ({"prompt": "a", "temperature": 3}, completion_args, r"temperature = 3 is out of range \[0.0, 2.0\]"),
    ({"prompt": "a", "top_p": 0}, completion_args, r"top_p = 0 is out of range \(0.0, 1.0\]"),
    ({"prompt": "a", "max_tokens": True}, completion_args, "max_tokens must be an integer"),
    ({"prompt": "a", "max_tokens": 5000}, completion_args, r"over the server limit 1024 \(\[limits\]"),
    ({"prompt": "a", "mode": "turbo"}, completion_args, "mode must be one of"),
    ({"prompt": "a", "stream_options": {"x": 1}}, completion_args, "stream_options"),
    ({"prompt": ["a", "b"]}, completion_args, "one prompt per request"),
    ({"prompt": "a", "wat": 1}, completion_args, "unknown field 'wat'"),
    ({}, completion_args, "prompt is required"),
    ({"messages": []}, chat_args, "non-empty list"),
    ({"messages": [{"role": "tool", "content": "x"}]}, chat_args, r"messages\[0\].role"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": [{}]}]}, chat_args, "tool_calls"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, chat_args, "tools"),
    ({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}}, chat_args,
     "response_format"),
    ({"messages": [{"role": "user", "content": "x"}], "prompt": "a"}, chat_args, "unknown field 'prompt'"),
])
def test_bad_fields_are_400_naming_the_field(body, fn, match):
    with pytest.raises(ApiError, match=match) as e:
        fn(body, CFG)
    assert e.value.status == 400


def test_neutral_openai_defaults_are_accepted():
    """What SDKs and frameworks send by default is fine at its neutral value."""
    a = chat_args({"model": "m", "messages": [{"role": "developer", "content": [{"type": "text", "text": "a"}]},
                                              {"role": "assistant", "content": None, "tool_calls": []},
                                              {"role": "user", "content": "b", "name": "x"}],
                   "n": 1, "presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {}, "logprobs": False,
                   "user": "u", "stream": True, "stream_options": {"include_usage": True}, "tools": None,
                   "parallel_tool_calls": True, "response_format": {"type": "text"}, "max_completion_tokens": 9,
                   "seed": 3, "stop": "x", "temperature": 0.5, "top_p": 0.9}, CFG)
    assert a.messages == [{"role": "system", "content": "a"}, {"role": "assistant", "content": ""},
                          {"role": "user", "content": "b", "name": "x"}]
    assert (a.max_tokens, a.stream, a.include_usage, a.stop, a.seed) == (9, True, True, ["x"], 3)
    c = completion_args({"prompt": [[1, 2, 3]], "echo": False, "best_of": 1, "logprobs": None, "suffix": None}, CFG)
    assert c.prompt == [1, 2, 3] and c.max_tokens == 16 and c.temperature == CFG.controller.temperature


TEMPLATES = {
    "chatml": ct.CHATML,
    # Llama-3 style: bos_token, loop controls, trim_blocks/lstrip_blocks, tojson
    "llama3ish": (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' and loop.first %}{% continue %}{% endif %}\n"
        "  {{ '<|start|>' + m['role'] + '\\n' + m['content'] | trim + '<|end|>' }}\n"
        "{% endfor %}{{ messages[0] | tojson }}{% if add_generation_prompt %}<|start|>assistant\n{% endif %}"),
    "strict": ("{% if messages[0]['role'] != 'user' %}{{ raise_exception('first message must be the user') }}"
               "{% endif %}{% for m in messages %}{{ m['content'] }}{% endfor %}"),
}


@pytest.fixture(scope="module")
def hf_tokenizer(tiny_models):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(tiny_models["llama"])


@pytest.mark.parametrize("name", ["chatml", "llama3ish"])
def test_render_matches_transformers(hf_tokenizer, name):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(hf_tokenizer.backend_tokenizer.to_str())
    mine = ChatTemplate(TEMPLATES[name], tok, {"bos_token": "<bos>", "eos_token": "<eos>"})
    theirs = hf_tokenizer.apply_chat_template(MSGS, chat_template=TEMPLATES[name], add_generation_prompt=True,
                                              tokenize=False)
    assert mine.render(MSGS) == theirs
    assert mine.token_ids(MSGS) == list(hf_tokenizer.apply_chat_template(
        MSGS, chat_template=TEMPLATES[name], add_generation_prompt=True, tokenize=True, return_dict=False))


def test_template_errors_and_sandbox_are_400():
    from tokenizers import Tokenizer

    from cosine.export.tiny import make_tokenizer

    t = ChatTemplate(TEMPLATES["strict"], Tokenizer.from_str(make_tokenizer(64).to_str()), {})
    with pytest.raises(ApiError, match="first message must be the user") as e:
        t.render(MSGS)
    assert e.value.status == 400
    evil = compile_template("{{ messages.__class__.__mro__ }}")
    with pytest.raises(Exception, match="unsafe|access"):
        evil.render(messages=[])


def test_export_stores_the_template_and_hf_sources_are_read(tiny_models, tmp_path):
    d = tmp_path / "hf"
    shutil.copytree(tiny_models["llama"], d)
    assert ct.from_hf_dir(d) == ct.CHATML  # the tiny models carry ChatML (chat_template.jinja)
    (d / ct.FILE).unlink()
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert ct.from_hf_dir(d) == "D"
    out = tmp_path / "engine"
    out.mkdir()
    assert ct.store(d, out) and (out / ct.FILE).read_text() == "D"
    cfg.pop("chat_template")
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert not ct.store(d, out) and not (out / ct.FILE).exists()  # no stale template is kept


def test_gguf_template_and_older_engines(tmp_path, control_engines):
    import gguf

    src = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(src), "llama")
    w.add_string(ct.GGUF_KEY, "{{ 'G' }}")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert ct.from_gguf(src) == "{{ 'G' }}"
    # an engine exported before templates were stored: read from the manifest's source ...
    old = tmp_path / "old-engine"
    shutil.copytree(control_engines["target"], old)
    (old / ct.FILE).unlink()
    man = json.loads((old / "manifest.json").read_text())
    (old / "manifest.json").write_text(json.dumps({**man, "source": str(src)}))
    assert ct.load(old) == ("{{ 'G' }}", str(src))
    # ... or a clear error saying how to fix it, and the fix works
    (old / "manifest.json").write_text(json.dumps({**man, "source": str(tmp_path / "gone.gguf")}))
    with pytest.raises(ct.ChatTemplateMissing, match="is gone; re-export .* `python -m cosine.export.chat_template"):
        ct.load(old)
    assert ct.main([str(old), "--source", str(src)]) == 0 and ct.load(old)[0] == "{{ 'G' }}"


@settings(max_examples=60, deadline=None)
@given(text=st.text(alphabet=st.sampled_from(list("aé€😀 \nß中")), min_size=1, max_size=30))
def test_stream_text_never_splits_a_utf8_character(text):
    """What the gateway streams is serve's chunk text (control/pool.py Detokenizer): with a
    byte-level tokenizer, where one character spans several tokens, no chunk carries a
    broken character and the chunks add up to the whole text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from cosine.control.request import Detokenizer

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(alphabet))}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    ids = tok.encode(text).ids
    assert len(ids) == len(text.encode())  # one token per byte: multi-byte characters are split
    d = Detokenizer(lambda x: tok.decode(x), [])
    chunks = [d.push(t) for t in ids] + [d.flush()]
    assert all("\ufffd" not in c for c in chunks)
    assert "".join(chunks) == text


# ----- SSE batching (cosine/gateway/generate.py _events) --------------------------------------

class _Stream:
    """An AsyncStream's reading side, fed by the test: what ``has_next`` sees is what is queued."""

    def __init__(self) -> None:
        self.rid, self.result, self.q = "r1", None, asyncio.Queue()

    def has_next(self) -> bool:
        return not self.q.empty()

    def __aiter__(self):  # type: ignore[no-untyped-def]
        return self

    async def __anext__(self):  # type: ignore[no-untyped-def]
        item = await self.q.get()
        if item is None:
            self.result = GenerateResult("ab", [1, 2], "length")
            raise StopAsyncIteration
        return Chunk(item, [0])


def test_sse_sends_what_is_ready_at_once_and_never_holds_a_token_back():
    async def run() -> list[bytes]:
        s = _Stream()
        events = _events(None, Shape(True, "r1", "m"), s, s, Chunk("a", [1]), False)  # type: ignore[arg-type]
        # role + first text in one write, at once: nothing is queued behind them (a wait here is the bug)
        writes = [await asyncio.wait_for(events.__anext__(), 5)]
        s.q.put_nowait("b")
        s.q.put_nowait(None)  # the last text and the end arrive together: one write with [DONE]
        writes += [w async for w in events]
        return writes

    writes = asyncio.run(run())
    assert len(writes) == 2, writes
    first = [json.loads(e[6:]) for e in writes[0].decode().split("\n\n") if e]
    assert first[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert first[1]["choices"][0]["delta"]["content"] == "a"
    assert writes[1].endswith(DONE) and b'"content":"b"' in writes[1] and b'"finish_reason":"length"' in writes[1]
