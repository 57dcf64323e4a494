"""The I/O-bound forward and the device-resident cache (workers/arrays.py): the cache kept
as numpy arrays or as torch tensors (the GPU code path, here on the CPU) gives the same
tokens and logits as a plain ``session.run`` over host arrays, on every op, and a step
moves no cache bytes through host memory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cosine.config import LimitsConfig, ModelConfig, WorkerConfig
from cosine.keyslots import with_slots
from cosine.tree import ancestor_mask, depths
from cosine.workers.engine import Engine
from cosine.workers.kvcache import KVCache
from cosine.workers.neural import NeuralOps
from cosine.workers.stats import Stats

torch = pytest.importorskip("torch")

PROMPTS = {"a": [3, 1, 4, 1, 5, 9, 2, 6, 5], "b": [2, 7, 1, 8]}
PARENTS = [-1, 0, 0, 1, 1, 2]


def _ops(engine_dir: Path, kind: str, buckets: bool = False) -> NeuralOps:
    e = Engine(engine_dir, threads=1, kv_arrays=kind, buckets=buckets)
    cache = KVCache(e.num_layers, e.num_kv_heads, e.head_dim, e.dtype, budget_tokens=4096,
                    max_tokens=e.max_positions, chunk_tokens=8, arrays=e.arrays)
    return NeuralOps(e, cache, WorkerConfig("w", "m"), ModelConfig("m", "target", engine="x"), LimitsConfig(), Stats())


def _scenario(ops: NeuralOps) -> list:
    """prefill (batched), a greedy draft, extend, a batched tree verify, commit, and a
    verify with an inline commit; returns every reply's arrays and lengths."""
    out = []

    def call(op: str, h: dict, a: dict) -> None:
        head, arrs = ops.handle({"op": op, **h}, a)
        out.append((op, head, {k: np.asarray(v) for k, v in arrs.items()}))

    reqs = [{"rid": r, "n": len(p) - 1} for r, p in PROMPTS.items()]
    call("prefill", {"requests": reqs}, {"tokens": np.concatenate([p[:-1] for p in PROMPTS.values()]).astype(np.int32)})
    call("draft", {"requests": [{"rid": "a", "n_feed": 1, "k": 4, "topk": 3}]},
         {"feed": np.array(PROMPTS["a"][-1:], np.int32)})
    call("extend", {"requests": [{"rid": "b", "n": 1}]}, {"tokens": np.array(PROMPTS["b"][-1:], np.int32)})
    n = len(PARENTS)
    call("verify", {"return": "logits", "requests": [{"rid": "a", "n": n}, {"rid": "b", "n": n}]},
         {"tokens": np.array([5, 8, 9, 7, 9, 3] * 2, np.int32), "parents": np.array(PARENTS * 2, np.int32)})
    call("commit", {"requests": [{"rid": "a", "nodes": [0, 1, 3]}]}, {})
    call("verify", {"return": "logits", "requests": [{"rid": "b", "n": 2, "commit": [0, 2]}]},
         {"tokens": np.array([4, 4], np.int32), "parents": np.array([-1, 0], np.int32)})
    call("draft", {"requests": [{"rid": "a", "n_feed": 1, "k": 3}, {"rid": "b", "n_feed": 1, "k": 2}]},
         {"feed": np.array([7, 4], np.int32)})
    return out


def test_numpy_and_torch_caches_give_identical_replies(worker_engines: dict[str, Path]) -> None:
    engine_dir = worker_engines["qwen2"]
    ref = _scenario(_ops(engine_dir, "numpy"))
    got = _scenario(_ops(engine_dir, "torch"))
    for (op, h1, a1), (_, h2, a2) in zip(ref, got):
        assert h1 == h2, op
        assert a1.keys() == a2.keys(), op
        for k in a1:
            np.testing.assert_allclose(a1[k], a2[k], rtol=1e-5, atol=1e-5, err_msg=f"{op}.{k}")


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_shape_buckets_give_identical_replies(worker_engines: dict[str, Path], kind: str) -> None:
    """The CUDA-graph path's shape buckets (fixed buffers, padding, device copies), run
    uncaptured on the CPU: every reply equals the unbucketed one, and buckets are reused."""
    engine_dir = worker_engines["qwen2"]
    ref = _scenario(_ops(engine_dir, kind))
    ops = _ops(engine_dir, kind, buckets=True)
    got = _scenario(ops)
    for (op, h1, a1), (_, h2, a2) in zip(ref, got):
        assert h1 == h2, op
        for k in a1:
            np.testing.assert_allclose(a1[k], a2[k], rtol=1e-5, atol=1e-5, err_msg=f"{op}.{k}")
    graphs = ops.engine.graphs
    assert graphs.buckets and graphs.uncaptured == 0
    assert any(b.runs > 1 for b in graphs.buckets.values())  # a later call replays its bucket
    assert all(shape[3] % 256 == 0 for shape in graphs.buckets)


