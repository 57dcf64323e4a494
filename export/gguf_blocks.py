"""Weight matrices kept in GGUF's own block bytes, for cosine's ``GGUFMatMul`` operator
(workers/kernels): each output row is the GGUF tensor's row, unchanged, so the engine
reads the weights at the file's size (Q4_K 4.5 bits per weight, Q6_K 6.56, Q8_0 8.5).

``--matmul gguf`` builds products from these; ``--matmul nbits`` from NBits (nbits.py),
ONNX Runtime's MatMulNBits, which any provider runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# formats the kernel computes, and the input widths it takes (its activations are
# quantized in blocks of 256)
KERNEL_FORMATS = ("Q4_K", "Q6_K", "Q8_0")
WIDTH_MULTIPLE = 256


def _sizes(fmt: str) -> tuple[int, int]:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    return GGML_QUANT_SIZES[GGMLQuantizationType[fmt]]


@dataclass
class GGUFBlocks:
    """W [N, K] as GGUF rows: ``raw`` uint8 [N, K / block_elems * block_bytes]."""

    format: str
    raw: np.ndarray
    k: int

    def __post_init__(self) -> None:
        if self.format not in KERNEL_FORMATS:
            raise ValueError(f"GGUFMatMul computes {', '.join(KERNEL_FORMATS)}, not {self.format}")
        elems, nbytes = _sizes(self.format)
        if self.k % WIDTH_MULTIPLE or self.raw.ndim != 2 or self.raw.shape[1] != self.k // elems * nbytes:
            raise ValueError(f"{self.format} rows of width {self.k} need a width that is a multiple of "
                             f"{WIDTH_MULTIPLE} and {self.k // elems * nbytes} bytes per row, got {self.raw.shape}")
        self.raw = np.ascontiguousarray(self.raw, np.uint8)

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.raw.shape[0]), self.k

    def rows(self, index: np.ndarray) -> "GGUFBlocks":
        """The same matrix with its output rows reordered (a q/k head permutation)."""
        return GGUFBlocks(self.format, self.raw[np.asarray(index)], self.k)

    def dequantize(self) -> np.ndarray:
        """float32 W [N, K], gguf's own dequantization."""
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        return dequantize(self.raw, GGMLQuantizationType[self.format]).reshape(self.shape).astype(np.float32)


def fits(fmt: str, k: int) -> bool:
    """Whether the kernel computes a matrix of this format and input width."""
    return fmt in KERNEL_FORMATS and k % WIDTH_MULTIPLE == 0


def stack(parts: list[GGUFBlocks]) -> GGUFBlocks:
    """Several matrices of one format and input width as one, outputs concatenated."""
    first = parts[0]
    if any((p.format, p.k) != (first.format, first.k) for p in parts):
        raise ValueError("only matrices with the same format and input width stack")
    return GGUFBlocks(first.format, np.concatenate([p.raw for p in parts]), first.k)


def quantize_q8_0(w: np.ndarray) -> GGUFBlocks:
    """Float W [N, K] -> Q8_0 rows (gguf's own quantizer: per 32 weights an fp16 scale
    max|w| / 127 and int8 values), for ``--quantize int8 --matmul gguf``."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    n, k = w.shape
    raw = quantize(np.ascontiguousarray(w, np.float32), GGMLQuantizationType.Q8_0)
    return GGUFBlocks("Q8_0", raw.reshape(n, -1), k)
