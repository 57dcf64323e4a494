"""Building blocks shared by the architecture graphs: the engine interface, norms,
rotary embedding, tree attention over a heads-major KV cache, and the LM head.

Tensor layout inside the graph: hidden states [B, T, hidden]; per-head tensors
[B, T, H, D] until attention; the cache and the new tokens' K/V are heads-major,
[B, Hkv, P, D] (docs/design.md), the layout of the standard ``Attention`` op's past.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .graph import GraphBuilder

# Masked scores: the most negative float32. Where() (not an additive mask) keeps unmasked
# scores exact; a fully masked row (padding) softmaxes to a uniform row, never NaN.
_MASKED = float(np.finfo(np.float32).min)


@dataclass(frozen=True)
class ModelSpec:
    """Shape facts of one exported model (they go into the manifest)."""

    architecture: str  # graph family: "llama" or "gpt2"
    model_type: str  # Hugging Face config.model_type
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    max_positions: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def interface(g: GraphBuilder, spec: ModelSpec, key_slots: bool = False) -> dict[str, Any]:
    """Declare the graph inputs/outputs of docs/design.md; returns the input names.
    ``key_slots``: the fused graph's input placing each new token's key (fused.py)."""
    L, Hkv, D, V = spec.num_layers, spec.num_kv_heads, spec.head_dim, spec.vocab_size
    names: dict[str, Any] = {
        "input_ids": g.add_input("input_ids", np.int64, ["batch", "seq"]),
        "position_ids": g.add_input("position_ids", np.int64, ["batch", "seq"]),
        "attention_mask": g.add_input("attention_mask", np.bool_, ["batch", 1, "seq", "total"]),
        "logits_index": g.add_input("logits_index", np.int64, ["batch", "keep"]),
        "past": [],
    }
    if key_slots:
        names["key_slots"] = g.add_input("key_slots", np.int64, ["batch", "seq"])
    for i in range(L):
        names["past"].append((g.add_input(f"past_key.{i}", g.dtype, ["batch", Hkv, "past", D]),
                              g.add_input(f"past_value.{i}", g.dtype, ["batch", Hkv, "past", D])))
    g.add_output("logits", np.float32, ["batch", "keep", V])
    for i in range(L):
        g.add_output(f"new_key.{i}", g.dtype, ["batch", Hkv, "seq", D])
    for i in range(L):
        g.add_output(f"new_value.{i}", g.dtype, ["batch", Hkv, "seq", D])
    return names


def io_description(spec: ModelSpec, dtype: str, key_slots: bool = False) -> tuple[list[dict], list[dict]]:
    """The manifest's "inputs"/"outputs" lists (same facts as ``interface``)."""
    kv = ["batch", spec.num_kv_heads, "past", spec.head_dim]
    new = ["batch", spec.num_kv_heads, "seq", spec.head_dim]
    ins = [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "seq"]},
           {"name": "position_ids", "dtype": "int64", "shape": ["batch", "seq"]},
           {"name": "attention_mask", "dtype": "bool", "shape": ["batch", 1, "seq", "past+seq"]},
           {"name": "logits_index", "dtype": "int64", "shape": ["batch", "keep"]}]
    if key_slots:
        ins.append({"name": "key_slots", "dtype": "int64", "shape": ["batch", "seq"]})
    outs = [{"name": "logits", "dtype": "float32", "shape": ["batch", "keep", spec.vocab_size]}]
    for i in range(spec.num_layers):
        ins += [{"name": f"past_key.{i}", "dtype": dtype, "shape": kv},
                {"name": f"past_value.{i}", "dtype": dtype, "shape": kv}]
    outs += [{"name": f"new_key.{i}", "dtype": dtype, "shape": new} for i in range(spec.num_layers)]
    outs += [{"name": f"new_value.{i}", "dtype": dtype, "shape": new} for i in range(spec.num_layers)]
    return ins, outs


def rms_norm(g: GraphBuilder, x: str, weight: str, eps: float) -> str:
    """HF LlamaRMSNorm: statistics in float32, scale applied in the model dtype."""
    xf = g.to_float(x)
    var = g.op("ReduceMean", [g.op("Mul", [xf, xf])], axes=[-1], keepdims=1)
    inv = g.op("Reciprocal", [g.op("Sqrt", [g.op("Add", [var, g.f32(eps)])])])
    return g.op("Mul", [g.to_model(g.op("Mul", [xf, inv])), weight])


def layer_norm(g: GraphBuilder, x: str, weight: str, bias: str, eps: float) -> str:
    """LayerNormalization computed in float32 (weights cast by the caller's dtype)."""
    if g.dtype == np.float32:
        return g.op("LayerNormalization", [x, weight, bias], axis=-1, epsilon=eps)
    y = g.op("LayerNormalization", [g.to_float(x), g.to_float(weight), g.to_float(bias)], axis=-1, epsilon=eps)
    return g.to_model(y)


def split_heads(g: GraphBuilder, x: str, heads: int, head_dim: int) -> str:
    """[B, T, heads*D] -> [B, T, heads, D] (Reshape's 0 copies B and T)."""
    return g.op("Reshape", [x, g.i64([0, 0, heads, head_dim])])


