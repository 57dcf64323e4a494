"""The kernel property that lets a quantized target stay lossless: ONNX Runtime's
MatMulNBits (int8 activations, accuracy level 4) gives a row the same bits whatever the
number of rows beside it (M >= 2) and wherever it sits among them. Decoding pads its one
row to two (`min_rows`, workers/batching.py) and a tree verify runs many rows; if an
onnxruntime upgrade broke this, speculation with a quantized target would stop being
exact (docs/export.md, "Exactness"). Checked on the block formats the GGUF export writes:
4-bit blocks of 32 (Q4_0/Q4_1/Q4_K) and 8-bit blocks of 16 (Q6_K) and 32 (Q8_0)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper


def _session(bits: int, block: int, k: int, n: int, rng: np.random.Generator) -> ort.InferenceSession:
    blocks = k // block
    weights = rng.integers(0, 256, size=(n, blocks, block * bits // 8), dtype=np.uint8)
    scales = (rng.random(n * blocks, dtype=np.float32) * 0.01).astype(np.float32)
    node = helper.make_node("MatMulNBits", ["A", "B", "scales"], ["Y"], domain="com.microsoft", K=k, N=n, bits=bits,
                            block_size=block, accuracy_level=4)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", n])],
                              initializer=[numpy_helper.from_array(weights, "B"), numpy_helper.from_array(scales, "scales")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2  # as the workers run: the split over threads must not matter either
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("bits,block", [(4, 32), (8, 16), (8, 32)])
def test_a_rows_bits_do_not_depend_on_the_rows_beside_it(bits: int, block: int) -> None:
    rng = np.random.default_rng(bits * 100 + block)
    k, n = 256, 384
    s = _session(bits, block, k, n, rng)
    rows = rng.standard_normal((40, k)).astype(np.float32)
    row = rows[7]
    ref = s.run(None, {"A": np.stack([row, rows[0]])})[0][0]  # a decode step: the row padded to two
    for m, at in ((2, 1), (3, 2), (8, 5), (17, 16), (40, 7)):
        batch = rows[:m].copy()
        batch[at] = row
        got = s.run(None, {"A": batch})[0][at]
        assert np.array_equal(got, ref), (
            f"MatMulNBits ({bits}-bit, blocks of {block}, onnxruntime {ort.__version__}) gave row {at} of {m} "
            f"other bits than the same row in a 2-row product (max diff {np.abs(got - ref).max():.3g}): decoding "
            f"and tree verification of a quantized target would no longer agree bit for bit")
