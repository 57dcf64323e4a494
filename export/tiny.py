"""Tiny random Hugging Face models (llama / qwen2 / gpt2) with a character tokenizer.

For tests and demos without any download. Same arguments -> byte-identical weights:
every parameter is re-drawn from one seeded torch.Generator in name order, with a
larger std than HF's init so that a 64-token vocabulary gets clearly peaked, varied
next-token distributions (greedy output is not one repeated token).

Note: transformers 5's AutoTokenizer substitutes its own Qwen2Tokenizer pipeline for a
qwen2 config; load the tiny tokenizer with ``tokenizers.Tokenizer.from_file`` (as the
engine does) or ``PreTrainedTokenizerFast.from_pretrained``.
"""

from __future__ import annotations

import os
import string
from pathlib import Path

from .chat_template import CHATML

ARCHS = ("llama", "qwen2", "gpt2")
SPECIALS = ("<eos>", "<bos>", "<unk>")  # ids 0, 1, 2
_CHARS = " " + string.ascii_lowercase + string.ascii_uppercase + string.digits + ".,!?'\"-:;()\n" \
    + "#$%&*+/<=>@[]^_`{|}~\\"


def make_tokenizer(vocab_size: int):
    """Character-level WordLevel tokenizer with exactly ``vocab_size`` entries."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    n_chars = vocab_size - len(SPECIALS)
    if not 1 <= n_chars <= len(_CHARS):
        raise ValueError(f"vocab_size must be in [{len(SPECIALS) + 1}, {len(SPECIALS) + len(_CHARS)}]")
    vocab = {t: i for i, t in enumerate(SPECIALS)}
    vocab.update({c: len(SPECIALS) + i for i, c in enumerate(_CHARS[:n_chars])})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one char = one token
    tok.decoder = decoders.Fuse()  # join characters back without separators
    tok.add_special_tokens(list(SPECIALS))
    return tok


def _config(arch: str, vocab_size: int, hidden: int, layers: int, heads: int, kv_heads: int, max_positions: int):
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    common = dict(vocab_size=vocab_size, bos_token_id=1, eos_token_id=0, pad_token_id=0)
    if arch == "llama":
        return LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                           num_attention_heads=heads, num_key_value_heads=kv_heads,
                           max_position_embeddings=max_positions, rms_norm_eps=1e-5,
                           tie_word_embeddings=False, **common)
    if arch == "qwen2":  # tied head, q/k/v biases, another rope_theta
        return Qwen2Config(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                           num_attention_heads=heads, num_key_value_heads=kv_heads,
                           max_position_embeddings=max_positions, rms_norm_eps=1e-6,
                           rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                           tie_word_embeddings=True, use_sliding_window=False, **common)
    if arch == "gpt2":
        return GPT2Config(n_embd=hidden, n_layer=layers, n_head=heads, n_positions=max_positions,
                          activation_function="gelu_new", tie_word_embeddings=True, **common)
    raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")


def make_tiny_model(out_dir: str | Path, arch: str = "llama", seed: int = 0, vocab_size: int = 64,
                    hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                    max_positions: int = 256) -> Path:
    """Build, save (safetensors + tokenizer) and return ``out_dir``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig, PreTrainedTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = _config(arch, vocab_size, hidden, layers, heads, kv_heads, max_positions)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):  # tied parameters appear once
            if "norm" in name or ".ln_" in name:
                # norm scales near 1 (not exactly: a wrong norm weight must show in parity)
                base = 1.0 if name.endswith("weight") else 0.0
                p.copy_(base + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                std = 0.02 if "wpe" in name else 0.3 if "embed" in name or "wte" in name else 0.15
                p.copy_(std * torch.randn(p.shape, generator=gen))
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=0, pad_token_id=0)
    model.save_pretrained(out, safe_serialization=True)
    fast = PreTrainedTokenizerFast(tokenizer_object=make_tokenizer(vocab_size), eos_token="<eos>",
                                   bos_token="<bos>", unk_token="<unk>", pad_token="<eos>")
    fast.chat_template = CHATML  # chat completions in tests (export stores it in the engine)
    fast.save_pretrained(out)
    return out
