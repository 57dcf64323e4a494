"""cosine:GGUFMatMul (workers/kernels): products with weights in GGUF's own blocks.

- against gguf's own dequantization: each output within the error bound of int8
  activations (|w| . max|x| / 254 per block of 256), for Q4_K, Q6_K and Q8_0 blocks;
- every row's bits independent of the other rows of the call: how many there are, where
  the row sits, what the others hold (the property that lets a decode step of one row
  equal the same row of a tree verification, bit for bit);
- bad graphs are refused with a clear error.
"""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
gguf = pytest.importorskip("gguf")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper  # noqa: E402

from cosine.workers import kernels  # noqa: E402

if kernels.available():
    pytest.skip(f"GGUF kernel unavailable: {kernels.available()}", allow_module_level=True)

FORMATS = ("Q4_K", "Q6_K", "Q8_0")


def random_blocks(fmt: str, n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """Raw GGUF rows [N, bytes]: random quants and scales, with finite fp16 headers."""
    qtype = gguf.GGMLQuantizationType[fmt]
    elems, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (n * k // elems, nbytes), dtype=np.uint8)
    half = lambda size: rng.uniform(0.001, 0.02, size).astype(np.float16).view(np.uint8).reshape(-1, 2)  # noqa: E731
    if fmt == "Q4_K":
        blocks[:, 0:2], blocks[:, 2:4] = half(len(blocks)), half(len(blocks))
    elif fmt == "Q6_K":
        blocks[:, 208:210] = half(len(blocks))
    else:
        blocks[:, 0:2] = half(len(blocks))
    return blocks.reshape(n, -1)


def dequantize(fmt: str, raw: np.ndarray, n: int, k: int) -> np.ndarray:
    return gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[fmt]).reshape(n, k).astype(np.float64)


def session(fmt: str, raw: np.ndarray, n: int, k: int, threads: int = 2, rank: int = 3,
            width: int | str | None = None) -> ort.InferenceSession:
    shape = ["b", "t", k if width is None else width][-rank:]
    node = helper.make_node("GGUFMatMul", ["x", "w"], ["y"], domain="cosine", format=fmt, K=k, N=n)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [helper.make_tensor("w", TensorProto.UINT8, raw.shape, raw.tobytes(), raw=True)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("cosine", 1)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    kernels.register(opts, {kernels.MANIFEST_KEY: kernels.NAME})
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("fmt", FORMATS)
def test_product_matches_gguf_dequantization_within_int8_bound(fmt: str) -> None:
    rng = np.random.default_rng(0)
    n, k = 70, 512  # N not a multiple of the column tiles, two 256-blocks of x
    raw = random_blocks(fmt, n, k, rng)
    w = dequantize(fmt, raw, n, k)
    x = rng.standard_normal((2, 5, k)).astype(np.float32)
    x[0, 1, 7] = 40.0  # an outlier: its block's scale is coarse, the bound says how much
    y = session(fmt, raw, n, k).run(None, {"x": x})[0]
    assert y.shape == (2, 5, n) and y.dtype == np.float32
    ref = x.astype(np.float64) @ w.T
    peak = np.abs(x.reshape(-1, k // 256, 256)).max(-1)  # [rows, blocks]
    bound = (np.abs(w).reshape(n, k // 256, 256).sum(-1) @ peak.T).T / 254  # [rows, n]
    err = np.abs(y.reshape(-1, n) - ref.reshape(-1, n))
    assert np.all(err <= bound * 1.001 + 1e-4 * np.abs(ref.reshape(-1, n)) + 1e-5), float((err / bound).max())
    # and the bound is not vacuous: the product tracks the reference closely
    assert np.corrcoef(y.ravel(), ref.ravel())[0, 1] > 0.999


@pytest.mark.parametrize("fmt", FORMATS)
def test_rows_are_independent_of_the_other_rows(fmt: str) -> None:
    rng = np.random.default_rng(1)
    n, k = 96, 768
    raw = random_blocks(fmt, n, k, rng)
    sess = session(fmt, raw, n, k, rank=2)
    probe = rng.standard_normal(k).astype(np.float32)
    alone = sess.run(None, {"x": probe[None]})[0][0]
    for m in (2, 3, 4, 5, 8, 9, 17):
        for where in sorted({0, m // 2, m - 1}):
            others = rng.standard_normal((m, k)).astype(np.float32) * rng.uniform(0.1, 10)
            others[where] = probe
            got = sess.run(None, {"x": others})[0][where]
            assert np.array_equal(got.view(np.uint32), alone.view(np.uint32)), (m, where)


def test_one_and_many_threads_agree_bit_for_bit() -> None:
    rng = np.random.default_rng(2)
    n, k = 300, 512
    raw = random_blocks("Q4_K", n, k, rng)
    x = rng.standard_normal((1, 6, k)).astype(np.float32)
    one = session("Q4_K", raw, n, k, threads=1).run(None, {"x": x})[0]
    two = session("Q4_K", raw, n, k, threads=2).run(None, {"x": x})[0]
    assert np.array_equal(one, two)


def test_empty_rows_give_an_empty_product() -> None:
    rng = np.random.default_rng(3)
    raw = random_blocks("Q6_K", 8, 256, rng)
    y = session("Q6_K", raw, 8, 256).run(None, {"x": np.zeros((1, 0, 256), np.float32)})[0]
    assert y.shape == (1, 0, 8)


def test_wrong_width_and_bad_attributes_are_clear_errors() -> None:
    rng = np.random.default_rng(4)
    raw = random_blocks("Q4_K", 8, 256, rng)
    sess = session("Q4_K", raw, 8, 256, width="k")  # the graph does not pin the width: the kernel checks
    with pytest.raises(Exception, match="K = 256"):
        sess.run(None, {"x": np.zeros((1, 1, 512), np.float32)})
    with pytest.raises(Exception, match="not one of Q4_K, Q6_K, Q8_0"):
        session("Q5_K", raw, 8, 256)
    with pytest.raises(Exception, match="multiple of 256"):
        session("Q8_0", random_blocks("Q8_0", 8, 96, rng), 8, 96)
    with pytest.raises(Exception, match="bytes"):  # W of another shape than N rows of K
        session("Q4_K", raw[:4], 8, 256).run(None, {"x": np.zeros((1, 1, 256), np.float32)})


def test_an_engine_naming_an_unknown_library_is_refused() -> None:
    with pytest.raises(kernels.KernelUnavailable, match="does not have"):
        kernels.register(ort.SessionOptions(), {kernels.MANIFEST_KEY: ["someone-elses-ops"]})
