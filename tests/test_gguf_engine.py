"""Engines whose products run on cosine's GGUF kernel (`cosine-export --matmul gguf`):

- the manifest names the operator library and says one row computes as among many; the
  graph holds GGUF rows (`.blocks`) and no MatMulNBits;
- a one-row forward gives bit for bit the logits and new keys of the same token inside a
  two-token forward, so the worker runs decode steps unpadded (min_rows 1);
- the parity variant computes the same graph in float (GGUFMatMul as MatMul over the
  dequantized rows), close to the shipped graph's int8-activation logits;
- a cluster with this target returns the autoregressive output in every mode;
- asking for the kernel where it does not apply is a clear error.

The tiny model has hidden size 256: the kernel takes input widths in multiples of 256.
Q4_K/Q6_K rows from a real GGUF file: tests/test_real_models.py; the kernel's arithmetic
per format: tests/test_gguf_kernel.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cosine.export.build import export_engine
from cosine.export.errors import ExportError
from cosine.workers import kernels
from cosine.workers.engine import Engine

onnx = pytest.importorskip("onnx")
if kernels.available():
    pytest.skip(f"GGUF kernel unavailable: {kernels.available()}", allow_module_level=True)


@pytest.fixture(scope="module")
def tiny256(tmp_path_factory) -> Path:
    from cosine.export.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("tiny256")
    return make_tiny_model(root / "src", arch="llama", hidden=256, heads=4, kv_heads=2, layers=2, seed=3)


@pytest.fixture(scope="module")
def gguf_engine(tiny256: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gguf-kernel") / "engine"
    export_engine(tiny256, out, quantize="int8", matmul="gguf", progress=False)
    return out


@pytest.fixture(scope="module")
def nbits8_engine(tiny256: Path, tmp_path_factory) -> Path:
    """8-bit MatMulNBits: its one-row kernel is the many-row one (tests/test_kernel_rows.py),
    so its manifest says one_row_exact too."""
    out = tmp_path_factory.mktemp("nbits8") / "engine"
    export_engine(tiny256, out, quantize="int8", matmul="nbits", progress=False)
    return out


def test_manifest_and_graph(gguf_engine: Path) -> None:
    man = json.loads((gguf_engine / "manifest.json").read_text())
    assert man["matmul"] == "gguf" and man["custom_ops"] == kernels.NAME and man["one_row_exact"] is True
    assert man["quantization"]["mode"] == "int8" and man["quantization"]["top1_agreement"] >= 0.75
    g = onnx.load(str(gguf_engine / "model.onnx"), load_external_data=False).graph
    ops = [n.op_type for n in g.node]
    assert "MatMulNBits" not in ops and ops.count("GGUFMatMul") == 2 * 4 + 1  # qkv, o, gate|up, down; head
    assert sorted(t.name for t in g.initializer if t.name.endswith(".blocks"))[0] == "lm_head.blocks"
    assert Engine(gguf_engine, threads=1, min_rows=2).min_rows == 1


def _step(engine: Engine, prefix: list[int], new: list[int]):
    """Forward ``new`` (a chain) after ``prefix``: logits rows and each layer's new K."""
    _, pk, pv = engine.forward(np.array([prefix]), np.arange(len(prefix))[None],
                               np.tril(np.ones((len(prefix), len(prefix)), bool))[None, None], engine.empty_past())
    p, t = len(prefix), len(new)
    mask = np.concatenate([np.ones((t, p), bool), np.tril(np.ones((t, t), bool))], axis=1)[None, None]
    return engine.forward(np.array([new]), np.arange(p, p + t)[None], mask, list(zip(pk, pv)))


def test_one_row_equals_that_row_among_two_bit_for_bit(gguf_engine: Path) -> None:
    engine = Engine(gguf_engine, threads=2)
    prefix = [5, 9, 2, 7, 11, 3, 8]
    one_logits, one_k, one_v = _step(engine, prefix, [21])
    two_logits, two_k, two_v = _step(engine, prefix, [21, 30])
    assert np.array_equal(one_logits[0, 0].view(np.uint32), two_logits[0, 0].view(np.uint32))
    for a, b in zip(one_k + one_v, two_k + two_v):
        assert np.array_equal(np.asarray(a)[:, :, 0], np.asarray(b)[:, :, 0])


