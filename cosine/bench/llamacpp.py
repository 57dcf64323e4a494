"""llama.cpp as a peer in `cosine-bench run` (`--peers llamacpp,llamacpp-lookup,llamacpp-draft`):
the same GGUF file, the same prompt token ids and token counts, greedy, end-of-sequence
suppressed (as cosine's ``ignore_eos``), timed like a cosine request (prompt processing
included), interleaved with cosine's modes wave by wave.

| peer | what | needs |
|---|---|---|
| llamacpp | plain greedy decoding | llama-cpp-python (`pip install 'cosine[llamacpp]'`, docs/benchmarks/README.md) |
| llamacpp-lookup | llama.cpp with prompt-lookup decoding (llama-cpp-python's LlamaPromptLookupDecoding) | the same |
| llamacpp-draft | llama-server's draft-model speculative decoding (`-md`, the drafter's GGUF) | a `llama-server` binary: `--llama-server PATH` |

Each peer runs in its own process (a child for llama-cpp-python, llama-server itself), so
its peak RSS is its own; a wave of several requests is served one after another, as a
single llama.cpp instance serves them.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import resource
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

log = logging.getLogger("cosine.bench.llamacpp")

PEERS = ("llamacpp", "llamacpp-lookup", "llamacpp-draft")
BUILD_HINT = ('CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON" '
              "pip install 'cosine[llamacpp]' (compiles llama.cpp: 10-30 min on 2 cores)")


def available() -> str | None:
    """None when llama-cpp-python imports, else why the in-process peers are skipped."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return f"llama.cpp peers skipped: llama-cpp-python is not installed ({BUILD_HINT})"
    return None


def _child(conn: Any, gguf: str, threads: int, n_ctx: int, lookup: bool) -> None:
    """The peer process: load the model once, then answer (prompt ids, max tokens) requests."""
    import numpy as np
    from llama_cpp import Llama, LogitsProcessorList
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    draft = LlamaPromptLookupDecoding(num_pred_tokens=2) if lookup else None  # its docs: 2 on a CPU (10 on a GPU)
    llm = Llama(model_path=gguf, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, n_batch=512,
                verbose=False, draft_model=draft)
    eos = {llm.token_eos(), *([llm.token_eot()] if hasattr(llm, "token_eot") else [])} - {-1}

    def no_eos(_ids: Any, scores: Any) -> Any:
        scores[list(eos)] = -np.inf
        return scores

    conn.send(("ready", None))
    while True:
        msg = conn.recv()
        if msg is None:
            return
        ids, max_tokens = msg
        t0 = time.perf_counter()
        new: list[int] = []
        for tok in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True,
                                logits_processor=LogitsProcessorList([no_eos])):
            new.append(int(tok))
            if len(new) >= max_tokens:
                break
        secs = time.perf_counter() - t0
        conn.send(("done", (new, secs, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)))


class LlamaCppPeer:
    """llama-cpp-python in a child process (plain greedy, or with prompt lookup)."""

    def __init__(self, name: str, gguf: Path, threads: int, n_ctx: int = 4096, lookup: bool = False) -> None:
        self.name, self.peak_rss = name, 0
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_child, args=(child, str(gguf), threads, n_ctx, lookup), daemon=True)
        self.proc.start()
        deadline = time.monotonic() + 600
        while not self.conn.poll(0.5):
            if not self.proc.is_alive() or time.monotonic() > deadline:
                code = self.proc.exitcode
                self.close()
                raise RuntimeError(f"{name}: llama.cpp did not load {gguf}: " + (
                    f"its process exited with {code}" if code is not None else "still loading after 600 s"))
        self.conn.recv()
        log.info("%s: llama.cpp loaded %s (%d threads%s)", name, gguf.name, threads, ", prompt lookup" * lookup)

    def generate(self, prompt_ids: list[int], max_tokens: int) -> tuple[list[int], float]:
        self.conn.send((list(prompt_ids), max_tokens))
        _, (new, secs, rss) = self.conn.recv()
        self.peak_rss = max(self.peak_rss, rss)
        return new, secs

    def close(self) -> None:
        try:
            self.conn.send(None)
        except (BrokenPipeError, OSError):
            pass
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()


class LlamaServerPeer:
    """llama-server with a draft model (-md): llama.cpp's own speculative decoding."""

    def __init__(self, name: str, server: Path, gguf: Path, draft_gguf: Path, threads: int, port: int,
                 n_ctx: int = 4096) -> None:
        self.name, self.url, self.peak_rss = name, f"http://127.0.0.1:{port}", 0
        # llama-server's own speculative defaults (draft length, p-min): what its users run
        cmd = [str(server), "-m", str(gguf), "-md", str(draft_gguf), "-t", str(threads), "-c", str(n_ctx),
               "--host", "127.0.0.1", "--port", str(port), "-np", "1"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{name}: llama-server exited with {self.proc.returncode}: "
                                   f"{(self.proc.stderr.read() or '')[-800:]}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        else:
            self.close()
            raise RuntimeError(f"{name}: llama-server not healthy within 600 s")
        log.info("%s: llama-server %s with draft %s (%d threads)", name, gguf.name, draft_gguf.name, threads)

    def generate(self, prompt_ids: list[int], max_tokens: int) -> tuple[list[int], float]:
        body = {"prompt": list(prompt_ids), "n_predict": max_tokens, "temperature": 0.0, "top_k": 1,
                "ignore_eos": True, "cache_prompt": False, "return_tokens": True, "stream": False}
        req = urllib.request.Request(self.url + "/completion", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        t0 = time.perf_counter()
        with urllib.request.urlopen(req, timeout=1800) as r:
            out = json.loads(r.read())
        secs = time.perf_counter() - t0
        self.peak_rss = max(self.peak_rss, _rss(self.proc.pid))
        return [int(t) for t in out.get("tokens", [])][:max_tokens], secs

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def _rss(pid: int) -> int:
    """Peak resident set size of a process (VmHWM), bytes."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def start(names: list[str], target_gguf: Path, draft_gguf: Path | None, threads: int,
          server: Path | None, port: int) -> tuple[list[Any], list[dict]]:
    """The peers asked for that can run here; returns (peers, skipped: [{peer, reason}])."""
    peers, skipped = [], []
    why = available()
    for name in names:
        try:
            if name in ("llamacpp", "llamacpp-lookup"):
                if why:
                    skipped.append({"peer": name, "reason": why})
                    continue
                peers.append(LlamaCppPeer(name, target_gguf, threads, lookup=name == "llamacpp-lookup"))
            elif name == "llamacpp-draft":
                if server is None or not os.access(server, os.X_OK) or draft_gguf is None:
                    skipped.append({"peer": name, "reason": "needs --llama-server PATH (a llama-server binary "
                                    "built from llama.cpp) and a neural drafter with a GGUF source"})
                    continue
                peers.append(LlamaServerPeer(name, server, target_gguf, draft_gguf, threads, port))
            else:
                raise ValueError(f"unknown llama.cpp peer {name!r}; known: {', '.join(PEERS)}")
        except RuntimeError as e:
            skipped.append({"peer": name, "reason": str(e)})
    for s in skipped:
        log.warning("%s: %s", s["peer"], s["reason"])
    return peers, skipped
