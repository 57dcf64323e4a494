"""A live worker under bad input: every malformed or invalid message gets an error reply
naming the problem, and the state of the other requests is untouched. Also: capacity,
idle eviction, a missing provider and a bounded fuzz run."""

from __future__ import annotations

import time
import tomllib
from pathlib import Path
from typing import Any, Iterator

import msgpack
import numpy as np
import pytest
import zmq

from cosine.protocol import decode, encode
from cosine.workers.client import WorkerClient, WorkerError, spawn_worker, stop_worker
from cosine.workers.engine import Engine

KEEP_PROMPT = [3, 1, 4, 1, 5, 9, 2, 6]


def endpoint_of(cfg: Path) -> str:
    w = tomllib.loads(cfg.read_text())["workers"][0]
    return f"tcp://{w['host']}:{w['port']}"


@pytest.fixture(scope="module")
def engine_dir(worker_engines: dict[str, Path]) -> Path:
    return worker_engines["llama"]


@pytest.fixture(scope="module")
def manifest(engine_dir: Path) -> Engine:
    return Engine(engine_dir, threads=1)


class Live:
    """A worker process, a well-behaved client holding request 'keeper', and raw DEALERs."""

    def __init__(self, cfg: Path):
        self.cfg = cfg
        self.endpoint = endpoint_of(cfg)
        self.proc = spawn_worker(cfg, "w0")
        self.client = WorkerClient(self.endpoint, timeout_s=20)
        self.ctx = zmq.Context.instance()
        self.client.call("prefill", {"requests": [{"rid": "keeper", "n": len(KEEP_PROMPT) - 1}]},
                         {"tokens": np.array(KEEP_PROMPT[:-1], np.int32)})
        self.expected = self.keeper_draft()

    def keeper_draft(self) -> list[int]:
        """Repeatable: keep rolls the cache back to the prompt first."""
        _, a = self.client.call("draft", {"requests": [{"rid": "keeper", "keep": len(KEEP_PROMPT) - 1, "n_feed": 1,
                                                        "k": 3}]}, {"feed": np.array(KEEP_PROMPT[-1:], np.int32)})
        return a["tokens"].tolist()

    def raw(self) -> zmq.Socket:
        s = self.ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(self.endpoint)
        return s

    def assert_intact(self) -> None:
        assert self.keeper_draft() == self.expected
        s, _ = self.client.call("stats")
        assert s["requests_held"] >= 1

    def close(self) -> int:
        self.client.close()
        return stop_worker(self.proc)


@pytest.fixture(scope="module")
def live(engine_dir: Path, worker_config) -> Iterator[Live]:
    w = Live(worker_config(engine_dir))
    yield w
    assert w.close() == 0, "\n".join(w.proc.output_tail)


def roundtrip(sock: zmq.Socket, frames: list[bytes], timeout_s: float = 10.0) -> dict[str, Any]:
    sock.send_multipart(frames)
    assert sock.poll(int(timeout_s * 1000)), "worker did not answer"
    header, _ = decode(sock.recv_multipart())
    return header


def msg(op: str, seq: int, arrays: dict[str, np.ndarray] | None = None, **fields: Any) -> list[bytes]:
    return encode({"v": 1, "op": op, "seq": seq, **fields}, arrays)


def i32(xs: list[int]) -> np.ndarray:
    return np.asarray(xs, np.int32)


def raw_header(h: dict[str, Any], *frames: bytes) -> list[bytes]:
    return [msgpack.packb(h), *frames]


