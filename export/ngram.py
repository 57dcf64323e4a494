"""`cosine-export --kind ngram`: build a weight-free domain n-gram drafter engine.

Writes DIR/ngram.json + DIR/*.npy (cosine.workers.ngram.NgramModel.save), a copy of the
target's tokenizer.json and a manifest.json with "kind": "ngram". The lead's
cosine-export parser calls add_ngram_args(parser) and, for --kind ngram, run_ngram(args).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Iterator

import numpy as np

from cosine.workers.ngram import NgramModel

log = logging.getLogger("cosine.export.ngram")

CHUNK_CHARS = 64 * 1024  # text per encode() input: long enough for BPE, small enough to batch
BATCH = 64


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def resolve_tokenizer(tokenizer: str | Path) -> tuple[Path, int | None, dict]:
    """(tokenizer.json path, engine vocab_size or None, engine manifest or {}) for an
    engine directory or a tokenizer.json path."""
    p = Path(tokenizer)
    if p.is_dir():
        tj = p / "tokenizer.json"
        if not tj.is_file():
            raise FileNotFoundError(f"{p} has no tokenizer.json")
        man = json.loads((p / "manifest.json").read_text()) if (p / "manifest.json").is_file() else {}
        return tj, man.get("vocab_size"), man
    if not p.is_file():
        raise FileNotFoundError(f"tokenizer {p} not found (give an engine directory or a tokenizer.json)")
    return p, None, {}


def corpus_files(paths: list[Path]) -> list[Path]:
    """Files as given; directories contribute their *.txt files (sorted, recursive)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(q for q in p.rglob("*.txt") if q.is_file())
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"corpus {p} not found")
    if not out:
        raise FileNotFoundError(f"no corpus files in {[str(p) for p in paths]}")
    return out


def _chunks(text: str) -> Iterator[str]:
    """Cut at newlines near CHUNK_CHARS so the BPE merges across a cut are rare."""
    i = 0
    while i < len(text):
        j = min(i + CHUNK_CHARS, len(text))
        if j < len(text):
            nl = text.rfind("\n", i, j)
            j = nl + 1 if nl > i else j
        yield text[i:j]
        i = j


def tokenize_files(files: list[Path], tokenizer_json: Path, max_tokens: int | None = None) -> list[np.ndarray]:
    """One int32 id array per file (a file is a document: n-gram contexts never span two)."""
    from tokenizers import Tokenizer
    from tqdm import tqdm

    tok = Tokenizer.from_file(str(tokenizer_json))
    docs: list[np.ndarray] = []
    total = 0
    bar = tqdm(total=sum(f.stat().st_size for f in files), unit="B", unit_scale=True, desc="tokenizing")
    for f in files:
        text = f.read_text(encoding="utf-8", errors="replace")
        chunks = list(_chunks(text))
        parts: list[np.ndarray] = []
        for b in range(0, len(chunks), BATCH):
            batch = chunks[b:b + BATCH]
            for enc in tok.encode_batch(batch, add_special_tokens=False):
                parts.append(np.asarray(enc.ids, np.int32))
            bar.update(sum(len(c.encode("utf-8", "replace")) for c in batch))
            total += sum(p.size for p in parts[-len(batch):])
            if max_tokens is not None and total >= max_tokens:
                break
        doc = np.concatenate(parts) if parts else np.zeros(0, np.int32)
        if max_tokens is not None and total > max_tokens:
            doc = doc[:doc.size - (total - max_tokens)]
            total = max_tokens
        docs.append(doc)
        if max_tokens is not None and total >= max_tokens:
            break
    bar.close()
    return docs


