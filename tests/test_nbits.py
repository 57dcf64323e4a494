"""Block-quantized weights: GGUF blocks carried over exactly, the MatMulNBits encoding
(offsets for per-block minimums) and the product ONNX Runtime computes from it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cosine.export.gguf_weights import FORMATS, to_nbits
from cosine.export.nbits import NBits, from_integers, quantize_symmetric, stack

gguf = pytest.importorskip("gguf")


def _f16(rng: np.random.Generator, n: int, lo: float = 1e-3, hi: float = 2e-2) -> np.ndarray:
    return rng.uniform(lo, hi, n).astype(np.float16).view(np.uint8).reshape(n, 2)


def random_blocks(fmt: str, n: int, k: int, seed: int = 0) -> np.ndarray:
    """Raw GGUF data [n, row bytes] of one format: every byte random except the float16
    scales, which are kept finite (any bit pattern of the packed integers is valid)."""
    qtype = gguf.GGMLQuantizationType[fmt]
    elems, size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    nb = n * k // elems
    b = rng.integers(0, 256, (nb, size), dtype=np.uint8)
    if fmt == "Q6_K":
        b[:, 208:210] = _f16(rng, nb)
    else:
        b[:, 0:2] = _f16(rng, nb)
        if fmt in ("Q4_1", "Q5_1", "Q4_K", "Q5_K"):
            b[:, 2:4] = _f16(rng, nb)
    return b.reshape(n, -1)


@pytest.mark.parametrize("chunk_rows", [8192, 4])
@pytest.mark.parametrize("fmt", FORMATS)
def test_gguf_blocks_are_carried_over_exactly(fmt: str, chunk_rows: int, monkeypatch) -> None:
    """Whole, or converted a few rows at a time (as the 152k-row head is) into one matrix."""
    from cosine.export import gguf_weights

    monkeypatch.setattr(gguf_weights, "CHUNK_ROWS", chunk_rows)
    n, k = 6, 512
    data = random_blocks(fmt, n, k)
    qtype = gguf.GGMLQuantizationType[fmt]
    nb = to_nbits(data, qtype, (n, k))
    ref = gguf.quants.dequantize(data, qtype).reshape(n, k)
    # exact in real arithmetic; in float32 the offset adds back a rounding of ~1e-7 x |W|
    np.testing.assert_allclose(nb.dequantize(), ref, rtol=1e-6, atol=1e-6 * np.abs(ref).max())
    symmetric = fmt in ("Q4_0", "Q5_0", "Q6_K", "Q8_0")
    assert (nb.offset is None) == symmetric  # no extra product for formats without a minimum
    assert nb.bits == (4 if fmt in ("Q4_0", "Q4_1", "Q4_K") else 8)


def test_corrupt_blocks_are_refused() -> None:
    qtype = gguf.GGMLQuantizationType["Q8_0"]
    with pytest.raises(ValueError, match="needs"):
        to_nbits(random_blocks("Q8_0", 2, 64), qtype, (2, 128))
    with pytest.raises(ValueError, match="not carried over"):
        to_nbits(np.zeros((2, 128), np.uint8), gguf.GGMLQuantizationType["IQ4_NL"], (2, 64))


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 5), st.integers(1, 4), st.sampled_from([16, 32]), st.booleans(), st.booleans(),
       st.integers(0, 2**31 - 1))
def test_integers_round_trip(n: int, blocks: int, block_size: int, signed: bool, with_min: bool, seed: int) -> None:
    """W = scale * q + minimum comes back from the stored bytes, offsets and zero point."""
    rng = np.random.default_rng(seed)
    k = blocks * block_size
    lo, hi = ((-8, 7) if rng.random() < 0.5 else (-32, 31)) if signed else ((0, 15) if rng.random() < 0.5 else (0, 63))
    q = rng.integers(lo, hi + 1, (n, k)).astype(np.int16)
    scale = rng.uniform(-0.1, 0.1, (n, blocks)).astype(np.float32)
    minimum = rng.uniform(-1, 1, (n, blocks)).astype(np.float32) if with_min else None
    nb = from_integers(q, scale, minimum, block_size, signed)
    want = scale[..., None] * q.reshape(n, blocks, block_size) + (0 if minimum is None else minimum[..., None])
    np.testing.assert_allclose(nb.dequantize(), want.reshape(n, k), rtol=1e-5, atol=1e-6 * (1 + np.abs(want).max()))
    assert nb.bits == (4 if hi - lo < 16 else 8)
    packed = nb.packed()
    assert packed.shape == (n, blocks, block_size * nb.bits // 8) and packed.dtype == np.uint8


def test_symmetric_quantization_error_is_within_half_a_step() -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 128)).astype(np.float32)
    nb = quantize_symmetric(w, bits=4, block_size=32)
    step = np.abs(nb.scale).repeat(32, axis=1)  # the block's peak maps to -8: +peak would be +8, clipped to 7
    err = np.abs(nb.dequantize() - w)
    assert (err <= step + 1e-6).all() and np.median(err / step) < 0.3 and nb.offset is None
    assert np.abs(quantize_symmetric(w, bits=8).dequantize() - w).max() < np.abs(w).max() / 100


def test_stack_and_rows_keep_each_matrix() -> None:
    a, b = (to_nbits(random_blocks("Q4_K", n, 256, seed=n), gguf.GGMLQuantizationType["Q4_K"], (n, 256))
            for n in (3, 5))
    s = stack([a, b])
    np.testing.assert_array_equal(s.dequantize(), np.concatenate([a.dequantize(), b.dequantize()]))
    order = np.array([2, 0, 1])
    np.testing.assert_array_equal(a.rows(order).dequantize(), a.dequantize()[order])
    c = to_nbits(random_blocks("Q6_K", 2, 256), gguf.GGMLQuantizationType["Q6_K"], (2, 256))
    with pytest.raises(ValueError, match="same bits"):
        stack([a, c])


def _product(w: NBits | np.ndarray, x: np.ndarray, tmp: Path, accuracy_level: int) -> np.ndarray:
    """x @ W^T through the graph code the exporter uses (fused.linear), on ONNX Runtime."""
    import onnxruntime as ort

    from cosine.export import fused
    from cosine.export.graph import FUSED_OPSET, GraphBuilder

    g = GraphBuilder(tmp, "float32", opset=FUSED_OPSET)
    inp = g.add_input("x", np.float32, ["b", "t", x.shape[-1]])
    y = fused.linear(g, inp, w, "w", accuracy_level=accuracy_level)
    g.op("Identity", [y], name="y")
    g.add_output("y", np.float32, ["b", "t", w.shape[0]])
    g.save("product")
    sess = ort.InferenceSession(str(tmp / "model.onnx"), providers=["CPUExecutionProvider"])
    return sess.run(["y"], {"x": x})[0]


@pytest.mark.parametrize("fmt", ["Q4_K", "Q6_K", "Q8_0", "Q4_1"])
def test_matmulnbits_computes_the_gguf_weights(fmt: str, tmp_path: Path) -> None:
    """MatMulNBits plus the block-sum offset product equals x @ W^T with gguf's own float
    weights: to float precision in float compute, and to int8-activation precision at the
    shipped accuracy level."""
    n, k = 24, 512
    qtype = gguf.GGMLQuantizationType[fmt]
    data = random_blocks(fmt, n, k, seed=7)
    w = gguf.quants.dequantize(data, qtype).reshape(n, k)
    x = np.random.default_rng(1).standard_normal((2, 3, k)).astype(np.float32)
    ref = x @ w.T
    nb = to_nbits(data, qtype, (n, k))
    for level, tol in ((0, 1e-4), (4, 2e-2)):
        (tmp_path / str(level)).mkdir()
        got = _product(nb, x, tmp_path / str(level), level)
        assert np.abs(got - ref).max() <= tol * np.abs(ref).max(), (fmt, level)


@pytest.mark.parametrize("fmt", ["Q4_K", "Q6_K", "Q8_0"])
def test_embedding_rows_from_blocks(fmt: str, tmp_path: Path) -> None:
    """A block-quantized embedding table gathers exactly gguf's float rows."""
    import onnxruntime as ort

    from cosine.export import fused
    from cosine.export.graph import FUSED_OPSET, GraphBuilder

    v, k = 40, 256
    qtype = gguf.GGMLQuantizationType[fmt]
    data = random_blocks(fmt, v, k, seed=3)
    table = gguf.quants.dequantize(data, qtype).reshape(v, k)
    g = GraphBuilder(tmp_path, "float32", opset=FUSED_OPSET)
    ids = g.add_input("ids", np.int64, ["b", "t"])
    g.op("Identity", [fused.embedding(g, to_nbits(data, qtype, (v, k)), ids, "embed")], name="x")
    g.add_output("x", np.float32, ["b", "t", k])
    g.save("embedding")
    sess = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    pick = np.array([[0, 39, 7], [7, 2, 20]], np.int64)
    got = sess.run(["x"], {"ids": pick})[0]
    np.testing.assert_allclose(got, table[pick], rtol=1e-6, atol=1e-6 * np.abs(table).max())
