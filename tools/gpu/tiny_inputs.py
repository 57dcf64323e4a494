#!/usr/bin/env python3
"""The rehearsal's stand-ins for the bundle's contents (tools/gpu/stage.sh --rehearse).

    python tools/gpu/tiny_inputs.py SRC

writes SRC/<group>/ for bundle.py pack, shaped like the real bundle:
  wheels/   a small generated wheel standing in for onnxruntime-gpu: it proves that the
            staged wheels are pip-installed and come first on PYTHONPATH
  data/     data.tar.xz: train/{code,docs,prose,german}.txt (text from this repository
            and the built-in prompts) and prompts.json (4 prompts per domain)
  target/   a tiny qwen2 model (export/tiny.py, seed 0) standing in for the 1.5B GGUF
  drafter/  a tiny qwen2 model (seed 1) standing in for the 0.5B GGUF
"""

from __future__ import annotations

import io
import json
import sys
import tarfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PROBE = "cosine_gpu_probe"
DOMAINS = ("code", "docs", "prose", "german")
PER_DOMAIN = 4


def probe_wheel(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    whl = d / f"{PROBE}-0.1-py3-none-any.whl"
    info = f"{PROBE}-0.1.dist-info"
    files = {f"{PROBE}/__init__.py": '"""Stand-in for onnxruntime-gpu in the GPU rehearsal."""\nSTAGED = True\n',
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {PROBE}\nVersion: 0.1\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: tiny_inputs\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{info}/RECORD"] = "".join(f"{n},,\n" for n in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(whl, "w") as z:
        for name, text in files.items():
            z.writestr(zipfile.ZipInfo(name, (2020, 1, 1, 0, 0, 0)), text)
    return whl


def _corpus(domain: str) -> str:
    from cosine.bench.prompts import BUILTIN

    sources = {"code": sorted((REPO / "cosine").glob("*.py"))[:6], "docs": sorted((REPO / "docs").glob("*.md"))[:4],
               "prose": [REPO / "README.md"], "german": []}[domain]
    text = "\n".join(BUILTIN[domain]) * 20 + "\n" + "\n".join(p.read_text()[:40000] for p in sources)
    return text


def data_tar(d: Path) -> Path:
    from cosine.bench.prompts import BUILTIN

    d.mkdir(parents=True, exist_ok=True)
    texts = {dom: _corpus(dom) for dom in DOMAINS}
    prompts = {}
    for dom in DOMAINS:
        own = list(BUILTIN[dom])
        own += [texts[dom][i * 300:i * 300 + 120] for i in range(1, PER_DOMAIN + 1)]  # pad to PER_DOMAIN
        prompts[dom] = own[:PER_DOMAIN]
    blobs = {f"train/{dom}.txt": texts[dom].encode() for dom in DOMAINS}
    blobs["prompts.json"] = json.dumps(prompts, indent=1).encode()
    out = d / "data.tar.xz"
    with tarfile.open(out, "w:xz") as tar:
        for name, blob in blobs.items():
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode, ti.mtime = len(blob), 0o644, 0
            tar.addfile(ti, io.BytesIO(blob))
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    from cosine.export.tiny import make_tiny_model

    src = Path(argv[0])
    probe_wheel(src / "wheels")
    data_tar(src / "data")
    for group, seed in (("target", 0), ("drafter", 1)):
        make_tiny_model(src / group, arch="qwen2", seed=seed, max_positions=1024)
    print(f"rehearsal inputs in {src}: {', '.join(sorted(p.name for p in src.iterdir()))}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