def bad_cases(V: int, max_pos: int) -> list[tuple[str, list[bytes], str, str]]:
    """(name, frames, expected code, expected words in the message). seq 1 on a fresh socket."""
    two = i32([1, 2]).tobytes()
    return [
        ("garbage header", [b"\xc1\xff not msgpack"], "bad_frame", "msgpack"),
        ("header not a map", [msgpack.packb([1, 2])], "bad_frame", "map"),
        ("frame count", raw_header({"v": 1, "op": "extend", "seq": 1,
                                    "arrays": [{"name": "tokens", "dtype": "int32", "shape": [2]}]}), "bad_frame",
         "frames follow"),
        ("bad dtype", raw_header({"v": 1, "op": "extend", "seq": 1,
                                  "arrays": [{"name": "tokens", "dtype": "object", "shape": [2]}]}, two),
         "bad_frame", "dtype"),
        ("bad shape", raw_header({"v": 1, "op": "extend", "seq": 1,
                                  "arrays": [{"name": "tokens", "dtype": "int32", "shape": [3]}]}, two),
         "bad_frame", "bytes"),
        ("unknown op", msg("explode", 1), "unknown_op", "explode"),
        ("wrong dtype", msg("extend", 1, {"tokens": np.array([1.0, 2.0], np.float32)},
                            requests=[{"rid": "keeper", "n": 2}]), "bad_request", "int32"),
        ("wrong shape", msg("extend", 1, {"tokens": np.ones((1, 2), np.int32)},
                            requests=[{"rid": "keeper", "n": 2}]), "bad_request", "shape"),
        ("token out of range", msg("extend", 1, {"tokens": i32([1, V])}, requests=[{"rid": "keeper", "n": 2}]),
         "bad_request", "token id"),
        ("missing field", msg("extend", 1, {"tokens": i32([1, 2])}, requests=[{"rid": "keeper"}]),
         "bad_request", "'n'"),
        ("unknown rid", msg("extend", 1, {"tokens": i32([1, 2])}, requests=[{"rid": "nobody", "n": 2}]),
         "unknown_request", "nobody"),
        ("batch with one unknown rid", msg("extend", 1, {"tokens": i32([1, 2, 3])},
                                           requests=[{"rid": "keeper", "n": 2}, {"rid": "ghost", "n": 1}]),
         "unknown_request", "ghost"),
        ("duplicate rid in message", msg("rollback", 1, requests=[{"rid": "keeper", "length": 1},
                                                                  {"rid": "keeper", "length": 2}]),
         "bad_request", "twice"),
        ("prefill held rid", msg("prefill", 1, {"tokens": i32([1])}, requests=[{"rid": "keeper", "n": 1}]),
         "duplicate_request", "keeper"),
        ("tree cycle", msg("verify", 1, {"tokens": i32([1, 2, 3]), "parents": i32([-1, 2, 1])},
                           requests=[{"rid": "keeper", "n": 3}]), "bad_request", "node 1 has parent 2"),
        ("tree parent out of range", msg("verify", 1, {"tokens": i32([1, 2]), "parents": i32([-1, 7])},
                                         requests=[{"rid": "keeper", "n": 2}]), "bad_request", "parent 7"),
        ("tree without root", msg("verify", 1, {"tokens": i32([1, 2]), "parents": i32([0, 0])},
                                  requests=[{"rid": "keeper", "n": 2}]), "bad_request", "root"),
        ("rollback past length", msg("rollback", 1, requests=[{"rid": "keeper", "length": 10_000}]),
         "bad_request", "length"),
        ("prompt over context", msg("prefill", 1, {"tokens": np.zeros(max_pos + 1, np.int32)},
                                    requests=[{"rid": "huge", "n": max_pos + 1}]), "too_long", "context"),
        ("extend over context", msg("extend", 1, {"tokens": np.zeros(max_pos, np.int32)},
                                    requests=[{"rid": "keeper", "n": max_pos}]), "too_long", "context"),
        ("draft too many steps", msg("draft", 1, {"feed": i32([1])},
                                     requests=[{"rid": "keeper", "n_feed": 1, "k": 100_000}]), "bad_request", "k must"),
        ("wrong version", encode({"v": 2, "op": "health", "seq": 1}), "version", "version 2"),
        ("missing seq", encode({"v": 1, "op": "health"}), "bad_request", "seq"),
        ("bad temperature", msg("draft", 1, {"feed": i32([1])},
                                requests=[{"rid": "keeper", "n_feed": 1, "k": 1, "temperature": -1.0}]),
         "bad_request", "temperature"),
        ("forced wrong length", msg("draft", 1, {"feed": i32([1])},
                                    requests=[{"rid": "keeper", "n_feed": 1, "k": 2, "forced": [1]}]),
         "bad_request", "forced"),
        ("bad return", msg("verify", 1, {"tokens": i32([1]), "parents": i32([-1])},
                           requests=[{"rid": "keeper", "n": 1}], **{"return": "everything"}), "bad_request", "return"),
        ("unknown field", msg("extend", 1, {"tokens": i32([1])}, requests=[{"rid": "keeper", "n": 1, "nn": 1}]),
         "bad_request", "nn"),
    ]


