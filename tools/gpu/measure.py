#!/usr/bin/env python3
"""The whole GPU measurement of issue 22 as one prepared script (docs/gpu.md). Run through
tools/gpu/measure.sh, on the GPU host, from the repo's working copy:

    measure.sh put N           keep carried part N (.device/bundle.partNN + .device/bundle.json);
                               starts the preparation in the background (install, exports)
    measure.sh run [--budget S] [--steps A,B] [--retry-failed]
                               wait for the preparation, then measure, within S seconds
                               (default 330): worker, bench-c1, bench-c16, routing-2, routing-3,
                               cuda-graph, summary; results into $OUT after every step.
                               --steps: a rerun of some steps (the others' results stay);
                               --retry-failed: prepare again the jobs that failed
    measure.sh status          what is staged, prepared and measured
    measure.sh --rehearse      all of it on this CPU: stage.sh --rehearse builds a tiny bundle,
                               one `put` per part (each a new process, as device calls are), `run`

Options: --work DIR (the host's working folder; default /tmp/cosine-gpu, a new temporary
folder for --rehearse), --carried DIR (where a call's carried files land; default .device).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bundle  # noqa: E402
import pipeline  # noqa: E402
import steps  # noqa: E402
from hostenv import LOG_FILE, REPO, Host, log  # noqa: E402

SCRIPT = Path(__file__).resolve()
PREPARE_DEADLINE_S = {False: 1500.0, True: 600.0}  # the host goes back after 30 minutes held anyway


def cmd_put(host: Host, n: int) -> int:
    old = (host.stage / bundle.MANIFEST).read_text() if (host.stage / bundle.MANIFEST).is_file() else ""
    try:
        bundle.put(host.carried, host.stage, n)
    except bundle.BundleError as e:
        print(f"ERROR: {e}", file=sys.stderr)
        return 1
    if old and json.loads(old)["content_key"] != bundle.load(host.stage)["content_key"]:
        log("a new bundle: forgetting what was prepared from the old one")
        shutil.rmtree(host.state, ignore_errors=True)
        shutil.rmtree(host.unpacked, ignore_errors=True)
    print("\n".join(bundle.status(host.stage)))
    pipeline.start(host, SCRIPT)
    print(f"prepare: {pipeline.progress(host)}")
    for name in pipeline.JOBS:
        st = host.status_of(name)
        if st["status"] == "failed":
            print(f"prepare: {name} FAILED: {st['detail']}")
    return 0


def cmd_run(host: Host, budget_s: float, only: tuple[str, ...], retry: bool) -> int:
    host.runs.mkdir(parents=True, exist_ok=True)
    LOG_FILE.append(host.runs / "measure.log")
    host.link_source()
    try:
        log("; ".join(line.strip() for line in bundle.status(host.stage)))
    except bundle.BundleError as e:
        log(f"no bundle staged here: {e}")
    if retry and not pipeline.running(host):
        for name in pipeline.JOBS:
            if host.status_of(name)["status"] == "failed":
                log(f"retrying the failed preparation job {name}")
                (host.state / f"{name}.json").unlink()
    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    log(f"measuring on {host.provider}/{host.device}{' (rehearsal)' if host.rehearse else ''}, budget {budget_s:.0f} s,"
        f" work {host.work}, results {out or host.runs}")
    rc = steps.Runner(host, budget_s, out, only).run()
    print((host.runs / "summary.md").read_text())
    return rc


def cmd_status(host: Host) -> int:
    try:
        print("\n".join(bundle.status(host.stage)))
    except bundle.BundleError as e:
        print(e)
    print(f"prepare: {pipeline.progress(host)}{' (running)' if pipeline.running(host) else ''}")
    if (host.runs / "steps.json").is_file():
        for r in json.loads((host.runs / "steps.json").read_text()):
            print(f"  {r['name']:16} {r['status']:10} {r['seconds']:6.0f} s  {r['detail']}")
    return 0


def rehearse(host: Host, budget_s: float) -> int:
    """stage.sh --rehearse, then one process per device call: put 0 .. put N-1, run."""
    t0 = time.monotonic()
    if subprocess.run(["bash", str(REPO / "tools" / "gpu" / "stage.sh"), "--rehearse", "--out",
                       str(host.carried)], cwd=REPO).returncode:
        log("stage.sh --rehearse failed")
        return 1
    parts = len(json.loads((host.carried / bundle.MANIFEST).read_text())["parts"])
    log(f"rehearsal bundle: {parts} parts in {time.monotonic() - t0:.0f} s; now one put per part")
    t1 = time.monotonic()
    for i in range(parts):
        if subprocess.run([host.python, str(SCRIPT), "put", str(i), *host.args()], cwd=REPO).returncode:
            log(f"put {i} failed")
            return 1
    log(f"{parts} puts in {time.monotonic() - t1:.0f} s; now run")
    return subprocess.run([host.python, str(SCRIPT), "run", "--budget", str(budget_s), *host.args()],
                          cwd=REPO).returncode


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="measure.sh", formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__)
    ap.add_argument("command", nargs="?", choices=("put", "prepare", "run", "status"))
    ap.add_argument("part", nargs="?", type=int)
    ap.add_argument("--rehearse", action="store_true")
    ap.add_argument("--work", type=Path)
    ap.add_argument("--carried", type=Path)
    ap.add_argument("--budget", type=float)
    ap.add_argument("--retry-failed", action="store_true", help="run: prepare again what failed (after a fix)")
    ap.add_argument("--steps", default=",".join(steps.STEPS), help="run only these steps (a rerun); the "
                    "results of the others stay")
    a = ap.parse_args(argv)
    if a.command is None and not a.rehearse:
        ap.error("give a command (put N, run, status) or --rehearse")
    work = a.work or (Path(tempfile.mkdtemp(prefix="cosine-gpu-rehearsal-")) if a.rehearse and a.command is None
                      else Path("/tmp/cosine-gpu"))
    carried = a.carried or ((work / "carry") if a.rehearse and a.command is None else REPO / ".device")
    host = Host(work.resolve(), carried.resolve(), a.rehearse, sys.executable)
    budget = a.budget or (600.0 if a.rehearse else 330.0)
    if a.command is None:
        if not os.environ.get("OUT"):
            os.environ["OUT"] = str(host.work / "out")
        return rehearse(host, budget)
    if a.command == "put":
        if a.part is None:
            ap.error("put needs the part number")
        return cmd_put(host, a.part)
    if a.command == "prepare":
        return pipeline.daemon(host, PREPARE_DEADLINE_S[a.rehearse])
    if a.command == "run":
        only = tuple(x for x in a.steps.split(",") if x)
        if not only or set(only) - set(steps.STEPS):
            ap.error(f"--steps takes some of {','.join(steps.STEPS)}; got {a.steps!r}")
        return cmd_run(host, budget, only, a.retry_failed)
    return cmd_status(host)


if __name__ == "__main__":
    sys.exit(main())
