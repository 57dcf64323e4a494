#!/usr/bin/env python3
"""Which execution provider each node of an engine's graph is placed on (tools/gpu/pipeline.py).

    python tools/gpu/placement.py --engine DIR --provider cuda --json FILE

A node without a CUDA kernel in this onnxruntime build runs on the CPU provider inside a
CUDA session, with copies across the bus around it: every GPU number is then off, and this
says which op types. It reads ONNX Runtime's own verbose "Node placements" report while the
session is built (in a child process: the report goes to the C++ stderr).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

BUILD = """
import sys, onnxruntime as ort
if sys.argv[2] != "cpu":
    ort.preload_dlls()
o = ort.SessionOptions()
o.log_severity_level = 0
o.log_verbosity_level = 0
eps = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider"]}[sys.argv[2]]
s = ort.InferenceSession(sys.argv[1], o, providers=eps)
print("SESSION-PROVIDERS", s.get_providers(), flush=True)
"""


def parse(log: str) -> dict:
    """{"placements": {provider: nodes}, "nodes": {provider: [op types]}} from ONNX Runtime's report."""
    placements: dict[str, int] = {}
    nodes: dict[str, list[str]] = {}
    current = None
    for line in log.splitlines():
        m = re.search(r"(?:All nodes|Node\(s\)) placed on \[(\w+)\]\. Number of nodes: (\d+)", line)
        if m:
            current = m.group(1)
            placements[current] = placements.get(current, 0) + int(m.group(2))
            continue
        m = re.search(r"VerifyEachNodeIsAssignedToAnEp\]\s+(\w+) \(", line)
        if m and current:
            nodes.setdefault(current, []).append(m.group(1))
    return {"placements": placements, "nodes": {k: sorted(set(v)) for k, v in nodes.items()}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="placement", description=__doc__.split("\n\n")[0])
    ap.add_argument("--engine", type=Path, required=True)
    ap.add_argument("--provider", default="cuda", choices=("cpu", "cuda"))
    ap.add_argument("--json", type=Path, required=True)
    a = ap.parse_args(argv)
    p = subprocess.run([sys.executable, "-c", BUILD, str(a.engine / "model.onnx"), a.provider], capture_output=True,
                       text=True, timeout=600)
    res = {"engine": str(a.engine), "provider": a.provider, "exit": p.returncode, **parse(p.stderr)}
    want = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}[a.provider]
    res["elsewhere"] = {k: v for k, v in res["placements"].items() if k != want}
    if p.returncode:
        res["error"] = p.stderr.strip().splitlines()[-1:] or ["?"]
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(res, indent=1))
    print(json.dumps({k: res[k] for k in ("placements", "elsewhere")}))
    return p.returncode


if __name__ == "__main__":
    sys.exit(main())
