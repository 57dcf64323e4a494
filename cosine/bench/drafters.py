"""`cosine-bench drafters`: each drafter alone, per domain, through the real cluster.

Every drafter worker in the config drafts for the target in `speculative` mode, pinned
to it by the request's `drafters` field, on the same prompts; `cosine` mode (routing and
fusion over all drafters) runs beside them. The table gives the mean accepted length
(1 + accepted/rounds, greedy) per drafter and domain, the best drafter of each domain,
and whether it beats the general neural drafter. Every output is checked against
`autoregressive` (greedy identity).

    cosine-bench drafters --config config.toml --prompts data/prompts.json --per-domain 2
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from cosine import config as cfgmod
from cosine.bench import prompts as promptsets
from cosine.bench.run import environment
from cosine.log import setup

log = logging.getLogger("cosine.bench.drafters")


def measure(endpoint: str, items: list[tuple[str, str]], drafters: list[str], max_tokens: int,
            timeout_s: float, with_cosine: bool = True, curve: Any = None) -> list[dict]:
    """One record per (row, prompt); rows are the drafter names, plus "autoregressive" and
    "cosine"."""
    from cosine.client import Client

    runs: list[tuple[str, str, list[str] | None]] = [("autoregressive", "autoregressive", None)]
    runs += [(d, "speculative", [d]) for d in drafters]
    if with_cosine:
        runs.append(("cosine", "cosine", None))
    out = []
    with Client(endpoint, timeout_s=timeout_s, curve=curve) as c:
        for row, mode, pin in runs:
            for i, (domain, prompt) in enumerate(items):
                t0 = time.perf_counter()
                r = c.generate(prompt, max_tokens=max_tokens, mode=mode, drafters=pin, ignore_eos=True)
                wall = time.perf_counter() - t0
                st = dict(r.stats)
                out.append({"row": row, "mode": mode, "domain": domain, "prompt_index": i,
                            "tokens": len(r.token_ids), "token_ids": list(r.token_ids), "wall_s": wall,
                            "mean_accepted_length": st.get("mean_accepted_length", 1.0),
                            "rounds": st.get("rounds"), "drafters_used": st.get("drafters_used")})
                log.info("%-20s %-8s #%d: accepted length %.2f, %.1f tok/s", row, domain, i,
                         out[-1]["mean_accepted_length"], len(r.token_ids) / max(wall, 1e-9))
    return out


def summarize(records: list[dict], general: str | None) -> dict:
    """Per row and domain: mean accepted length and tokens/s; per domain: the best drafter."""
    ref = {(r["domain"], r["prompt_index"]): r["token_ids"] for r in records if r["row"] == "autoregressive"}
    mismatches = [(r["row"], r["domain"], r["prompt_index"]) for r in records
                  if ref.get((r["domain"], r["prompt_index"])) not in (None, r["token_ids"])]
    table: dict[str, dict[str, dict[str, float]]] = {}
    for r in records:
        cell = table.setdefault(r["row"], {}).setdefault(r["domain"], {"acc": [], "tps": []})
        cell["acc"].append(r["mean_accepted_length"])
        cell["tps"].append(r["tokens"] / max(r["wall_s"], 1e-9))
    table = {row: {d: {"mean_accepted_length": float(np.mean(c["acc"])), "tokens_per_s": float(np.mean(c["tps"]))}
                   for d, c in ds.items()} for row, ds in table.items()}
    domains = sorted({r["domain"] for r in records})
    drafter_rows = [row for row in table if row not in ("autoregressive", "cosine")]
    best = {}
    for d in domains:
        cand = [(table[row][d]["mean_accepted_length"], row) for row in drafter_rows if d in table[row]]
        if cand:
            acc, row = max(cand)
            g = table.get(general, {}).get(d, {}).get("mean_accepted_length") if general else None
            best[d] = {"drafter": row, "mean_accepted_length": acc, "general": g,
                       "beats_general": None if g is None else bool(row != general and acc > g)}
    return {"table": table, "best": best, "general": general, "domains": domains,
            "identity": {"checked": sum(1 for r in records if r["row"] != "autoregressive"),
                         "mismatches": mismatches}}


def markdown(result: dict) -> str:
    env, s = result["environment"], result["summary"]
    domains, table = s["domains"], s["table"]
    lines = [f"Command: `{env['command']}`  ",
             f"Commit `{env['git_commit'][:12]}`, {env['date']}, {env['machine']['host']} "
             f"({env['machine']['cpu_count']} CPUs), max_tokens {result['args']['max_tokens']}, greedy, "
             f"draft length {result['draft_len']} (speculative mode, one drafter per row)", "",
             "Mean accepted length (1 + accepted/rounds) per drafter and domain; **bold** = best drafter "
             "of the domain; tok/s in parentheses.", "",
             "| drafter | kind | " + " | ".join(domains) + " |", "|---|---|" + "---|" * len(domains)]
    for row, ds in table.items():
        cells = []
        for d in domains:
            c = ds.get(d)
            if c is None:
                cells.append("-")
                continue
            v = f"{c['mean_accepted_length']:.2f}"
            if s["best"].get(d, {}).get("drafter") == row:
                v = f"**{v}**"
            cells.append(f"{v} ({c['tokens_per_s']:.1f})")
        lines.append(f"| {row} | {result['kinds'].get(row, '-')} | " + " | ".join(cells) + " |")
    g = s.get("general")
    if g:
        lines += ["", f"General neural drafter: `{g}`. Best drafter per domain:", ""]
        for d, b in s["best"].items():
            gv = "-" if b["general"] is None else f"{b['general']:.2f}"
            verdict = "yes" if b["beats_general"] else "no"
            lines.append(f"- {d}: `{b['drafter']}` {b['mean_accepted_length']:.2f} vs general {gv}: "
                         f"better than the general drafter: {verdict}")
    ident = s["identity"]
    lines += ["", f"Greedy identity check: {ident['checked']} outputs compared with autoregressive, "
                  f"{len(ident['mismatches'])} mismatches."]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    s = result["summary"]
    rows = [r for r in s["table"] if r != "autoregressive"]
    domains = s["domains"]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(domains)), 4))
    w = 0.8 / max(1, len(rows))
    for i, row in enumerate(rows):
        ax.bar([j + i * w for j in range(len(domains))],
               [s["table"][row].get(d, {}).get("mean_accepted_length", 0) for d in domains], w, label=row)
    ax.set_xticks([j + 0.4 - w / 2 for j in range(len(domains))], domains)
    ax.set_ylabel("mean accepted length (1 + accepted/rounds)")
    ax.set_title("accepted length by drafter and domain (greedy)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="cosine-bench drafters", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=Path("config.toml"))
    ap.add_argument("--prompts", type=Path, default=None, help="prompts JSON from `cosine datasets build`")
    ap.add_argument("--domains", default="code,docs,prose,german")
    ap.add_argument("--per-domain", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--general", default=None,
                    help="the general neural drafter's worker name (default: the first neural drafter)")
    ap.add_argument("--no-cosine", action="store_true", help="skip the routed cosine row")
    ap.add_argument("--timeout", type=float, default=1800.0)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    cfg = cfgmod.load_for_cli(args.config, "cosine-bench drafters")
    if cfg is None:
        return 2
    setup(cfg.logging.level, cfg.logging.file, "bench")
    items = promptsets.load(args.domains.split(","), args.prompts, args.per_domain)
    drafter_workers = [w for w in cfg.workers if cfg.model(w.model).role == "drafter"]
    if not drafter_workers:
        ap.error(f"{args.config} has no drafter workers")
    kinds = {w.name: cfg.model(w.model).kind + (f" ({cfg.model(w.model).quantize})"
                                               if cfg.model(w.model).quantize else "") for w in drafter_workers}
    general = args.general or next((w.name for w in drafter_workers if cfg.model(w.model).kind == "neural"), None)
    args.out.mkdir(parents=True, exist_ok=True)
    env = environment(cfg, ["drafters", *argv])

    from cosine.control.cluster import LocalCluster
    from cosine.security import CurveKeys

    with LocalCluster(args.config) as cluster:
        records = measure(cluster.endpoint, items, [w.name for w in drafter_workers], args.max_tokens,
                          args.timeout, with_cosine=not args.no_cosine,
                          curve=CurveKeys.from_config(cfg.security))
    result = {"environment": env, "args": {k: str(v) for k, v in vars(args).items()}, "kinds": kinds,
              "draft_len": cfg.controller.speculation.draft_len, "summary": summarize(records, general),
              "records": records}
    (args.out / "drafters.json").write_text(json.dumps(result, indent=1))
    (args.out / "drafters.md").write_text(f"# cosine-bench drafters\n\n{markdown(result)}")
    plot(result, args.out / "drafters.png")
    print((args.out / "drafters.md").read_text())
    bad = result["summary"]["identity"]["mismatches"]
    if bad:
        log.error("greedy identity broken for %s", bad)
        return 1
    return 0
