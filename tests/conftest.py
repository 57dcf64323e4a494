"""Shared test fixtures."""

from __future__ import annotations

import faulthandler
import json
import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest


# ----- hang watchdog -----------------------------------------------------------------------
# A test that hangs once cost a whole CI run (90 min, no output). pytest-timeout (pyproject:
# `timeout`) fails such a test with every thread's stack and the suite goes on; where its
# SIGALRM cannot break the wait (a C call that does not return on EINTR), this backstop dumps
# the stacks to the real stderr and exits, so CI still ends in minutes and says where.
BACKSTOP_AFTER_S = float(os.environ.get("COSINE_TEST_BACKSTOP_S", "300"))  # past the test's own timeout
_real_stderr: int | None = None


def pytest_configure(config: pytest.Config) -> None:
    global _real_stderr
    _real_stderr = os.dup(2)  # output capture is suspended here: this is the terminal / CI log


def _timeout_s(item: pytest.Item) -> float:
    """The test's pytest-timeout limit: its marker, else --timeout, else pyproject's (0: none)."""
    marker = item.get_closest_marker("timeout")
    if marker and marker.args:
        return float(marker.args[0])
    return float(item.config.getoption("timeout", None) or item.config.getini("timeout") or 0)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):  # type: ignore[no-untyped-def]
    limit = _timeout_s(item)
    if limit > 0:
        faulthandler.dump_traceback_later(limit + BACKSTOP_AFTER_S, exit=True,
                                          file=_real_stderr if _real_stderr is not None else 2)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


# ----- worker fixtures (tests/test_worker*.py) ---------------------------------------------

def wait_line(proc: subprocess.Popen, needle: str, timeout_s: float, seen: list[str] | None = None) -> str:
    """Read ``proc``'s stdout until a line holds ``needle`` (lines also go to ``seen``)."""
    seen = [] if seen is None else seen
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            if proc.poll() is not None:
                break
            continue
        seen.append(line)
        if needle in line:
            return line
    raise AssertionError(f"{needle!r} not printed; output:\n{''.join(seen[-60:])}")


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A TCP port on loopback that was free a moment ago and that this test process has not
    handed out before (the kernel may offer one port twice in a row: one config would then
    give it to two sockets)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


@pytest.fixture(scope="session")
def worker_engines(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny fp32 engines exported by cosine.export, by architecture."""
    from cosine.export.build import export_engine
    from cosine.export.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("worker-engines")
    out = {}
    for arch in ("llama", "qwen2", "gpt2"):  # after the first, each export takes ~2 s
        model = make_tiny_model(root / f"{arch}-hf", arch=arch, seed=0)
        export_engine(model, root / f"{arch}-engine", dtype="float32", progress=False)
        out[arch] = root / f"{arch}-engine"
    return out


@pytest.fixture(scope="session")
def worker_config(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``worker_config(engine_dir, **worker_overrides) -> config.toml path`` for one worker
    named "w0" on a free loopback port serving ``engine_dir`` as the target."""

    def make(engine_dir: Path, **overrides: Any) -> Path:
        w: dict[str, Any] = {"name": "w0", "model": "tiny", "host": "127.0.0.1", "port": free_port(),
                             "device": "cpu", "provider": "cpu", "max_batch": 16, "kv_budget_tokens": 65536,
                             "idle_timeout_s": 600.0, "threads": 1}
        w.update(overrides)
        lines = ["[logging]", 'level = "INFO"', "", "[[models]]", 'name = "tiny"', 'role = "target"',
                 f'engine = "{engine_dir}"', "", "[[workers]]"]
        for k, v in w.items():
            lines.append(f"{k} = " + (f'"{v}"' if isinstance(v, str) else str(v).lower() if isinstance(v, bool)
                                      else repr(v)))
        lines += ["", "[controller]", f'endpoint = "tcp://127.0.0.1:{free_port()}"']
        p = tmp_path_factory.mktemp("worker-config") / "config.toml"
        p.write_text("\n".join(lines) + "\n")
        return p

    return make


# ----- control-plane fixtures (tests/test_control*.py, test_client*.py, test_e2e*.py) -------

def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, str):
        return f'"{v}"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return repr(v)


