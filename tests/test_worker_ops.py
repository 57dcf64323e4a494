"""Worker ops against a live worker process, checked against full recomputes of the
same engine in-process (Engine.forward with no cache)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from cosine.tree import path_to
from cosine.workers.client import WorkerClient, WorkerError, spawn_worker, stop_worker
from cosine.workers.engine import Engine


@pytest.fixture(scope="module", params=["llama", "qwen2", "gpt2"])
def engine_dir(request: pytest.FixtureRequest, worker_engines: dict[str, Path]) -> Path:
    return worker_engines[request.param]


@pytest.fixture(scope="module")
def engine(engine_dir: Path) -> Engine:
    return Engine(engine_dir, threads=1)


@pytest.fixture(scope="module")
def client(engine_dir: Path, worker_config) -> Iterator[WorkerClient]:
    # max_batch 2 so the 3-request messages below also exercise splitting.
    cfg = worker_config(engine_dir, max_batch=2)
    proc = spawn_worker(cfg, "w0")
    import tomllib
    port = tomllib.loads(cfg.read_text())["workers"][0]["port"]
    c = WorkerClient(f"tcp://127.0.0.1:{port}", timeout_s=30)
    yield c
    c.close()
    assert stop_worker(proc) == 0, "\n".join(proc.output_tail)


def ref_logits(engine: Engine, tokens: list[int]) -> np.ndarray:
    """Logits at every position of ``tokens``, computed with no cache at all."""
    t = len(tokens)
    logits, _, _ = engine.forward(np.array([tokens]), np.arange(t)[None], np.tril(np.ones((t, t), bool))[None, None],
                                  engine.empty_past())
    return logits[0]


def ref_greedy(engine: Engine, tokens: list[int], k: int) -> list[int]:
    seq = list(tokens)
    for _ in range(k):
        seq.append(int(np.argmax(ref_logits(engine, seq)[-1])))
    return seq[len(tokens):]


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def i32(xs: list[int]) -> np.ndarray:
    return np.asarray(xs, np.int32)


def prefill(c: WorkerClient, prompts: dict[str, list[int]]) -> None:
    """Prefill by the system convention: the cache gets prompt[:-1]."""
    reqs = [{"rid": r, "n": len(p) - 1} for r, p in prompts.items()]
    h, _ = c.call("prefill", {"requests": reqs}, {"tokens": i32(sum((p[:-1] for p in prompts.values()), []))})
    assert [r["length"] for r in h["requests"]] == [len(p) - 1 for p in prompts.values()]


def release(c: WorkerClient, *rids: str) -> None:
    c.call("release", {"rids": list(rids)})


@pytest.fixture(scope="module")
def V(engine: Engine) -> int:
    return engine.vocab_size


def prompt(rng: np.random.Generator, n: int, V: int) -> list[int]:
    return [int(x) for x in rng.integers(0, V, n)]


def test_health_and_stats(client: WorkerClient, engine: Engine) -> None:
    h, _ = client.call("health")
    assert h["name"] == "w0" and h["provider"] == "cpu" and h["protocol"] == 1
    assert h["engine"]["vocab_size"] == engine.vocab_size
    s, _ = client.call("stats")
    assert s["cache_tokens_budget"] == 65536 and "health" in s["steps"]


def test_draft_greedy_matches_stepwise_decoding(client: WorkerClient, engine: Engine, V: int) -> None:
    rng = np.random.default_rng(1)
    # g3 has a one-token prompt: an empty prefill, everything comes through `feed`
    prompts = {"g0": prompt(rng, 3, V), "g1": prompt(rng, 9, V), "g2": prompt(rng, 6, V), "g3": prompt(rng, 1, V)}
    ks = {"g0": 5, "g1": 2, "g2": 4, "g3": 3}
    prefill(client, prompts)
    reqs = [{"rid": r, "n_feed": 1, "k": ks[r], "topk": 3, "temperature": 0.0} for r in prompts]
    h, a = client.call("draft", {"requests": reqs}, {"feed": i32([p[-1] for p in prompts.values()])})
    row = 0
    for r, p in prompts.items():
        want = ref_greedy(engine, p, ks[r])
        got = a["tokens"][row:row + ks[r]].tolist()
        assert got == want, r
        # reported probabilities are the softmax of the same logits
        ref = ref_logits(engine, p + want)
        for j in range(ks[r]):
            q = np.exp(log_softmax(ref[len(p) - 1 + j]))
            np.testing.assert_allclose(a["token_probs"][row + j], q[want[j]], atol=1e-5)
            assert a["topk_ids"][row + j, 0] == want[j]
            np.testing.assert_allclose(a["topk_probs"][row + j], np.sort(q)[::-1][:3], atol=1e-5)
        row += ks[r]
    assert [x["length"] for x in h["requests"]] == [len(p) + ks[r] - 1 for r, p in prompts.items()]
    assert a["topk_ids"].shape == (sum(ks.values()), 3) and "probs" not in a

    # continuing: the cache now lacks the last drafted token, which is fed next
    h, a2 = client.call("draft", {"requests": [{"rid": "g0", "n_feed": 1, "k": 2, "topk": 0}]},
                        {"feed": i32([a["tokens"][4]])})
    full = prompts["g0"] + a["tokens"][:5].tolist()
    assert a2["tokens"].tolist() == ref_greedy(engine, full, 2)
    assert a2["topk_ids"].shape == (2, 0)
    release(client, *prompts)


def test_verify_tree_logprobs_match_separate_paths(client: WorkerClient, engine: Engine, V: int) -> None:
    rng = np.random.default_rng(2)
    prompts = {"v0": prompt(rng, 2, V), "v1": prompt(rng, 11, V), "v2": prompt(rng, 6, V)}
    sizes = {"v0": 1, "v1": 9, "v2": 6}
    prefill(client, prompts)
    trees = {}
    for r, p in prompts.items():
        n = sizes[r]
        parents = [-1] + [int(rng.integers(0, i)) for i in range(1, n)]
        tokens = [p[-1]] + prompt(rng, n - 1, V)
        trees[r] = (tokens, parents)
    h, a = client.call("verify", {"requests": [{"rid": r, "n": sizes[r]} for r in prompts], "return": "logits"},
                       {"tokens": i32(sum((t for t, _ in trees.values()), [])),
                        "parents": i32(sum((p for _, p in trees.values()), []))})
    assert [x["length"] for x in h["requests"]] == [len(p) - 1 for p in prompts.values()]
    row = 0
    for r, p in prompts.items():
        tokens, parents = trees[r]
        for u in range(len(tokens)):
            path = [tokens[i] for i in path_to(np.array(parents), u)]
            want = log_softmax(ref_logits(engine, p[:-1] + path)[-1])
            np.testing.assert_allclose(log_softmax(a["logits"][row + u]), want, atol=1e-4, err_msg=f"{r} node {u}")
            assert a["argmax"][row + u] == np.argmax(want)
        row += len(tokens)
    s, _ = client.call("stats")
    assert s["cache_tokens_used"] == sum(len(p) - 1 + sizes[r] for r, p in prompts.items())  # trees are pending
    release(client, *prompts)


def chain_tree(rng: np.random.Generator, root: int, V: int) -> tuple[list[int], list[int]]:
    """A 7-node tree with two branches off the root and a fork lower down."""
    parents = [-1, 0, 1, 2, 0, 4, 2]
    return [root] + prompt(rng, 6, V), parents


def test_commit_then_next_step_equals_cache_of_accepted_tokens(client: WorkerClient, engine: Engine, V: int) -> None:
    rng = np.random.default_rng(3)
    p = prompt(rng, 8, V)
    prefill(client, {"c0": p, "c1": p})
    tokens, parents = chain_tree(rng, p[-1], V)
    for rid in ("c0", "c1"):
        client.call("verify", {"requests": [{"rid": rid, "n": 7}]}, {"tokens": i32(tokens), "parents": i32(parents)})
    accepted = [0, 1, 2, 6]  # root, then down the first branch and its fork
    acc_tokens = [tokens[i] for i in accepted]
    bonus = int(rng.integers(0, V))
    next_tokens, next_parents = [bonus, 5, 7], [-1, 0, 0]

    # c0: separate commit, then verify; c1: commit inline in the next verify
    h, _ = client.call("commit", {"requests": [{"rid": "c0", "nodes": accepted}]})
    assert h["requests"][0]["length"] == len(p) - 1 + 4
    h, a0 = client.call("verify", {"requests": [{"rid": "c0", "n": 3}], "return": "logits"},
                        {"tokens": i32(next_tokens), "parents": i32(next_parents)})
    h, a1 = client.call("verify", {"requests": [{"rid": "c1", "n": 3, "commit": accepted}], "return": "logits"},
                        {"tokens": i32(next_tokens), "parents": i32(next_parents)})
    assert h["requests"][0]["length"] == len(p) - 1 + 4
    # a fresh request whose cache holds only the accepted tokens
    prefill(client, {"c2": p[:-1] + acc_tokens + [bonus]})
    h, a2 = client.call("verify", {"requests": [{"rid": "c2", "n": 3}], "return": "logits"},
                        {"tokens": i32(next_tokens), "parents": i32(next_parents)})
    ref = ref_logits(engine, p[:-1] + acc_tokens + [bonus])[-1]
    for a in (a0, a1, a2):
        np.testing.assert_allclose(log_softmax(a["logits"][0]), log_softmax(ref), atol=1e-4)
    np.testing.assert_allclose(a0["logits"], a2["logits"], atol=1e-4)
    np.testing.assert_allclose(a1["logits"], a2["logits"], atol=1e-4)

    # a path that does not follow parent links, and commit without a pending tree
    with pytest.raises(WorkerError) as e:
        client.call("commit", {"requests": [{"rid": "c0", "nodes": [0, 1, 2]}]})
    assert e.value.code == "bad_request" and "not a child" in e.value.message
    client.call("commit", {"requests": [{"rid": "c0", "nodes": [0]}]})
    with pytest.raises(WorkerError, match="without a pending"):
        client.call("commit", {"requests": [{"rid": "c0", "nodes": [0]}]})
    release(client, "c0", "c1", "c2")


def test_extend_rollback_keep_and_forced(client: WorkerClient, engine: Engine, V: int) -> None:
    rng = np.random.default_rng(4)
    p = prompt(rng, 12, V)
    prefill(client, {"e0": p[:6]})  # cache: p[:5]
    h, _ = client.call("extend", {"requests": [{"rid": "e0", "n": 4}]}, {"tokens": i32(p[5:9])})
    assert h["requests"][0]["length"] == 9
    h, _ = client.call("rollback", {"requests": [{"rid": "e0", "length": 7}]})
    assert h["requests"][0]["length"] == 7
    _, a = client.call("draft", {"requests": [{"rid": "e0", "n_feed": 1, "k": 3}]}, {"feed": i32([p[7]])})
    assert a["tokens"].tolist() == ref_greedy(engine, p[:8], 3)

    # keep: roll back to 4 and feed two tokens in the same op
    h, a = client.call("draft", {"requests": [{"rid": "e0", "keep": 4, "n_feed": 2, "k": 3}]}, {"feed": i32(p[4:6])})
    assert a["tokens"].tolist() == ref_greedy(engine, p[:6], 3)
    assert h["requests"][0]["length"] == 4 + 2 + 3 - 1

    # forced: step 2 takes a given token; its probability is still the drafter's
    forced_tok = int(rng.integers(0, V))
    h, a = client.call("draft", {"requests": [{"rid": "e0", "keep": 4, "n_feed": 2, "k": 3,
                                               "forced": [-1, forced_tok, -1]}]}, {"feed": i32(p[4:6])})
    first = ref_greedy(engine, p[:6], 1)[0]
    assert a["tokens"].tolist() == [first, forced_tok, ref_greedy(engine, p[:6] + [first, forced_tok], 1)[0]]
    q = np.exp(log_softmax(ref_logits(engine, p[:6] + [first])[-1]))
    np.testing.assert_allclose(a["token_probs"][1], q[forced_tok], atol=1e-5)
    release(client, "e0")


def test_forced_runs_match_step_by_step(client: WorkerClient, engine: Engine, V: int) -> None:
    """Consecutive forced steps go through one forward (guided drafting); every step still
    reports the drafter's own choice (topk) and its probability of the forced token, and
    the cache ends up holding exactly the chosen tokens."""
    rng = np.random.default_rng(7)
    p = prompt(rng, 8, V)
    prefill(client, {"g0": p, "g1": p})
    guide = [int(t) for t in rng.integers(0, V, 6)]
    patterns = {"g0": guide[:3] + [-1], "g1": [-1, guide[3], guide[4], -1, guide[5], -1]}
    reqs = [{"rid": rid, "n_feed": 1, "k": len(f), "topk": 1, "forced": f} for rid, f in patterns.items()]
    h, a = client.call("draft", {"requests": reqs}, {"feed": i32([p[-1], p[-1]])})
    off = 0
    for rid, f in patterns.items():
        seq = list(p)
        for step, want in enumerate(f):
            ref = ref_logits(engine, seq)[-1]
            own = int(np.argmax(ref))
            tok = own if want < 0 else want
            q = np.exp(log_softmax(ref))
            assert int(a["tokens"][off + step]) == tok, (rid, step)
            assert int(a["topk_ids"][off + step, 0]) == own, (rid, step)
            np.testing.assert_allclose(a["token_probs"][off + step], q[tok], atol=1e-5)
            seq.append(tok)
        off += len(f)
    lengths = {r["rid"]: r["length"] for r in h["requests"]}
    assert lengths == {rid: len(p) + len(f) - 1 for rid, f in patterns.items()}
    # the cache holds the chosen tokens: the next op continues from them
    _, b = client.call("draft", {"requests": [{"rid": "g0", "n_feed": 1, "k": 2}]}, {"feed": i32([a["tokens"][3]])})
    assert b["tokens"].tolist() == ref_greedy(engine, p + a["tokens"][:4].tolist(), 2)
    release(client, "g0", "g1")


def test_chains_stop_early_below_min_reach(client: WorkerClient, engine: Engine, V: int) -> None:
    """A greedy chain ends after the step where the product of its tokens' probabilities
    falls below min_reach: the tokens up to there are the full chain's, the rest are -1,
    the reply's k is the steps drafted, and the cache holds all but the last (the caller's
    convention), so the next op continues exactly."""
    rng = np.random.default_rng(11)
    p = prompt(rng, 8, V)
    prefill(client, {"m0": p, "m1": p})
    full = ref_greedy(engine, p, 6)
    probs, seq = [], list(p)
    for t in full:
        probs.append(float(np.exp(log_softmax(ref_logits(engine, seq)[-1]))[t]))
        seq.append(t)
    reach = np.cumprod(probs)
    stop = 2  # end after the third step: its reach is below the threshold, earlier ones are not
    mins = [0.0] * 6
    mins[stop] = float(reach[stop]) * 1.0001
    reqs = [{"rid": "m0", "n_feed": 1, "k": 6, "topk": 1, "min_reach": mins},
            {"rid": "m1", "n_feed": 1, "k": 6, "topk": 1, "min_reach": [0.0] * 6}]
    h, a = client.call("draft", {"requests": reqs}, {"feed": i32([p[-1], p[-1]])})
    assert a["tokens"][:6].tolist() == full[:stop + 1] + [-1] * (5 - stop)
    assert a["tokens"][6:].tolist() == full  # never below: the whole chain
    ks = {r["rid"]: (r["k"], r["length"]) for r in h["requests"]}
    assert ks == {"m0": (stop + 1, len(p) + stop), "m1": (6, len(p) + 5)}
    _, b = client.call("draft", {"requests": [{"rid": "m0", "n_feed": 1, "k": 2}]}, {"feed": i32([full[stop]])})
    assert b["tokens"].tolist() == full[stop + 1:stop + 3]
    with pytest.raises(WorkerError, match="min_reach must be a list of 3 numbers in"):
        client.call("draft", {"requests": [{"rid": "m1", "n_feed": 1, "k": 3, "min_reach": [0.5, 2.0, 0.1]}]},
                    {"feed": i32([full[-1]])})
    release(client, "m0", "m1")


def test_drafter_proxy_mirror_follows_chains_that_stopped_early(client: WorkerClient, engine: Engine,
                                                                V: int) -> None:
    """The control plane's drafter proxy keeps a mirror of the worker's cache: after a chain
    that stopped early it must record all drafted tokens but the last, so that the next op,
    on the accepted tokens plus a bonus, feeds exactly what the worker lacks."""
    from cosine.control.proxies import DrafterProxy, DraftJob

    rng = np.random.default_rng(12)
    p = prompt(rng, 8, V)
    full = ref_greedy(engine, p, 6)
    proxy = DrafterProxy("d", client.endpoint, 30.0)
    try:
        out = proxy.draft([DraftJob("x0", p, 6, min_reach=[1.0] * 6)])
        assert out.error is None and out.value["x0"].tokens == full[:1]  # no probability is 1: stop at once
        assert proxy.cached.get("x0") == p  # the stopped step's token was not fed
        ctx = p + full[:2]  # its token accepted, then the target's bonus
        out = proxy.draft([DraftJob("x0", ctx, 3)])
        assert out.error is None and out.value["x0"].tokens == full[2:5]
    finally:
        proxy.release(["x0"])
        proxy.close()


def test_sampling_is_reproducible_per_seed(client: WorkerClient, V: int) -> None:
    rng = np.random.default_rng(5)
    p = prompt(rng, 5, V)
    prefill(client, {"s0": p})
    req = {"rid": "s0", "keep": 4, "n_feed": 1, "k": 6, "temperature": 1.5, "seed": 1234, "return_probs": True}
    _, a = client.call("draft", {"requests": [req]}, {"feed": i32(p[-1:])})
    _, b = client.call("draft", {"requests": [req]}, {"feed": i32(p[-1:])})
    assert a["tokens"].tolist() == b["tokens"].tolist()
    assert a["probs"].shape == (6, V)
    np.testing.assert_allclose(a["probs"].sum(-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(a["token_probs"], a["probs"][np.arange(6), a["tokens"]], atol=1e-7)
    assert (a["token_probs"] > 0).all()
    _, c = client.call("draft", {"requests": [{**req, "seed": 99}]}, {"feed": i32(p[-1:])})
    _, d = client.call("draft", {"requests": [{**req, "seed": 100}]}, {"feed": i32(p[-1:])})
    assert len({tuple(x["tokens"]) for x in (a, c, d)}) > 1  # seeds matter
    release(client, "s0")


def test_pipelined_requests_from_several_connections(client: WorkerClient, engine: Engine, V: int) -> None:
    """Requests sent back to back on several DEALERs all come back to their sender, in order."""
    import zmq

    from cosine.protocol import decode, encode

    rng = np.random.default_rng(6)
    p = prompt(rng, 6, V)
    prefill(client, {"p0": p})
    want = ref_greedy(engine, p, 2)
    socks = []
    for _ in range(3):
        s = zmq.Context.instance().socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(client.endpoint)
        socks.append(s)
    for seq in range(1, 11):
        for s in socks:
            s.send_multipart(encode({"v": 1, "op": "draft", "seq": seq,
                                     "requests": [{"rid": "p0", "keep": 5, "n_feed": 1, "k": 2}]},
                                    {"feed": i32(p[-1:])}))
    for s in socks:
        for seq in range(1, 11):
            assert s.poll(20_000)
            h, a = decode(s.recv_multipart())
            assert h["ok"] and h["seq"] == seq and a["tokens"].tolist() == want
        s.close(0)
    release(client, "p0")
