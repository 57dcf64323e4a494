"""Llama-family graph (Llama, Mistral, Qwen2, SmolLM): RMSNorm, RoPE, GQA, SwiGLU.

Optional q/k/v/o and MLP biases are taken from the checkpoint when present (Qwen2 has
q/k/v biases), so one builder covers the family.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
from tqdm import tqdm

from . import layers as Lyr
from .errors import UnsupportedArchitecture
from .graph import GraphBuilder

MODEL_TYPES = ("llama", "mistral", "qwen2")


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


def build(g: GraphBuilder, config: Any, tensor: Callable[[str], np.ndarray], names: set[str],
          inv_freq: np.ndarray, rope_scale: float = 1.0, progress: bool = True) -> Lyr.ModelSpec:
    """Emit the whole graph into ``g``. ``tensor(name)`` returns one float32 weight."""
    spec = spec_for(config)
    H, Hkv, D = spec.num_heads, spec.num_kv_heads, spec.head_dim
    eps = float(config.rms_norm_eps)
    io = Lyr.interface(g, spec)

    def opt(name: str) -> str | None:
        return g.weight(name, tensor(name)) if name in names else None

    embed = g.weight("model.embed_tokens.weight", tensor("model.embed_tokens.weight"))
    x = g.op("Gather", [embed, io["input_ids"]])
    cos, sin = Lyr.rope_gather(g, Lyr.rope_tables(g, inv_freq, spec.max_positions, rope_scale), io["position_ids"])
    m5 = Lyr.mask5(g, io["attention_mask"])

    for i in tqdm(range(spec.num_layers), desc="layers", unit="layer", disable=not progress, leave=False):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        h = Lyr.rms_norm(g, x, g.weight(p + "input_layernorm.weight", tensor(p + "input_layernorm.weight")), eps)
        # fused QKV: one MatMul instead of three (matters for small tree batches on CPU)
        w_qkv = np.concatenate([tensor(a + f"{n}_proj.weight") for n in "qkv"], axis=0).T
        b_names = [a + f"{n}_proj.bias" for n in "qkv"]
        b_qkv = None
        if any(n in names for n in b_names):
            sizes = (H * D, Hkv * D, Hkv * D)
            b_qkv = g.weight(a + "qkv_proj.bias", np.concatenate(
                [tensor(n) if n in names else np.zeros(s, np.float32) for n, s in zip(b_names, sizes)]))
        qkv = g.linear(h, g.weight(a + "qkv_proj.weight", w_qkv), b_qkv)
        del w_qkv
        q, k, v = g.op("Split", [qkv, g.i64([H * D, Hkv * D, Hkv * D])], outputs=3, axis=-1)
        q = Lyr.apply_rope(g, Lyr.split_heads(g, q, H, D), cos, sin, D)
        k = Lyr.apply_rope(g, Lyr.split_heads(g, k, Hkv, D), cos, sin, D, name=f"new_key.{i}")
        v = g.op("Reshape", [v, g.i64([0, 0, Hkv, D])], name=f"new_value.{i}")
        ctx = Lyr.attention(g, q, k, v, *io["past"][i], m5, spec, scale=D ** -0.5)
        o = g.linear(ctx, g.weight(a + "o_proj.weight", tensor(a + "o_proj.weight").T), opt(a + "o_proj.bias"))
        x = g.op("Add", [x, o])

        h = Lyr.rms_norm(g, x, g.weight(p + "post_attention_layernorm.weight",
                                        tensor(p + "post_attention_layernorm.weight")), eps)
        mp = p + "mlp."
        w_gu = np.concatenate([tensor(mp + "gate_proj.weight"), tensor(mp + "up_proj.weight")], axis=0).T
        inter = w_gu.shape[1] // 2
        b_gu = None
        if mp + "gate_proj.bias" in names:
            b_gu = g.weight(mp + "gate_up_proj.bias",
                            np.concatenate([tensor(mp + "gate_proj.bias"), tensor(mp + "up_proj.bias")]))
        gu = g.linear(h, g.weight(mp + "gate_up_proj.weight", w_gu), b_gu)
        del w_gu
        gate, up = g.op("Split", [gu, g.i64([inter, inter])], outputs=2, axis=-1)
        act = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])]), up])  # SiLU(gate) * up
        down = g.linear(act, g.weight(mp + "down_proj.weight", tensor(mp + "down_proj.weight").T),
                        opt(mp + "down_proj.bias"))
        x = g.op("Add", [x, down])

    x = Lyr.logit_rows(g, x, io["logits_index"])
    x = Lyr.rms_norm(g, x, g.weight("model.norm.weight", tensor("model.norm.weight")), eps)
    tied = bool(getattr(config, "tie_word_embeddings", False)) or "lm_head.weight" not in names
    head = embed if tied else g.weight("lm_head.weight", tensor("lm_head.weight"))
    Lyr.lm_head(g, x, head, spec)
    return spec
