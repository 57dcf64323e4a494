"""``cosine-export``: build an engine directory from a Hugging Face model or GGUF file.

Exit codes: 0 ok, 2 user error (one line on stderr, no traceback), 1 internal error.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Sequence

from .build import DTYPES, GRAPHS, export_engine
from .errors import ExportError
from .ngram import add_ngram_args, run_ngram
from .runtime import PROVIDERS
from .weights import MATMUL, QUANTIZE


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cosine-export", description=__doc__.splitlines()[0])
    p.add_argument("--kind", choices=("neural", "ngram"), default="neural",
                   help="neural: a transformer engine from --model; ngram: a domain n-gram drafter from --corpus")
    p.add_argument("--model", help="Hugging Face model directory or .gguf file (--kind neural)")
    p.add_argument("--out", required=True, help="engine directory to write")
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--provider", choices=tuple(PROVIDERS), default="cpu",
                   help="execution provider to check parity on (tensorrt also builds and caches its engine)")
    p.add_argument("--name", default=None, help="engine name in the manifest (default: model file/dir name)")
    p.add_argument("--no-parity", action="store_true", help="skip the parity check against PyTorch")
    p.add_argument("--graph", choices=GRAPHS, default=None,
                   help="fused: ONNX Runtime's fused kernels (default where the architecture has them); "
                        "plain: elementary ops, the reference graph")
    p.add_argument("--quantize", choices=QUANTIZE, default="none",
                   help="gguf: compute with the GGUF file's own quantized blocks, exactly (MatMulNBits); "
                        "int4 / int8: symmetric blocks of 32 from the float weights; none: float weights")
    p.add_argument("--matmul", choices=("auto", *MATMUL), default="auto",
                   help="operator for quantized products: gguf = cosine's CPU kernel over the GGUF file's own "
                        "Q4_K/Q6_K/Q8_0 rows (built with g++ on first use; also Q8_0 rows for --quantize int8); "
                        "nbits = ONNX Runtime's MatMulNBits (any provider); auto = gguf for --quantize gguf on "
                        "CPU where the kernel builds, else nbits")
    p.add_argument("--quiet", action="store_true", help="no progress bar, warnings only")
    add_ngram_args(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)  # argparse itself exits 2 on bad flags
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if args.kind == "ngram":
        return run_ngram(args)
    if not args.model:
        parser.error("--model is required for --kind neural")
    try:
        manifest = export_engine(args.model, args.out, dtype=args.dtype, provider=args.provider, name=args.name,
                                 check_parity=not args.no_parity, progress=not args.quiet, graph=args.graph,
                                 quantize=args.quantize, matmul=args.matmul)
    except ExportError as e:
        print(f"cosine-export: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cosine-export: interrupted", file=sys.stderr)
        return 130
    summary = {k: manifest[k] for k in ("name", "architecture", "graph", "dtype", "num_layers", "vocab_size")}
    if manifest.get("matmul"):
        summary["matmul"] = manifest["matmul"]
    summary["parity_passed"] = manifest["parity"]["passed"]
    if manifest.get("quantization"):
        summary["quantization"] = manifest["quantization"]
    print(json.dumps({"engine": str(args.out), **summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
