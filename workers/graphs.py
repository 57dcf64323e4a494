"""CUDA graphs for the engine's forwards (``[workers] cuda_graph = true``, docs/gpu.md).

A fused 1.5B decode step is ~1,000 kernels; launched one by one they cost more than the
H100 needs to read the weights (1.18 ms). ONNX Runtime can capture a run's kernels once
as a CUDA graph and replay it (``enable_cuda_graph``), but only if every bound input and
output keeps its address, shape and type for that graph (``gpu_graph_id``). So forwards
are rounded up to shape buckets (batch, new tokens, logits rows, past columns), each with
its own persistent device buffers bound once; a call pads into its bucket the way
batching.py pads a batch (padding rows attend to themselves, extra past columns are
masked), copies its past in on the device, replays, and copies the outputs out (a later
call of the same bucket overwrites them).

Without ``capture`` the same buckets run as plain bound forwards: that is how the CPU
tests check the padding and the copies that the GPU path relies on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

log = logging.getLogger("cosine.worker.graphs")

BATCHES = (1, 2, 4, 8, 16, 32, 64)
TOKENS = (1, 2, 4, 8, 16, 32, 64)
PAST_STEP = 256  # past columns round up to a multiple of this
MAX_BUCKETS = 48  # captured graphs hold their buffers for good; beyond this, forwards run uncaptured


def round_up(n: int, sizes: tuple[int, ...]) -> int | None:
    return next((s for s in sizes if s >= n), None)


@dataclass
class Bucket:
    graph_id: int
    shape: tuple[int, int, int, int]  # (batch, tokens, logits rows, past columns)
    inputs: dict[str, Any]  # name -> device buffer
    outputs: dict[str, Any]
    binding: Any
    runs: int = 0


class GraphBuckets:
    """Shape buckets of one engine (engine.py calls ``run`` when cuda_graph is on)."""

    def __init__(self, engine: Any, capture: bool) -> None:
        self.engine, self.capture = engine, capture
        self.buckets: dict[tuple[int, int, int, int], Bucket] = {}
        self.uncaptured = 0  # forwards that fit no bucket (or came after MAX_BUCKETS)

    def key(self, B: int, T: int, K: int, P: int) -> tuple[int, int, int, int] | None:
        b, t, k = round_up(B, BATCHES), round_up(T, TOKENS), round_up(K, TOKENS)
        if b is None or t is None or k is None:
            return None
        return b, t, min(k, t), -(-P // PAST_STEP) * PAST_STEP

    def run(self, ids: np.ndarray, pos: np.ndarray, mask: np.ndarray, past: list[tuple[Any, Any]],
            rows: np.ndarray, slots: np.ndarray) -> tuple[np.ndarray, list[Any], list[Any]] | None:
        """The forward through its bucket; None when it fits none (the caller runs it plain)."""
        B, T = ids.shape
        P = mask.shape[-1] - T
        key = self.key(B, T, rows.shape[1], P)
        if key is None or (key not in self.buckets and len(self.buckets) >= MAX_BUCKETS):
            self.uncaptured += 1
            return None
        bucket = self.buckets.get(key) or self._new(key)
        self._fill(bucket, ids, pos, mask, past, rows, slots)
        self.engine.run_bound(bucket.binding, bucket.graph_id if self.capture else None)
        bucket.runs += 1
        out = bucket.outputs
        arr, L = self.engine.arrays, self.engine.num_layers
        logits = arr.logits_to_host(out["logits"][:B, :rows.shape[1]])
        new_k = [arr.copy(out[f"new_key.{i}"][:B, :, :T]) for i in range(L)]
        new_v = [arr.copy(out[f"new_value.{i}"][:B, :, :T]) for i in range(L)]
        return logits, new_k, new_v

    def _new(self, key: tuple[int, int, int, int]) -> Bucket:
        e = self.engine
        b, t, k, p = key
        kv = (b, e.num_kv_heads, p, e.head_dim)
        new = (b, e.num_kv_heads, t, e.head_dim)
        z = e.arrays.zeros
        inputs = {"input_ids": z((b, t), np.int64), "position_ids": z((b, t), np.int64),
                  "attention_mask": z((b, 1, t, p + t), np.bool_), "logits_index": z((b, k), np.int64)}
        if e.takes_slots:
            inputs["key_slots"] = z((b, t), np.int64)
        for i in range(e.num_layers):  # zero-filled: masked columns must hold finite values
            inputs[f"past_key.{i}"], inputs[f"past_value.{i}"] = z(kv, e.dtype), z(kv, e.dtype)
        outputs = {"logits": z((b, k, e.vocab_size), np.float32)}
        for i in range(e.num_layers):
            outputs[f"new_key.{i}"], outputs[f"new_value.{i}"] = z(new, e.dtype), z(new, e.dtype)
        binding = e.session.io_binding()
        for name, a in inputs.items():
            e.bind(binding, name, a, output=False)
        for name, a in outputs.items():
            e.bind(binding, name, a, output=True)
        bucket = Bucket(len(self.buckets), key, inputs, outputs, binding)
        self.buckets[key] = bucket
        log.info("shape bucket %d: batch %d, %d new tokens, %d logits rows, %d past columns%s", bucket.graph_id,
                 b, t, k, p, " (captured as a CUDA graph on its first run)" if self.capture else "")
        return bucket

    def _fill(self, bucket: Bucket, ids: np.ndarray, pos: np.ndarray, mask: np.ndarray,
              past: list[tuple[Any, Any]], rows: np.ndarray, slots: np.ndarray) -> None:
        """Pad the call into the bucket's fixed buffers (host pieces copied in once each).
        The call's key columns [0, P) stay, [P, P + T) move to [p, p + T)."""
        b, t, k, p = bucket.shape
        B, T = ids.shape
        P = mask.shape[-1] - T
        host_ids, host_pos = np.zeros((b, t), np.int64), np.zeros((b, t), np.int64)
        host_ids[:B, :T], host_pos[:B, :T] = ids, pos
        host_mask = np.zeros((b, 1, t, p + t), np.bool_)
        host_mask[:B, :, :T, :P] = mask[..., :P]
        host_mask[:B, :, :T, p:p + T] = mask[..., P:]
        pad_b, pad_t = np.nonzero(~np.pad(np.ones((B, T), bool), ((0, b - B), (0, t - T))))
        host_mask[pad_b, 0, pad_t, p + pad_t] = True  # padding rows attend to themselves
        host_rows = np.zeros((b, k), np.int64)
        host_rows[:B, :rows.shape[1]] = rows
        host_slots = p + np.broadcast_to(np.arange(t, dtype=np.int64), (b, t)).copy()
        host_slots[:B, :T] = np.where(slots < P, slots, slots - P + p)
        arr, inp = self.engine.arrays, bucket.inputs
        hosts = {"input_ids": host_ids, "position_ids": host_pos, "attention_mask": host_mask,
                 "logits_index": host_rows, "key_slots": host_slots}
        for name in inp.keys() & hosts.keys():
            arr.copy_from_host(inp[name], hosts[name])
        for i, (pk, pv) in enumerate(past):
            inp[f"past_key.{i}"][:B, :, :P] = pk
            inp[f"past_value.{i}"][:B, :, :P] = pv
