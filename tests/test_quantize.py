"""Quantized engines built at export (`cosine-export --quantize int4|int8|gguf`): the
manifest records their agreement with the float model and that they compute with int8
activations, the worker runtime runs them, and a quantized target serves every mode
exactly (key slots, docs/export.md "Exactness"); serve warns about one exported before
key slots."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from cosine.export.build import export_engine
from cosine.export.errors import ExportError
from cosine.workers.engine import Engine


@pytest.fixture(scope="module")
def quantized(tiny_models, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("quantized")
    for mode in ("int4", "int8"):
        export_engine(tiny_models["qwen2"], root / mode, quantize=mode, progress=False)
    return {mode: root / mode for mode in ("int4", "int8")}


@pytest.mark.parametrize("mode", ["int4", "int8"])
def test_quantized_engine_records_agreement_and_runs(quantized, mode: str) -> None:
    man = json.loads((quantized[mode] / "manifest.json").read_text())
    q = man["quantization"]
    assert q["mode"] == mode and 0.0 <= q["top1_agreement"] <= 1.0 and q["positions"] >= 8
    assert man["parity"]["passed"] is None and "by design" in man["parity"]["skipped"]
    e = Engine(quantized[mode], provider="cpu", device="cpu", threads=1)
    logits, k, v = e.forward(np.array([[1, 2, 3]], np.int64), np.arange(3)[None].astype(np.int64),
                             np.tril(np.ones((3, 3), bool))[None, None], e.empty_past())
    assert logits.shape == (1, 3, e.vocab_size) and np.isfinite(logits).all()
    assert k[0].shape == (1, e.num_kv_heads, 3, e.head_dim)
    # every product is a MatMulNBits, the LM head too: no float MatMul/Gemm over a constant is left
    g = onnx.load(str(quantized[mode] / "model.onnx"), load_external_data=False).graph
    consts = {t.name for t in g.initializer}
    left = [n.name for n in g.node if n.op_type in ("Gemm", "MatMul") and n.input[1] in consts]
    assert left == [] and sum(n.op_type == "MatMulNBits" for n in g.node) >= 2 * 4 + 1, left
    if mode == "int8":
        assert q["top1_agreement"] >= 0.9  # 8-bit blocks barely move a tiny model's argmax
    # the tiny qwen2 ties its head to the embedding: one set of blocks serves both, gathered
    # row by row for the embedding (no float table) and multiplied for the logits
    blocks = sorted(t.name for t in g.initializer if t.name.endswith(".q"))
    assert "model.embed_tokens.q" in blocks and not any(b.startswith("lm_head") for b in blocks)
    assert "model.embed_tokens.weight" not in consts
    assert len(blocks) == len(set(blocks)) == 1 + 2 * 4  # embedding/head + per layer qkv, o, gate|up, down


def test_gguf_quantization_needs_a_gguf_file(tiny_models, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="is not a .gguf file"):
        export_engine(tiny_models["llama"], tmp_path / "x", quantize="gguf", progress=False)
    with pytest.raises(ExportError, match="quantize must be one of"):
        export_engine(tiny_models["llama"], tmp_path / "x", quantize="int3", progress=False)
    with pytest.raises(ExportError, match="plain float graph only"):
        export_engine(tiny_models["gpt2"], tmp_path / "x", quantize="int4", progress=False)
    with pytest.raises(ExportError, match="the plain graph is the float reference"):
        export_engine(tiny_models["llama"], tmp_path / "x", quantize="int8", graph="plain", progress=False)


def test_a_quantized_target_serves_every_mode_exactly(quantized, tmp_path: Path) -> None:
    """An int4 target verifies, an int8 copy drafts: every mode gives the autoregressive
    output, and serve does not warn (tests/test_control_quantized.py goes further)."""
    from cosine.client import Client
    from cosine.control.cluster import LocalCluster

    from conftest import write_cluster_config

    assert json.loads((quantized["int4"] / "manifest.json").read_text())["activations"] == "int8"
    cfg = write_cluster_config(tmp_path / "config.toml", quantized["int4"], {"q8": quantized["int8"]})
    with LocalCluster(cfg) as cluster, Client(cluster.endpoint, timeout_s=60) as c:
        ref = c.generate([5, 9, 2, 7], max_tokens=16, mode="autoregressive").token_ids
        for mode in ("speculative", "specinfer", "cosine"):
            assert c.generate([5, 9, 2, 7], max_tokens=16, mode=mode).token_ids == ref, mode
        log = "\n".join(cluster.serve.tail)
    assert "NOT exact" not in log, log[-2000:]


def test_serve_warns_about_a_quantized_target_exported_before_key_slots(quantized, tmp_path: Path, caplog) -> None:
    import shutil

    from cosine import config
    from cosine.control.serve import load_target

    from conftest import write_cluster_config

    old = tmp_path / "old-int4"
    shutil.copytree(quantized["int4"], old)
    m = json.loads((old / "manifest.json").read_text())
    m["inputs"] = [i for i in m["inputs"] if i["name"] != "key_slots"]
    (old / "manifest.json").write_text(json.dumps(m))
    cfg = config.load(write_cluster_config(tmp_path / "config.toml", old, {}))
    with caplog.at_level("WARNING", logger="cosine.control.serve"):
        load_target(cfg)
    assert "NOT exact" in caplog.text and "Export it again" in caplog.text
