"""`cosine-http` through real clients nobody here wrote: the official `openai` SDK,
langchain-openai and curl, against a live gateway + cluster (tests/conftest.py http_cluster)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from tokenizers import Tokenizer

from cosine.client import Client
from cosine.config import MODES

REPO = Path(__file__).resolve().parents[1]
PROMPT = [5, 17, 12, 8, 9]
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi"}]
FIGURES = {"mode", "drafters_used", "rounds", "num_drafts", "num_draft_tokens", "num_accepted_tokens",
           "draft_acceptance_rate", "mean_acceptance_length", "ttft_s"}


@pytest.fixture(scope="module")
def sdk(http_cluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=http_cluster.base + "/v1", api_key=http_cluster.key, max_retries=0, timeout=60)


def quiet(endpoint: str, deadline_s: float = 30.0) -> dict:
    """serve's stats once no request runs or waits (bounded wait)."""
    with Client(endpoint, timeout_s=30) as c:
        end = time.monotonic() + deadline_s
        while True:
            st = c.stats()
            if st["active_requests"] == 0 and st["queued_requests"] == 0:
                return st
            assert time.monotonic() < end, f"requests still running: {st['active_requests']}"
            time.sleep(0.05)


def test_completions_and_chat_with_usage_and_figures(sdk, http_cluster):
    r = sdk.completions.create(model="target", prompt=PROMPT, max_tokens=12, extra_body={"mode": "cosine"})
    assert r.object == "text_completion" and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens == len(PROMPT) and r.usage.total_tokens == len(PROMPT) + r.usage.completion_tokens
    fig = r.model_extra["speculation"]
    assert set(fig) == FIGURES and fig["mode"] == "cosine" and fig["rounds"] >= 1
    assert fig["num_accepted_tokens"] <= fig["num_draft_tokens"]
    c = sdk.chat.completions.create(model="target", messages=MESSAGES, max_completion_tokens=10)
    assert c.object == "chat.completion" and c.choices[0].message.role == "assistant"
    assert c.usage.completion_tokens >= 1 and c.usage.prompt_tokens > 10
    assert set(c.model_extra["speculation"]) == FIGURES
    assert [m.id for m in sdk.models.list()] == ["target"]