def test_cuda_graph_is_refused_off_the_gpu(worker_engines: dict[str, Path]) -> None:
    from cosine.workers.engine import EngineError

    with pytest.raises(EngineError, match="cuda_graph needs provider"):
        Engine(worker_engines["llama"], threads=1, cuda_graph=True)


def test_bound_forward_equals_a_plain_session_run(worker_engines: dict[str, Path]) -> None:
    """Today's path (host arrays through session.run) against the bound forward, for a
    prefix and then a tree over it, with numpy and with torch arrays."""
    engine_dir = worker_engines["llama"]
    for kind in ("numpy", "torch"):
        e = Engine(engine_dir, threads=1, kv_arrays=kind)
        prefix = np.array([[5, 3, 9, 2, 11, 7]], np.int64)
        P = prefix.shape[1]
        feeds = {"input_ids": prefix, "position_ids": np.arange(P)[None], "logits_index": np.arange(P)[None],
                 "attention_mask": np.tril(np.ones((P, P), bool))[None, None]}
        empty = np.zeros((1, e.num_kv_heads, 0, e.head_dim), np.float32)
        for i in range(e.num_layers):
            feeds[f"past_key.{i}"] = feeds[f"past_value.{i}"] = empty
        names = [o.name for o in e.session.get_outputs()]
        plain = dict(zip(names, e.session.run(names, with_slots(e.session, feeds))))
        logits, k, v = e.forward(feeds["input_ids"], feeds["position_ids"], feeds["attention_mask"], e.empty_past(),
                                 feeds["logits_index"])
        np.testing.assert_allclose(logits, plain["logits"], rtol=1e-6, atol=1e-6)
        for i in range(e.num_layers):
            np.testing.assert_allclose(np.asarray(k[i]), plain[f"new_key.{i}"], rtol=1e-6, atol=1e-6)
        # a tree over the prefix, its past bound where the cache keeps it
        parents = np.array(PARENTS)
        N = parents.size
        mask = np.concatenate([np.ones((N, P), bool), ancestor_mask(parents)], axis=1)[None, None]
        tree = {"input_ids": np.array([[4, 6, 8, 1, 2, 3]]), "position_ids": (P + depths(parents))[None],
                "attention_mask": mask, "logits_index": np.arange(N)[None]}
        host_past = {**{f"past_key.{i}": plain[f"new_key.{i}"] for i in range(e.num_layers)},
                     **{f"past_value.{i}": plain[f"new_value.{i}"] for i in range(e.num_layers)}}
        want = e.session.run(["logits"], with_slots(e.session, {**tree, **host_past}))[0]
        got, _, _ = e.forward(tree["input_ids"], tree["position_ids"], mask, list(zip(k, v)), tree["logits_index"])
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_a_step_moves_no_cache_bytes_through_host_memory(worker_engines: dict[str, Path], monkeypatch) -> None:
    """Every conversion of a torch tensor to numpy during the ops is recorded: only logits
    rows ([..., V]) may come back; K/V never do. (A planted `.numpy()` of a cache slab in
    the forward path fails this test.)"""
    ops = _ops(worker_engines["qwen2"], "torch")
    V = ops.engine.vocab_size
    seen: list[tuple[int, ...]] = []
    real_numpy = torch.Tensor.numpy

    def numpy(self, *a, **kw):
        seen.append(tuple(self.shape))
        return real_numpy(self, *a, **kw)

    monkeypatch.setattr(torch.Tensor, "numpy", numpy)
    monkeypatch.setattr(torch.Tensor, "__array__", lambda self, *a, **kw: pytest.fail(
        f"a tensor of shape {tuple(self.shape)} was converted to numpy implicitly"))
    _scenario(ops)
    assert seen and all(shape[-1] == V for shape in seen), seen
    t = ops.engine.arrays.transfers.snapshot()
    assert t["cache_bytes_to_host"] == 0 and t["cache_bytes_from_host"] == 0
    # the counter itself counts: moving a slab to the host is visible
    slab = ops.cache.get("a").k[0]
    ops.engine.arrays.to_host(slab)
    assert ops.engine.arrays.transfers.cache_to_host == slab.numel() * slab.element_size()


def test_torch_arrays_need_torch_or_say_how(monkeypatch, worker_engines: dict[str, Path]) -> None:
    import builtins

    from cosine.workers.engine import EngineError

    real_import = builtins.__import__

    def no_torch(name, *a, **kw):
        if name == "torch":
            raise ImportError("No module named 'torch'")
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_torch)
    with pytest.raises(EngineError, match="torch is not installed"):
        Engine(worker_engines["llama"], threads=1, kv_arrays="torch")
    with pytest.raises(EngineError, match="kv_arrays must be one of"):
        Engine(worker_engines["llama"], threads=1, kv_arrays="cupy")
