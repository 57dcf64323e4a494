"""Tables and plots from results.json; `cosine-bench report` regenerates
docs/benchmarks/README.md from every dated results directory (never typed by hand)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def table(result: dict) -> str:
    env, summ = result["environment"], result["summary"]
    lines = [
        f"Command: `{env['command']}`  ",
        f"Commit `{env['git_commit'][:12]}`, {env['date']}, {env['machine']['host']} "
        f"({env['machine']['cpu_count']} CPUs), onnxruntime {env['onnxruntime']}, "
        f"workers: {', '.join(w['name'] + '=' + w['model'] + '@' + w['provider'] for w in env['workers'])}",
        "",
        "| mode@concurrency | requests | tokens | tok/s | tok/s per request | ms/token p50 | ms/token p95 | TTFT ms p50 | mean accepted length | verifier idle | drafter idle |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, s in summ.items():
        d = s.get("server_stats_delta", {})
        f = lambda v, fmt="{:.2f}": fmt.format(v) if isinstance(v, (int, float)) else "-"  # noqa: E731
        lines.append(f"| {key} | {s['requests']} | {s['tokens']} | {f(s['tokens_per_s'])} | "
                     f"{f(s['tokens_per_s_per_request'])} | {f(s['latency_per_token_ms_p50'], '{:.1f}')} | "
                     f"{f(s['latency_per_token_ms_p95'], '{:.1f}')} | {f(s.get('ttft_ms_p50'), '{:.0f}')} | "
                     f"{f(s.get('mean_accepted_length'))} | {f(d.get('verifier_idle_frac'))} | "
                     f"{f(d.get('drafter_idle_frac'))} |")
    if result.get("ratios"):
        lines += ["", "| ratio (same run) | value |", "|---|---|"]
        lines += [f"| {k} | {v:.2f}x |" for k, v in result["ratios"].items()]
    if result.get("paired_ratios") and result.get("records") and \
            any("ci95" not in v for v in result["paired_ratios"].values()):
        from cosine.bench.run import paired_ratios  # a run from before the intervals: recompute
        result = {**result, "paired_ratios": paired_ratios(result["records"])}
    if result.get("paired_ratios"):
        lines += ["", "Paired (cosine's tokens/s over the baseline's on the same prompts and pass: per prompt at "
                      "concurrency 1, per wave of prompts sent at once above it):",
                  ""] + paired_rows(result["paired_ratios"])
    per = {k: v["mean_accepted_length_by_drafter"] for k, v in summ.items() if v.get("mean_accepted_length_by_drafter")}
    if per:
        lines += ["", "Mean accepted length of the requests each drafter drafted for (a routed request "
                      "counts for every drafter it used; `cosine-bench drafters` measures each alone):", "",
                  "| mode@concurrency | " + " | ".join(f"{d}" for d in sorted({d for v in per.values() for d in v}))
                  + " |"]
        names = sorted({d for v in per.values() for d in v})
        lines.append("|---|" + "---|" * len(names))
        lines += [f"| {k} | " + " | ".join(f"{v[d]:.2f}" if d in v else "-" for d in names) + " |"
                  for k, v in per.items()]
    ident = result.get("identity", {})
    lines += ["", ident["note"] if ident.get("note") else
              f"Greedy identity check: {ident.get('checked', 0)} outputs compared with autoregressive, "
              f"{len(ident.get('mismatches', []))} mismatches."]
    for name, p in (ident.get("peers_against_autoregressive") or {}).items():
        lines.append(f"{name} (another engine on the same weights): {p['identical']} of {p['requests']} outputs "
                     f"identical to cosine's autoregressive; mean common prefix {p['mean_common_prefix']:.1f} tokens.")
    for name, p in (ident.get("peers_against_llamacpp") or {}).items():
        lines.append(f"{name} against llama.cpp's own greedy decoding: {p['identical']} of {p['requests']} outputs "
                     f"identical; mean common prefix {p['mean_common_prefix']:.1f} tokens.")
    if result.get("peak_rss_bytes"):
        lines += ["", "| process | peak RSS MiB |", "|---|---|"]
        lines += [f"| {k} | {v / 2**20:.0f} |" for k, v in result["peak_rss_bytes"].items()]
    return "\n".join(lines) + "\n"


def paired_rows(paired: dict[str, dict]) -> list[str]:
    """Markdown table of paired ratios (``summarize_pairs`` per key)."""
    return ["| ratio | geometric mean | 95% interval (bootstrap) | min | max | cosine faster |",
            "|---|---|---|---|---|---|"] + [
        f"| {k} | {v['geomean']:.2f}x | {_interval(v.get('ci95'))} | {v['min']:.2f}x | {v['max']:.2f}x | "
        f"{v['cosine_faster']} of {v['pairs']} |" for k, v in paired.items()]


def _interval(ci: list[float] | None) -> str:
    return f"{ci[0]:.2f}-{ci[1]:.2f}x" if ci else "-"


def write_markdown(result: dict, path: Path) -> None:
    path.write_text(f"# cosine-bench results\n\n{table(result)}")


def write_plots(result: dict, out: Path) -> list[Path]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    paths = []
    summ = result["summary"]
    fig, ax = plt.subplots(figsize=(6, 4))
    modes = sorted({k.split("@")[0] for k in summ})
    for m in modes:
        pts = sorted((int(k.split("@")[1]), s["tokens_per_s"]) for k, s in summ.items()
                     if k.split("@")[0] == m and k.split("@")[1].isdigit())
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrency (closed loop)")
    ax.set_ylabel("tokens/s")
    ax.legend()
    ax.set_title("throughput by mode")
    fig.tight_layout()
    paths.append(out / "throughput.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    acc = {k: s["mean_accepted_length_by_domain"] for k, s in summ.items()
           if s.get("mean_accepted_length_by_domain") and k.endswith("@1")}
    if acc:
        fig, ax = plt.subplots(figsize=(7, 4))
        domains = sorted({d for v in acc.values() for d in v})
        w = 0.8 / len(acc)
        for i, (k, v) in enumerate(sorted(acc.items())):
            ax.bar([j + i * w for j in range(len(domains))], [v.get(d, 0) for d in domains], w, label=k)
        ax.set_xticks([j + 0.4 - w / 2 for j in range(len(domains))], domains)
        ax.set_ylabel("mean accepted length (1 + accepted/rounds)")
        ax.legend()
        fig.tight_layout()
        paths.append(out / "accepted_length.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    for key, rounds in (result.get("timelines") or {}).items():
        if key.startswith("cosine@") and rounds:
            paths.append(plot_timeline(rounds, key, out / f"timeline_{key.replace('@', '_')}.png", plt))
    return paths


def plot_timeline(rounds: list, key: str, path: Path, plt, n: int = 30) -> Path:
    """Gantt chart of n consecutive rounds from the middle of a level: verification on
    one lane, drafting (sequential and pipelined) on the other; overlap = pipelining."""
    mid = max(0, len(rounds) // 2 - n // 2)
    rs = rounds[mid:mid + n]
    t0 = rs[0][0]
    fig, ax = plt.subplots(figsize=(10, 2.6))
    for sd0, sd1, v0, v1, d0, d1, *_ in rs:
        ax.broken_barh([(v0 - t0, v1 - v0)], (1.6, 0.8), color="tab:blue")
        ax.broken_barh([(sd0 - t0, sd1 - sd0), (d0 - t0, d1 - d0)], (0.6, 0.8), color="tab:orange")
    ax.set_yticks([1.0, 2.0], ["draft", "verify"])
    ax.set_xlabel("seconds")
    ax.set_title(f"{key}: {len(rs)} rounds (drafting overlapping verification = pipelining)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="cosine-bench report")
    ap.add_argument("root", type=Path, nargs="?", default=Path("docs/benchmarks"))
    a = ap.parse_args(argv)
    def started(path: Path) -> str:  # the run's own start time; the directory name as a fallback
        try:
            r = json.loads(path.read_text())
            return r["environment"]["date"] if "environment" in r else r["date"]
        except (KeyError, ValueError, OSError):
            return path.parent.name

    runs = sorted(a.root.rglob("results.json"), key=started, reverse=True)
    parts = ["# Benchmarks\n", "Generated by `cosine-bench report` from the results.json files below; "
             "newest first. Each run's directory also has its plots and raw per-request records.\n"]
    for p in runs:
        name, result = p.parent.relative_to(a.root).as_posix(), json.loads(p.read_text())
        if "environment" in result and "summary" in result:
            parts.append(f"\n## {name}\n\n{table(result)}")
        else:  # another benchmark's results (the HTTP gateway's): its own markdown says it
            parts.append(f"\n## {name}\n\nSee [{name}/results.md]({name}/results.md).\n")
    (a.root / "README.md").write_text("\n".join(parts))
    print(f"wrote {a.root / 'README.md'} from {len(runs)} runs")
    return 0


def pool(results: list[dict]) -> dict[str, dict]:
    """Paired ratios of several runs of the same code pooled: each ratio is still taken
    within its own run (same prompt, same pass, same minute of machine speed); pooling only
    adds pairs, which narrows the interval of the geometric mean."""
    from cosine.bench.run import paired_values, summarize_pairs
    values: dict[str, list[float]] = {}
    for res in results:
        for k, rs in paired_values(res.get("records") or []).items():
            values.setdefault(k, []).extend(rs)
    return {k: summarize_pairs(rs) for k, rs in values.items()}


def pool_main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="cosine-bench pool",
                                 description="Pool the paired ratios of several runs of the same code.")
    ap.add_argument("runs", type=Path, nargs="+", help="run directories (each with results.json)")
    ap.add_argument("--md", type=Path, help="also write the table to this Markdown file")
    a = ap.parse_args(argv)
    results, commits = [], []
    for d in a.runs:
        p = d / "results.json"
        if not p.is_file():
            ap.error(f"{p}: no results.json (is {d} a cosine-bench run directory?)")
        res = json.loads(p.read_text())
        if not res.get("records"):
            ap.error(f"{p}: the run kept no per-request records; nothing to pair")
        results.append(res)
        commits.append(f"`{d.name}` (commit `{res['environment']['git_commit'][:12]}`)")
    pooled = pool(results)
    if not pooled:
        ap.error("no paired ratios: the runs need cosine and a baseline mode on the same prompts")
    lines = [f"Pooled paired ratios of {len(results)} runs: {', '.join(commits)}.", "",
             "Command: `cosine-bench pool " + " ".join(str(d) for d in a.runs) + "`", ""] + paired_rows(pooled)
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if a.md:
        a.md.write_text(text)
    return 0
