"""The block-quantized tensors of a GGUF file as exact ``NBits`` matrices (nbits.py).

Every block format read here writes a weight as ``scale * q + minimum`` per block, with
an integer q and float scale (and minimum) from the block's header; we read the scale and
minimum from the header, recover q from gguf's own dequantization and check that the
triple gives back gguf's float weights bit for bit. So an engine built from these
computes with the very weights the user downloaded (llama.cpp's dequantization), not a
second quantization of them.

Tensors in other formats (F32, F16, BF16 and any block format not listed) come back as
None: the caller keeps them as float, from the PyTorch model transformers loaded.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .gguf_blocks import GGUFBlocks, fits
from .nbits import NBits, from_integers, stack

log = logging.getLogger("cosine.export")


def _f16(blocks: np.ndarray, start: int) -> np.ndarray:
    return np.ascontiguousarray(blocks[:, start:start + 2]).view(np.float16).astype(np.float32)[:, 0]


def _k_scales(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K / Q5_K: scale and minimum of each 32-weight sub-block, [n_blocks, 8]."""
    from gguf.quants import Q4_K

    sc, mn = Q4_K.get_scale_min(np.ascontiguousarray(blocks[:, 4:16]))
    d, dmin = _f16(blocks, 0)[:, None], _f16(blocks, 2)[:, None]
    return d * sc.astype(np.float32), -(dmin * mn.astype(np.float32))


def _q6_k_scales(blocks: np.ndarray) -> tuple[np.ndarray, None]:
    sc = np.ascontiguousarray(blocks[:, 192:208]).view(np.int8).astype(np.float32)
    return _f16(blocks, 208)[:, None] * sc, None


# format -> (weights per scale, signed q, values q takes, header reader giving
# [n_blocks, scales per block] scale and minimum)
_Header = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray | None]]
_FORMATS: dict[str, tuple[int, bool, int, _Header]] = {
    "Q4_0": (32, True, 16, lambda b: (_f16(b, 0)[:, None], None)),
    "Q4_1": (32, False, 16, lambda b: (_f16(b, 0)[:, None], _f16(b, 2)[:, None])),
    "Q5_0": (32, True, 32, lambda b: (_f16(b, 0)[:, None], None)),
    "Q5_1": (32, False, 32, lambda b: (_f16(b, 0)[:, None], _f16(b, 2)[:, None])),
    "Q8_0": (32, True, 256, lambda b: (_f16(b, 0)[:, None], None)),
    "Q4_K": (32, False, 16, _k_scales),
    "Q5_K": (32, False, 32, _k_scales),
    "Q6_K": (16, True, 64, _q6_k_scales),
}
CHUNK_ROWS = 8192  # a matrix is converted in pieces of rows: the 152k-row head at once took ~5 GB
FORMATS = tuple(_FORMATS)


def to_nbits(data: np.ndarray, qtype: Any, shape: tuple[int, int]) -> NBits:
    """One GGUF tensor's raw blocks (``ReaderTensor.data``) -> NBits [N, K], exactly,
    converted CHUNK_ROWS rows at a time."""
    n, k = shape
    data = np.asarray(data, np.uint8).reshape(n, -1)
    if n <= CHUNK_ROWS:
        return _rows_to_nbits(data, qtype, shape)
    return stack([_rows_to_nbits(data[i:i + CHUNK_ROWS], qtype, (min(CHUNK_ROWS, n - i), k))
                  for i in range(0, n, CHUNK_ROWS)])


def _rows_to_nbits(data: np.ndarray, qtype: Any, shape: tuple[int, int]) -> NBits:
    from gguf import GGML_QUANT_SIZES
    from gguf.quants import dequantize

    name = qtype.name
    if name not in _FORMATS:
        raise ValueError(f"GGUF format {name} is not carried over as blocks (supported: {', '.join(FORMATS)})")
    block_size, signed, levels, header = _FORMATS[name]
    n, k = shape
    elems, nbytes = GGML_QUANT_SIZES[qtype]
    blocks = np.asarray(data, np.uint8).reshape(-1, nbytes)
    if blocks.shape[0] * elems != n * k:
        raise ValueError(f"{name} data holds {blocks.shape[0] * elems} weights, shape {n}x{k} needs {n * k}")
    w = dequantize(np.asarray(data), qtype).reshape(n, k // block_size, block_size)
    scale, minimum = (a.reshape(n, k // block_size) if a is not None else None for a in header(blocks))
    m = 0.0 if minimum is None else minimum[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(scale[..., None] != 0, np.rint((w - m) / scale[..., None]), 0.0)
    back = scale[..., None] * q + m
    if not np.array_equal(back, w):
        bad = float(np.abs(back - w).max())
        raise ValueError(f"{name} blocks do not reproduce gguf's dequantization (max error {bad:g}); "
                         f"this gguf package writes the format differently")
    return from_integers(q.reshape(n, k).astype(np.int16), scale, minimum, block_size, signed, levels)


class GGUFMatrices:
    """The GGUF file's block-quantized matrices, looked up by Hugging Face parameter name
    (``model.layers.0.mlp.down_proj.weight``), oriented [out, in] like ``nn.Linear``."""

    def __init__(self, path: str | Path, model: Any, config: Any) -> None:
        from gguf import GGUFReader
        from transformers.modeling_gguf_pytorch_utils import (TENSOR_PROCESSORS, TensorProcessor,
                                                               get_gguf_hf_weights_map)

        self.reader = GGUFReader(str(path))
        field = self.reader.fields["general.architecture"]
        arch = bytes(field.parts[field.data[0]]).decode()
        heads = int(config.num_attention_heads)
        # transformers' own processor: the same q/k row permutation it applied to the float model
        self.processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config={
            "num_attention_heads": heads,
            "num_key_value_heads": int(getattr(config, "num_key_value_heads", None) or heads)})
        to_hf = get_gguf_hf_weights_map(model, self.processor)
        self.tensors = {to_hf[t.name]: t for t in self.reader.tensors if t.name in to_hf}

    def nbits(self, hf_name: str) -> NBits | None:
        """The matrix as NBits, or None when the file holds it as float (or lacks it)."""
        t = self.tensors.get(hf_name)
        if t is None or t.tensor_type.name not in _FORMATS:
            if t is not None and t.tensor_type.name not in ("F32", "F16", "BF16"):
                log.warning("%s is %s, which is not carried over as blocks: it stays float", hf_name,
                            t.tensor_type.name)
            return None
        n, k = int(t.shape[1]), int(t.shape[0])  # GGUF lists the contiguous (input) axis first
        nb = to_nbits(t.data, t.tensor_type, (n, k))
        order = self._row_order(t.name, n)
        return nb if order is None else nb.rows(order)

    def blocks(self, hf_name: str) -> GGUFBlocks | None:
        """The matrix as the file's own rows for the GGUF kernel, or None when the kernel
        does not compute its format or width (the caller falls back to ``nbits``)."""
        t = self.tensors.get(hf_name)
        if t is None:
            return None
        n, k = int(t.shape[1]), int(t.shape[0])
        if not fits(t.tensor_type.name, k):
            return None
        raw = np.asarray(t.data, np.uint8).reshape(n, -1)
        order = self._row_order(t.name, n)
        return GGUFBlocks(t.tensor_type.name, raw if order is None else raw[order], k)

    def _row_order(self, gguf_name: str, n: int) -> np.ndarray | None:
        """transformers' q/k row permutation for this tensor; None when it keeps the order."""
        order = self.processor.process(weights=np.arange(n)[:, None], name=gguf_name).weights[:, 0]
        return None if np.array_equal(order, np.arange(n)) else np.asarray(order)
