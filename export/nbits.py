"""Block-quantized weight matrices as operands of ONNX Runtime's ``MatMulNBits``.

A weight matrix W [N, K] (N outputs, K inputs, quantized in blocks along K) is held as

    W[n, k] = scale[n, b] * (byte[n, k] - z) + offset[b, n],     b = k // block_size

with ``z = 2 ** (bits - 1)``, the zero point MatMulNBits assumes when it is given none.
That one form carries every GGUF block format exactly (gguf_weights.py): symmetric ones
(Q4_0, Q5_0, Q6_K, Q8_0) have no offset; the ones with a per-block minimum (Q4_1, Q5_1,
Q4_K, Q5_K) put it in ``offset``. We do not pass MatMulNBits float zero points, which
would express the minimum directly: on onnxruntime 1.32's CPU provider they leave the
int8-compute path and ran a 1536 x 8960 product 60x slower (276 ms against 4.1 ms,
measured here). Instead the graph adds the offsets as one small product,

    x @ W^T = MatMulNBits(x) + blocksum(x) @ offset,     blocksum(x)[.., b] = sum of x over block b,

[K / block_size, N] floats: a quarter of the 4-bit weights' bytes (one float per 32).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BITS = (4, 8)


@dataclass
class NBits:
    """One quantized weight matrix; see the module docstring for the meaning."""

    bits: int
    block_size: int
    q: np.ndarray  # uint8 [N, K]: one value per weight, in 0 .. 2**bits - 1
    scale: np.ndarray  # float32 [N, K // block_size]
    offset: np.ndarray | None  # float32 [K // block_size, N], or None where it is zero

    def __post_init__(self) -> None:
        if self.bits not in BITS:
            raise ValueError(f"bits must be one of {BITS}, got {self.bits}")
        n, k = self.q.shape
        if k % self.block_size or self.scale.shape != (n, k // self.block_size):
            raise ValueError(f"{n}x{k} weights with block size {self.block_size} need scales "
                             f"[{n}, {k // max(self.block_size, 1)}], got {list(self.scale.shape)}")
        if self.offset is not None and self.offset.shape != (k // self.block_size, n):
            raise ValueError(f"offsets must be [{k // self.block_size}, {n}], got {list(self.offset.shape)}")

    @property
    def shape(self) -> tuple[int, int]:
        return self.q.shape  # type: ignore[return-value]

    @property
    def zero(self) -> int:
        return 1 << (self.bits - 1)

    def packed(self) -> np.ndarray:
        """MatMulNBits' B input: uint8 [N, K / block_size, block_size * bits / 8]; with 4 bits
        the even element of each pair is the low nibble."""
        n, k = self.q.shape
        q = self.q.reshape(n, k // self.block_size, self.block_size)
        if self.bits == 8:
            return np.ascontiguousarray(q)
        return np.ascontiguousarray(q[..., 0::2] | (q[..., 1::2] << 4))

    def dequantize(self) -> np.ndarray:
        """float32 W [N, K] (the reference the graph's product must match)."""
        n, k = self.q.shape
        nb = k // self.block_size
        w = (self.q.reshape(n, nb, self.block_size).astype(np.float32) - self.zero) * self.scale[..., None]
        if self.offset is not None:
            w = w + self.offset.T[..., None]
        return w.reshape(n, k)

    def rows(self, index: np.ndarray) -> "NBits":
        """The same matrix with its output rows reordered (a q/k head permutation)."""
        off = None if self.offset is None else np.ascontiguousarray(self.offset[:, index])
        return NBits(self.bits, self.block_size, np.ascontiguousarray(self.q[index]),
                     np.ascontiguousarray(self.scale[index]), off)


def stack(parts: list[NBits]) -> NBits:
    """Several matrices with the same format as one, outputs concatenated (fused QKV)."""
    first = parts[0]
    if any((p.bits, p.block_size, p.shape[1]) != (first.bits, first.block_size, first.shape[1]) for p in parts):
        raise ValueError("only matrices with the same bits, block size and input width stack")
    offsets = None
    if any(p.offset is not None for p in parts):
        offsets = np.concatenate([p.offset if p.offset is not None
                                  else np.zeros((p.shape[1] // p.block_size, p.shape[0]), np.float32)
                                  for p in parts], axis=1)
    return NBits(first.bits, first.block_size, np.concatenate([p.q for p in parts]),
                 np.concatenate([p.scale for p in parts]), offsets)


def from_integers(q: np.ndarray, scale: np.ndarray, minimum: np.ndarray | None, block_size: int,
                  signed: bool, levels: int | None = None) -> NBits:
    """W = scale * q + minimum per block, q integers; 4 bits when q takes at most 16
    values, else 8.

    ``q`` [N, K] ints (centred on 0 when ``signed``, else from 0); ``scale`` and
    ``minimum`` [N, K / block_size]; ``levels``: how many values the format's q takes (a
    GGUF format's, so that every part of a matrix converted in pieces is encoded alike),
    None = from the data. A signed q is stored around the zero point, so a symmetric
    format needs no offset. An unsigned q in 0 .. levels-1 is stored centred too (byte =
    q - levels/2 + z), and the offset takes ``minimum + scale * levels/2``: the smallest
    shift, so adding the offset back cancels the least float precision.
    """
    lo, hi = (int(q.min()), int(q.max())) if q.size else (0, 0)
    if levels is None:
        levels = 16 if (signed and -8 <= lo and hi <= 7) or (not signed and lo >= 0 and hi <= 15) else 256
        while not signed and levels // 2 > hi and levels > 16:
            levels //= 2
    bits = 4 if levels <= 16 else 8
    z = 1 << (bits - 1)
    shift = z if signed else z - levels // 2
    if lo + shift < 0 or hi + shift > (1 << bits) - 1:
        raise ValueError(f"integers {lo}..{hi} do not fit {bits} bits")
    offset = None
    if shift != z or minimum is not None:
        off = scale * np.float32(z - shift) if shift != z else np.zeros_like(scale)
        if minimum is not None:
            off = off + minimum
        offset = np.ascontiguousarray(off.T, np.float32)
    return NBits(bits, block_size, (q + shift).astype(np.uint8), np.ascontiguousarray(scale, np.float32), offset)


def quantize_symmetric(w: np.ndarray, bits: int = 4, block_size: int = 32) -> NBits:
    """Round-to-nearest symmetric quantization of float W [N, K] (for float sources: HF
    checkpoints, float GGUF files); the scale maps each block's largest magnitude to the
    most negative integer, as MatMulNBitsQuantizer's symmetric mode does."""
    n, k = w.shape
    if k % block_size:
        raise ValueError(f"input width {k} is not a multiple of the block size {block_size}")
    qmax = (1 << (bits - 1)) - 1
    blocks = w.reshape(n, k // block_size, block_size).astype(np.float32)
    peak = np.take_along_axis(blocks, np.abs(blocks).argmax(-1)[..., None], -1)[..., 0]
    scale = peak / np.float32(-(qmax + 1))
    inv = np.divide(1.0, scale, out=np.zeros_like(scale), where=scale != 0)
    q = np.clip(np.rint(blocks * inv[..., None]), -(qmax + 1), qmax).astype(np.int16).reshape(n, k)
    return from_integers(q, scale, None, block_size, signed=True)
