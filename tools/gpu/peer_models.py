#!/usr/bin/env python3
"""A model for the Hugging Face peers, saved as safetensors (tools/gpu/pipeline.py).

    python tools/gpu/peer_models.py --model GGUF-or-DIR --out DIR [--dtype float16]

transformers dequantizes a GGUF file on every load, on one CPU core: about a minute for
the 1.5B target. The host does it once, in the background while the parts still arrive
and the engines export, and the benchmark's peers then load DIR in seconds. Same weights:
the GGUF dequantized and cast to --dtype, as `cosine.bench.peers.load` would.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="peer_models", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    a = ap.parse_args(argv)
    from cosine.bench import peers

    t0 = time.perf_counter()
    m = peers.load(a.model, "cpu", a.dtype)
    tmp = a.out.with_name(a.out.name + ".tmp")
    m.model.save_pretrained(tmp, safe_serialization=True)
    m.tokenizer.save_pretrained(tmp)
    if a.out.exists():
        import shutil

        shutil.rmtree(a.out)
    tmp.rename(a.out)
    print(f"{a.model} -> {a.out} ({a.dtype}) in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
