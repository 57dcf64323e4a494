"""The fused graph's building blocks: ONNX Runtime's fused kernels in place of the
plain graph's elementwise chains (docs/export.md, "Fused graph").

| block | op | replaces |
|---|---|---|
| RMS norm | `RMSNormalization` (opset 23) | Mul, ReduceMean, Add, Sqrt, Reciprocal, Mul, Mul |
| residual + RMS norm | `com.microsoft:SkipSimplifiedLayerNormalization` | Add + the above |
| rotary embedding | `RotaryEmbedding` (opset 23) with per-token `position_ids` | Gather, Split, Neg, Concat, Mul, Mul, Add |
| tree attention | `Attention` (opset 23): grouped-query heads, boolean tree mask, new K/V scattered to their key slots | Concat, Transpose, MatMul, Where, Softmax, MatMul, Transpose |
| quantized linear | `com.microsoft:MatMulNBits` (+ one small MatMul for per-block minimums), or `cosine:GGUFMatMul` over the GGUF file's own rows (`--matmul gguf`, workers/kernels) | MatMul over float32 weights |

The interface (inputs, outputs, heads-major cache) is the plain graph's (layers.py), plus
``key_slots`` [B, T]: the key column in [0, P + T) of each new token (cosine/keyslots.py
says why decoding's columns make tree verification bit-exact).
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from .gguf_blocks import GGUFBlocks
from .graph import COSINE_DOMAIN, MS_DOMAIN, GraphBuilder
from .nbits import NBits

# MatMulNBits accuracy level: 4 = int8 compute on CPU (the activations of each block
# quantized to int8, as llama.cpp does for its K-quant dot products); 0 = float compute.
# On the 2-core CPU a 1536 x 8960 product took 4.1 ms at level 4 and 16 ms at level 0.
ACCURACY_LEVEL = 4


def linear(g: GraphBuilder, x: str, w: np.ndarray | NBits | GGUFBlocks, name: str, bias: np.ndarray | None = None,
           accuracy_level: int = ACCURACY_LEVEL) -> str:
    """x @ W^T (+ bias) for W [out, in]: a float MatMul, MatMulNBits or GGUFMatMul.
    Initializers are named ``name.weight`` (float, stored [in, out]), ``name.q/.scales/
    .offsets`` or ``name.blocks`` (the GGUF rows)."""
    if isinstance(w, GGUFBlocks):
        n, k = w.shape
        y = g.op("GGUFMatMul", [x, g.weight(name + ".blocks", w.raw, np.uint8)], domain=COSINE_DOMAIN,
                 format=w.format, K=k, N=n)
    elif isinstance(w, NBits):
        y = _matmul_nbits(g, x, w, name, accuracy_level)
    else:
        y = g.op("MatMul", [x, g.weight(name + ".weight", np.ascontiguousarray(w.T))])
    return g.op("Add", [y, g.weight(name + ".bias", bias)]) if bias is not None else y


def _nbits_weights(g: GraphBuilder, w: NBits, name: str) -> tuple[str, str, str | None]:
    """The initializers of one NBits matrix named ``name`` (written once: a tied embedding
    and LM head share them): packed q [N, blocks, bytes], scales [N * blocks], offsets
    [blocks, N]."""
    key = ("nbits", name)
    if key not in g.memo:
        g.memo[key] = (g.weight(name + ".q", w.packed(), np.uint8),
                       g.weight(name + ".scales", w.scale.reshape(-1), np.float32),
                       None if w.offset is None else g.weight(name + ".offsets", w.offset, np.float32))
    return g.memo[key]


def _matmul_nbits(g: GraphBuilder, x: str, w: NBits, name: str, accuracy_level: int) -> str:
    n, k = w.shape
    q, scales, offsets = _nbits_weights(g, w, name)
    y = g.op("MatMulNBits", [x, q, scales], domain=MS_DOMAIN, K=k, N=n, bits=w.bits, block_size=w.block_size,
             accuracy_level=accuracy_level)
    if offsets is None:
        return y
    return g.op("Add", [y, g.op("MatMul", [block_sums(g, x, k, w.block_size), offsets])])


def embedding(g: GraphBuilder, table: np.ndarray | NBits, ids: str, name: str) -> str:
    """Rows of the token embedding [V, hidden] for ids [B, T]. A block-quantized table is
    dequantized row by row in the graph (the rows gathered, then unpacked, scaled and
    offset): the float table of a 152k vocabulary would hold 0.9 GB of the 1.5B target's
    memory for the few rows each step reads."""
    if not isinstance(table, NBits):
        return g.op("Gather", [g.weight(name + ".weight", table), ids])
    v, k = table.shape
    blocks = k // table.block_size
    q, scales, offsets = _nbits_weights(g, table, name)
    rows = g.op("Gather", [q, ids])  # [B, T, blocks, bytes]
    if table.bits == 4:  # the even element of each pair is the low nibble
        lo = g.op("BitwiseAnd", [rows, g.const(15, np.uint8)])
        hi = g.op("BitShift", [rows, g.const(4, np.uint8)], direction="RIGHT")
        ax = g.i64([-1])
        rows = g.op("Concat", [g.op("Unsqueeze", [lo, ax]), g.op("Unsqueeze", [hi, ax])], axis=-1)
    vals = g.op("Reshape", [g.op("Cast", [rows], to=TensorProto.FLOAT), g.i64([0, 0, blocks, table.block_size])])
    scale_rows = g.op("Gather", [g.op("Reshape", [scales, g.i64([v, blocks])]), ids])  # [B, T, blocks]
    x = g.op("Mul", [g.op("Sub", [vals, g.f32(float(table.zero))]), g.op("Unsqueeze", [scale_rows, g.i64([-1])])])
    if offsets is not None:  # offsets are [blocks, V]: gather along V, then blocks last
        off = g.op("Transpose", [g.op("Gather", [offsets, ids], axis=1)], perm=[1, 2, 0])
        x = g.op("Add", [x, g.op("Unsqueeze", [off, g.i64([-1])])])
    return g.op("Reshape", [x, g.i64([0, 0, k])])


def block_sums(g: GraphBuilder, x: str, width: int, block_size: int) -> str:
    """[B, T, width] -> [B, T, width / block_size]: x summed over each quantization block
    (computed once per input and block size, shared by the products that read it)."""
    key = ("block_sums", x, block_size)
    if key not in g.memo:
        blocks = g.op("Reshape", [x, g.i64([0, 0, width // block_size, block_size])])
        g.memo[key] = g.op("ReduceSum", [blocks, g.i64([-1])], keepdims=0)
    return g.memo[key]


def rms_norm(g: GraphBuilder, x: str, weight: np.ndarray, eps: float, name: str) -> str:
    return g.op("RMSNormalization", [x, g.weight(name, weight)], axis=-1, epsilon=eps)


def skip_rms_norm(g: GraphBuilder, x: str, skip: str, weight: np.ndarray, eps: float, name: str) -> tuple[str, str]:
    """(rms_norm(x + skip), x + skip) in one kernel."""
    normed, _, _, total = g.op("SkipSimplifiedLayerNormalization", [x, skip, g.weight(name, weight)], outputs=4,
                               domain=MS_DOMAIN, epsilon=eps)
    return normed, total


def rope_caches(g: GraphBuilder, inv_freq: np.ndarray, max_positions: int, scaling: float = 1.0) -> tuple[str, str]:
    """RotaryEmbedding's cos/sin caches [max_positions, D/2], as HF computes them (float32)."""
    pos = np.arange(max_positions, dtype=np.float32)[:, None]
    freqs = pos * np.asarray(inv_freq, np.float32)[None, :]
    return (g.weight("rope.cos_cache", np.cos(freqs) * np.float32(scaling)),
            g.weight("rope.sin_cache", np.sin(freqs) * np.float32(scaling)))