def build_ngram(corpus_paths: list[Path], tokenizer: str | Path, out_dir: Path, order: int = 4,
                min_count: int = 1, max_tokens: int | None = None) -> dict:
    """Tokenize the corpus with the target's tokenizer, count, save; returns the manifest."""
    t0 = time.time()
    out_dir = Path(out_dir)
    tok_json, engine_vocab, engine_man = resolve_tokenizer(tokenizer)
    from tokenizers import Tokenizer

    tok_vocab = Tokenizer.from_file(str(tok_json)).get_vocab_size(with_added_tokens=True)
    # q rows must be as long as the target's logits, which can exceed the tokenizer's ids
    vocab_size = max(tok_vocab, engine_vocab or 0)
    files = corpus_files(corpus_paths)
    docs = tokenize_files(files, tok_json, max_tokens)
    n_tokens = int(sum(d.size for d in docs))
    log.info("tokenized %d files: %d tokens; counting orders 1..%d", len(files), n_tokens, order)
    model = NgramModel.build(docs, vocab_size, order=order, min_count=min_count)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save(out_dir)
    shutil.copyfile(tok_json, out_dir / "tokenizer.json")

    src_hash = hashlib.sha256()
    for f in files:
        src_hash.update(f"{f.name}\0{sha256_file(f)}\n".encode())
    from cosine import __version__

    manifest = {
        "format": "cosine-engine", "format_version": 1, "exporter_version": __version__,
        "kind": "ngram", "name": out_dir.name, "order": order, "min_count": min_count,
        "vocab_size": vocab_size, "tokenizer_vocab_size": tok_vocab, "tokens": n_tokens,
        "contexts": [int(t.keys.size) for t in model.tables], "discounts": model.discounts,
        "sources": [str(f) for f in files], "source_sha256": src_hash.hexdigest(),
        "tokenizer_sha256": sha256_file(tok_json),
        "eos_token_ids": engine_man.get("eos_token_ids", []), "bos_token_id": engine_man.get("bos_token_id"),
        "bytes": int(sum(p.stat().st_size for p in out_dir.glob("*.npy"))),
        "build_s": round(time.time() - t0, 1),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    log.info("wrote %s: %d tokens, %d MB of tables in %.1f s", out_dir, n_tokens, manifest["bytes"] >> 20,
             manifest["build_s"])
    return manifest


def add_ngram_args(parser: argparse.ArgumentParser) -> None:
    """Arguments of --kind ngram (the caller owns --kind itself)."""
    g = parser.add_argument_group("n-gram drafter (--kind ngram)")
    taken = set(getattr(parser, "_option_string_actions", {}))  # e.g. an existing --out: reuse it

    def add(flag: str, **kw) -> None:
        if flag not in taken:
            g.add_argument(flag, **kw)

    add("--corpus", nargs="+", type=Path, metavar="PATH",
        help="text files or directories of *.txt (e.g. datasets/train/code.txt)")
    add("--tokenizer", help="the target's engine directory, or a tokenizer.json")
    add("--out", type=Path, help="output engine directory")
    add("--order", type=int, default=4, help="n-gram order (context = order - 1 tokens; default 4)")
    add("--min-count", type=int, default=1, help="drop (context, token) pairs seen fewer times")
    add("--max-tokens", type=int, default=None, help="stop tokenizing after this many tokens")


def run_ngram(args: argparse.Namespace) -> int:
    missing = [f"--{n}" for n in ("corpus", "tokenizer", "out") if not getattr(args, n, None)]
    if missing:
        log.error("--kind ngram needs %s", ", ".join(missing))
        return 2
    if getattr(args, "order", 4) < 1 or getattr(args, "min_count", 1) < 1:
        log.error("--order and --min-count must be >= 1")
        return 2
    try:
        m = build_ngram([Path(p) for p in args.corpus], args.tokenizer, Path(args.out), getattr(args, "order", 4),
                        getattr(args, "min_count", 1), getattr(args, "max_tokens", None))
    except FileNotFoundError as e:
        log.error("%s", e)
        return 2
    print(f"ngram engine {args.out}: {m['tokens']} tokens, order {m['order']}, vocab {m['vocab_size']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone use (python -m cosine.export.ngram ...); cosine-export wires the same."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(prog="cosine-export --kind ngram")
    add_ngram_args(p)
    return run_ngram(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