def test_bad_input_gets_named_error_and_state_is_intact(live: Live, manifest: Engine) -> None:
    good = live.raw()  # a concurrent well-formed client on its own connection
    good_seq = 0
    for name, frames, code, words in bad_cases(manifest.vocab_size, manifest.max_positions):
        sock = live.raw()
        sock.send_multipart(frames)
        good_seq += 1
        h_good = roundtrip(good, msg("draft", good_seq, {"feed": i32(KEEP_PROMPT[-1:])},
                                     requests=[{"rid": "keeper", "keep": len(KEEP_PROMPT) - 1, "n_feed": 1, "k": 3}]))
        assert sock.poll(10_000), name
        h, _ = decode(sock.recv_multipart())
        sock.close(0)
        assert h["ok"] is False, name
        assert h["error"]["code"] == code, (name, h["error"])
        assert words.lower() in h["error"]["message"].lower(), (name, h["error"])
        assert h_good["ok"], (name, h_good)
        live.assert_intact()
    good.close(0)
    s, _ = live.client.call("stats")
    assert s["requests_held"] == 1  # nothing admitted by a failed message


def test_duplicate_seq_and_released_rid(live: Live) -> None:
    sock = live.raw()
    assert roundtrip(sock, msg("health", 5))["ok"]
    for seq in (5, 4):
        h = roundtrip(sock, msg("health", seq))
        assert h["error"]["code"] == "duplicate_seq" and h["seq"] == seq
    assert roundtrip(sock, msg("health", 6))["ok"]
    other = live.raw()  # seq is per connection
    assert roundtrip(other, msg("health", 1))["ok"]

    assert roundtrip(sock, msg("prefill", 7, {"tokens": i32([1, 2])}, requests=[{"rid": "tmp", "n": 2}]))["ok"]
    h = roundtrip(sock, msg("release", 8, rids=["tmp", "never"]))
    assert h["released"] == ["tmp"] and h["unknown"] == ["never"]
    h = roundtrip(sock, msg("extend", 9, {"tokens": i32([1])}, requests=[{"rid": "tmp", "n": 1}]))
    assert h["error"]["code"] == "unknown_request" and "tmp" in h["error"]["message"]
    sock.close(0)
    other.close(0)
    live.assert_intact()


def _mutations(rng: np.random.Generator, V: int) -> list[list[bytes]]:
    """Valid-looking messages of every op, then corrupted in random ways."""
    rids = ["f0", "f1", "f2", "keeper-not"]

    def rand_value() -> Any:
        return [None, -1, 0, 1, 3, 2**40, -2**63, 1.5, float("nan"), "x", "", [], [0], [-1, 0], {}, {"a": 1}, True,
                b"\x00"][int(rng.integers(0, 18))]

    def base() -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        op = ["prefill", "draft", "extend", "rollback", "verify", "commit", "release", "health", "stats",
              "nope"][int(rng.integers(0, 10))]
        rid = rids[int(rng.integers(0, len(rids)))]
        n = int(rng.integers(0, 4))
        toks = rng.integers(-1, V + 1, n).astype(np.int32)
        reqs = {"prefill": [{"rid": rid, "n": n}], "extend": [{"rid": rid, "n": n}],
                "draft": [{"rid": rid, "n_feed": n, "k": int(rng.integers(0, 4)), "topk": int(rng.integers(0, 3)),
                           "temperature": float(rng.choice([0.0, 1.0])), "seed": 1}],
                "rollback": [{"rid": rid, "length": int(rng.integers(-1, 5))}],
                "verify": [{"rid": rid, "n": n}], "commit": [{"rid": rid, "nodes": [0, 1][:n]}]}.get(op)
        h: dict[str, Any] = {"op": op}
        arrs: dict[str, np.ndarray] = {}
        if reqs is not None:
            h["requests"] = reqs
        if op in ("prefill", "extend", "verify"):
            arrs["tokens"] = toks
        if op == "verify":
            arrs["parents"] = np.array([-1] + [int(rng.integers(-1, max(1, i))) for i in range(1, n)], np.int32)[:n]
        if op == "draft":
            arrs["feed"] = toks
        if op == "release":
            h["rids"] = [rid]
        return h, arrs

    out = []
    for _ in range(300):
        h, arrs = base()
        kind = int(rng.integers(0, 8))
        if kind == 1 and h.get("requests"):  # a field gets a random value
            key = list(h["requests"][0])[int(rng.integers(0, len(h["requests"][0])))]
            h["requests"][0][key] = rand_value()
        elif kind == 2:
            h[["op", "requests", "rids", "return", "v", "arrays"][int(rng.integers(0, 6))]] = rand_value()
        elif kind == 3 and arrs:  # wrong dtype / shape
            name = next(iter(arrs))
            arrs[name] = arrs[name].astype([np.float32, np.int64, np.int8, np.bool_][int(rng.integers(0, 4))])
            if rng.random() < 0.5:
                arrs[name] = arrs[name].reshape(1, -1)
        h.setdefault("v", 1)
        try:
            frames = encode({**h, "seq": 0}, arrs)
        except (ValueError, TypeError):
            frames = [msgpack.packb({"v": 1, "op": "health", "seq": 0})]
        if kind == 4:  # byte flips in the header
            b = bytearray(frames[0])
            for _ in range(int(rng.integers(1, 4))):
                b[int(rng.integers(0, len(b)))] = int(rng.integers(0, 256))
            frames[0] = bytes(b)
        elif kind == 5:  # drop, add or truncate frames
            choice = int(rng.integers(0, 3))
            if choice == 0 and len(frames) > 1:
                frames = frames[:-1]
            elif choice == 1:
                frames = [*frames, bytes(rng.integers(0, 256, 8, dtype=np.uint8))]
            elif len(frames) > 1:
                frames[-1] = bytes(frames[-1])[:-1]
        elif kind == 6:  # random bytes
            frames = [bytes(rng.integers(0, 256, int(rng.integers(0, 40)), dtype=np.uint8))
                      for _ in range(int(rng.integers(1, 4)))]
        elif kind == 7:  # header truncated
            frames[0] = bytes(frames[0])[:int(rng.integers(0, len(frames[0])))]
        out.append([bytes(f) for f in frames])
    return out


