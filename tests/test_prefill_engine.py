"""A target with a prefill engine (`[[models]] prefill_engine`): prompt tokens go through
another export of the same model (float weights here, an int4 target), everything else
through the target's own engine. What must hold: the cache is what the split says (prompt
rows from the prefill engine, output rows of a request prefilled again from the engine
that decoded them), a batched prefill writes each request's rows as a lone one does, and
every mode still gives the target's autoregressive output, through real processes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cosine.client import Client
from cosine.config import ConfigError, LimitsConfig, ModelConfig, WorkerConfig, load
from cosine.workers.engine import Engine, EngineError, check_prefill_engine
from cosine.workers.kvcache import KVCache
from cosine.workers.neural import NeuralOps
from cosine.workers.stats import Stats

from conftest import write_cluster_config

PROMPTS = [list(np.random.default_rng(i).integers(3, 60, n)) for i, n in enumerate((20, 57, 90))]


@pytest.fixture(scope="module")
def engines(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from cosine.export.build import export_engine

    root = tmp_path_factory.mktemp("prefill-engine")
    export_engine(tiny_models["qwen2"], root / "float", progress=False)
    export_engine(tiny_models["qwen2"], root / "int4", quantize="int4", progress=False)
    return {"float": root / "float", "int4": root / "int4"}


def _ops(main: Path, prefill: Path | None) -> NeuralOps:
    e = Engine(main, threads=1, min_rows=2)
    cache = KVCache(e.num_layers, e.num_kv_heads, e.head_dim, e.dtype, budget_tokens=1 << 14,
                    max_tokens=e.max_positions, chunk_tokens=64, arrays=e.arrays)
    pre = Engine(prefill, threads=1) if prefill else None
    if pre is not None:
        check_prefill_engine(e, pre)
    return NeuralOps(e, cache, WorkerConfig("w", "m"), ModelConfig("m", "target", engine="x"), LimitsConfig(),
                     Stats(), pre)


def _rows(ops: NeuralOps, rid: str) -> np.ndarray:
    e = ops.cache.get(rid)
    return np.stack([np.stack([k[:, :e.length], v[:, :e.length]]) for k, v in zip(e.k, e.v)])


def _prefill(ops: NeuralOps, items: list[tuple[str, list[int], int | None]]) -> None:
    reqs = [{"rid": r, "n": len(t), **({"prompt": k} if k is not None else {})} for r, t, k in items]
    ops.handle({"op": "prefill", "requests": reqs}, {"tokens": np.concatenate([np.asarray(t, np.int32)
                                                                               for _, t, _ in items])})


def test_prompt_rows_come_from_the_prefill_engine_and_the_rest_from_the_target(engines) -> None:
    hybrid = _ops(engines["int4"], engines["float"])
    float_only, int4_only = _ops(engines["float"], None), _ops(engines["int4"], None)
    toks = PROMPTS[1]
    k = 40  # a request prefilled again: 40 prompt tokens, then 17 it had generated
    _prefill(hybrid, [("a", toks, k)])
    _prefill(float_only, [("f", toks[:k], None)])
    _prefill(int4_only, [("q", toks[:k], None)])
    got = _rows(hybrid, "a")
    assert np.array_equal(got[..., :k, :], _rows(float_only, "f"))
    assert not np.array_equal(got[..., :k, :], _rows(int4_only, "q"))  # the float path was taken
    # the output tokens: as an extend (the target's own engine) after the prompt's rows
    _prefill(hybrid, [("b", toks[:k], None)])
    hybrid.handle({"op": "extend", "requests": [{"rid": "b", "n": len(toks) - k}]},
                  {"tokens": np.asarray(toks[k:], np.int32)})
    assert np.array_equal(got, _rows(hybrid, "b"))


def test_a_batched_prefill_writes_what_a_lone_one_does(engines) -> None:
    hybrid = _ops(engines["int4"], engines["float"])
    _prefill(hybrid, [(f"b{i}", p, None) for i, p in enumerate(PROMPTS)])
    for i, p in enumerate(PROMPTS):
        _prefill(hybrid, [(f"l{i}", p, None)])
        assert np.array_equal(_rows(hybrid, f"b{i}"), _rows(hybrid, f"l{i}")), i


def test_another_model_is_refused_as_a_prefill_engine(engines, tiny_models, tmp_path) -> None:
    from cosine.export.build import export_engine

    export_engine(tiny_models["llama"], tmp_path / "other", progress=False)
    with pytest.raises(EngineError, match="not the same model"):
        check_prefill_engine(Engine(engines["int4"], threads=1), Engine(tmp_path / "other", threads=1))


def test_config_takes_a_prefill_engine_for_targets_only(engines, tmp_path) -> None:
    cfg = write_cluster_config(tmp_path / "c.toml", engines["int4"], {"d": engines["int4"]})
    text = cfg.read_text()
    target_line = f'engine = "{engines["int4"]}"'
    assert text.count(target_line) >= 1
    ok = text.replace(target_line, f'{target_line}\nprefill_engine = "{engines["float"]}"', 1)
    cfg.write_text(ok)
    c = load(cfg)
    assert c.prefill_engine_dir(c.target_model()) == engines["float"]
    cfg.write_text(text.replace(target_line, f'{target_line}\nprefill_engine = "{tmp_path / "none"}"', 1))
    with pytest.raises(ConfigError, match="prefill engine for model"):
        load(cfg)
    drafter = text.rsplit(target_line, 1)
    cfg.write_text(drafter[0] + target_line + f'\nprefill_engine = "{engines["float"]}"' + drafter[1])
    with pytest.raises(ConfigError, match="prefill_engine is for a neural target"):
        load(cfg)


def test_every_mode_matches_autoregressive_with_a_prefill_engine(engines, tmp_path) -> None:
    from cosine.control.cluster import LocalCluster

    cfg = write_cluster_config(tmp_path / "config.toml", engines["int4"], {"good": engines["int4"]},
                               limits={"max_prompt_tokens": 200})
    line = f'engine = "{engines["int4"]}"'
    cfg.write_text(cfg.read_text().replace(line, f'{line}\nprefill_engine = "{engines["float"]}"', 1))
    with LocalCluster(cfg) as cluster, Client(cluster.endpoint, timeout_s=120) as c:
        for p in PROMPTS:
            want = c.generate(p, max_tokens=24, mode="autoregressive").token_ids
            for mode in ("speculative", "specinfer", "cosine"):
                assert c.generate(p, max_tokens=24, mode=mode).token_ids == want, mode
        from cosine.workers.client import WorkerClient

        with WorkerClient(cluster.cfg.worker("verifier-0").endpoint, timeout_s=10) as w:
            engine = w.call("health", {})[0]["engine"]
    assert engine["prefill_engine"]["dir"] == str(engines["float"])
