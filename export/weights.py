"""Where each weight of the graph comes from, and in which precision.

``Weights`` hands the graph builders float vectors (norms, biases, embeddings) and
matrices [out, in] that are float32 arrays or block-quantized ``NBits``:

| quantize | matrices |
|---|---|
| none | float32, from the PyTorch model |
| gguf | the GGUF file's own blocks, exactly (gguf_weights.py); float where the file has float |
| int4, int8 | round-to-nearest symmetric blocks of 32 from the float weights (any source) |

and, per ``matmul``, which operator computes them: ``nbits`` (ONNX Runtime's MatMulNBits,
matrices as ``NBits``) or ``gguf`` (cosine's GGUFMatMul, matrices as ``GGUFBlocks``:
the file's Q4_K / Q6_K / Q8_0 rows for ``gguf``, Q8_0 rows for ``int8``; any matrix the
kernel does not compute stays NBits). The embedding table is always NBits or float: the
graph gathers its rows.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import numpy as np

from . import gguf_blocks as gb
from .errors import ExportError
from .gguf_blocks import GGUFBlocks
from .nbits import NBits, quantize_symmetric, stack

QUANTIZE = ("none", "gguf", "int4", "int8")
MATMUL = ("nbits", "gguf")
Matrix = np.ndarray | NBits | GGUFBlocks

log = logging.getLogger("cosine.export")


def resolve_matmul(matmul: str, quantize: str, provider: str = "cpu") -> str:
    """The operator an export with these settings computes its quantized products with:
    "nbits" or "gguf". ``matmul`` "auto" takes the GGUF kernel for a GGUF file's blocks on
    CPU where the kernel builds (else MatMulNBits, with a warning); an explicit "gguf" that
    cannot apply is an ExportError saying why."""
    from cosine.workers import kernels

    if matmul not in ("auto", *MATMUL):
        raise ExportError(f"matmul must be one of auto, {', '.join(MATMUL)}, got {matmul!r}")
    if matmul == "nbits" or (matmul == "auto" and (quantize != "gguf" or provider != "cpu")):
        return "nbits"
    why = kernels.available()
    if matmul == "auto":
        if why:
            log.warning("GGUF kernel unavailable (%s): computing the blocks with MatMulNBits", why)
        return "nbits" if why else "gguf"
    if provider != "cpu":
        raise ExportError(f"--matmul gguf is a CPU operator; provider {provider} takes --matmul nbits")
    if quantize not in ("gguf", "int8"):
        raise ExportError(f"--matmul gguf computes --quantize gguf or int8 engines, not {quantize}")
    if why:
        raise ExportError(f"--matmul gguf: {why}")
    return "gguf"


class Weights:
    def __init__(self, tensor: Callable[[str], np.ndarray], names: set[str], quantize: str = "none",
                 gguf: Any = None, block_size: int = 32, matmul: str = "nbits") -> None:
        if quantize not in QUANTIZE:
            raise ExportError(f"quantize must be one of {', '.join(QUANTIZE)}, got {quantize!r}")
        if quantize == "gguf" and gguf is None:
            raise ExportError("--quantize gguf carries a GGUF file's blocks over: pass a .gguf file as --model")
        self.tensor, self.names, self.quantize, self.gguf, self.block_size = tensor, names, quantize, gguf, block_size
        self.matmul = matmul

    def has(self, name: str) -> bool:
        return name in self.names

    def vector(self, name: str) -> np.ndarray:
        return self.tensor(name)

    def matrix(self, name: str) -> Matrix:
        """One [out, in] matrix in the chosen precision, for the chosen operator."""
        if self.matmul == "gguf":
            if self.quantize == "gguf":
                blocks = self.gguf.blocks(name)
                if blocks is not None:
                    self._check_blocks(name, blocks)
                    return blocks
            elif gb.fits("Q8_0", self.tensor(name).shape[1]):
                return gb.quantize_q8_0(self.tensor(name))
        return self.table(name)

    def _check_blocks(self, name: str, blocks: GGUFBlocks) -> None:
        """The file's rows, as the graph will hold them, dequantize to the very float
        matrix transformers loaded (same rows, same order): proof that the engine
        computes with the file's weights."""
        if not np.array_equal(blocks.dequantize(), np.asarray(self.tensor(name), np.float32)):
            raise ExportError(f"{name}: the GGUF file's {blocks.format} rows do not dequantize to the weights "
                              f"transformers loaded from it (row order or format mismatch)")

    def table(self, name: str) -> np.ndarray | NBits:
        """A matrix as float or NBits (the embedding table, whose rows the graph gathers)."""
        if self.quantize == "gguf":
            nb = self.gguf.nbits(name)
            return self.tensor(name) if nb is None else nb
        if self.quantize in ("int4", "int8"):
            return quantize_symmetric(self.tensor(name), bits=int(self.quantize[3:]), block_size=self.block_size)
        return self.tensor(name)

    def groups(self, names: list[str]) -> list[tuple[list[str], list[int], Matrix]]:
        """Matrices that share one input, concatenated along their outputs into as few
        products as their formats allow (float with float; NBits with the same bits and
        block size): [q|k|v] in one product when all three have one format, [q|k] and [v]
        when the GGUF file stores v in another. Returns (member names, their output
        widths, matrix) per product."""
        groups: dict[tuple, tuple[list[str], list]] = {}
        for name in names:
            m = self.matrix(name)
            key = ("nbits", m.bits, m.block_size) if isinstance(m, NBits) else \
                ("gguf", m.format, m.k) if isinstance(m, GGUFBlocks) else ("float",)
            members, parts = groups.setdefault(key, ([], []))
            members.append(name)
            parts.append(m)
        return [(members, [p.shape[0] for p in parts], _stack(parts)) for members, parts in groups.values()]


def _stack(parts: list) -> Matrix:
    if isinstance(parts[0], NBits):
        return stack(parts)
    if isinstance(parts[0], GGUFBlocks):
        return gb.stack(parts)
    return np.concatenate(parts)
