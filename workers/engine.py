"""One exported engine (docs/design.md "Engine") inside an ONNX Runtime session.

The engine is stateless: every call gets the past K/V it should attend to and returns
the new tokens' K/V; the KV cache (kvcache.py) owns the memory. Every forward runs
through ``io_binding()``: past K/V are bound by address where the cache keeps them (host
memory or the device, arrays.py), the new K/V and the logits are written into buffers
allocated there, and only ids, positions, mask and the logits rows asked for cross the
bus. The requested execution provider is used or start-up fails: a CUDA worker silently
running on CPU would be a 10-100x slowdown nobody notices until production.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from cosine.keyslots import appended, host_layout

from . import arrays as arrays_mod
from . import kernels
from .graphs import GraphBuckets

log = logging.getLogger("cosine.worker.engine")

# Engine manifest format. 2: the graph takes ``logits_index`` and computes logits only for
# those rows. 3: the cache and the new K/V are heads-major [B, Hkv, P, D] (the standard
# Attention op's layout); engines of formats 1-2 (sequence-major) must be exported again.
FORMAT_VERSION = 3

_PROVIDER_NAMES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


class EngineError(RuntimeError):
    """The engine cannot be loaded as configured (bad directory, provider missing)."""


def _device_id(device: str) -> int:
    m = re.fullmatch(r"cuda(?::(\d+))?", device)
    return int(m.group(1) or 0) if m else 0


def _providers(provider: str, device: str, engine_dir: Path, cuda_graph: bool = False) -> list[Any]:
    """ONNX Runtime provider list for the configured provider; never includes a fallback
    to CPU for a GPU provider (TensorRT may fall back to CUDA for unsupported nodes)."""
    if provider == "cpu":
        return ["CPUExecutionProvider"]
    dev = {"device_id": _device_id(device)}
    if provider == "cuda":
        return [("CUDAExecutionProvider", {**dev, "enable_cuda_graph": "1"} if cuda_graph else dev)]
    if provider == "tensorrt":
        cache = engine_dir / "trt_cache"
        cache.mkdir(exist_ok=True)
        trt = {**dev, "trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache)}
        return [("TensorrtExecutionProvider", trt), ("CUDAExecutionProvider", dev)]
    raise EngineError(f"unknown provider {provider!r}; use one of {sorted(_PROVIDER_NAMES)}")


def check_prefill_engine(main: "Engine", prefill: "Engine") -> None:
    """A prefill engine writes the cache the main engine reads: the same model and cache
    layout, and key slots (so that a prompt's keys sit where decoding's would, whatever the
    batch: without them a batched prefill would compute other bits than a lone one)."""
    facts = ("num_layers", "num_kv_heads", "head_dim", "vocab_size", "dtype")
    differ = [f"{f} {getattr(prefill, f)} vs {getattr(main, f)}" for f in facts if getattr(prefill, f) != getattr(main, f)]
    for key in ("architecture", "model_type", "source_sha256"):  # the same weights, where both manifests say
        a, b = prefill.manifest.get(key), main.manifest.get(key)
        if a is not None and b is not None and a != b:
            differ.append(f"{key} {a} vs {b}")
    if differ:
        raise EngineError(f"prefill engine {prefill.dir} is not the same model as {main.dir}: {', '.join(differ)}; "
                          f"export both from the same weights")
    if not prefill.takes_slots:
        raise EngineError(f"prefill engine {prefill.dir} has no key_slots input (exported before key slots); "
                          f"export it again with cosine-export")


def all_rows(batch: int, seq: int) -> np.ndarray:
    """``logits_index`` asking for every one of ``seq`` new tokens' logits: int64 [batch, seq]."""
    return np.broadcast_to(np.arange(seq, dtype=np.int64), (batch, seq)).copy()


