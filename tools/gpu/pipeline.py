"""The preparation that runs on the host while the parts still arrive (docs/gpu.md).

`measure.sh put` starts it in the background (its own session, so it outlives the call);
`measure.sh run` starts it if nothing did, and waits for it. Each job waits for its inputs
(a group's parts, another job), then records ok or failed with the reason in state/:

  install        wheels staged: pip install them into site/, check the runtime (onnxruntime
                 from site/, a MatMul on its CUDA provider)
  data           the corpora and prompts, unpacked
  target         target staged and installed: cosine-export fp16, parity on the GPU provider
  drafter        likewise for the 0.5B drafter; then which provider each node of its graph
                 (the target's op types) is placed on (placement.py), a diagnostic
  ngram          data and target done: the n-gram drafters, counted with the target's tokenizer
  peers-target   target staged: its Hugging Face model saved as fp16 safetensors (peer_models.py)
  peers-drafter  likewise for the drafter
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import tarfile
import threading
import time
import tomllib
from pathlib import Path
from typing import Callable

import bundle
from hostenv import REPO, Host, log, run_logged, tail

JOBS = ("install", "data", "target", "drafter", "ngram", "peers-target", "peers-drafter")
HERE = Path(__file__).resolve().parent
POLL_S = 0.5


class JobFailed(Exception):
    pass


def model_path(host: Host, role: str) -> Path:
    """The staged model of a role: its GGUF file, or the Hugging Face folder (rehearsal)."""
    d = host.unpacked / role
    ggufs = sorted(d.glob("*.gguf"))
    return ggufs[0] if ggufs else d


def shipped_names(config: Path = REPO / "config.toml") -> dict[str, list[str]]:
    cfg = tomllib.loads(config.read_text())
    ms = cfg["models"]
    return {"target": [m["name"] for m in ms if m["role"] == "target"],
            "drafter": [m["name"] for m in ms if m["role"] == "drafter" and m.get("kind", "neural") == "neural"][:1],
            "ngram": [f"{m['name']}={Path(m['source']).name}" for m in ms if m.get("kind") == "ngram"]}


class Prepare:
    def __init__(self, host: Host, deadline_s: float) -> None:
        self.host, self.deadline = host, time.monotonic() + deadline_s
        self.names = shipped_names()
        self._extract_lock = threading.Lock()
        self._extracted: set[str] = set()

    # ---- waiting
    def _until(self, ready: Callable[[], bool], what: str) -> None:
        while not ready():
            if time.monotonic() > self.deadline:
                raise JobFailed(f"gave up waiting for {what}")
            time.sleep(POLL_S)

    def group(self, g: str) -> None:
        """Wait for a group's parts, then unpack it (once, whichever job asks first)."""
        self._until(lambda: bundle.complete(self.host.stage, g), f"the parts of {g}")
        with self._extract_lock:
            if g not in self._extracted:
                bundle.extract(self.host.stage, g, self.host.unpacked)
                self._extracted.add(g)

    def job(self, name: str) -> None:
        self._until(lambda: self.host.status_of(name)["status"] in ("ok", "failed"), f"job {name}")
        st = self.host.status_of(name)
        if st["status"] != "ok":
            raise JobFailed(f"needs {name}, which failed: {st['detail']}")

    def sh(self, name: str, cmd: list[str]) -> None:
        rc, _ = run_logged(cmd, self.host.logs / f"{name}.log", self.host.env(),
                           timeout_s=max(1.0, self.deadline - time.monotonic()))
        if rc:
            raise JobFailed(f"exit {rc}: {tail(self.host.logs / f'{name}.log', 3)}")

    # ---- the jobs
    def install(self) -> None:
        self.group("wheels")
        wheels = sorted(str(p) for p in (self.host.unpacked / "wheels").glob("*.whl"))
        self.sh("install", [self.host.python, "-m", "pip", "install", "--disable-pip-version-check", "-q",
                            "--no-index", "--no-deps", "--no-compile", "--upgrade", "--target", str(self.host.site),
                            *wheels])
        self.host.link_source()
        self.sh("install", [self.host.python, str(HERE / "runtime_check.py"), "--site", str(self.host.site)]
                + (["--rehearse"] if self.host.rehearse else []))

    def data(self) -> None:
        self.group("data")
        with tarfile.open(self.host.unpacked / "data" / "data.tar.xz") as tar:
            tar.extractall(self.host.unpacked / "data", filter="data")

    def model(self, role: str) -> None:
        self.group(role)
        self.job("install")
        self.sh(f"export-{role}", [self.host.python, "-m", "cosine.export", "--model", str(model_path(self.host, role)),
                                   "--out", str(self.host.engines / role), "--name", self.names[role][0],
                                   "--dtype", "float16", "--provider", self.host.provider])  # logs its phases
        if role == "drafter":  # same op types as the target's graph, and off the critical path: a diagnostic
            run_logged([self.host.python, str(HERE / "placement.py"), "--engine", str(self.host.engines / role),
                        "--provider", self.host.provider, "--json", str(self.host.runs / "placement.json")],
                       self.host.logs / "placement.log", self.host.env(), timeout_s=300)

    def peers(self, role: str) -> None:
        self.group(role)
        self.job("install")
        self.sh(f"peers-{role}", [self.host.python, str(HERE / "peer_models.py"), "--model",
                                  str(model_path(self.host, role)), "--out", str(self.host.peers / role),
                                  "--dtype", self.host.peer_dtype])

    def ngram(self) -> None:
        self.job("data")
        self.job("target")
        errors: list[str] = []

        def one(spec: str) -> None:
            name, corpus = spec.split("=", 1)
            try:
                self.sh(name, [self.host.python, "-m", "cosine.export", "--kind", "ngram", "--corpus",
                                          str(self.host.unpacked / "data" / "train" / corpus), "--tokenizer",
                                          str(self.host.engines / "target"), "--out", str(self.host.engines / name)])
            except JobFailed as e:
                errors.append(f"{name}: {e}")

        threads = [threading.Thread(target=one, args=(s,)) for s in self.names["ngram"]]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise JobFailed("; ".join(errors))

    def run_job(self, name: str, fn: Callable[[], None]) -> None:
        if self.host.status_of(name)["status"] == "ok":
            return
        t0 = time.monotonic()
        self.host.mark(name, "running")
        try:
            fn()
        except Exception as e:  # recorded, never raised: the other jobs and the measurement go on
            self.host.mark(name, "failed", f"{type(e).__name__}: {e}" if not isinstance(e, JobFailed) else str(e),
                           time.monotonic() - t0)
            log(f"prepare: {name} FAILED after {time.monotonic() - t0:.0f} s: {e}")
            return
        self.host.mark(name, "ok", "", time.monotonic() - t0)
        log(f"prepare: {name} done in {time.monotonic() - t0:.0f} s")

    def run(self) -> None:
        fns = {"install": self.install, "data": self.data, "target": lambda: self.model("target"),
               "drafter": lambda: self.model("drafter"), "ngram": self.ngram,
               "peers-target": lambda: self.peers("target"), "peers-drafter": lambda: self.peers("drafter")}
        threads = [threading.Thread(target=self.run_job, args=(n, fns[n])) for n in JOBS]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        write_record(self.host)


