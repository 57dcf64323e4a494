#!/usr/bin/env python3
"""`cosine-bench worker` (workers/bench.py) with a GPU execution provider by default.

    python tools/airgap/gpu_worker_bench.py [any cosine-bench worker option]

A thin wrapper kept for tools/airgap/remote.sh and older command lines: it adds
`--provider cuda` when no --provider is given (the device then defaults to cuda:0) and
runs `python -m cosine.workers.bench` with everything else unchanged. Without --engine a
tiny llama engine is exported with its parity checked on the same provider, which makes
it a GPU smoke test that needs no model weights (tools/airgap/remote.sh smoke).
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not any(a == "--provider" or a.startswith("--provider=") for a in argv):
        argv = ["--provider", "cuda", *argv]
    from cosine.workers.bench import main as bench

    return bench(argv)


if __name__ == "__main__":
    sys.exit(main())
