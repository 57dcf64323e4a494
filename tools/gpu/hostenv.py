"""Where the measurement keeps its files on the host, the environment its commands run in,
and how a command is run: logged, timed, and stopped at its deadline with its whole
process group (a benchmark's cluster with it)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TIMED_OUT = 124
LOG_FILE: list[Path] = []  # where log() also writes (measure.py sets it)


def log(msg: str) -> None:
    line = f"[measure {time.strftime('%H:%M:%S')}] {msg}"
    print(line, file=sys.stderr, flush=True)
    for f in LOG_FILE:
        with open(f, "a") as out:
            out.write(line + "\n")


class Host:
    """The host's folders, under ``work`` (they live as long as the host is held), and its settings."""

    def __init__(self, work: Path, carried: Path, rehearse: bool, python: str = sys.executable) -> None:
        self.work, self.carried, self.rehearse, self.python = work, carried, rehearse, python
        self.stage = work / "stage"        # the parts and bundle.json
        self.unpacked = work / "unpacked"  # the groups, as packed
        self.site = work / "site"          # the staged wheels, pip-installed
        self.src = work / "src"            # this working copy's code as the `cosine` package
        self.engines = work / "engines"
        self.peers = work / "peers"        # the Hugging Face peers' models (safetensors)
        self.runs = work / "runs"          # results; what goes back under $OUT is taken from here
        self.logs = self.runs / "logs"
        self.state = work / "state"        # prepare jobs' states
        # CPU rehearsal: tiny models, provider cpu, the CUDA-only steps skipped
        self.provider = "cpu" if rehearse else "cuda"
        self.device = "cpu" if rehearse else "cuda:0"
        self.peer_dtype = "float32" if rehearse else "float16"

    def args(self) -> list[str]:
        """The options that make another invocation see the same host."""
        return ["--work", str(self.work), "--carried", str(self.carried)] + (["--rehearse"] if self.rehearse else [])

    def link_source(self) -> None:
        """This working copy's code as the `cosine` package (pyproject's folder mapping)."""
        pkg = self.src / "cosine"
        pkg.mkdir(parents=True, exist_ok=True)
        want = {p.name: p for p in (REPO / "cosine").iterdir() if p.name != "__pycache__"}
        want.update({n: REPO / n for n in ("control", "workers", "export")})
        for name, target in want.items():
            link = pkg / name
            if link.is_symlink() and Path(os.readlink(link)) == target:
                continue
            # The background preparation and `run` both call this, at the same moment on a
            # fresh host: make each link under a name of our own and rename it into place,
            # which is atomic, so neither sees the other's half-made link (CI saw EEXIST).
            tmp = pkg / f".{name}.{os.getpid()}.tmp"
            tmp.unlink(missing_ok=True)
            tmp.symlink_to(target)
            os.replace(tmp, link)

    def env(self) -> dict[str, str]:
        """The staged packages first (onnxruntime-gpu shadows the host's CPU build), then the host's."""
        e = dict(os.environ)
        e["PYTHONPATH"] = os.pathsep.join([str(self.src), str(self.site)] + ([e["PYTHONPATH"]] if e.get("PYTHONPATH") else []))
        # `python -m` from the repo root must not import ./cosine, which lacks control/ workers/ export/
        e.update(PYTHONSAFEPATH="1", PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                 HF_DATASETS_OFFLINE="1", TQDM_DISABLE="1")  # logs, not bars
        return e

    # ---- job states: state/<name>.json {"status": ok|failed|running, "seconds", "detail"}
    def mark(self, name: str, status: str, detail: str = "", seconds: float | None = None) -> None:
        self.state.mkdir(parents=True, exist_ok=True)
        rec = {"name": name, "status": status, "detail": detail, "seconds": seconds, "at": time.time()}
        tmp = self.state / f"{name}.json.tmp"
        tmp.write_text(json.dumps(rec))
        os.replace(tmp, self.state / f"{name}.json")

    def status_of(self, name: str) -> dict:
        try:
            return json.loads((self.state / f"{name}.json").read_text())
        except (OSError, ValueError):
            return {"name": name, "status": "waiting", "detail": "", "seconds": None}


def run_logged(cmd: list[str], logfile: Path, env: dict[str, str], timeout_s: float | None = None,
               cwd: Path = REPO) -> tuple[int, float]:
    """Run ``cmd`` in its own process group, stdout and stderr to ``logfile``. Past
    ``timeout_s`` the group gets SIGTERM (a cluster stops its workers), SIGKILL 20 s later;
    the exit status is then TIMED_OUT. Returns (exit status, seconds)."""
    logfile.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with open(logfile, "ab") as out:
        out.write(f"$ {' '.join(cmd)}\n".encode())
        out.flush()
        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                             cwd=cwd, start_new_session=True)
        try:
            rc = p.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _stop_group(p)
            rc = TIMED_OUT
    return rc, time.monotonic() - t0


def _stop_group(p: subprocess.Popen) -> None:
    for sig, grace in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            return
        try:
            p.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def reap(marker: str, grace_s: float = 10.0) -> list[int]:
    """Stop the processes whose command line holds ``marker`` (a step's own config path): a
    cluster's workers run in sessions of their own, so a step stopped at its limit may leave
    them behind, holding the GPU. SIGTERM, then SIGKILL after ``grace_s``. Returns their pids."""
    pids = []
    for d in Path("/proc").glob("[0-9]*"):
        try:
            if int(d.name) != os.getpid() and marker in (d / "cmdline").read_bytes().decode(errors="replace"):
                pids.append(int(d.name))
        except (OSError, ValueError):
            continue
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 0.0)):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        end = time.monotonic() + wait
        while time.monotonic() < end and any(Path(f"/proc/{p}").exists() for p in pids):
            time.sleep(0.2)
    return pids


def tail(path: Path, lines: int = 12) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
