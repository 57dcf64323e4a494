"""Bad input to cosine-http, fuzzed: random JSON, wrong types, huge numbers, deep nesting,
invalid UTF-8, slow clients. Each gets a 4xx in OpenAI's error shape, never a 5xx, and a
well-behaved client's requests keep completing with the same greedy output meanwhile."""

from __future__ import annotations

import json
import socket
import threading
import time
from urllib.parse import urlparse

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cosine.gateway.requests import CHAT_FIELDS, COMPLETION_FIELDS

PROMPT = [5, 17, 12, 8, 9]
ENDPOINTS = ("/v1/completions", "/v1/chat/completions")

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12)
field_names = st.sampled_from(sorted(COMPLETION_FIELDS | CHAT_FIELDS)) | st.text(max_size=12)
bodies = st.dictionaries(field_names, json_values, max_size=6)


class GoodClient:
    """Sends a known greedy request in a loop while the fuzzing runs; records failures."""

    def __init__(self, base: str, key: str):
        self.base, self.key = base, key
        self.stop, self.done, self.errors = threading.Event(), 0, []
        self.ref = self._one()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _one(self) -> str:
        r = httpx.post(self.base + "/v1/completions", timeout=60, headers={"Authorization": f"Bearer {self.key}"},
                       json={"prompt": PROMPT, "max_tokens": 12, "mode": "cosine"})
        if r.status_code != 200:
            raise AssertionError(f"good request got {r.status_code}: {r.text}")
        return r.json()["choices"][0]["text"]

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                text = self._one()
                if text != self.ref:
                    self.errors.append(f"output changed: {text!r} != {self.ref!r}")
                self.done += 1
            except Exception as e:  # noqa: BLE001 - recorded, asserted by the test
                self.errors.append(repr(e))

    def __enter__(self) -> "GoodClient":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(60)


@pytest.fixture(scope="module")
def http(http_cluster):
    with httpx.Client(base_url=http_cluster.base, timeout=60,
                      headers={"Authorization": f"Bearer {http_cluster.key}"}) as h:
        yield h


def check_4xx(r: httpx.Response) -> None:
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    err = r.json()["error"]
    assert isinstance(err["message"], str) and err["message"] and {"type", "param", "code"} <= set(err)


def check_ok_or_4xx(r: httpx.Response) -> None:
    if r.status_code != 200:
        check_4xx(r)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=bodies, path=st.sampled_from(ENDPOINTS))
def test_random_json_bodies(http, body, path):
    body.setdefault("max_tokens", 4)  # a random body that happens to be valid stays cheap
    check_ok_or_4xx(http.post(path, json=body))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(sorted(COMPLETION_FIELDS | CHAT_FIELDS)), value=json_values,
       path=st.sampled_from(ENDPOINTS))
def test_each_field_with_random_values(http, field, value, path):
    body = {"prompt": PROMPT} if path == ENDPOINTS[0] else {"messages": [{"role": "user", "content": "hi"}]}
    body.update({"max_tokens": 4, field: value})
    if field == "max_tokens" and type(value) is int and value > 16:
        body[field] = 16 if value < 10 ** 6 else value  # valid ones stay short; huge ones stay huge
    check_ok_or_4xx(http.post(path, json=body))


def test_malformed_bodies_are_400_and_good_clients_keep_completing(http, http_cluster):
    deep = "[" * 100_000 + "]" * 100_000
    raw = [b"", b"{", b"null", b"[]", b'"text"', b"\xff\xfe\xfa{}", b'{"prompt": "\xc3\x28"}', deep.encode(),
           b'{"prompt": [1, 2], "max_tokens": 1' + b"9" * 5000 + b"}", b'{"prompt": "a", "temperature": NaN}',
           b'{"prompt": "a", "temperature": 1e999}', b'{"prompt": "a", "max_tokens": 1e400}',
           json.dumps({"prompt": [2 ** 40]}).encode(), json.dumps({"prompt": [[1, 2], [3]]}).encode(),
           json.dumps({"messages": [{"role": "tool", "content": "x"}]}).encode(),
           json.dumps({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]}).encode(),
           json.dumps({"prompt": "a", "seed": -1}).encode(), json.dumps({"prompt": "a", "stop": [""]}).encode()]
    with GoodClient(http_cluster.base, http_cluster.key) as good:
        for body in raw:
            for path in ENDPOINTS:
                check_4xx(http.post(path, content=body, headers={"Content-Type": "application/json"}))
        check_4xx(http.post("/v1/completions", content=b"x" * ((1 << 20) + 1)))  # 413
        check_4xx(http.get("/v1/completions"))  # 405
        check_4xx(http.post("/v1/nothing", json={}))  # 404
        end = time.monotonic() + 60
        while good.done < 3 and time.monotonic() < end and not good.errors:
            time.sleep(0.05)
    assert not good.errors and good.done >= 3


def _raw(base: str) -> socket.socket:
    u = urlparse(base)
    return socket.create_connection((u.hostname, u.port), timeout=30)


def test_slow_loris_gets_408_and_others_keep_completing(http_cluster):
    """One client dribbles its body, another never finishes its headers; both hold their
    connections while a good client completes requests; the dribbler gets 408 after
    [http] body_timeout_s (3 s here)."""
    body = json.dumps({"prompt": PROMPT, "max_tokens": 4}).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {http_cluster.key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    slow_body, slow_head = _raw(http_cluster.base), _raw(http_cluster.base)
    try:
        slow_body.sendall(head)
        slow_head.sendall(head[:20])
        t0 = time.monotonic()
        with GoodClient(http_cluster.base, http_cluster.key) as good:
            reply = b""
            for b in body:  # one byte every 0.2 s: 3 s pass long before the body is complete
                try:
                    slow_body.sendall(bytes([b]))
                except OSError:
                    break
                slow_body.settimeout(0.2)
                try:
                    reply += slow_body.recv(65536)
                    break
                except socket.timeout:
                    continue
            slow_body.settimeout(30)
            while b"\r\n\r\n" not in reply:
                chunk = slow_body.recv(65536)
                if not chunk:
                    break
                reply += chunk
            end = time.monotonic() + 60
            while good.done < 3 and time.monotonic() < end and not good.errors:
                time.sleep(0.05)
        assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
        assert 2.5 < time.monotonic() - t0 < 30
        assert not good.errors and good.done >= 3
    finally:
        slow_body.close()
        slow_head.close()
