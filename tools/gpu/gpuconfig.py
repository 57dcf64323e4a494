#!/usr/bin/env python3
"""The measurement's configs, generated from the shipped config.toml (docs/gpu.md).

    python tools/gpu/gpuconfig.py --shipped config.toml --out FILE --engines DIR --data DIR
        [--provider cuda] [--device cuda:0] [--target-source PATH] [--drafter-source PATH]
        [--max-drafters K] [--cuda-graph] [--no-check]

Everything is the shipped deployment's (limits, controller policies, routing, fusion,
scheduling, the weight-free drafters and their domains) except what placing it on the
GPU host needs:
  - the target and the first model drafter run fp16 engines (ENGINES/target, ENGINES/drafter,
    no quantization) on --provider/--device; their `source` is what the Hugging Face peers load;
  - the weight-free drafters stay on CPU; the n-gram ones count DATA/train/<file> into
    ENGINES/<model name>; model drafters without an engine on the host are left out;
  - every endpoint gets a free loopback port; [http] and any log file are dropped;
  - the variants: [controller.routing] max_drafters_per_request = K, [workers] cuda_graph =
    true on the target's worker.
The result is validated with cosine.config.load (engines checked unless --no-check).
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import tomllib
from pathlib import Path
from typing import Any


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def place(cfg: dict[str, Any], engines: Path, data: Path, provider: str, device: str, ports: list[int],
          sources: dict[str, str], max_drafters: int | None = None, cuda_graph: bool = False) -> dict[str, Any]:
    """The shipped config (parsed) placed on the host; a new dict, ``cfg`` is untouched."""
    out = json.loads(json.dumps(cfg))  # deep copy of plain TOML data
    out.pop("http", None)
    out["logging"] = {**out.get("logging", {}), "level": "INFO", "file": ""}
    target = next(m for m in out["models"] if m.get("role") == "target")
    drafter = next((m for m in out["models"] if m.get("role") == "drafter" and m.get("kind", "neural") == "neural"),
                   None)
    keep = []
    for m in out["models"]:
        kind = m.get("kind", "neural")
        if m is target or m is drafter:
            role = "target" if m is target else "drafter"
            m.update(engine=str(engines / role), dtype="float16")
            m.pop("quantize", None)
            m.pop("matmul", None)  # float16 engines: no quantized products
            if sources.get(role):
                m["source"] = sources[role]
        elif kind == "ngram":
            m.update(source=str(data / "train" / Path(m["source"]).name), engine=str(engines / m["name"]))
        elif kind == "neural":
            continue  # another model drafter: no engine is staged for it
        keep.append(m)
    out["models"] = keep
    names = {m["name"] for m in keep}
    gpu = {target["name"]} | ({drafter["name"]} if drafter else set())
    workers = [w for w in out["workers"] if w["model"] in names]
    for w, port in zip(workers, ports):
        w.update(host="127.0.0.1", port=port)
        w.pop("cpus", None)
        on_gpu = w["model"] in gpu
        w.update(device=device if on_gpu else "cpu", provider=provider if on_gpu else "cpu")
        if cuda_graph and w["model"] == target["name"]:
            w["cuda_graph"] = True
    out["workers"] = workers
    ctl = out.setdefault("controller", {})
    ctl["endpoint"] = f"tcp://127.0.0.1:{ports[len(workers)]}"
    if max_drafters is not None:
        ctl.setdefault("routing", {})["max_drafters_per_request"] = max_drafters
    return out


# ---------------------------------------------------------------- TOML out

def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):  # JSON's escapes are TOML's; TOML also wants DEL escaped, and no surrogate pairs
        return json.dumps(v, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(v, list):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def _is_tables(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)


def dumps(d: dict[str, Any], prefix: str = "") -> str:
    """TOML for plain config data: scalars, lists, tables, arrays of flat tables."""
    lines = [f"{k} = {_value(v)}" for k, v in d.items() if not isinstance(v, dict) and not _is_tables(v)]
    for k, v in d.items():
        if isinstance(v, dict):
            lines += ["", f"[{prefix}{k}]", dumps(v, f"{prefix}{k}.").strip("\n")]
        elif _is_tables(v):
            for t in v:
                lines += ["", f"[[{prefix}{k}]]", dumps(t, f"{prefix}{k}.").strip("\n")]
    return "\n".join(x for x in lines if x is not None) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="gpuconfig", description=__doc__.split("\n\n")[0])
    ap.add_argument("--shipped", type=Path, default=Path("config.toml"))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--engines", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--provider", default="cuda")
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--target-source", default="")
    ap.add_argument("--drafter-source", default="")
    ap.add_argument("--max-drafters", type=int, default=None)
    ap.add_argument("--cuda-graph", action="store_true")
    ap.add_argument("--no-check", action="store_true", help="do not check that the engines exist")
    a = ap.parse_args(argv)
    shipped = tomllib.loads(a.shipped.read_text())
    cfg = place(shipped, a.engines.resolve(), a.data.resolve(), a.provider, a.device,
                free_ports(len(shipped.get("workers", [])) + 1),
                {"target": a.target_source, "drafter": a.drafter_source}, a.max_drafters, a.cuda_graph)
    variant = [f"max_drafters_per_request = {a.max_drafters}"] if a.max_drafters is not None else []
    variant += ["cuda_graph = true on the target's worker"] if a.cuda_graph else []
    head = (f"# Generated by tools/gpu/gpuconfig.py from {a.shipped}: the shipped deployment, the target and the\n"
            f"# model drafter on {a.provider}/{a.device} in fp16, the weight-free drafters on CPU"
            + (f"; {', '.join(variant)}" if variant else "") + ".\n")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(head + dumps(cfg))
    from cosine import config as cfgmod

    try:
        loaded = cfgmod.load(a.out, check_engines=not a.no_check)
    except cfgmod.ConfigError as e:
        print(f"gpuconfig: the generated {a.out} does not load: {e}", file=sys.stderr)
        return 1
    print(f"{a.out}: " + ", ".join(f"{w.name} on {w.device}/{w.provider}" for w in loaded.workers))
    return 0


if __name__ == "__main__":
    sys.exit(main())
