"""Quantized drafter engines: loadable by the worker runtime, agreement recorded, and a
drafter built from one keeps every mode's output identical (the target decides)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cosine.export.errors import ExportError
from cosine.export.quantize import quantize_engine
from cosine.workers.engine import Engine


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_engine_runs_and_records_agreement(control_engines, tmp_path: Path, mode: str) -> None:
    out = tmp_path / f"q-{mode}"
    man = quantize_engine(control_engines["target"], out, mode)
    q = man["quantization"]
    assert q["mode"] == mode and 0.0 <= q["top1_agreement"] <= 1.0
    assert json.loads((out / "manifest.json").read_text())["quantization"]["mode"] == mode
    e = Engine(out, provider="cpu", device="cpu", threads=1)
    logits, k, v = e.forward(np.array([[1, 2, 3]], np.int64), np.arange(3)[None].astype(np.int64),
                             np.tril(np.ones((3, 3), bool))[None, None], e.empty_past())
    assert logits.shape == (1, 3, e.vocab_size) and np.isfinite(logits).all()
    with pytest.raises(ExportError, match="already quantized"):
        quantize_engine(out, tmp_path / "again", mode)
    if mode == "int4":  # the LM head is quantized too: no float Gemm/MatMul over a constant is left
        import onnx

        g = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
        consts = {t.name for t in g.initializer}
        left = [n.name for n in g.node if n.op_type in ("Gemm", "MatMul") and n.input[1] in consts]
        assert left == [] and sum(n.op_type == "MatMulNBits" for n in g.node) >= 2, left


def test_quantize_needs_an_engine(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="not an exported engine"):
        quantize_engine(tmp_path, tmp_path / "out", "int8")
    with pytest.raises(ExportError, match="unknown quantization"):
        quantize_engine(tmp_path, tmp_path / "out", "int3")


def test_quantized_drafter_keeps_output_identical(control_engines, tmp_path: Path) -> None:
    from cosine.client import Client
    from cosine.control.cluster import LocalCluster

    from conftest import write_cluster_config

    drafter = tmp_path / "drafter-int4"
    quantize_engine(control_engines["target"], drafter, "int4")
    cfg = write_cluster_config(tmp_path / "config.toml", control_engines["target"], {"q4": drafter})
    with LocalCluster(cfg) as cluster, Client(cluster.endpoint, timeout_s=60) as c:
        for prompt in ([5, 9, 2, 7], [30, 31, 32]):
            ref = c.generate(prompt, max_tokens=20, mode="autoregressive").token_ids
            for mode in ("speculative", "cosine"):
                assert c.generate(prompt, max_tokens=20, mode=mode).token_ids == ref
