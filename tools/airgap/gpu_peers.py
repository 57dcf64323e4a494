#!/usr/bin/env python3
"""Hugging Face peers (greedy `generate()` and assisted generation) on a GPU, merged into
a `cosine-bench run` results directory.

    python tools/airgap/gpu_peers.py --results DIR [--device cuda:0] [--dtype float16] [--peers hf,hf-assisted]

`cosine-bench run` loads its peers with cosine.bench.peers.load(path), which defaults
to CPU and float32 (cosine/bench/run.py run_peers passes no device), so on the GPU host
tools/airgap/remote.sh runs the benchmark with `--peers none` and then this script:
same config, same prompts, same token budget (read back from DIR/results.json), the
models loaded with peers.load(path, device, dtype), one untimed warm-up generation per
peer (CUDA start-up is not generation time), then the records, the `hf@1` /
`hf-assisted@1` summaries and the cosine/peer ratios are added to DIR/results.json and
results.md and the plots are rewritten. Re-running replaces the earlier peer records.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

NAMES = ("hf", "hf-assisted")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="gpu_peers", description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", type=Path, required=True, help="a cosine-bench run --out directory")
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    ap.add_argument("--peers", default=",".join(NAMES))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("gpu_peers")

    from cosine import config as cfgmod, models
    from cosine.bench import peers, prompts as promptsets
    from cosine.bench.report import write_markdown, write_plots
    from cosine.bench.run import ratios, summarize

    path = args.results / "results.json"
    if not path.is_file():
        print(f"gpu_peers: {path} not found; run cosine-bench run --out {args.results} first", file=sys.stderr)
        return 2
    why = peers.available()
    if why:
        print(f"gpu_peers: {why}", file=sys.stderr)
        return 1
    wanted = [p for p in args.peers.split(",") if p]
    bad = sorted(set(wanted) - set(NAMES))
    if bad:
        ap.error(f"unknown peers {bad}; known: {', '.join(NAMES)}")
    result = json.loads(path.read_text())
    a = result["args"]
    cfg = cfgmod.load(Path(a["config"]), check_engines=False)
    items = promptsets.load(a["domains"].split(","), None if a.get("prompts") in (None, "None") else Path(a["prompts"]),
                            int(a.get("per_domain") or 0))
    max_tokens = int(a["max_tokens"])

    def resolve(src: str) -> Path:
        p = Path(src)
        return p if p.exists() else (models.cached_path(src) or models.fetch(src))

    import torch

    t0 = time.perf_counter()
    target = peers.load(resolve(cfg.target_model().source), args.device, args.dtype)
    drafters = [m for m in cfg.models if m.role == "drafter" and m.kind == "neural" and m.source]
    assistant = peers.load(resolve(drafters[0].source), args.device, args.dtype) \
        if drafters and "hf-assisted" in wanted else None
    load_s = time.perf_counter() - t0
    records = [r for r in result["records"] if r.get("peer") not in NAMES]
    peer_recs = []
    for name in wanted:
        asst = assistant if name == "hf-assisted" else None
        if name == "hf-assisted" and asst is None:
            log.warning("hf-assisted skipped: the config has no neural drafter with a source")
            continue
        warm_ids = target.tokenizer(items[0][1])["input_ids"]
        peers.generate(target, warm_ids, 8, assistant=asst)  # untimed: CUDA kernels, allocator, caches
        for d, p in items:
            ids = target.tokenizer(p)["input_ids"]
            new, secs = peers.generate(target, ids, max_tokens, assistant=asst)
            peer_recs.append({"peer": name, "mode": name, "domain": d, "prompt": p[:60], "tokens": len(new),
                              "token_ids": new, "wall_s": secs, "concurrency": 1})
            log.info("%s [%s] %d tokens in %.3f s (%.1f tok/s)", name, d, len(new), secs, len(new) / max(secs, 1e-9))
    summary = {k: v for k, v in result["summary"].items() if k.split("@")[0] not in NAMES}
    for name in NAMES:
        rs = [r for r in peer_recs if r["peer"] == name]
        if rs:
            summary[f"{name}@1"] = summarize(rs, sum(r["wall_s"] for r in rs))
    result["records"] = records + peer_recs
    result["summary"] = summary
    result["ratios"] = ratios(summary)
    result["environment"]["peers"] = {
        "device": args.device, "dtype": args.dtype, "torch": torch.__version__,
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_s": load_s, "warmup": "one untimed 8-token generation per peer",
        "by": "tools/airgap/gpu_peers.py (cosine-bench run's own peers run on CPU float32)"}
    path.write_text(json.dumps(result, indent=1))
    write_markdown(result, args.results / "results.md")
    write_plots(result, args.results)
    for name in NAMES:
        s = summary.get(f"{name}@1")
        if s:
            print(f"{name}@1 on {args.device} {args.dtype}: {s['tokens_per_s']:.2f} tok/s")
    for k, v in sorted(result["ratios"].items()):
        if k.split("/")[1].split("@")[0] in NAMES:
            print(f"{k}: {v:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