def write_record(host: Host) -> list[dict]:
    recs = [host.status_of(n) for n in JOBS]
    host.runs.mkdir(parents=True, exist_ok=True)
    (host.runs / "prepare.json").write_text(json.dumps(recs, indent=1))
    return recs


def finished(host: Host) -> bool:
    return all(host.status_of(n)["status"] in ("ok", "failed") for n in JOBS)


def _lock(host: Host):
    host.state.mkdir(parents=True, exist_ok=True)
    f = open(host.state / "prepare.lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None
    return f


def running(host: Host) -> bool:
    f = _lock(host)
    if f is None:
        return True
    f.close()
    return False


def daemon(host: Host, deadline_s: float) -> int:
    """`measure.sh prepare`: run every job unless another prepare holds the lock."""
    f = _lock(host)
    if f is None:
        log("prepare is already running")
        return 0
    try:
        (host.state / "prepare.pid").write_text(str(os.getpid()))
        Prepare(host, deadline_s).run()
    finally:
        f.close()
    return 0


def start(host: Host, script: Path) -> None:
    """Start the background prepare in its own session (it outlives the device call)."""
    if finished(host) or running(host):
        return
    host.logs.mkdir(parents=True, exist_ok=True)
    with open(host.logs / "prepare.log", "ab") as out:
        subprocess.Popen([host.python, str(script), "prepare", *host.args()], stdout=out, stderr=subprocess.STDOUT,
                         stdin=subprocess.DEVNULL, start_new_session=True, cwd=REPO, env=dict(os.environ))
    log("started the background preparation (install, exports) as the parts arrive; logs in "
        f"{host.logs}/prepare.log")


def progress(host: Host) -> str:
    return ", ".join(f"{n} {host.status_of(n)['status']}" for n in JOBS)


if __name__ == "__main__":
    sys.exit("pipeline.py is run through tools/gpu/measure.sh")