def write_cluster_config(path: Path, target: Path, drafters: dict[str, Any], controller: dict[str, Any] | None = None,
                         sections: dict[str, dict[str, Any]] | None = None, limits: dict[str, Any] | None = None,
                         model_extra: dict[str, dict[str, Any]] | None = None) -> Path:
    """config.toml for one verifier ("verifier-0", model "target") and one drafter worker per
    entry of ``drafters`` (worker name -> engine dir), all on free loopback ports.
    ``model_extra`` adds keys to a drafter's [[models]] entry (by worker name)."""
    lines = ["[logging]", 'level = "WARNING"', "", "[limits]"]
    lim = {"max_prompt_tokens": 96, "max_new_tokens": 256, **(limits or {})}
    lines += [f"{k} = {_toml_value(v)}" for k, v in lim.items()]
    # a drafter is an engine dir (neural) or (kind, engine dir or None) for weight-free ones
    models = [("target", "target", ("neural", target), ())] + \
        [(f"m-{n}", "drafter", e if isinstance(e, tuple) else ("neural", e), (n,)) for n, e in drafters.items()]
    for name, role, (kind, eng), domains in models:
        lines += ["", "[[models]]", f'name = "{name}"', f'role = "{role}"', f'kind = "{kind}"',
                  f"domains = {_toml_value(list(domains))}"] + ([f'engine = "{eng}"'] if eng else [])
        extra = (model_extra or {}).get(name[2:] if name.startswith("m-") else "", {})
        lines += [f"{k} = {_toml_value(v)}" for k, v in extra.items()]
    workers = [("verifier-0", "target")] + [(n, f"m-{n}") for n in drafters]
    for wname, model in workers:
        lines += ["", "[[workers]]", f'name = "{wname}"', f'model = "{model}"', 'host = "127.0.0.1"',
                  f"port = {free_port()}", "threads = 1", "max_batch = 64", "idle_timeout_s = 600.0"]
    # pipeline "on": the test clusters share one host, where "auto" would turn it off, and
    # the pipelined round loop is what most tests exercise
    c = {"endpoint": f"tcp://127.0.0.1:{free_port()}", "mode": "cosine", "worker_timeout_s": 3.0,
         "pipeline": "on", **(controller or {})}
    lines += ["", "[controller]"] + [f"{k} = {_toml_value(v)}" for k, v in c.items()]
    # tiny engines draft about as slowly as they verify: keep speculation on regardless
    # (tests of the gates set gate themselves)
    sections = dict(sections or {})
    sections["speculation"] = {"disable_below_ratio": 0.0, "gate": "off", **sections.get("speculation", {})}
    # likewise a model drafter is always engaged (its prefill would rarely pay here)
    sections["routing"] = {"engage_by_cost": False, **sections.get("routing", {})}
    for sec, kv in sections.items():
        lines += ["", f"[controller.{sec}]"] + [f"{k} = {_toml_value(v)}" for k, v in kv.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def build_ngram_engine(out: Path, vocab: int) -> Path:
    """An n-gram drafter engine from a small 'domain corpus': repeated motifs plus noise, fixed seed."""
    from cosine.workers.ngram import NgramModel

    rng = np.random.default_rng(7)
    motifs = [rng.integers(3, vocab, size=rng.integers(4, 9)) for _ in range(12)]
    docs = [np.concatenate([motifs[i] for i in rng.integers(0, 12, size=40)] + [rng.integers(3, vocab, 50)])
            for _ in range(20)]
    NgramModel.build([d.astype(np.int32) for d in docs], vocab_size=vocab, order=4).save(out)
    (out / "manifest.json").write_text(json.dumps({"format": "cosine-engine", "kind": "ngram", "order": 4,
                                                   "vocab_size": vocab}))
    return out


@pytest.fixture(scope="session")
def control_engines(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny engines for the control plane: "target" (llama, seed 0), "poor" (a different-seed
    drafter with the same vocabulary) and "small" (vocab 16 target for sampling tests)."""
    from cosine.export.build import export_engine
    from cosine.export.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("control-engines")
    out = {}
    for name, seed, vocab in (("target", 0, None), ("poor", 1, None), ("small", 2, 16), ("small_poor", 3, 16)):
        kw = {} if vocab is None else {"vocab_size": vocab}
        model = make_tiny_model(root / f"{name}-hf", arch="llama", seed=seed, **kw)
        export_engine(model, root / f"{name}-engine", dtype="float32")
        out[name] = root / f"{name}-engine"
    return out


@pytest.fixture(scope="session")
def control_cluster(control_engines: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    """verifier + a perfect drafter (the target's own engine) + a poor drafter, and serve."""
    from cosine.control.cluster import LocalCluster

    cfg = write_cluster_config(tmp_path_factory.mktemp("cluster") / "config.toml", control_engines["target"],
                               {"good": control_engines["target"], "poor": control_engines["poor"]},
                               sections={"scheduling": {"max_batch": 16}})
    with LocalCluster(cfg) as c:
        yield c


# ----- export fixtures (tests/test_export*.py) -----------------------------------------------

@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny random Hugging Face model directories (seed 0, vocab 64), by architecture:
    "llama" (GQA, untied head), "qwen2" (GQA, qkv bias, tied head), "gpt2"."""
    from cosine.export.tiny import ARCHS, make_tiny_model

    root = tmp_path_factory.mktemp("tiny-models")
    return {arch: make_tiny_model(root / arch, arch=arch, seed=0) for arch in ARCHS}


# ----- HTTP gateway fixtures (tests/test_http_*.py) -------------------------------------------

API_KEYS = ("test-key-1", "test-key-2")


def add_http(cfg: Path, port: int, **keys: Any) -> str:
    """Append an [http] table (the test API keys, loopback ``port``); returns the base URL."""
    kv = {"host": "127.0.0.1", "port": port, "api_keys": list(API_KEYS), **keys}
    with open(cfg, "a") as f:
        f.write("\n[http]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in kv.items()))
    return f"http://127.0.0.1:{port}"


class HttpCluster:
    """A LocalCluster plus `cosine-http` (real processes): ``base`` is the gateway's URL."""

    def __init__(self, cluster: Any, cfg_path: Path, base: str):
        self.cluster, self.cfg_path, self.base = cluster, cfg_path, base
        self.endpoint = cluster.endpoint
        self.key = API_KEYS[0]


@pytest.fixture(scope="session")
def http_cluster(control_engines: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    """verifier + a perfect and a poor drafter + serve + cosine-http with two API keys, shared
    by the HTTP test modules. The gateway accepts 1 MiB bodies within 3 s."""
    from cosine.control.cluster import LocalCluster
    from cosine.gateway.process import GatewayProcess

    cfg = write_cluster_config(tmp_path_factory.mktemp("http") / "config.toml", control_engines["target"],
                               {"good": control_engines["target"], "poor": control_engines["poor"]},
                               limits={"max_message_bytes": 1 << 20},
                               sections={"scheduling": {"max_batch": 16}})
    base = add_http(cfg, free_port(), body_timeout_s=3.0, request_timeout_s=60.0)
    with LocalCluster(cfg) as c, GatewayProcess(cfg, base):
        yield HttpCluster(c, cfg, base)