def test_streaming_both_endpoints(sdk):
    full = sdk.completions.create(model="target", prompt=PROMPT, max_tokens=20)
    chunks = list(sdk.completions.create(model="target", prompt=PROMPT, max_tokens=20, stream=True,
                                         stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == full.choices[0].text
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert set(chunks[-1].model_extra["speculation"]) == FIGURES
    chat = sdk.chat.completions.create(model="target", messages=MESSAGES, max_tokens=16)
    parts = list(sdk.chat.completions.create(model="target", messages=MESSAGES, max_tokens=16, stream=True))
    assert parts[0].choices[0].delta.role == "assistant"
    assert "".join(p.choices[0].delta.content or "" for p in parts) == chat.choices[0].message.content
    assert parts[-1].choices[0].finish_reason == chat.choices[0].finish_reason
    assert set(parts[-1].model_extra["speculation"]) == FIGURES  # no usage asked: on the finish chunk


def test_stop_strings_and_seeds(sdk):
    full = sdk.completions.create(model="target", prompt=PROMPT, max_tokens=30, extra_body={"ignore_eos": True})
    text = full.choices[0].text
    stop = text[4:6]
    for stream in (False, True):
        r = sdk.completions.create(model="target", prompt=PROMPT, max_tokens=30, stop=[stop], stream=stream)
        got = "".join(c.choices[0].text for c in r if c.choices) if stream else r.choices[0].text
        assert got == text[:text.find(stop)]
    sampled = {seed: [sdk.completions.create(model="target", prompt=PROMPT, max_tokens=16, temperature=0.9,
                                             seed=seed).choices[0].text for _ in range(2)] for seed in (1, 2, 3)}
    assert all(a == b for a, b in sampled.values()), sampled  # same seed, same text
    assert len({v[0] for v in sampled.values()}) > 1, sampled  # the seed matters


@pytest.mark.parametrize("mode", MODES)
def test_greedy_http_equals_zmq_token_for_token(sdk, http_cluster, mode):
    tok = Tokenizer.from_file(_target_tokenizer(http_cluster))
    with Client(http_cluster.endpoint, timeout_s=60) as c:
        ref = c.generate(PROMPT, max_tokens=24, mode=mode)
        chat_ids = _chat_ids(http_cluster)
        ref_chat = c.generate(chat_ids, max_tokens=12, mode=mode)
    r = sdk.completions.create(model="target", prompt=PROMPT, max_tokens=24, extra_body={"mode": mode})
    assert r.choices[0].text == ref.text
    assert tok.encode(r.choices[0].text, add_special_tokens=False).ids == ref.token_ids
    assert r.usage.completion_tokens == len(ref.token_ids)
    s = sdk.completions.create(model="target", prompt=PROMPT, max_tokens=24, stream=True, extra_body={"mode": mode})
    assert "".join(ch.choices[0].text for ch in s if ch.choices) == ref.text
    ch = sdk.chat.completions.create(model="target", messages=MESSAGES, max_tokens=12, extra_body={"mode": mode})
    assert ch.choices[0].message.content == ref_chat.text and ch.usage.prompt_tokens == len(chat_ids)


def _target_tokenizer(http_cluster) -> str:
    return str(_engine(http_cluster) / "tokenizer.json")


def _engine(http_cluster) -> Path:
    from cosine import config

    cfg = config.load(http_cluster.cfg_path)
    return cfg.engine_dir(cfg.target_model())


def _chat_ids(http_cluster) -> list[int]:
    """The chat prompt as transformers renders it (an independent implementation)."""
    from transformers import PreTrainedTokenizerFast

    eng = _engine(http_cluster)
    t = PreTrainedTokenizerFast(tokenizer_file=str(eng / "tokenizer.json"), bos_token="<bos>", eos_token="<eos>")
    t.chat_template = (eng / "chat_template.jinja").read_text()
    return list(t.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False))


def test_errors_are_the_sdks_exception_types(sdk, http_cluster):
    with pytest.raises(openai.BadRequestError, match="n must be 1") as e:
        sdk.completions.create(model="target", prompt=PROMPT, n=2)
    assert e.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError, match="unknown field 'warp'"):
        sdk.completions.create(model="target", prompt=PROMPT, extra_body={"warp": 9})
    with pytest.raises(openai.BadRequestError, match="presence_penalty"):
        sdk.chat.completions.create(model="target", messages=MESSAGES, presence_penalty=0.5)
    with pytest.raises(openai.BadRequestError, match=r"limit is 96 tokens|limits\] max_prompt_tokens"):
        sdk.completions.create(model="target", prompt=[5] * 200)
    with pytest.raises(openai.BadRequestError, match="max_tokens = 100000 is over the server limit 256"):
        sdk.completions.create(model="target", prompt=PROMPT, max_tokens=100_000)
    with pytest.raises(openai.BadRequestError, match="unknown drafter"):  # refused by cosine-serve itself
        sdk.completions.create(model="target", prompt=PROMPT, extra_body={"drafters": ["nobody"]})
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=http_cluster.base + "/v1", api_key="wrong", max_retries=0).models.list()
    assert openai.OpenAI(base_url=http_cluster.base + "/v1", api_key="test-key-2", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError, match="model 'gpt-9' not found"):
        sdk.completions.create(model="gpt-9", prompt=PROMPT)
    with pytest.raises(openai.NotFoundError):
        sdk.get("/no/such/path", cast_to=object)
    with pytest.raises(openai.APIStatusError, match="max_message_bytes") as e:
        sdk.completions.create(model="target", prompt="x" * (1 << 20))
    assert e.value.status_code == 413


def test_langchain_chat_openai_streaming_and_not(http_cluster):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model="target", base_url=http_cluster.base + "/v1", api_key=http_cluster.key, max_tokens=12,
                     temperature=0, max_retries=0)
    msgs = [("system", "Be brief."), ("user", "Say hi")]
    whole = llm.invoke(msgs)
    streamed = "".join(c.content for c in llm.stream(msgs))
    assert whole.content and streamed == whole.content
    assert whole.usage_metadata["output_tokens"] >= 1