@pytest.mark.parametrize("which", ["gguf_engine", "nbits8_engine"])
def test_every_node_computes_a_row_alike_alone_and_among_others(which: str, request, tmp_path: Path) -> None:
    """Stronger than comparing logits (a last-bit difference can vanish in int8 rounding
    and reappear many tokens later): every intermediate tensor of the graph, row by row,
    for both engines whose manifest says one_row_exact."""
    import shutil

    gguf_engine = request.getfixturevalue(which)
    assert json.loads((gguf_engine / "manifest.json").read_text())["one_row_exact"] is True

    import onnxruntime as ort
    from onnx import helper

    debug = tmp_path / "debug"
    shutil.copytree(gguf_engine, debug)
    model = onnx.load(str(debug / "model.onnx"), load_external_data=False)
    outputs = {o.name for o in model.graph.output}
    tensors = [o for n in model.graph.node for o in n.output if o and o not in outputs]
    model.graph.output.extend(helper.make_empty_tensor_value_info(t) for t in tensors)
    onnx.save(model, str(debug / "model.onnx"))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    kernels.register(opts, {kernels.MANIFEST_KEY: kernels.NAME})
    sess = ort.InferenceSession(str(debug / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    man = json.loads((gguf_engine / "manifest.json").read_text())
    p = 20

    def run(new: list[int]) -> list[np.ndarray]:
        t = len(new)
        feeds = {"input_ids": np.array([new]), "position_ids": np.arange(p, p + t)[None],
                 "attention_mask": np.concatenate([np.ones((t, p), bool), np.tril(np.ones((t, t), bool))], 1)[None, None],
                 "logits_index": np.arange(t)[None], "key_slots": np.arange(p, p + t)[None]}
        for i in range(man["num_layers"]):
            for j, kind in enumerate(("key", "value")):
                feeds[f"past_{kind}.{i}"] = np.random.default_rng(10 * i + j).standard_normal(
                    (1, man["num_kv_heads"], p, man["head_dim"])).astype(np.float32)
        return sess.run(tensors, feeds)

    compared = 0
    for name, one, two in zip(tensors, run([21]), run([21, 30, 7])):
        one, two = np.asarray(one), np.asarray(two)
        axis = next((a for a in range(one.ndim) if one.shape[a] == 1 and two.shape[a] == 3
                     and one.shape[:a] + one.shape[a + 1:] == two.shape[:a] + two.shape[a + 1:]), None)
        if axis is None or one.dtype.kind != "f":
            continue
        compared += 1
        assert np.array_equal(one, np.take(two, [0], axis=axis)), name
    assert compared > 20


def test_float_compute_variant_replaces_the_kernel_with_float_products(gguf_engine: Path) -> None:
    from cosine.export import parity as par
    from cosine.export.runtime import session

    prefix = np.array([[5, 9, 2, 7, 11, 3, 8, 1]], np.int64)
    feeds = {"input_ids": prefix, "position_ids": np.arange(8)[None],
             "attention_mask": np.tril(np.ones((8, 8), bool))[None, None], "logits_index": np.arange(8)[None],
             "key_slots": np.arange(8)[None]}
    engine = Engine(gguf_engine, threads=1)
    for i in range(engine.num_layers):
        for kind in ("key", "value"):
            feeds[f"past_{kind}.{i}"] = np.zeros((1, engine.num_kv_heads, 0, engine.head_dim), np.float32)
    shipped = session(gguf_engine).run(["logits"], feeds)[0]
    with par.float_compute(gguf_engine) as name:
        g = onnx.load(str(gguf_engine / name), load_external_data=False).graph
        assert not [n for n in g.node if n.op_type == "GGUFMatMul"]
        floated = session(gguf_engine, model_file=name).run(["logits"], feeds)[0]
    assert not (gguf_engine / "model.float-compute.data").exists()
    # int8 activations against float ones over the same weights: close, not equal
    assert not np.array_equal(shipped, floated)
    assert np.linalg.norm(shipped - floated) < 0.1 * np.linalg.norm(floated)
    assert (shipped.argmax(-1) == floated.argmax(-1)).mean() >= 0.75


def test_every_mode_equals_autoregressive_through_a_cluster(gguf_engine: Path, tiny_models, tmp_path: Path) -> None:
    from cosine.client import Client
    from cosine.control.cluster import LocalCluster

    from conftest import write_cluster_config

    drafter = tmp_path / "drafter"
    export_engine(tiny_models["llama"], drafter, quantize="int4", progress=False)
    cfg = write_cluster_config(tmp_path / "config.toml", gguf_engine, {"small": drafter})
    prompts = [[5, 9, 2, 7], [12, 40, 33], [7] * 6]
    with LocalCluster(cfg) as cluster, Client(cluster.endpoint, timeout_s=60) as c:
        for prompt in prompts:
            ref = c.generate(prompt, max_tokens=20, mode="autoregressive").token_ids
            for mode in ("speculative", "specinfer", "cosine"):
                assert c.generate(prompt, max_tokens=20, mode=mode).token_ids == ref, (prompt, mode)
        log = "\n".join(cluster.serve.tail)
    assert "NOT exact" not in log, log[-2000:]


def test_the_kernel_where_it_does_not_apply_is_a_clear_error(tiny_models, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="--quantize gguf or int8"):
        export_engine(tiny_models["llama"], tmp_path / "a", quantize="int4", matmul="gguf", progress=False)
    with pytest.raises(ExportError, match="matmul must be one of"):
        export_engine(tiny_models["llama"], tmp_path / "b", quantize="int8", matmul="fast", progress=False)
    # a width the kernel does not take (64) stays MatMulNBits, and one row is still exact (8 bits)
    man = export_engine(tiny_models["llama"], tmp_path / "c", quantize="int8", matmul="gguf", progress=False)
    g = onnx.load(str(tmp_path / "c" / "model.onnx"), load_external_data=False).graph
    assert "GGUFMatMul" not in [n.op_type for n in g.node] and "custom_ops" not in man
    assert man["one_row_exact"] is True