def _with_seq(frames: list[bytes], seq: int) -> list[bytes]:
    """Put a fresh seq into a message whose header still decodes (keeps them mostly unique)."""
    try:
        h = msgpack.unpackb(frames[0], raw=False, strict_map_key=True)
    except Exception:
        return frames
    if isinstance(h, dict) and isinstance(h.get("seq"), int):
        h["seq"] = seq
        return [msgpack.packb(h, use_bin_type=True), *frames[1:]]
    return frames


def test_fuzz_300_messages(live: Live, manifest: Engine) -> None:
    rng = np.random.default_rng(20240601)
    sock = live.raw()
    codes: dict[str, int] = {}
    for i, frames in enumerate(_mutations(rng, manifest.vocab_size), start=1):
        sock.send_multipart(_with_seq(frames, i))
        assert sock.poll(10_000), f"no reply to fuzz message {i}: {frames!r}"
        h, _ = decode(sock.recv_multipart())
        key = "ok" if h["ok"] else h["error"]["code"]
        codes[key] = codes.get(key, 0) + 1
        assert h["ok"] or h["error"]["code"] != "internal", (i, frames, h)
    sock.close(0)
    assert live.proc.poll() is None
    health, _ = live.client.call("health")
    assert health["name"] == "w0"
    live.assert_intact()
    print("fuzz reply codes:", codes)
    assert len(codes) >= 5, codes  # the fuzz reached many different checks


def test_capacity_admission(engine_dir: Path, worker_config) -> None:
    w = Live(worker_config(engine_dir, kv_budget_tokens=40))  # keeper holds 9 tokens after its draft
    try:
        s0, _ = w.client.call("stats")
        with pytest.raises(WorkerError) as e:  # the pair does not fit, so neither is admitted
            w.client.call("prefill", {"requests": [{"rid": "a", "n": 10}, {"rid": "b", "n": 25}]},
                          {"tokens": np.ones(35, np.int32)})
        assert e.value.code == "capacity" and "budget" in e.value.message
        s1, _ = w.client.call("stats")
        assert (s1["requests_held"], s1["cache_tokens_used"]) == (s0["requests_held"], s0["cache_tokens_used"])
        w.client.call("prefill", {"requests": [{"rid": "a", "n": 25}]}, {"tokens": np.ones(25, np.int32)})
        with pytest.raises(WorkerError) as e:  # growth is checked too
            w.client.call("extend", {"requests": [{"rid": "a", "n": 10}]}, {"tokens": np.ones(10, np.int32)})
        assert e.value.code == "capacity"
        with pytest.raises(WorkerError) as e:  # and a tree that would not fit
            w.client.call("verify", {"requests": [{"rid": "a", "n": 8}]},
                          {"tokens": np.ones(8, np.int32), "parents": np.arange(-1, 7, dtype=np.int32)})
        assert e.value.code == "capacity"
        h, _ = w.client.call("extend", {"requests": [{"rid": "a", "n": 0}]}, {"tokens": np.ones(0, np.int32)})
        assert h["requests"][0]["length"] == 25
        w.assert_intact()
        w.client.call("release", {"rids": ["a"]})
        w.client.call("prefill", {"requests": [{"rid": "b", "n": 25}]}, {"tokens": np.ones(25, np.int32)})
    finally:
        assert w.close() == 0


