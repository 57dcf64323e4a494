"""The measurement steps of `measure.sh run`, each sized and timed to fit the budget
(plan.py), each recorded as ok / failed / timed out / skipped with the reason, the results
published under $OUT after every step so a cut-off run still returns what it measured."""

from __future__ import annotations

import json
import shutil
import subprocess
import tarfile
import time
from pathlib import Path
from typing import Callable

import goals
import pipeline
import plan
from hostenv import REPO, TIMED_OUT, Host, log, reap, run_logged, tail

RESERVE_S = 15.0          # kept for the summary and the copy to $OUT
DOMAINS = "code,docs,prose,german"
ALL_MODES = "autoregressive,speculative,specinfer,cosine"
STEPS = ("worker", "bench-c1", "bench-c16", "routing-2", "routing-3", "cuda-graph")


def _nvidia_smi() -> str:
    try:
        p = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=30)
        return p.stdout.strip() or p.stderr.strip() or "nvidia-smi printed nothing"
    except (OSError, subprocess.SubprocessError) as e:
        return f"unknown (nvidia-smi: {e})"


class Runner:
    def __init__(self, host: Host, budget_s: float, out: Path | None, only: tuple[str, ...] = STEPS) -> None:
        self.host, self.out, self.only = host, out, set(only)
        self.t_end = time.monotonic() + budget_s
        self.profile = plan.REHEARSAL if host.rehearse else plan.GPU
        self.speeds = self.profile.guess
        self.tokens = self.profile.tokens[0]
        self.records = self._earlier()

    def _earlier(self) -> list[dict]:
        """A rerun's steps start afresh; the results of the steps it does not rerun stay."""
        try:
            earlier = json.loads((self.host.runs / "steps.json").read_text())
        except (OSError, ValueError):
            earlier = []
        for name in self.only:
            shutil.rmtree(self.host.runs / name, ignore_errors=True)
            (self.host.logs / f"{name}.log").unlink(missing_ok=True)
        if "worker" in self.only:
            for f in ("worker.json", "worker.md"):
                (self.host.runs / f).unlink(missing_ok=True)
        return [r for r in earlier if r["name"] in STEPS and r["name"] not in self.only]

    def remaining(self) -> float:
        return self.t_end - time.monotonic() - RESERVE_S

    # ---- bookkeeping
    def record(self, name: str, status: str, seconds: float, detail: str = "") -> None:
        self.records.append({"name": name, "status": status, "seconds": round(seconds, 1), "detail": detail})
        self.records.sort(key=lambda r: STEPS.index(r["name"]))
        log(f"step {name}: {status} ({seconds:.0f} s){' - ' + detail if detail else ''}")
        self.host.runs.mkdir(parents=True, exist_ok=True)
        (self.host.runs / "steps.json").write_text(json.dumps(self.records, indent=1))
        self.publish()

    def publish(self) -> None:
        """The summary, and into $OUT seven files (the device returns at most eight)."""
        runs = self.host.runs
        pipeline.write_record(self.host)
        goals.summarize(runs, self.host.rehearse)
        if self.out is None:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        copies = {"summary.json": runs / "summary.json", "summary.md": runs / "summary.md",
                  "worker.json": runs / "worker.json", "bench-c1.json": runs / "bench-c1" / "results.json",
                  "bench-c16.json": runs / "bench-c16" / "results.json", "measure.log": runs / "measure.log"}
        for name, src in copies.items():
            if src.is_file():
                shutil.copyfile(src, self.out / name)
        tmp = self.out / "results.tar.gz.tmp"
        with tarfile.open(tmp, "w:gz") as tar:
            tar.add(runs, arcname="runs")
        tmp.replace(self.out / "results.tar.gz")

    # ---- one step
    def await_jobs(self, jobs: tuple[str, ...], est: float) -> float:
        """Wait while the preparation still works on ``jobs`` and the step would still fit."""
        t0 = time.monotonic()
        final = ("ok", "failed")
        while any(self.host.status_of(j)["status"] not in final for j in jobs) and self.remaining() > est / plan.SAFETY:
            if not pipeline.running(self.host):  # died, or not yet holding its lock: look again, then restart it
                time.sleep(1.0)
                if not pipeline.running(self.host) and not pipeline.finished(self.host):
                    pipeline.start(self.host, Path(__file__).parent / "measure.py")
            time.sleep(pipeline.POLL_S)
        return time.monotonic() - t0

    def step(self, name: str, needs: tuple[str, ...], cmd: Callable[[float], list[str]] | None,
             skip: str = "", soft: tuple[str, ...] = ()) -> bool:
        """Run ``cmd(timeout)`` once the jobs it needs are done, unless one failed, the budget
        is short, or ``skip`` says why not. ``soft`` jobs are waited for but not required."""
        if name not in self.only:
            return False
        est = plan.estimate(name, self.tokens, self.profile, self.speeds)
        waited = 0.0 if skip else self.await_jobs(needs + soft, est)
        wait_note = f"waited {waited:.0f} s for {', '.join(needs + soft)}; " if waited >= 1 else ""
        blocked = [f"{j} {self.host.status_of(j)['status']}" for j in needs if self.host.status_of(j)["status"] != "ok"]
        why = skip or (f"{wait_note}needs {', '.join(blocked)}" if blocked else "") or \
            (f"budget: {max(0.0, self.remaining()):.0f} s left, the step takes ~{est / plan.SAFETY:.0f} s"
             if self.remaining() < est / plan.SAFETY else "")
        if why:
            self.record(name, "skipped", waited, why)
            return False
        limit = plan.timeout(name, self.tokens, self.remaining(), self.profile, self.speeds)
        log(f"step {name}: up to {limit:.0f} s (estimate {est:.0f} s, {self.remaining():.0f} s left)")
        logfile = self.host.logs / f"{name}.log"
        try:
            argv = cmd(limit)
        except Exception as e:  # recorded; the later steps still run
            self.record(name, "failed", waited, f"{wait_note}could not set the step up: {e}")
            return False
        rc, secs = run_logged(argv, logfile, self.host.env(), timeout_s=limit)
        if rc == 0:
            self.record(name, "ok", secs, wait_note.rstrip("; "))
        elif rc == TIMED_OUT:
            left = reap(str(self.host.runs / name / "config.toml"))  # its cluster, if it outlived it
            self.record(name, "timed out", secs, f"{wait_note}stopped at its limit of {limit:.0f} s"
                        + (f", {len(left)} leftover process(es) stopped" if left else "") + f"; log {logfile.name}")
        else:
            self.record(name, "failed", secs, f"{wait_note}exit {rc}: " + tail(logfile, 4).replace("\n", " | "))
        return rc == 0

    # ---- the commands
    def worker_cmd(self, _limit: float) -> list[str]:
        p, h = self.profile, self.host
        return [h.python, "-m", "cosine.bench", "worker", "--engine", str(h.engines / "target"),
                "--provider", h.provider, "--device", h.device, "--iters", str(p.worker_iters),
                "--prefix", str(p.worker_prefix), "--batches", "1,4,16", "--tree-sizes", "1,2,4,8,16,32,64",
                "--prefill-lengths", str(p.worker_prefill), "--floor-ms", str(goals.FLOOR_MS),
                "--json", str(h.runs / "worker.json"), "--md", str(h.runs / "worker.md"), "--quiet"]

    def config(self, name: str, *variant: str) -> Path:
        h, out = self.host, self.host.runs / name / "config.toml"
        src = {r: (h.peers / r if h.status_of(f"peers-{r}")["status"] == "ok" else pipeline.model_path(h, r))
               for r in ("target", "drafter")}
        rc, _ = run_logged([h.python, str(Path(__file__).parent / "gpuconfig.py"), "--shipped",
                            str(REPO / "config.toml"), "--out", str(out), "--engines", str(h.engines), "--data",
                            str(h.unpacked / "data"), "--provider", h.provider, "--device", h.device,
                            "--target-source", str(src["target"]), "--drafter-source", str(src["drafter"]), *variant],
                           h.logs / f"{name}.log", h.env(), timeout_s=60)
        if rc:
            raise RuntimeError(f"gpuconfig failed: {tail(h.logs / f'{name}.log', 3)}")
        return out

    def bench_cmd(self, name: str, modes: str, levels: str, peers: bool, *variant: str) -> Callable[[float], list[str]]:
        def cmd(limit: float) -> list[str]:
            h, p = self.host, self.profile
            c = [h.python, "-m", "cosine.bench", "run", "--config", str(self.config(name, *variant)),
                 "--modes", modes, "--concurrency", levels, "--interleave", "--domains", DOMAINS,
                 "--prompts", str(h.unpacked / "data" / "prompts.json"), "--per-domain", str(p.per_domain),
                 "--max-tokens", str(self.tokens), "--timeout", f"{limit:.0f}", "--out", str(h.runs / name)]
            if not peers:
                return c + ["--peers", "none"]
            return c + ["--peers", "hf,hf-assisted", "--peer-device", h.device, "--peer-dtype", h.peer_dtype,
                        "--peer-per-domain", str(p.peer_per_domain)]
        return cmd

    # ---- the whole run
    def plan_benchmarks(self) -> tuple[str, ...]:
        """Speeds from the worker step, the new-token budget, and the time plan, printed."""
        try:
            worker = json.loads((self.host.runs / "worker.json").read_text())
        except (OSError, ValueError):
            worker = None
        self.speeds = plan.measured(self.profile, worker)
        todo = tuple(x for x in plan.BENCH_STEPS if x in self.only and not (self.host.rehearse and x == "cuda-graph"))
        self.tokens = plan.choose_tokens(self.remaining(), todo, self.profile, self.speeds)
        est = {s: plan.estimate(s, self.tokens, self.profile, self.speeds) for s in todo}
        log(f"plan: {4 * self.profile.per_domain} prompts x {self.tokens} new tokens per run (batch-1 decode "
            f"{self.speeds.decode_b1_ms:.2f} ms, cluster start ~{self.speeds.cluster_start_s:.0f} s); "
            + ", ".join(f"{k} ~{v:.0f} s" for k, v in est.items())
            + f"; {sum(est.values()):.0f} s of the {self.remaining():.0f} s left")
        return todo

    def run(self) -> int:
        pipeline.start(self.host, Path(__file__).parent / "measure.py")
        gpu = "none (rehearsal on CPU)" if self.host.rehearse else _nvidia_smi()
        (self.host.runs / "gpu.txt").write_text(gpu + "\n")
        log(f"GPU: {gpu}")
        self.step("worker", ("install", "target"), self.worker_cmd)
        self.plan_benchmarks()
        need, soft = ("install", "target", "drafter", "ngram", "data"), ("peers-target", "peers-drafter")
        self.step("bench-c1", need, self.bench_cmd("bench-c1", ALL_MODES, "1", True), soft=soft)
        self.step("bench-c16", need, self.bench_cmd("bench-c16", ALL_MODES, "16", False))
        for k in (2, 3):
            self.step(f"routing-{k}", need, self.bench_cmd(f"routing-{k}", "cosine", "1,16", False,
                                                           "--max-drafters", str(k)))
        self.step("cuda-graph", need, self.bench_cmd("cuda-graph", "autoregressive,cosine", "1,16", False,
                                                     "--cuda-graph"),
                  skip="CUDA-only: [workers] cuda_graph needs provider cuda; the rehearsal runs on cpu"
                  if self.host.rehearse else "")
        ok = [r["name"] for r in self.records if r["status"] == "ok"]
        na = [r["name"] for r in self.records if r["detail"].startswith("CUDA-only")]
        bad = [r["name"] for r in self.records if r["name"] not in ok + na]
        log(f"done: {len(ok)} steps ok" + (f", {len(na)} not applicable here ({', '.join(na)})" if na else "")
            + (f", NOT OK: {', '.join(bad)}" if bad else ""))
        self.publish()
        return 1 if bad else 0