class Engine:
    """ONNX Runtime session over an engine directory plus its manifest facts."""

    def __init__(self, engine_dir: str | Path, provider: str = "cpu", device: str = "cpu", threads: int = 0,
                 spin: bool = False, kv_arrays: str = "auto", cuda_graph: bool = False,
                 buckets: bool | None = None, min_rows: int = 1):
        """``cuda_graph``: capture each shape bucket as a CUDA graph (provider cuda);
        ``buckets``: run forwards through the shape buckets without capturing (the CPU
        tests of that path); None = as ``cuda_graph``. ``min_rows``: batching pads a
        single-row forward to this many rows (2 for a target: batching.py says why),
        unless the manifest says one row computes as it does among many."""
        self.min_rows = min_rows
        self.dir = Path(engine_dir)
        manifest_path = self.dir / "manifest.json"
        model_path = self.dir / "model.onnx"
        if not manifest_path.is_file() or not model_path.is_file():
            raise EngineError(f"{self.dir} is not an engine directory (needs manifest.json and model.onnx); "
                              f"build it with cosine-export")
        self.manifest: dict[str, Any] = json.loads(manifest_path.read_text())
        m = self.manifest
        if m.get("one_row_exact"):
            self.min_rows = 1
        if int(m.get("format_version", 1)) < FORMAT_VERSION:
            raise EngineError(f"{self.dir} is an engine of format {m.get('format_version', 1)}, older than this "
                              f"worker's {FORMAT_VERSION} (its cache layout changed); export it again with "
                              f"cosine-export (`make demo` does it for the engines config.toml names)")
        self.num_layers = int(m["num_layers"])
        self.num_kv_heads = int(m["num_kv_heads"])
        self.head_dim = int(m["head_dim"])
        self.vocab_size = int(m["vocab_size"])
        self.max_positions = int(m["max_positions"])
        self.dtype = np.dtype(m.get("dtype", "float32"))
        self.provider = provider
        self.device = device
        try:
            self.arrays = arrays_mod.make(kv_arrays, device)
        except (RuntimeError, ValueError) as e:
            raise EngineError(str(e)) from None

        wanted = _PROVIDER_NAMES.get(provider)
        if wanted is None:
            raise EngineError(f"unknown provider {provider!r}; use one of {sorted(_PROVIDER_NAMES)}")
        if provider != "cpu" and hasattr(ort, "preload_dlls"):
            # onnxruntime-gpu >= 1.21 can load the CUDA/cuDNN DLLs from pip wheels.
            try:
                ort.preload_dlls()
            except Exception as e:  # a missing optional library is reported by the check below
                log.debug("onnxruntime.preload_dlls failed: %s", e)
        available = ort.get_available_providers()
        if wanted not in available:
            raise EngineError(f"provider {provider!r} ({wanted}) is not available in this onnxruntime "
                              f"{ort.__version__} build; available: {available}. Install onnxruntime-gpu "
                              f"(cuda/tensorrt) or set provider = \"cpu\" for this worker")

        opts = ort.SessionOptions()
        try:
            kernels.register(opts, m)  # cosine's own operators, where the engine uses them
        except kernels.KernelUnavailable as e:
            raise EngineError(f"{self.dir}: {e}") from None
        if threads > 0:
            opts.intra_op_num_threads = threads
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if not spin:  # a spinning idle thread pool steals cores from co-located workers
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
        if cuda_graph and (provider != "cuda" or self.arrays.device_type != "cuda"):
            raise EngineError("cuda_graph needs provider \"cuda\" with the cache on the GPU (kv_arrays \"auto\" "
                              "or \"torch\"): a CUDA graph replays kernels over fixed device buffers")
        try:
            self.session = ort.InferenceSession(str(model_path), sess_options=opts,
                                                providers=_providers(provider, device, self.dir, cuda_graph))
        except Exception as e:
            raise EngineError(f"could not load {model_path} with {wanted}: {e}") from e
        got = self.session.get_providers()[0]
        if got != wanted:
            raise EngineError(f"requested {wanted} but the session runs on {got}; refusing to fall back")

        self._past_names = [(f"past_key.{i}", f"past_value.{i}") for i in range(self.num_layers)]
        self._out_names = ["logits"] + [f"new_key.{i}" for i in range(self.num_layers)] \
            + [f"new_value.{i}" for i in range(self.num_layers)]
        inputs = {i.name for i in self.session.get_inputs()}
        missing = {"input_ids", "position_ids", "attention_mask", "logits_index", *sum(self._past_names, ())} - inputs
        if missing:
            raise EngineError(f"{model_path} lacks graph inputs {sorted(missing)} (see docs/design.md)")
        # key_slots (cosine/keyslots.py): where each new token's key goes; engines exported
        # before it (and the plain graph) append new keys after the past, inexactly
        self.takes_slots = "key_slots" in inputs
        self.layout = host_layout() if self.takes_slots else None
        self.inexact_nodes = 0  # tree nodes laid out unlike decoding (counted by batching.py)
        self.cuda_graph = cuda_graph
        self.graphs = GraphBuckets(self, capture=cuda_graph) if (cuda_graph if buckets is None else buckets) else None
        log.info("engine %s loaded: %s, L=%d Hkv=%d D=%d V=%d max_positions=%d dtype=%s on %s; %s",
                 self.dir, m.get("name", "?"), self.num_layers, self.num_kv_heads, self.head_dim,
                 self.vocab_size, self.max_positions, self.dtype, got,
                 f"key slots in {self.layout.lanes} lanes, blocks of {self.layout.block} (tree verifies exact)"
                 if self.layout else "new keys appended (no key_slots input: tree verifies not bit-exact)")

    def summary(self) -> dict[str, Any]:
        return {"name": self.manifest.get("name"), "architecture": self.manifest.get("architecture"),
                "vocab_size": self.vocab_size, "num_layers": self.num_layers, "dtype": self.dtype.name,
                "max_positions": self.max_positions,
                "key_layout": self.layout.to_dict() if self.layout is not None else None}

    def empty_past(self, batch: int = 1) -> list[tuple[Any, Any]]:
        z = self.arrays.zeros((batch, self.num_kv_heads, 0, self.head_dim), self.dtype)
        return [(z, z)] * self.num_layers

    def forward(self, input_ids: np.ndarray, position_ids: np.ndarray, attention_mask: np.ndarray,
                past: list[tuple[Any, Any]], logits_index: np.ndarray | None = None,
                key_slots: np.ndarray | None = None) -> tuple[np.ndarray, list[Any], list[Any]]:
        """One graph run. Shapes as in docs/design.md; ``past[i] = (K, V)`` of layer i,
        each [B, Hkv, P, D], contiguous arrays of this engine's ``arrays`` kind.
        ``logits_index`` [B, K]: the new-token rows whose logits to compute (None = all
        T). ``key_slots`` [B, T]: the key column of each new token in [0, P + T) (None =
        P + t; ignored by an engine without the input). Returns (logits [B,K,V] in host
        memory, new K per layer, new V per layer), the new K/V [B, Hkv, T, D] where the
        cache lives."""
        B, T = np.shape(input_ids)
        rows = all_rows(B, T) if logits_index is None else np.ascontiguousarray(logits_index, np.int64)
        key_slots = appended(np.shape(attention_mask)) if key_slots is None else np.ascontiguousarray(key_slots, np.int64)
        if self.graphs is not None:
            out = self.graphs.run(np.asarray(input_ids), np.asarray(position_ids), np.asarray(attention_mask),
                                  past, rows, key_slots)
            if out is not None:
                return out
        binding = self.session.io_binding()
        inputs = [("input_ids", np.ascontiguousarray(input_ids, np.int64)),
                  ("position_ids", np.ascontiguousarray(position_ids, np.int64)),
                  ("attention_mask", np.ascontiguousarray(attention_mask, np.bool_)), ("logits_index", rows)]
        if self.takes_slots:
            inputs.append(("key_slots", key_slots))
        for name, host in inputs:
            binding.bind_cpu_input(name, host)
        for (kn, vn), (k, v) in zip(self._past_names, past):
            self.bind(binding, kn, k, output=False)
            self.bind(binding, vn, v, output=False)
        shape = (B, self.num_kv_heads, T, self.head_dim)
        new_k = [self.arrays.empty(shape, self.dtype) for _ in range(self.num_layers)]
        new_v = [self.arrays.empty(shape, self.dtype) for _ in range(self.num_layers)]
        for i in range(self.num_layers):
            self.bind(binding, f"new_key.{i}", new_k[i], output=True)
            self.bind(binding, f"new_value.{i}", new_v[i], output=True)
        logits = self.arrays.empty((B, rows.shape[1], self.vocab_size), np.float32)
        self.bind(binding, "logits", logits, output=True)
        self.run_bound(binding, -1 if self.cuda_graph else None)
        return self.arrays.logits_to_host(logits), new_k, new_v

    def run_bound(self, binding: Any, graph_id: int | None) -> None:
        """One run over bound buffers; ``graph_id``: the CUDA graph to capture or replay
        (-1: neither, on a session with CUDA graphs; None: no CUDA graphs)."""
        opts = None
        if graph_id is not None:
            opts = ort.RunOptions()
            opts.add_run_config_entry("gpu_graph_id", str(graph_id))
        self.session.run_with_iobinding(binding, opts)

    def bind(self, binding: Any, name: str, a: Any, output: bool) -> None:
        """Bind an array by address where it lives. Host arrays bound to a GPU session
        (kv_arrays = "numpy" there) cross the bus: counted as cache transfers."""
        arr = self.arrays
        dtype = {"logits": np.float32, "input_ids": np.int64, "position_ids": np.int64, "logits_index": np.int64,
                 "attention_mask": np.bool_, "key_slots": np.int64}.get(name, self.dtype)
        if arr.device_type == "cpu" and self.device != "cpu" and name.startswith(("past_", "new_")):
            nbytes = int(np.prod(a.shape)) * np.dtype(dtype).itemsize
            if output:
                arr.transfers.cache_to_host += nbytes
            else:
                arr.transfers.cache_from_host += nbytes
        if not output and 0 in tuple(a.shape):  # an empty past (P = 0) has no address to bind
            binding.bind_cpu_input(name, np.zeros(tuple(a.shape), dtype))
            return
        fn = binding.bind_output if output else binding.bind_input
        fn(name, arr.device_type, arr.device_id, dtype, list(a.shape), arr.address(a))
