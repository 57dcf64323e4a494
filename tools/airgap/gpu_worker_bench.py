#!/usr/bin/env python3
"""`cosine-bench worker` (workers/bench.py) with the worker and the reference engine on a
GPU execution provider.

    python tools/airgap/gpu_worker_bench.py [--engine DIR] [--provider cuda] [--device cuda:0]
        [--iters 200] [--prefix 32] [--tree-nodes 8] [--threads 1] [--json FILE]

workers/bench.py has no provider option: its worker config and its in-process Engine
are CPU-only. This wrapper changes exactly those two things (the worker section of the
generated config gets `provider`/`device`, Engine gets the same) and otherwise runs the
same measurement, so the numbers compare with docs/workers.md. Without --engine a tiny
llama engine is exported with its parity checked on the same provider (a GPU smoke test
that needs no model weights: tools/airgap/remote.sh smoke).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="gpu_worker_bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--engine", type=Path, help="engine directory (default: export a tiny llama engine)")
    ap.add_argument("--provider", default="cuda", choices=("cpu", "cuda", "tensorrt"))
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--prefix", type=int, default=32, help="cached tokens before each call")
    ap.add_argument("--tree-nodes", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    ap.add_argument("--json", type=Path, default=None, help="also write the result as JSON here")
    args = ap.parse_args(argv)
    if args.provider == "cpu":
        args.device = "cpu"

    import cosine.workers.bench as wb

    # patched for cpu too, so the patch itself is exercised where there is no GPU
    make_config = wb._config

    def _config(tmp: Path, engine_dir: Path, threads: int):
        path, endpoint = make_config(tmp, engine_dir, threads)
        text, marker = path.read_text(), 'model = "bench"\n'
        if text.count(marker) != 1:
            raise SystemExit("gpu_worker_bench: cosine.workers.bench._config no longer writes one "
                             "'model = \"bench\"' line; update tools/airgap/gpu_worker_bench.py")
        path.write_text(text.replace(marker, f'{marker}provider = "{args.provider}"\ndevice = "{args.device}"\n'))
        return path, endpoint

    wb._config = _config
    wb.Engine = functools.partial(wb.Engine, provider=args.provider, device=args.device)

    with tempfile.TemporaryDirectory() as tmp:
        engine_dir = args.engine
        if engine_dir is None:
            from cosine.export.build import export_engine
            from cosine.export.tiny import make_tiny_model

            engine_dir = Path(tmp) / "engine"
            man = export_engine(make_tiny_model(Path(tmp) / "hf", arch="llama", seed=0), engine_dir,
                                dtype="float32", provider=args.provider, progress=False)
            print(f"tiny llama engine exported; parity on {args.provider}: passed={man['parity']['passed']} "
                  f"max_abs_logprob_diff={man['parity'].get('max_abs_logprob_diff')}", flush=True)
        man = json.loads((Path(engine_dir) / "manifest.json").read_text())
        res = wb.measure(Path(engine_dir), args.iters, args.prefix, args.tree_nodes, args.threads)
    res.update(provider=args.provider, device=args.device, engine_name=man.get("name"), dtype=man.get("dtype"))
    print(f"engine {res['engine']} ({res['engine_name']}, {res['dtype']})  provider {res['provider']} on "
          f"{res['device']}  prefix {res['prefix']}  iters {res['iters']}  threads {res['threads']}")
    print(f"health round trip p50: {res['health_rtt_ms_p50']:.3f} ms")
    print(f"{'op':8} {'rtt p50':>10} {'op p50':>10} {'engine p50':>11} {'overhead':>10}   (ms)")
    for op in ("draft", "verify"):
        r = res[op]
        label = op if op == "draft" else f"verify{res['tree_nodes']}"
        print(f"{label:8} {r['rtt_ms_p50']:10.3f} {r['op_ms_p50']:10.3f} {r['engine_ms_p50']:11.3f} "
              f"{r['overhead_ms_p50']:10.3f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
