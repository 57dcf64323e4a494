"""The issue's goals on the H100, judged against the numbers a measurement just took.

    python tools/gpu/goals.py RUNS_DIR [--rehearsal]  -> RUNS_DIR/summary.json, summary.md

RUNS_DIR holds worker.json (cosine-bench worker), <step>/results.json (cosine-bench run),
steps.json and prepare.json (tools/gpu/measure.py). Each goal is "met", "not met" or "not
measured", with the number it was judged on and where that number came from. `evaluate`
and `lossless` are pure functions of the loaded results.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

FLOOR_MS = 1.18          # fp16 Qwen2.5-Coder-1.5B weights / H100 memory bandwidth
HF_ASSISTED_REF = 21.5   # tok/s, HF assisted generation as the issue measured it
BENCH_RUNS = ("bench-c1", "bench-c16", "routing-2", "routing-3", "cuda-graph")


def _goal(key: str, text: str, value: float | None, threshold: float, source: str, higher: bool,
          unit: str = "x", note: str = "") -> dict[str, Any]:
    if value is None:
        status = "not measured"
    else:
        status = "met" if (value >= threshold if higher else value <= threshold) else "not met"
    return {"goal": key, "text": text, "status": status, "value": value, "threshold": threshold, "unit": unit,
            "source": source, "note": note}


def _ratio(runs: dict[str, dict], run: str, key: str) -> float | None:
    return ((runs.get(run) or {}).get("ratios") or {}).get(key)


def _paired(runs: dict[str, dict], run: str, key: str) -> str:
    p = ((runs.get(run) or {}).get("paired_ratios") or {}).get(key)
    return f"paired geometric mean {p['geomean']:.2f}x over {p['pairs']} pairs" if p else ""


def evaluate(worker: dict | None, runs: dict[str, dict]) -> list[dict[str, Any]]:
    """The five goals of the issue's "Goals on the H100" list."""
    dec1 = ((worker or {}).get("decode") or {}).get("1") or {}
    rtt, eng = dec1.get("rtt_ms_p50"), dec1.get("engine_ms_p50")
    goals = [_goal("decode-floor", f"batch-1 decode step at most 2x the {FLOOR_MS} ms floor", rtt, 2 * FLOOR_MS,
                   "worker.json decode[1].rtt_ms_p50 (worker round trip)", higher=False, unit="ms",
                   note="" if eng is None else f"engine alone {eng:.3f} ms ({eng / FLOOR_MS:.2f}x the floor)"),
             _goal("c1-vs-autoregressive", "cosine at least 2.5x autoregressive at concurrency 1",
                   _ratio(runs, "bench-c1", "cosine/autoregressive@1"), 2.5, "bench-c1 ratios",
                   higher=True, note=_paired(runs, "bench-c1", "cosine/autoregressive@1")),
             _goal("c16-vs-speculative", "cosine at least 1.3x vanilla speculative at concurrency 16",
                   _ratio(runs, "bench-c16", "cosine/speculative@16"), 1.3, "bench-c16 ratios",
                   higher=True, note=_paired(runs, "bench-c16", "cosine/speculative@16"))]
    hf = _ratio(runs, "bench-c1", "cosine/hf-assisted@1")
    cos1 = ((runs.get("bench-c1") or {}).get("summary") or {}).get("cosine@1", {}).get("tokens_per_s")
    goals.append(_goal("vs-hf-assisted", "cosine at least 10x Hugging Face assisted generation", hf, 10.0,
                       "bench-c1 ratios cosine/hf-assisted@1", higher=True,
                       note="" if cos1 is None else f"cosine {cos1:.1f} tok/s = {cos1 / HF_ASSISTED_REF:.1f}x the "
                       f"issue's {HF_ASSISTED_REF} tok/s"))
    levels = {"1": _ratio(runs, "bench-c1", "cosine/autoregressive@1"),
              "16": _ratio(runs, "bench-c16", "cosine/autoregressive@16")}
    got = {k: v for k, v in levels.items() if v is not None}
    worst = min(got.values()) if got else None
    g = _goal("never-below-autoregressive", "cosine never below autoregressive at any concurrency",
              worst if len(got) == len(levels) or (worst is not None and worst < 1.0) else None, 1.0,
              "min of cosine/autoregressive at concurrency 1 (bench-c1) and 16 (bench-c16)", higher=True,
              note=", ".join(f"@{k}: {v:.2f}x" if v is not None else f"@{k}: not measured" for k, v in levels.items()))
    goals.append(g)
    return goals


def lossless(runs: dict[str, dict]) -> dict[str, Any]:
    """Every speculative mode's greedy output equal to autoregressive's, in every run that checked."""
    checked = {k: r["identity"] for k, r in runs.items() if (r.get("identity") or {}).get("checked")}
    bad = {k: v["mismatches"] for k, v in checked.items() if v.get("mismatches")}
    return {"runs": sorted(checked), "outputs_compared": sum(v["checked"] for v in checked.values()),
            "mismatches": bad, "status": "not measured" if not checked else "ok" if not bad else "MISMATCH"}


