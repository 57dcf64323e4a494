#!/usr/bin/env python3
"""After the install: the staged packages are the ones imported, and ONNX Runtime's CUDA
provider really runs (tools/gpu/pipeline.py).

    python tools/gpu/runtime_check.py --site DIR [--rehearse]

Listing CUDAExecutionProvider is not enough: without the CUDA libraries onnxruntime lists
it and falls back to CPU, so a MatMul must run on it. onnxruntime.preload_dlls() finds the
CUDA 13 and cuDNN libraries of the host's PyTorch. In a rehearsal the stand-in wheel must
come from DIR, and the CUDA check is skipped (said so). Exit 1 with the reason otherwise.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time

PROBE = "cosine_gpu_probe"  # the rehearsal's stand-in wheel (tools/gpu/tiny_inputs.py)
IMPORTS = ("numpy", "zmq", "pykka", "msgpack", "tokenizers", "tqdm", "onnx", "gguf", "safetensors", "transformers",
           "torch", "cosine.control.serve", "cosine.workers.main", "cosine.export.build", "cosine.bench.run")


def origin(mod: object, site: str) -> str:
    f = os.path.realpath(getattr(mod, "__file__", "") or "")
    return "staged" if f.startswith(site + os.sep) else f"host ({os.path.dirname(f)})"


def cuda_matmul(ort: object) -> str | None:
    """None when a MatMul ran on CUDAExecutionProvider, else why not."""
    import numpy as np
    from onnx import TensorProto, helper

    t = time.perf_counter()
    try:
        ort.preload_dlls()
        print(f"onnxruntime.preload_dlls() ok ({time.perf_counter() - t:.2f} s)")
    except Exception as e:  # reported, then the session below says whether CUDA works anyway
        print(f"onnxruntime.preload_dlls() failed: {e}")
    g = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "g",
                          [helper.make_tensor_value_info(n, TensorProto.FLOAT16, [64, 64]) for n in "ab"],
                          [helper.make_tensor_value_info("c", TensorProto.FLOAT16, [64, 64])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    try:
        s = ort.InferenceSession(m.SerializeToString(), providers=["CUDAExecutionProvider"])
        a = (np.random.default_rng(0).standard_normal((64, 64)) / 8).astype(np.float16)
        err = float(np.abs(s.run(None, {"a": a, "b": a})[0].astype(np.float32) - a.astype(np.float32) @ a).max())
    except Exception as e:
        return f"a CUDA session failed: {type(e).__name__}: {e}"
    print(f"fp16 MatMul ran on {s.get_providers()[0]}, max error {err:.1e}")
    return None if s.get_providers()[0] == "CUDAExecutionProvider" and err < 1e-2 else "CUDA gave a wrong result"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="runtime_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--site", required=True)
    ap.add_argument("--rehearse", action="store_true")
    a = ap.parse_args(argv)
    site = os.path.realpath(a.site)
    print(f"python {sys.version.split()[0]} at {sys.executable}")
    first = importlib.import_module(PROBE if a.rehearse else "onnxruntime")
    where = origin(first, site)
    print(f"{first.__name__} {getattr(first, '__version__', '')} from {where}")
    if where != "staged":
        print(f"ERROR: {first.__name__} does not come from {site}: PYTHONPATH does not put the staged packages first")
        return 1
    bad = []
    for name in IMPORTS:
        try:
            mod = importlib.import_module(name)
            print(f"  {name:22} {str(getattr(mod, '__version__', '')):14} {origin(mod, site)}")
        except Exception as e:
            bad.append(f"{name}: {type(e).__name__}: {e}")
    if bad:
        print("ERROR: imports failed:\n  " + "\n  ".join(bad))
        return 1
    if a.rehearse:
        print("CUDA check skipped: rehearsal on CPU")
        return 0
    why = cuda_matmul(first)
    if why:
        print(f"ERROR: onnxruntime's CUDAExecutionProvider is not usable: {why}")
        return 1
    print("runtime check ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
