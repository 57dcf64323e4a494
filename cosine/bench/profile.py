"""`cosine-bench profile`: where one engine's forward spends its time, per ONNX op type.

ONNX Runtime's own profiler times every node of a decode step (one new token over a
cached prefix) and of a tree verification (a chain of N nodes); this sums the node times
by op type, next to the graph's node count per type, so a graph change shows which
kernels it removed and what the rest costs (docs/export.md).

    cosine-bench profile --engine engines/qwen2.5-coder-1.5b-gguf [--threads 2] [--md FILE]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from cosine.keyslots import with_slots
from cosine.workers import kernels


def node_counts(engine_dir: Path) -> dict[str, int]:
    import onnx

    model = onnx.load(str(engine_dir / "model.onnx"), load_external_data=False)
    return dict(collections.Counter(n.op_type for n in model.graph.node).most_common())


def _feeds(manifest: dict[str, Any], prefix: int, new: int) -> dict[str, np.ndarray]:
    """A forward of ``new`` chained tokens after ``prefix`` cached ones (random cache)."""
    L, Hkv, D = (int(manifest[k]) for k in ("num_layers", "num_kv_heads", "head_dim"))
    past = np.random.default_rng(0).standard_normal((1, Hkv, prefix, D)).astype(np.float32) * 0.1
    mask = np.ones((1, 1, new, prefix + new), bool)
    mask[0, 0, :, prefix:] = np.tril(np.ones((new, new), bool))
    feeds = {"input_ids": np.full((1, new), 100, np.int64),
             "position_ids": (prefix + np.arange(new, dtype=np.int64))[None], "attention_mask": mask,
             "logits_index": np.arange(new, dtype=np.int64)[None]}
    for i in range(L):
        feeds[f"past_key.{i}"] = feeds[f"past_value.{i}"] = past
    return feeds


def profile(engine_dir: Path, threads: int = 2, prefix: int = 128, tree: int = 8, iters: int = 5) -> dict[str, Any]:
    """{"nodes": count per op type, "decode"/"verify": {"ms": per forward, "ops": ms per op type}}."""
    import onnxruntime as ort

    manifest = json.loads((engine_dir / "manifest.json").read_text())
    out: dict[str, Any] = {"engine": str(engine_dir), "graph": manifest.get("graph"),
                           "quantization": (manifest.get("quantization") or {}).get("mode", "none"),
                           "threads": threads, "prefix": prefix, "tree": tree, "nodes": node_counts(engine_dir)}
    for what, new in (("decode", 1), ("verify", tree)):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        kernels.register(opts, manifest)
        opts.enable_profiling = True
        opts.profile_file_prefix = os.path.join(tempfile.mkdtemp(prefix="cosine-profile-"), what)
        sess = ort.InferenceSession(str(engine_dir / "model.onnx"), opts, providers=["CPUExecutionProvider"])
        feeds = with_slots(sess, _feeds(manifest, prefix, new))
        sess.run(["logits"], feeds)  # warm-up (also profiled: dropped below by run index)
        for _ in range(iters):
            sess.run(["logits"], feeds)
        trace = json.loads(Path(sess.end_profiling()).read_text())
        runs = [e for e in trace if e.get("cat") == "Session" and e.get("name") == "model_run"]
        timed = runs[1:]
        start = timed[0]["ts"] if timed else 0
        ops: dict[str, float] = collections.defaultdict(float)
        for e in trace:
            if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time") and e["ts"] >= start:
                ops[e["args"]["op_name"]] += e["dur"] / 1000 / max(1, len(timed))
        out[what] = {"ms": sum(r["dur"] for r in timed) / 1000 / max(1, len(timed)),
                     "ops": dict(sorted(ops.items(), key=lambda kv: -kv[1]))}
    return out


def markdown(results: list[dict[str, Any]]) -> str:
    """One table per engine: op type, nodes, decode ms, verify ms."""
    lines = []
    for r in results:
        lines += [f"### {Path(r['engine']).name} ({r['graph']} graph, quantize {r['quantization']}, "
                  f"{r['threads']} threads, {r['prefix']} cached tokens)", "",
                  f"{sum(r['nodes'].values())} nodes; decode step {r['decode']['ms']:.1f} ms, "
                  f"{r['tree']}-token verify {r['verify']['ms']:.1f} ms", "",
                  f"| op | nodes | decode ms | verify ms |", "|---|---|---|---|"]
        ops = sorted(set(r["nodes"]) | set(r["decode"]["ops"]), key=lambda o: -r["decode"]["ops"].get(o, 0.0))
        for op in ops:
            lines.append(f"| {op} | {r['nodes'].get(op, 0)} | {r['decode']['ops'].get(op, 0.0):.2f} | "
                         f"{r['verify']['ops'].get(op, 0.0):.2f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="cosine-bench profile", description=__doc__.splitlines()[0])
    ap.add_argument("--engine", type=Path, action="append", required=True, help="engine directory (repeatable)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prefix", type=int, default=128, help="cached tokens")
    ap.add_argument("--tree", type=int, default=8, help="tokens in the verify forward")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--md", type=Path, default=None)
    args = ap.parse_args(argv)
    for e in args.engine:
        if not (e / "manifest.json").is_file():
            ap.error(f"{e} is not an engine directory (no manifest.json)")
    results = [profile(e, args.threads, args.prefix, args.tree, args.iters) for e in args.engine]
    text = markdown(results)
    print(text)
    if args.md:
        args.md.write_text(text + "\n")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0
