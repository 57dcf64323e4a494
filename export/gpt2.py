"""GPT-2 graph: learned positions, pre-LayerNorm blocks, fused c_attn, GELU MLP, tied head.

GPT-2's Conv1D weights are stored [in, out], which is already MatMul's layout.
"""

from __future__ import annotations

import math
from typing import Any

from tqdm import tqdm

from . import layers as Lyr
from .errors import UnsupportedArchitecture
from .graph import GraphBuilder
from .weights import Weights

MODEL_TYPES = ("gpt2",)
_ACTS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast", "gelu")


def spec_for(config: Any) -> Lyr.ModelSpec:
    if config.activation_function not in _ACTS:
        raise UnsupportedArchitecture(f"gpt2 activation {config.activation_function!r} is not supported; "
                                      f"supported: {', '.join(_ACTS)}")
    H = int(config.n_head)
    return Lyr.ModelSpec("gpt2", config.model_type, int(config.n_layer), H, H, int(config.n_embd) // H,
                         int(config.n_embd), int(config.vocab_size), int(config.n_positions))


def _gelu(g: GraphBuilder, x: str, kind: str) -> str:
    half_x = g.op("Mul", [x, g.scalar(0.5)])
    if kind == "gelu":  # exact erf form
        inner = g.op("Erf", [g.op("Mul", [x, g.scalar(1 / math.sqrt(2.0))])])
    else:  # tanh approximation (gelu_new / gelu_pytorch_tanh)
        cube = g.op("Mul", [g.op("Mul", [x, x]), x])
        arg = g.op("Add", [x, g.op("Mul", [cube, g.scalar(0.044715)])])
        inner = g.op("Tanh", [g.op("Mul", [arg, g.scalar(math.sqrt(2.0 / math.pi))])])
    return g.op("Mul", [half_x, g.op("Add", [inner, g.scalar(1.0)])])


def build(g: GraphBuilder, config: Any, weights: Weights, progress: bool = True, **_: Any) -> Lyr.ModelSpec:
    """The plain float graph (build.py refuses --graph fused and --quantize for gpt2)."""
    spec = spec_for(config)
    H, D, E = spec.num_heads, spec.head_dim, spec.hidden_size
    eps = float(config.layer_norm_epsilon)
    io = Lyr.interface(g, spec)

    def w(name: str) -> str:
        return g.weight(name, weights.vector(name))

    wte = w("transformer.wte.weight")
    x = g.op("Add", [g.op("Gather", [wte, io["input_ids"]]),
                     g.op("Gather", [w("transformer.wpe.weight"), io["position_ids"]])])
    m5 = Lyr.mask5(g, io["attention_mask"])
    for i in tqdm(range(spec.num_layers), desc="layers", unit="layer", disable=not progress, leave=False):
        p = f"transformer.h.{i}."
        h = Lyr.layer_norm(g, x, w(p + "ln_1.weight"), w(p + "ln_1.bias"), eps)
        qkv = g.linear(h, w(p + "attn.c_attn.weight"), w(p + "attn.c_attn.bias"))
        q, k, v = g.op("Split", [qkv, g.i64([E, E, E])], outputs=3, axis=-1)
        q = Lyr.split_heads(g, q, H, D)
        k = Lyr.heads_major(g, Lyr.split_heads(g, k, H, D), name=f"new_key.{i}")
        v = Lyr.heads_major(g, Lyr.split_heads(g, v, H, D), name=f"new_value.{i}")
        scale = (D ** -0.5 if config.scale_attn_weights else 1.0)
        if getattr(config, "scale_attn_by_inverse_layer_idx", False):
            scale /= float(i + 1)
        ctx = Lyr.attention(g, q, k, v, *io["past"][i], m5, spec, scale=scale)
        x = g.op("Add", [x, g.linear(ctx, w(p + "attn.c_proj.weight"), w(p + "attn.c_proj.bias"))])
        h = Lyr.layer_norm(g, x, w(p + "ln_2.weight"), w(p + "ln_2.bias"), eps)
        h = _gelu(g, g.linear(h, w(p + "mlp.c_fc.weight"), w(p + "mlp.c_fc.bias")), config.activation_function)
        x = g.op("Add", [x, g.linear(h, w(p + "mlp.c_proj.weight"), w(p + "mlp.c_proj.bias"))])
    x = Lyr.logit_rows(g, x, io["logits_index"])
    x = Lyr.layer_norm(g, x, w("transformer.ln_f.weight"), w("transformer.ln_f.bias"), eps)
    tied = bool(getattr(config, "tie_word_embeddings", True)) or not weights.has("lm_head.weight")
    Lyr.lm_head(g, x, wte if tied else w("lm_head.weight"), spec)
    return spec