def test_idle_requests_are_freed(engine_dir: Path, worker_config) -> None:
    cfg = worker_config(engine_dir, idle_timeout_s=0.4)
    proc = spawn_worker(cfg, "w0")
    try:
        with WorkerClient(endpoint_of(cfg), timeout_s=10) as c:
            c.call("prefill", {"requests": [{"rid": "sleepy", "n": 3}]}, {"tokens": np.ones(3, np.int32)})
            deadline = time.monotonic() + 10  # the sweep runs every idle_timeout_s / 4: wait for it, bounded
            while c.call("stats")[0]["freed_idle"] == 0:
                assert time.monotonic() < deadline, "the idle request was not freed within 10 s"
                time.sleep(0.05)
            with pytest.raises(WorkerError) as e:
                c.call("extend", {"requests": [{"rid": "sleepy", "n": 1}]}, {"tokens": np.ones(1, np.int32)})
            assert e.value.code == "unknown_request"
            s, _ = c.call("stats")
            assert s["freed_idle"] == 1 and s["requests_held"] == 0 and s["cache_tokens_used"] == 0
    finally:
        assert stop_worker(proc) == 0
    log = "\n".join(proc.output_tail)
    assert "WARNING" in log and "'sleepy'" in log and "idle" in log


def test_missing_provider_fails_at_startup(engine_dir: Path, worker_config) -> None:
    cfg = worker_config(engine_dir, provider="cuda", device="cuda:0")
    with pytest.raises(RuntimeError) as e:
        spawn_worker(cfg, "w0", timeout_s=60)
    msg_ = str(e.value)
    assert "exited with code 3" in msg_ and "CUDAExecutionProvider" in msg_ and "not available" in msg_


def test_unknown_worker_name_fails_at_startup(engine_dir: Path, worker_config) -> None:
    with pytest.raises(RuntimeError, match="no worker named 'nope'"):
        spawn_worker(worker_config(engine_dir), "nope", timeout_s=30)


def test_engine_failure_is_internal_and_worker_keeps_serving(engine_dir: Path, worker_config,
                                                             tmp_path: Path) -> None:
    """A real fault: the manifest claims a longer context than the graph's rotary table, so
    a position past the real table passes validation and the ONNX Runtime run fails."""
    import json
    import shutil

    broken = tmp_path / "engine"
    shutil.copytree(engine_dir, broken)
    m = json.loads((broken / "manifest.json").read_text())
    real = m["max_positions"]
    m["max_positions"] = real + 1000
    (broken / "manifest.json").write_text(json.dumps(m))
    w = Live(worker_config(broken))
    try:
        with pytest.raises(WorkerError) as e:
            w.client.call("prefill", {"requests": [{"rid": "long", "n": real + 10}]}, {"tokens": i32([3] * (real + 10))})
        assert e.value.code == "internal"
        w.assert_intact()
        s, _ = w.client.call("stats")
        assert s["errors"]["prefill"] == 1 and s["requests_held"] == 1  # the failed prefill left nothing behind
    finally:
        assert w.close() == 0
    assert "Traceback" in "\n".join(w.proc.output_tail)


def test_worker_pins_itself_to_its_cpus(engine_dir: Path, worker_config) -> None:
    """`cpus = [...]` pins the worker process (and sizes its thread pool); a core the
    process may not use is refused at start-up with the allowed list."""
    import os

    proc = spawn_worker(worker_config(engine_dir, cpus=[0], threads=0), "w0")
    try:
        assert os.sched_getaffinity(proc.pid) == {0}
        assert any("pinned to cpus [0]" in line for line in proc.output_tail)
    finally:
        stop_worker(proc)
    with pytest.raises(RuntimeError, match=r"cores \[4096\] this process may not use"):
        spawn_worker(worker_config(engine_dir, cpus=[0, 4096]), "w0", timeout_s=30)
