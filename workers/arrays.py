"""Where a worker's KV cache lives: numpy arrays in host memory, or torch tensors on the
worker's device (docs/design.md, "Device-resident cache").

ONNX Runtime reads and writes both in place: the engine binds them by address through
``io_binding()``, so a forward's past K/V is never copied to or from the host, and the
cache's own bookkeeping (appending rows, keeping a verified tree's accepted nodes,
growing a slab, laying out a batch's pasts with padding) runs on the device as indexing
of these arrays. ONNX Runtime has no API for slicing a device buffer, and a small ONNX
graph per cache edit would rewrite whole slabs; torch, which the GPU host brings anyway,
does these edits in place. Torch on the CPU runs the very code of the GPU path, which is
how CI tests it.

Only small things cross the bus: token ids, positions, the mask and the logits rows
asked for. ``Transfers`` counts every byte of cache data that does cross (there should
be none) and the logits bytes brought back.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np

KINDS = ("numpy", "torch")


@dataclass
class Transfers:
    """Bytes moved between host memory and the cache's device (docs/workers.md)."""

    cache_to_host: int = 0  # must stay 0 on the bound path
    cache_from_host: int = 0
    logits_to_host: int = 0

    def snapshot(self) -> dict[str, int]:
        return {"cache_bytes_to_host": self.cache_to_host, "cache_bytes_from_host": self.cache_from_host,
                "logits_bytes_to_host": self.logits_to_host}


class NumpyArrays:
    """Host memory (the CPU provider's device)."""

    kind = "numpy"
    device_type, device_id = "cpu", 0

    def __init__(self) -> None:
        self.transfers = Transfers()

    def empty(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        return np.empty(shape, dtype)

    def zeros(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        return np.zeros(shape, dtype)

    def index(self, idx: np.ndarray) -> np.ndarray:
        return np.asarray(idx, np.int64)

    def address(self, a: np.ndarray) -> int:
        return int(a.ctypes.data)

    def logits_to_host(self, a: np.ndarray) -> np.ndarray:
        return np.array(a)  # a copy: the buffer may be a reused one (graphs.py)

    def copy(self, a: np.ndarray) -> np.ndarray:
        return a.copy()

    def copy_from_host(self, dst: np.ndarray, host: np.ndarray) -> None:
        dst[...] = host

    def to_host(self, a: np.ndarray) -> np.ndarray:
        return np.asarray(a)


class TorchArrays:
    """Torch tensors on ``device`` ("cpu" or "cuda:N")."""

    kind = "torch"

    def __init__(self, device: str = "cpu") -> None:
        try:
            import torch
        except ImportError:
            raise RuntimeError("a GPU worker keeps its KV cache in torch tensors on the device, but torch is "
                               "not installed; install PyTorch for this GPU, or set kv_arrays = \"numpy\" "
                               "(the cache then crosses the bus at every step)") from None
        self.torch = torch
        self.device = torch.device(device)
        m = re.fullmatch(r"cuda(?::(\d+))?", device)
        self.device_type, self.device_id = ("cuda", int(m.group(1) or 0)) if m else ("cpu", 0)
        self.transfers = Transfers()
        self._dtypes = {np.dtype(np.float32): torch.float32, np.dtype(np.float16): torch.float16,
                        np.dtype(np.int64): torch.int64, np.dtype(np.bool_): torch.bool}

    def empty(self, shape: tuple[int, ...], dtype: np.dtype) -> Any:
        return self.torch.empty(shape, dtype=self._dtypes[np.dtype(dtype)], device=self.device)

    def zeros(self, shape: tuple[int, ...], dtype: np.dtype) -> Any:
        return self.torch.zeros(shape, dtype=self._dtypes[np.dtype(dtype)], device=self.device)

    def index(self, idx: np.ndarray) -> Any:
        return self.torch.as_tensor(np.asarray(idx, np.int64), device=self.device)

    def address(self, a: Any) -> int:
        return int(a.data_ptr())

    def logits_to_host(self, a: Any) -> np.ndarray:
        out = a.cpu().numpy()
        if self.device_type != "cpu":
            self.transfers.logits_to_host += out.nbytes
        return out

    def copy(self, a: Any) -> Any:
        return a.clone()

    def copy_from_host(self, dst: Any, host: np.ndarray) -> None:
        """Small inputs (ids, positions, mask) into a persistent device buffer."""
        dst.copy_(self.torch.from_numpy(np.ascontiguousarray(host)))

    def to_host(self, a: Any) -> np.ndarray:
        """Cache data to host memory: counted, and never on the bound forward path."""
        out = a.cpu().numpy()
        self.transfers.cache_to_host += out.nbytes
        return out


Arrays = NumpyArrays | TorchArrays


def make(kind: str, device: str) -> Arrays:
    """``kind``: "numpy", "torch" or "auto" (numpy on the CPU, torch on a GPU)."""
    if kind == "auto":
        kind = "numpy" if device == "cpu" else "torch"
    if kind == "numpy":  # on a GPU: the cache crosses the bus at every forward (counted)
        return NumpyArrays()
    if kind == "torch":
        return TorchArrays(device)
    raise ValueError(f"kv_arrays must be one of auto, {', '.join(KINDS)}; got {kind!r}")