def rope_tables(g: GraphBuilder, inv_freq: np.ndarray, max_positions: int, scaling: float = 1.0) -> tuple[str, str]:
    """cos/sin tables [max_positions, D] exactly as HF computes them (float32 outer product)."""
    import torch

    pos = torch.arange(max_positions, dtype=torch.float32)
    freqs = pos[:, None] * torch.as_tensor(inv_freq, dtype=torch.float32)[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos = (emb.cos() * scaling).numpy()
    sin = (emb.sin() * scaling).numpy()
    return g.weight("rope.cos", cos), g.weight("rope.sin", sin)


def rope_gather(g: GraphBuilder, tables: tuple[str, str], position_ids: str) -> tuple[str, str]:
    """cos/sin for the given positions, shaped [B, T, 1, D] to broadcast over heads."""
    ax = g.i64([2])
    cos = g.op("Unsqueeze", [g.op("Gather", [tables[0], position_ids]), ax])
    sin = g.op("Unsqueeze", [g.op("Gather", [tables[1], position_ids]), ax])
    return cos, sin


def apply_rope(g: GraphBuilder, x: str, cos: str, sin: str, head_dim: int, name: str | None = None) -> str:
    """x*cos + rotate_half(x)*sin with HF's rotate_half = cat(-x2, x1) on the last axis."""
    half = head_dim // 2
    x1, x2 = g.op("Split", [x, g.i64([half, half])], outputs=2, axis=-1)
    rot = g.op("Concat", [g.op("Neg", [x2]), x1], axis=-1)
    return g.op("Add", [g.op("Mul", [x, cos]), g.op("Mul", [rot, sin])], name=name)


def heads_major(g: GraphBuilder, x: str, name: str | None = None) -> str:
    """[B, T, H, D] -> [B, H, T, D]."""
    return g.op("Transpose", [x], perm=[0, 2, 1, 3], name=name)


def attention(g: GraphBuilder, q: str, k_new: str, v_new: str, past_k: str, past_v: str, mask5: str,
              spec: ModelSpec, scale: float) -> str:
    """Tree attention. q [B,T,H,D]; k_new/v_new [B,Hkv,T,D]; past [B,Hkv,P,D];
    mask5 = attention_mask as [B,1,1,T,P+T]. Returns [B, T, H*D].

    GQA without repeating K/V: Q is viewed as [B,Hkv,n_rep,T,D] and K/V as
    [B,Hkv,1,S,D], so MatMul broadcasts over the n_rep query heads of each KV head.
    """
    Hkv, D = spec.num_kv_heads, spec.head_dim
    n_rep = spec.num_heads // Hkv
    k_all = g.op("Concat", [past_k, k_new], axis=2)  # [B,Hkv,S,D]
    v_all = g.op("Concat", [past_v, v_new], axis=2)
    ax2 = g.i64([2])
    k_t = g.op("Unsqueeze", [g.op("Transpose", [k_all], perm=[0, 1, 3, 2]), ax2])  # [B,Hkv,1,D,S]
    v_h = g.op("Unsqueeze", [v_all, ax2])  # [B,Hkv,1,S,D]
    q5 = g.op("Reshape", [q, g.i64([0, 0, Hkv, n_rep, D])])
    q5 = g.op("Transpose", [q5], perm=[0, 2, 3, 1, 4])  # [B,Hkv,n_rep,T,D]
    scores = g.op("MatMul", [q5, k_t])  # [B,Hkv,n_rep,T,S]
    scores = g.op("Mul", [g.to_float(scores), g.f32(scale)])  # scale and softmax in float32
    scores = g.op("Where", [mask5, scores, g.f32(_MASKED)])
    probs = g.to_model(g.op("Softmax", [scores], axis=-1))
    ctx = g.op("MatMul", [probs, v_h])  # [B,Hkv,n_rep,T,D]
    ctx = g.op("Transpose", [ctx], perm=[0, 3, 1, 2, 4])  # [B,T,Hkv,n_rep,D]
    return g.op("Reshape", [ctx, g.i64([0, 0, -1])])


def mask5(g: GraphBuilder, attention_mask: str) -> str:
    """[B,1,T,S] -> [B,1,1,T,S] to broadcast over (Hkv, n_rep)."""
    return g.op("Unsqueeze", [attention_mask, g.i64([1])])


def logit_rows(g: GraphBuilder, x: str, logits_index: str) -> str:
    """[B,T,hidden] -> [B,K,hidden]: only the rows whose logits the caller asked for. A
    prompt prefill needs no logits and a draft op one row per step, while the LM head
    (V x hidden) over every prompt token was about 20% of the 1.5B's prefill and 40% of
    the 0.5B's on the 2-core CPU (and a [T, V] float32 output per request)."""
    idx = g.op("Unsqueeze", [logits_index, g.i64([-1])])  # [B,K,1]
    return g.op("GatherND", [x, idx], batch_dims=1)


def lm_head(g: GraphBuilder, x: str, weight_v_by_h: str, spec: ModelSpec) -> str:
    """logits = x @ W^T with W stored [V, hidden] (so a tied embedding is reused, not
    copied): Gemm(transB) on the flattened [B*T, hidden] rows, float32 out."""
    flat = g.op("Reshape", [x, g.i64([-1, spec.hidden_size])])
    y = g.op("Gemm", [flat, weight_v_by_h], transB=1)
    shape = g.op("Shape", [x], start=0, end=2)
    out_shape = g.op("Concat", [shape, g.i64([spec.vocab_size])], axis=0)
    y = g.op("Reshape", [g.to_float(y), out_shape])
    return g.op("Identity", [y], name="logits")