def rotary(g: GraphBuilder, x: str, caches: tuple[str, str], position_ids: str, heads: int) -> str:
    """HF's rotate-half rotary embedding of x [B, T, heads*D] at explicit positions."""
    return g.op("RotaryEmbedding", [x, caches[0], caches[1], position_ids], num_heads=heads, interleaved=0)


def heads_major(g: GraphBuilder, x: str, heads: int, head_dim: int, name: str) -> str:
    """[B, T, heads*D] -> [B, heads, T, D] (a new-K/V output)."""
    return g.op("Transpose", [g.op("Reshape", [x, g.i64([0, 0, heads, head_dim])])], perm=[0, 2, 1, 3], name=name)


def key_slot_index(g: GraphBuilder, key_slots: str, new_key: str) -> str:
    """``key_slots`` [B, T] broadcast to new_key's shape [B, Hkv, T, D]: ScatterElements'
    indices, shared by every layer."""
    key = ("key_slot_index",)
    if key not in g.memo:
        g.memo[key] = g.op("Expand", [g.op("Unsqueeze", [key_slots, g.i64([1, 3])]), g.op("Shape", [new_key])])
    return g.memo[key]


def attention(g: GraphBuilder, q: str, new_kv: tuple[str, str], mask: str, past: tuple[str, str], index: str,
              heads: int, head_dim: int, scale: float) -> str:
    """Tree attention of q [B, T, heads*D] over the key sequence past [B, Hkv, P, D] ++
    new [B, Hkv, T, D], each new K/V also written at its key slot (``index`` from
    ``key_slot_index``), with the boolean mask [B, 1, T, P+T]; returns [B, T, heads*D].
    The mask selects the slot copies; the appended ones count only where a slot is
    P + t. Passing the whole key sequence as K/V (no past inputs) also spares the CPU
    kernel's present K/V outputs, which the worker never used."""
    keys = []
    for p, new in zip(past, new_kv):
        keys.append(g.op("ScatterElements", [g.op("Concat", [p, new], axis=2), index, new], axis=2))
    qh = g.op("Transpose", [g.op("Reshape", [q, g.i64([0, 0, heads, head_dim])])], perm=[0, 2, 1, 3])
    rows, extra = _query_padding(g, qh)
    padded_q = g.op("Concat", [qh, g.op("Slice", [qh, g.i64([0]), extra, g.i64([2])])], axis=2)
    y = g.op("Attention", [padded_q, keys[0], keys[1], padded_mask(g, mask, extra)], scale=scale)
    y = g.op("Slice", [y, g.i64([0]), rows, g.i64([2])])
    return g.op("Reshape", [g.op("Transpose", [y], perm=[0, 2, 1, 3]), g.i64([0, 0, heads * head_dim])])


def _query_padding(g: GraphBuilder, qh: str) -> tuple[str, str]:
    """(T, max(0, 2 - T)) as int64 [1] for queries [B, H, T, D]. ONNX Runtime 1.32's CPU
    Attention computes a lone query row with other last bits than the same row among
    several (measured: 1.5e-7 apart, enough to flip a token after int8 rounding many steps
    later); a lone row is given a copy of itself, so that decoding one token computes
    what a tree verify computes for it (tests/test_gguf_engine.py checks every node)."""
    key = ("query_padding",)
    if key not in g.memo:
        rows = g.op("Shape", [qh], start=2, end=3)
        g.memo[key] = rows, g.op("Max", [g.op("Sub", [g.i64([2]), rows]), g.i64([0])])
    return g.memo[key]


def padded_mask(g: GraphBuilder, mask: str, extra: str) -> str:
    """The mask [B, 1, T, S] with its first ``extra`` rows repeated (see _query_padding)."""
    key = ("padded_mask", mask)
    if key not in g.memo:
        g.memo[key] = g.op("Concat", [mask, g.op("Slice", [mask, g.i64([0]), extra, g.i64([2])])], axis=2)
    return g.memo[key]
