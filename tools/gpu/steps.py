"""The measurement steps of `measure.sh run`, each sized and timed to fit the budget
(plan.py), each recorded as ok / failed / timed out / skipped with the reason, the results
published under $OUT after every step so a cut-off run still returns what it measured."""

from __future__ import annotations

import json
import shutil
import tarfile
import time
from pathlib import Path
from typing import Callable

import goals
import pipeline
import plan
from hostenv import REPO, TIMED_OUT, Host, log, run_logged, tail

RESERVE_S = 15.0          # kept for the summary and the copy to $OUT
DOMAINS = "code,docs,prose,german"
ALL_MODES = "autoregressive,speculative,specinfer,cosine"
OUT_FILES = ("summary.json", "summary.md", "worker.json", "bench-c1.json", "bench-c16.json", "measure.log",
             "results.tar.gz")  # the device returns at most 8 files


class Runner:
    def __init__(self, host: Host, budget_s: float, out: Path | None) -> None:
        self.host, self.out = host, out
        self.t_end = time.monotonic() + budget_s
        self.profile = plan.REHEARSAL if host.rehearse else plan.GPU
        self.speeds = self.profile.guess
        self.tokens = self.profile.tokens[0]
        self.records: list[dict] = []

    def remaining(self) -> float:
        return self.t_end - time.monotonic() - RESERVE_S

    # ---- bookkeeping
    def record(self, name: str, status: str, seconds: float, detail: str = "") -> None:
        self.records.append({"name": name, "status": status, "seconds": round(seconds, 1), "detail": detail})
        log(f"step {name}: {status} ({seconds:.0f} s){' - ' + detail if detail else ''}")
        self.host.runs.mkdir(parents=True, exist_ok=True)
        (self.host.runs / "steps.json").write_text(json.dumps(self.records, indent=1))
        self.publish()

    def publish(self) -> None:
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
    def step(self, name: str, needs: tuple[str, ...], cmd: Callable[[float], list[str]] | None,
             skip: str = "") -> bool:
        """Run ``cmd(timeout)`` unless a job it needs failed, the budget is short, or ``skip`` says why not."""
        blocked = [f"{j} {self.host.status_of(j)['status']}" for j in needs if self.host.status_of(j)["status"] != "ok"]
        est = plan.estimate(name, self.tokens, self.profile, self.speeds)
        why = skip or (f"needs {', '.join(blocked)}" if blocked else "") or \
            (f"budget: {max(0.0, self.remaining()):.0f} s left, the step takes ~{est / plan.SAFETY:.0f} s"
             if self.remaining() < est / plan.SAFETY else "")
        if why:
            self.record(name, "skipped", 0.0, why)
            return False
        limit = plan.timeout(name, self.tokens, self.remaining(), self.profile, self.speeds)
        log(f"step {name}: up to {limit:.0f} s (estimate {est:.0f} s, {self.remaining():.0f} s left)")
        logfile = self.host.logs / f"{name}.log"
        try:
            argv = cmd(limit)
        except Exception as e:  # recorded; the later steps still run
            self.record(name, "failed", 0.0, f"could not set the step up: {e}")
            return False
        rc, secs = run_logged(argv, logfile, self.host.env(), timeout_s=limit)
        if rc == 0:
            self.record(name, "ok", secs)
        elif rc == TIMED_OUT:
            self.record(name, "timed out", secs, f"stopped at its limit of {limit:.0f} s; log {logfile.name}")
        else:
            self.record(name, "failed", secs, f"exit {rc}: " + tail(logfile, 4).replace("\n", " | "))
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
    def wait_prepare(self) -> None:
        t0 = time.monotonic()
        pipeline.start(self.host, Path(__file__).parent / "measure.py")
        keep = plan.estimate("worker", self.tokens, self.profile, self.speeds)
        while not pipeline.finished(self.host) and self.remaining() > keep:
            if not pipeline.running(self.host):  # it died, or has not taken its lock yet
                time.sleep(1.0)
                if not pipeline.running(self.host) and not pipeline.finished(self.host):
                    pipeline.start(self.host, Path(__file__).parent / "measure.py")
            time.sleep(pipeline.POLL_S)
        status = "ok" if pipeline.finished(self.host) else "timed out"
        self.record("prepare (wait)", status, time.monotonic() - t0, pipeline.progress(self.host))

    def run(self) -> int:
        self.wait_prepare()
        self.step("worker", ("target",), self.worker_cmd)
        try:
            worker = json.loads((self.host.runs / "worker.json").read_text())
        except (OSError, ValueError):
            worker = None
        self.speeds = plan.measured(self.profile, worker)
        todo = plan.BENCH_STEPS if not self.host.rehearse else plan.BENCH_STEPS[:-1]
        self.tokens = plan.choose_tokens(self.remaining(), todo, self.profile, self.speeds)
        log(f"benchmark runs: {4 * self.profile.per_domain} prompts, {self.tokens} new tokens each "
            f"(decode {self.speeds.decode_b1_ms:.2f} ms at batch 1, {self.remaining():.0f} s left)")
        need = ("target", "drafter", "ngram", "data")
        self.step("bench-c1", need, self.bench_cmd("bench-c1", ALL_MODES, "1", True))
        self.step("bench-c16", need, self.bench_cmd("bench-c16", ALL_MODES, "16", False))
        for k in (2, 3):
            self.step(f"routing-{k}", need, self.bench_cmd(f"routing-{k}", "cosine", "1,16", False,
                                                           "--max-drafters", str(k)))
        self.step("cuda-graph", need, self.bench_cmd("cuda-graph", "autoregressive,cosine", "1,16", False,
                                                     "--cuda-graph"),
                  skip="CUDA-only: [workers] cuda_graph needs provider cuda; the rehearsal runs on cpu"
                  if self.host.rehearse else "")
        bad = [r["name"] for r in self.records if r["status"] not in ("ok",)
               and not r["detail"].startswith("CUDA-only")]
        log(f"done: {len(self.records) - len(bad)} of {len(self.records)} steps ok"
            + (f"; not ok: {', '.join(bad)}" if bad else ""))
        return 1 if bad else 0
