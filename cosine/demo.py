"""`make demo`: fetch + export the config's models (cached), start the local cluster as
real processes over ZeroMQ on loopback, and run prompts from several domains."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from cosine import config as cfgmod
from cosine import models
from cosine.log import setup
from cosine.workers.engine import FORMAT_VERSION

log = logging.getLogger("cosine.demo")

PROMPTS = [
    ("code", "Write a Python function `is_prime(n)` that returns True if n is prime."),
    ("code", "In Go, write a function that reverses a slice of ints in place."),
    ("docs", "Explain what the Python `functools.lru_cache` decorator does, briefly."),
    ("prose", "Write two sentences about the sea at dawn."),
]


def _current(engine_dir: Path, quantize: str = "", target: bool = False, matmul: str = "") -> bool:
    """An engine directory with a manifest in today's format and the configured
    quantization and product operator (workers refuse older formats: their cache layout
    differs); a quantized target must have key slots (cosine/keyslots.py)."""
    man = engine_dir / "manifest.json"
    if not man.is_file():
        return False
    m = json.loads(man.read_text())
    if not (engine_dir / "model.onnx").is_file():
        return True  # n-gram tables have a format of their own
    if m.get("format_version", 1) < FORMAT_VERSION:
        log.info("engine %s has format_version %s < %d; exporting it again", engine_dir, m.get("format_version"),
                 FORMAT_VERSION)
        return False
    have = (m.get("quantization") or {}).get("mode", "none")
    if have != (quantize or "none"):
        log.info("engine %s is quantized %r, config.toml asks for %r; exporting it again", engine_dir, have,
                 quantize or "none")
        return False
    want = _matmul(quantize, matmul)
    if want and (m.get("matmul") or "nbits") != want:
        log.info("engine %s computes its products with %s, config.toml asks for %s; exporting it again", engine_dir,
                 m.get("matmul") or "nbits", want)
        return False
    if target and m.get("activations") == "int8" and not any(i.get("name") == "key_slots" for i in m["inputs"]):
        log.info("target engine %s was exported before key slots (its tree verifies are not exact with int8 "
                 "activations); exporting it again", engine_dir)
        return False
    return True


def _matmul(quantize: str, matmul: str) -> str:
    """The operator an export with these settings uses ("" for float engines)."""
    from cosine.export.weights import resolve_matmul  # numpy only: no torch needed here

    return resolve_matmul(matmul or "auto", quantize) if quantize else ""


def ensure_engines(cfg: cfgmod.Config) -> None:
    """Export every engine the config names but lacks (or has in an older format), from
    its `source` model."""
    missing = [m for m in cfg.models
               if m.kind != "lookup" and not _current(cfg.engine_dir(m), m.quantize, m.role == "target", m.matmul)]
    # n-gram drafters are counted with the target's tokenizer: the target goes first
    for m in sorted(missing, key=lambda m: m.kind == "ngram"):
        if m.kind == "ngram":
            ensure_ngram(cfg, m)
            continue
        if not m.source:
            raise SystemExit(f"engine for {m.name!r} is missing at {cfg.engine_dir(m)} and the model has no "
                             f"`source` to export it from; run cosine-export yourself")
        src = Path(m.source).expanduser()
        if not src.exists():
            src = models.cached_path(m.source) or models.fetch(m.source)
        from cosine.export.build import export_engine  # torch is only needed here

        t0 = time.time()
        out = cfg.engine_dir(m)
        log.info("exporting %s from %s to %s (%s, quantize %s, matmul %s), once; later runs reuse it", m.name, src,
                 out, m.dtype, m.quantize or "none", m.matmul or "auto")
        export_engine(src, out, dtype=m.dtype, name=m.name, quantize=m.quantize or "none", matmul=m.matmul or "auto")
        log.info("exported %s in %.0f s", m.name, time.time() - t0)


def _rel(cfg: cfgmod.Config, p: str) -> Path:
    q = Path(p).expanduser()
    return q if q.is_absolute() else (cfg.path.parent / q).resolve()


def ensure_ngram(cfg: cfgmod.Config, m: cfgmod.ModelConfig) -> None:
    """Count an n-gram drafter from its `source` corpus, DIR/train/DOMAIN.txt of `cosine
    datasets build`, which runs first (installing its Debian packages) if the file is missing."""
    if not m.source:
        raise SystemExit(f"n-gram engine for {m.name!r} is missing at {cfg.engine_dir(m)} and the model has no "
                         f"`source` corpus; build it with `cosine-export --kind ngram --corpus ... --out ...`")
    corpus = _rel(cfg, m.source)
    target = cfg.engine_dir(cfg.target_model())
    if not corpus.exists():
        if corpus.parent.name != "train" or corpus.suffix != ".txt":
            raise SystemExit(f"n-gram corpus {corpus} for {m.name!r} does not exist (and is not a "
                             f"`cosine datasets build` DIR/train/DOMAIN.txt that could be built)")
        from cosine import datasets

        domains = sorted({_rel(cfg, x.source).stem for x in cfg.models if x.kind == "ngram" and x.source
                          and _rel(cfg, x.source).parent == corpus.parent} & set(datasets.SOURCES))
        log.info("building the %s datasets into %s (Debian packages are installed if missing), once",
                 ", ".join(domains), corpus.parent.parent)
        datasets.build(corpus.parent.parent, target, domains=tuple(domains), max_mb=12.0)
    from cosine.export.ngram import build_ngram

    log.info("counting n-gram drafter %s from %s, once; later runs reuse it", m.name, corpus)
    build_ngram([corpus], target, cfg.engine_dir(m))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="cosine demo", description=__doc__)
    ap.add_argument("--config", type=Path, default=Path("config.toml"))
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--mode", default=None, help="override [controller] mode")
    a = ap.parse_args(argv)
    cfg = cfgmod.load_for_cli(a.config, "cosine demo", check_engines=False)
    if cfg is None:
        return 2
    setup(cfg.logging.level, cfg.logging.file, "demo")
    ensure_engines(cfg)
    cfgmod.load(a.config)  # now with engines: fail early with the loader's message

    from cosine.client import Client
    from cosine.control.cluster import LocalCluster
    from cosine.security import CurveKeys

    with LocalCluster(a.config) as cluster, \
            Client(cluster.endpoint, curve=CurveKeys.from_config(cfg.security)) as client:
        print(f"\ncosine is up: {len(cfg.workers)} workers, clients connect to {cluster.endpoint}\n")
        for domain, prompt in PROMPTS:
            r = client.generate(prompt, max_tokens=a.max_tokens, mode=a.mode)
            s = r.stats
            print(f"--- [{domain}] {prompt}\n{r.text.strip()}\n"
                  f"    {s['tokens']} tokens in {s['latency_s']:.2f} s = {s['tokens_per_s']:.1f} tok/s, "
                  f"TTFT {s['ttft_s'] * 1000:.0f} ms, mean accepted length {s['mean_accepted_length']:.2f}, "
                  f"drafters {s.get('drafters_used')}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
