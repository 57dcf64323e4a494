"""Hugging Face transformers peers on the same models and device: greedy `generate()`
and assisted generation (`assistant_model=`). Optional: needs torch + transformers."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("cosine.bench.peers")


def available() -> str | None:
    """None when the peers can run, else the reason they are skipped."""
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        return f"Hugging Face peers skipped: {e.name} is not installed (pip install 'cosine[export]')"
    return None


@dataclass
class HFModel:
    model: object
    tokenizer: object
    path: Path


def load(path: Path, device: str = "cpu", dtype: str = "float32") -> HFModel:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    kw = {"gguf_file": path.name} if path.suffix == ".gguf" else {}
    where = path.parent if path.suffix == ".gguf" else path
    t0 = time.time()
    model = AutoModelForCausalLM.from_pretrained(where, dtype=getattr(torch, dtype), **kw).to(device).eval()
    tok = AutoTokenizer.from_pretrained(where, **kw)
    log.info("loaded %s for the HF peer in %.0f s", path.name, time.time() - t0)
    return HFModel(model, tok, path)


def generate(target: HFModel, prompt_ids: list[int], max_new_tokens: int,
             assistant: HFModel | None = None) -> tuple[list[int], float]:
    """Greedy generation; returns (new token ids, seconds)."""
    import torch

    dev = next(target.model.parameters()).device
    ids = torch.tensor([prompt_ids], device=dev)
    kw = {"assistant_model": assistant.model} if assistant is not None else {}
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.no_grad():
        out = target.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                    do_sample=False, min_new_tokens=max_new_tokens, **kw)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return out[0, len(prompt_ids):].tolist(), time.perf_counter() - t0