def variants(runs: dict[str, dict]) -> list[dict[str, Any]]:
    """tokens/s of each mode@level in every benchmark run (routed drafters, CUDA graphs beside the main runs)."""
    rows = []
    for name in BENCH_RUNS:
        for key, s in sorted(((runs.get(name) or {}).get("summary") or {}).items()):
            rows.append({"run": name, "mode": key, "tokens_per_s": s.get("tokens_per_s"),
                         "mean_accepted_length": s.get("mean_accepted_length")})
    return rows


def comparison(runs: dict[str, dict]) -> list[dict[str, Any]]:
    """tokens/s of the main config (1 routed drafter) beside 2 and 3 routed drafters and CUDA graphs."""
    def tps(run: str, key: str) -> float | None:
        return (((runs.get(run) or {}).get("summary") or {}).get(key) or {}).get("tokens_per_s")

    rows = [("1 routed drafter (shipped)", "bench-c1", "bench-c16"), ("2 routed drafters", "routing-2", "routing-2"),
            ("3 routed drafters", "routing-3", "routing-3"), ("CUDA graphs on the verifier", "cuda-graph", "cuda-graph")]
    return [{"variant": label, **{f"{m}@{c}": tps(r1 if c == 1 else r16, f"{m}@{c}")
                                  for m in ("cosine", "autoregressive") for c in (1, 16)}}
            for label, r1, r16 in rows]


def _md(summary: dict[str, Any]) -> str:
    L = ["# GPU measurement" + (" (REHEARSAL: tiny models on CPU, the numbers mean nothing)"
                                if summary["rehearsal"] else ""), "", f"GPU: {summary.get('gpu') or 'unknown'}", "",
         "| goal | status | measured | target | from | note |", "|---|---|---|---|---|---|"]
    for g in summary["goals"]:
        v = "-" if g["value"] is None else f"{g['value']:.3f} {g['unit']}"
        op = "<=" if g["goal"] == "decode-floor" else ">="
        L.append(f"| {g['text']} | **{g['status']}** | {v} | {op} {g['threshold']} {g['unit']} | {g['source']} | "
                 f"{g['note']} |")
    pl = summary.get("placement") or {}
    if pl.get("placements"):
        where = ", ".join(f"{n} on {k}" for k, n in pl["placements"].items())
        off = "; NOT on the session's provider: " + ", ".join(
            f"{k} ({', '.join(pl['nodes'].get(k, [])) or 'op types not listed'})" for k in pl["elsewhere"]) \
            if pl.get("elsewhere") else ""
        L += ["", f"Graph node placement ({pl['engine'].rsplit('/', 1)[-1]} engine, the target's op types): {where}{off}"]
    ll = summary["lossless"]
    L += ["", f"Greedy outputs equal to autoregressive's: **{ll['status']}** ({ll['outputs_compared']} outputs "
              f"compared in {', '.join(ll['runs']) or 'no run'})", "", "## Steps", "",
          "| step | status | seconds | detail |", "|---|---|---|---|"]
    for s in summary["prepare"] + summary["steps"]:
        L.append(f"| {s['name']} | {s['status']} | {s.get('seconds') or 0:.0f} | {s.get('detail', '')} |")
    cols = ("cosine@1", "cosine@16", "autoregressive@1", "autoregressive@16")
    L += ["", "## Routed drafters and CUDA graphs (tok/s)", "", "| variant | " + " | ".join(cols) + " |",
          "|---" * 5 + "|"]
    for r in summary["comparison"]:
        L.append(f"| {r['variant']} | " + " | ".join("-" if r[c] is None else f"{r[c]:.1f}" for c in cols) + " |")
    L += ["", "## Throughput by run", "", "| run | mode@concurrency | tok/s | mean accepted length |",
          "|---|---|---|---|"]
    for r in summary["variants"]:
        acc = "-" if r["mean_accepted_length"] is None else f"{r['mean_accepted_length']:.2f}"
        L.append(f"| {r['run']} | {r['mode']} | {r['tokens_per_s']:.1f} | {acc} |")
    return "\n".join(L) + "\n"


def summarize(runs_dir: Path, rehearsal: bool) -> dict[str, Any]:
    def load(p: Path) -> Any:
        try:
            return json.loads(p.read_text())
        except (OSError, ValueError):
            return None

    worker = load(runs_dir / "worker.json")
    runs = {n: r for n in BENCH_RUNS if (r := load(runs_dir / n / "results.json"))}
    gpu = (runs_dir / "gpu.txt").read_text().strip() if (runs_dir / "gpu.txt").is_file() else None
    summary = {"rehearsal": rehearsal, "gpu": gpu, "goals": evaluate(worker, runs), "lossless": lossless(runs),
               "steps": load(runs_dir / "steps.json") or [], "prepare": load(runs_dir / "prepare.json") or [],
               "variants": variants(runs), "comparison": comparison(runs), "placement": load(runs_dir / "placement.json"),
               "worker": {k: (worker or {}).get(k) for k in ("decode", "verify", "floor")},
               "environment": (runs.get("bench-c1") or {}).get("environment") or (worker or {}).get("environment")}
    (runs_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    (runs_dir / "summary.md").write_text(_md(summary))
    return summary


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    print(_md(summarize(Path(sys.argv[1]), "--rehearsal" in sys.argv[2:])))