def test_curl_streams(http_cluster):
    if not shutil.which("curl"):
        pytest.skip("curl is not installed")
    out = subprocess.run(["curl", "-sN", http_cluster.base + "/v1/chat/completions", "-H",
                          f"Authorization: Bearer {http_cluster.key}", "-H", "Content-Type: application/json", "-d",
                          json.dumps({"model": "target", "messages": MESSAGES, "max_tokens": 8, "stream": True})],
                         capture_output=True, text=True, timeout=60).stdout
    events = [line[len("data: "):] for line in out.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and len(events) >= 3
    assert all(json.loads(e)["object"] == "chat.completion.chunk" for e in events[:-1])


def _readme_blocks() -> dict[str, str]:
    text = (REPO / "README.md").read_text()
    section = text.split("## OpenAI-compatible HTTP API", 1)[1].split("\n## ", 1)[0]
    return {lang: body for lang, body in re.findall(r"```(bash|python)\n(.*?)```", section, re.S)}


def test_readme_examples_run(http_cluster):
    blocks = _readme_blocks()
    assert set(blocks) == {"bash", "python"}
    env = {**os.environ, "COSINE_API_KEY": http_cluster.key}
    fix = lambda s: s.replace("http://127.0.0.1:8000", http_cluster.base).replace("qwen2.5-coder-1.5b", "target")  # noqa: E731
    if shutil.which("curl"):
        r = subprocess.run(["bash", "-c", "set -euo pipefail\n" + fix(blocks["bash"])], capture_output=True,
                           text=True, timeout=120, env=env)
        assert r.returncode == 0, r.stderr
        assert "data: [DONE]" in r.stdout and '"speculation"' in r.stdout
    r = subprocess.run([sys.executable, "-c", fix(blocks["python"])], capture_output=True, text=True, timeout=120,
                       env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()


def _scrape(base: str) -> dict[tuple[str, tuple], float]:
    text = httpx.get(base + "/metrics", timeout=30).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def _total(m: dict, name: str, **labels: str) -> float:
    return sum(v for (n, lab), v in m.items() if n == name and all(dict(lab).get(k) == x for k, x in labels.items()))


def test_metrics_move_by_exactly_what_serve_counts(sdk, http_cluster):
    quiet(http_cluster.endpoint)
    before = _scrape(http_cluster.base)
    rs = [sdk.completions.create(model="target", prompt=PROMPT, max_tokens=10, extra_body={"mode": m}) for m in MODES]
    rs += [sdk.chat.completions.create(model="target", messages=MESSAGES, max_tokens=8, extra_body={"mode": "cosine"})]
    st = quiet(http_cluster.endpoint)
    after = _scrape(http_cluster.base)
    d = lambda name, **lab: _total(after, name, **lab) - _total(before, name, **lab)  # noqa: E731
    figs = [r.model_extra["speculation"] for r in rs]
    assert d("cosine:request_success_total") == len(rs)
    assert d("cosine:generation_tokens_total") == sum(r.usage.completion_tokens for r in rs)
    assert d("cosine:prompt_tokens_total") == sum(r.usage.prompt_tokens for r in rs)
    assert d("cosine:spec_decode_num_draft_tokens_total") == sum(f["num_draft_tokens"] for f in figs)
    assert d("cosine:spec_decode_num_accepted_tokens_total") == sum(f["num_accepted_tokens"] for f in figs)
    assert d("cosine:spec_decode_num_accepted_tokens_per_pos_total") == sum(f["num_accepted_tokens"] for f in figs)
    assert d("cosine:spec_decode_num_trees_total") == sum(f["num_drafts"] for f in figs)
    assert d("cosine:spec_decode_num_draft_tokens_total", mode="autoregressive") == 0
    assert d("cosine:time_to_first_token_seconds_count") == len(rs)
    assert d("cosine:http_requests_total", endpoint="completions", status="200") == len(MODES)
    # and the exposition is serve's own snapshot, number for number
    m = st["metrics"]
    assert _total(after, "cosine:generation_tokens_total") == m["generation_tokens"]
    assert _total(after, "cosine:spec_decode_num_drafts_total") == sum(r["num_drafts"] for r in m["spec_decode"])
    assert _total(after, "cosine:router_picks_total") == sum(m["router_picks"].values())
    assert _total(after, "cosine:kv_cache_usage_perc", worker="verifier-0") == 0.0
    assert _total(after, "cosine:worker_up") == 3 and _total(after, "cosine:serve_up") == 1


def test_client_disconnect_mid_stream_cancels_in_serve(http_cluster):
    st0 = quiet(http_cluster.endpoint)
    body = {"model": "target", "prompt": PROMPT, "max_tokens": 250, "stream": True, "ignore_eos": True,
            "mode": "autoregressive"}
    with httpx.Client(timeout=60) as h:
        with h.stream("POST", http_cluster.base + "/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {http_cluster.key}"}) as resp:
            assert resp.status_code == 200
            next(resp.iter_lines())  # the first event: the request runs in serve
    st = quiet(http_cluster.endpoint)  # the connection is closed: serve must drop the request
    before, after = st0["metrics"]["requests_failed"], st["metrics"]["requests_failed"]
    assert after.get("cancelled", 0) == before.get("cancelled", 0) + 1
    assert st["metrics"]["requests_finished"] == st0["metrics"]["requests_finished"]  # not run to the end
    assert st["metrics"]["generation_tokens"] - st0["metrics"]["generation_tokens"] < 250
    with Client(http_cluster.endpoint, timeout_s=30) as c:  # serve's release calls reach the workers
        end = time.monotonic() + 10
        while True:
            held = {n: w.get("requests_held") for n, w in c.stats()["workers"].items()}
            if set(held.values()) == {0} or time.monotonic() > end:
                break
            time.sleep(0.05)
    assert set(held.values()) == {0}, held


def test_client_gone_before_a_json_answer_cancels_in_serve(http_cluster):
    """Non-streaming: the client gives up (0.15 s) long before 250 tokens are generated."""
    st0 = quiet(http_cluster.endpoint)
    body = {"prompt": PROMPT, "max_tokens": 250, "ignore_eos": True, "mode": "autoregressive"}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(http_cluster.base + "/v1/completions", json=body, timeout=httpx.Timeout(30, read=0.15),
                   headers={"Authorization": f"Bearer {http_cluster.key}"})
    st = quiet(http_cluster.endpoint)
    before, after = st0["metrics"]["requests_failed"], st["metrics"]["requests_failed"]
    assert after.get("cancelled", 0) == before.get("cancelled", 0) + 1
    assert st["metrics"]["requests_finished"] == st0["metrics"]["requests_finished"]
