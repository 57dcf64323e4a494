"""Where each weight of the graph comes from, and in which precision.

``Weights`` hands the graph builders float vectors (norms, biases, embeddings) and
matrices [out, in] that are float32 arrays or block-quantized ``NBits``:

| quantize | matrices |
|---|---|
| none | float32, from the PyTorch model |
| gguf | the GGUF file's own blocks, exactly (gguf_weights.py); float where the file has float |
| int4, int8 | round-to-nearest symmetric blocks of 32 from the float weights (any source) |
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from .errors import ExportError
from .nbits import NBits, quantize_symmetric, stack

QUANTIZE = ("none", "gguf", "int4", "int8")


class Weights:
    def __init__(self, tensor: Callable[[str], np.ndarray], names: set[str], quantize: str = "none",
                 gguf: Any = None, block_size: int = 32) -> None:
        if quantize not in QUANTIZE:
            raise ExportError(f"quantize must be one of {', '.join(QUANTIZE)}, got {quantize!r}")
        if quantize == "gguf" and gguf is None:
            raise ExportError("--quantize gguf carries a GGUF file's blocks over: pass a .gguf file as --model")
        self.tensor, self.names, self.quantize, self.gguf, self.block_size = tensor, names, quantize, gguf, block_size

    def has(self, name: str) -> bool:
        return name in self.names

    def vector(self, name: str) -> np.ndarray:
        return self.tensor(name)

    def matrix(self, name: str) -> np.ndarray | NBits:
        """One [out, in] matrix in the chosen precision."""
        if self.quantize == "gguf":
            nb = self.gguf.nbits(name)
            return self.tensor(name) if nb is None else nb
        if self.quantize in ("int4", "int8"):
            return quantize_symmetric(self.tensor(name), bits=int(self.quantize[3:]), block_size=self.block_size)
        return self.tensor(name)

    def groups(self, names: list[str]) -> list[tuple[list[str], list[int], np.ndarray | NBits]]:
        """Matrices that share one input, concatenated along their outputs into as few
        products as their formats allow (float with float; NBits with the same bits and
        block size): [q|k|v] in one product when all three have one format, [q|k] and [v]
        when the GGUF file stores v in another. Returns (member names, their output
        widths, matrix) per product."""
        groups: dict[tuple, tuple[list[str], list]] = {}
        for name in names:
            m = self.matrix(name)
            key = ("nbits", m.bits, m.block_size) if isinstance(m, NBits) else ("float",)
            members, parts = groups.setdefault(key, ([], []))
            members.append(name)
            parts.append(m)
        return [(members, [p.shape[0] for p in parts], stack(parts) if isinstance(parts[0], NBits)
                 else np.concatenate(parts)) for members, parts in groups.values()]
