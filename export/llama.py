"""Llama-family graph (Llama, Mistral, Qwen2, SmolLM): RMSNorm, RoPE, GQA, SwiGLU.

Optional q/k/v/o and MLP biases are taken from the checkpoint when present (Qwen2 has
q/k/v biases), so one builder covers the family.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from tqdm import tqdm

from . import fused as F
from . import layers as Lyr
from .errors import UnsupportedArchitecture
from .gguf_blocks import GGUFBlocks
from .graph import GraphBuilder
from .nbits import NBits
from .weights import Weights

MODEL_TYPES = ("llama", "mistral", "qwen2")
GRAPHS = ("fused", "plain")


def rope_parameters(config: Any) -> tuple[float, str]:
    """(rope_theta, rope_type) from a transformers 4.x or 5.x config."""
    rp = getattr(config, "rope_parameters", None)
    if isinstance(rp, dict) and "rope_theta" in rp:
        return float(rp["rope_theta"]), str(rp.get("rope_type") or "default")
    scaling = getattr(config, "rope_scaling", None)
    kind = "default" if not scaling else str(scaling.get("rope_type") or scaling.get("type") or "default")
    return float(getattr(config, "rope_theta", 10000.0)), kind


def spec_for(config: Any) -> Lyr.ModelSpec:
    theta, kind = rope_parameters(config)
    if kind != "default":
        raise UnsupportedArchitecture(f"rope scaling {kind!r} is not supported (only plain RoPE); "
                                      f"export a model without rope_scaling")
    if getattr(config, "use_sliding_window", False):
        raise UnsupportedArchitecture("sliding-window attention (use_sliding_window=true) is not supported")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise UnsupportedArchitecture(f"hidden_act {config.hidden_act!r} is not supported (llama family needs silu)")
    heads = int(config.num_attention_heads)
    kv = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    if heads % kv:
        raise UnsupportedArchitecture(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}")
    return Lyr.ModelSpec("llama", config.model_type, int(config.num_hidden_layers), heads, kv, head_dim,
                         int(config.hidden_size), int(config.vocab_size), int(config.max_position_embeddings))


def project(g: GraphBuilder, x: str, weights: Weights, names: list[str]) -> list[str]:
    """x through several [out, in] matrices that share it (q, k, v or gate, up), as few
    products as their formats allow; returns one output per name, in order."""
    out: dict[str, str] = {}
    for members, widths, matrix in weights.groups([n + ".weight" for n in names]):
        stems = [m[:-len(".weight")] for m in members]
        bias = None
        if any(weights.has(s + ".bias") for s in stems):
            bias = np.concatenate([weights.vector(s + ".bias") if weights.has(s + ".bias")
                                   else np.zeros(w, np.float32) for s, w in zip(stems, widths)])
        name = stems[0] + "".join("+" + s.rsplit(".", 1)[-1] for s in stems[1:])
        y = F.linear(g, x, matrix, name, bias)
        parts = [y] if len(stems) == 1 else g.op("Split", [y, g.i64(widths)], outputs=len(stems), axis=-1)
        out.update(zip(stems, parts))
    return [out[n] for n in names]


def swiglu(g: GraphBuilder, x: str, weights: Weights, mlp: str) -> str:
    gate, up = project(g, x, weights, [mlp + "gate_proj", mlp + "up_proj"])
    act = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])]), up])  # SiLU(gate) * up
    return project(g, act, weights, [mlp + "down_proj"])[0]


def build(g: GraphBuilder, config: Any, weights: Weights, inv_freq: np.ndarray, rope_scale: float = 1.0,
          graph: str = "fused", progress: bool = True) -> Lyr.ModelSpec:
    """Emit the whole graph into ``g`` (fused kernels or the plain reference graph)."""
    if graph not in GRAPHS:
        raise ValueError(f"graph must be one of {GRAPHS}, got {graph!r}")
    spec = spec_for(config)
    eps = float(config.rms_norm_eps)
    io = Lyr.interface(g, spec, key_slots=graph == "fused")
    table = weights.table("model.embed_tokens.weight")  # float, or NBits blocks (quantized engines)
    x = F.embedding(g, table, io["input_ids"], "model.embed_tokens")
    layer = _fused_layers if graph == "fused" else _plain_layers
    x = layer(g, spec, weights, io, x, inv_freq, rope_scale, eps, progress)
    x = Lyr.logit_rows(g, x, io["logits_index"])
    if graph == "plain":
        x = Lyr.rms_norm(g, x, g.weight("model.norm.weight", weights.vector("model.norm.weight")), eps)
    tied = bool(getattr(config, "tie_word_embeddings", False)) or not weights.has("lm_head.weight")
    head = table if tied else weights.matrix("lm_head.weight")
    if isinstance(head, (NBits, GGUFBlocks)):  # a tied head shares the embedding's blocks (written once)
        y = F.linear(g, x, head, "model.embed_tokens" if tied else "lm_head")
        g.op("Identity", [y], name="logits")
    else:  # float: Gemm over the [V, hidden] table, so a tied embedding is reused, not copied
        Lyr.lm_head(g, x, "model.embed_tokens.weight" if tied else g.weight("lm_head.weight", head), spec)
    return spec


def _fused_layers(g: GraphBuilder, spec: Lyr.ModelSpec, weights: Weights, io: dict[str, Any], x: str,
                  inv_freq: np.ndarray, rope_scale: float, eps: float, progress: bool) -> str:
    """All decoder layers with fused kernels; returns the final-normed hidden states. The
    residual adds ride in the next norm (SkipSimplifiedLayerNormalization)."""
    H, Hkv, D = spec.num_heads, spec.num_kv_heads, spec.head_dim
    caches = F.rope_caches(g, inv_freq, spec.max_positions, rope_scale)
    pending = None  # the last block's output, not yet added to the residual stream x
    for i in tqdm(range(spec.num_layers), desc="layers", unit="layer", disable=not progress, leave=False):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        norm = p + "input_layernorm.weight"
        if pending is None:
            h = F.rms_norm(g, x, weights.vector(norm), eps, norm)
        else:
            h, x = F.skip_rms_norm(g, pending, x, weights.vector(norm), eps, norm)
        q, k, v = project(g, h, weights, [a + "q_proj", a + "k_proj", a + "v_proj"])
        q = F.rotary(g, q, caches, io["position_ids"], H)
        k = F.rotary(g, k, caches, io["position_ids"], Hkv)
        new_kv = (F.heads_major(g, k, Hkv, D, name=f"new_key.{i}"), F.heads_major(g, v, Hkv, D, name=f"new_value.{i}"))
        index = F.key_slot_index(g, io["key_slots"], new_kv[0])
        ctx = F.attention(g, q, new_kv, io["attention_mask"], io["past"][i], index, H, D, scale=D ** -0.5)
        attn_out = project(g, ctx, weights, [a + "o_proj"])[0]
        norm = p + "post_attention_layernorm.weight"
        h, x = F.skip_rms_norm(g, attn_out, x, weights.vector(norm), eps, norm)
        pending = swiglu(g, h, weights, p + "mlp.")
    h, _ = F.skip_rms_norm(g, pending, x, weights.vector("model.norm.weight"), eps, "model.norm.weight")
    return h


def _plain_layers(g: GraphBuilder, spec: Lyr.ModelSpec, weights: Weights, io: dict[str, Any], x: str,
                  inv_freq: np.ndarray, rope_scale: float, eps: float, progress: bool) -> str:
    """All decoder layers as elementary ONNX ops (the reference graph); returns the
    residual stream before the final norm."""
    H, Hkv, D = spec.num_heads, spec.num_kv_heads, spec.head_dim
    cos, sin = Lyr.rope_gather(g, Lyr.rope_tables(g, inv_freq, spec.max_positions, rope_scale), io["position_ids"])
    m5 = Lyr.mask5(g, io["attention_mask"])
    for i in tqdm(range(spec.num_layers), desc="layers", unit="layer", disable=not progress, leave=False):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        norm = p + "input_layernorm.weight"
        h = Lyr.rms_norm(g, x, g.weight(norm, weights.vector(norm)), eps)
        q, k, v = project(g, h, weights, [a + "q_proj", a + "k_proj", a + "v_proj"])
        q = Lyr.apply_rope(g, Lyr.split_heads(g, q, H, D), cos, sin, D)
        k = Lyr.heads_major(g, Lyr.apply_rope(g, Lyr.split_heads(g, k, Hkv, D), cos, sin, D), name=f"new_key.{i}")
        v = Lyr.heads_major(g, Lyr.split_heads(g, v, Hkv, D), name=f"new_value.{i}")
        ctx = Lyr.attention(g, q, k, v, *io["past"][i], m5, spec, scale=D ** -0.5)
        x = g.op("Add", [x, project(g, ctx, weights, [a + "o_proj"])[0]])
        norm = p + "post_attention_layernorm.weight"
        h = Lyr.rms_norm(g, x, g.weight(norm, weights.vector(norm)), eps)
        x = g.op("Add", [x, swiglu(g, h, weights, p + "mlp.")])
    return x
