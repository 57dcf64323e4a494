"""cosine's own ONNX Runtime operators, compiled on first use for this machine.

One library today, ``cosine:GGUFMatMul`` (gguf_op.cc, gguf_blocks.h): products with
weights in GGUF's own blocks, whose output rows do not depend on the rows beside them.
Engines that use it say so in their manifest (``"custom_ops": "cosine-gguf"``);
``register`` adds the library to a session's options.

The library is built with the system's g++ against ONNX Runtime's C API headers: the
directory named by ``COSINE_ORT_INCLUDE``, else Debian's ``libonnxruntime-dev`` package
(fetched once from deb.debian.org, checked by SHA-256, unpacked in Python). The build is
cached under ``~/.cache/cosine/kernels`` (``COSINE_KERNELS_DIR``) keyed by the sources, headers and flags, and
written atomically, so workers starting at once never load a half-written file.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import shutil
import subprocess
import tarfile
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

log = logging.getLogger("cosine.kernels")

HERE = Path(__file__).resolve().parent
SOURCES = ("gguf_op.cc", "gguf_blocks.h")
LIBRARY = "libcosine_gguf.so"
MANIFEST_KEY = "custom_ops"
NAME = "cosine-gguf"
FLAGS = ("-O3", "-std=c++17", "-mavx2", "-mfma", "-mf16c", "-ffp-contract=off", "-fPIC", "-shared",
         "-fvisibility=hidden", "-Wl,--no-undefined")
CPU_FLAGS = ("avx2", "fma", "f16c")

# ONNX Runtime's C/C++ API headers (MIT). Any ONNX Runtime at least as new as the headers
# runs the library: the C API keeps older versions' tables.
HEADERS_DEB = ("http://deb.debian.org/debian/pool/main/o/onnxruntime/libonnxruntime-dev_1.21.0+dfsg-1_amd64.deb",
               "14f7d959d5deacbcf1504830d4189f91fc67382b399ed9ae9d3aa9c4050ced08")
HEADER_FILES = ("onnxruntime_c_api.h", "onnxruntime_cxx_api.h", "onnxruntime_cxx_inline.h", "onnxruntime_float16.h")


class KernelUnavailable(RuntimeError):
    """The library cannot be built or used on this machine (the message says why)."""


def cache_dir() -> Path:
    d = Path(os.environ.get("COSINE_KERNELS_DIR", Path.home() / ".cache" / "cosine" / "kernels")).expanduser()
    d.mkdir(parents=True, exist_ok=True)
    return d


def cpu_supported() -> str | None:
    """None when this CPU runs the kernel, else what it lacks."""
    try:
        flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("flags")), [])
    except OSError:
        return "cannot read /proc/cpuinfo (the GGUF kernel is built for x86-64 Linux)"
    missing = [f for f in CPU_FLAGS if f not in flags]
    return f"this CPU lacks {', '.join(missing)}" if missing else None


def _ar_members(data: bytes) -> dict[str, bytes]:
    """The members of a Unix ``ar`` archive (a .deb)."""
    if not data.startswith(b"!<arch>\n"):
        raise KernelUnavailable("the downloaded .deb is not an ar archive")
    out, pos = {}, 8
    while pos + 60 <= len(data):
        header = data[pos:pos + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        out[name] = data[pos + 60:pos + 60 + size]
        pos += 60 + size + (size & 1)
    return out


def headers() -> Path:
    """A directory holding onnxruntime_cxx_api.h and the headers it includes."""
    env = os.environ.get("COSINE_ORT_INCLUDE")
    if env:
        if not (Path(env) / "onnxruntime_cxx_api.h").is_file():
            raise KernelUnavailable(f"COSINE_ORT_INCLUDE={env} has no onnxruntime_cxx_api.h")
        return Path(env)
    url, sha = HEADERS_DEB
    target = cache_dir() / f"ort-include-{sha[:12]}"
    if all((target / f).is_file() for f in HEADER_FILES):
        return target
    log.info("fetching ONNX Runtime's API headers from %s", url)
    try:
        with urllib.request.urlopen(url, timeout=60) as r:
            data = r.read()
    except OSError as e:
        raise KernelUnavailable(f"could not fetch ONNX Runtime's headers from {url} ({e}); set COSINE_ORT_INCLUDE "
                                f"to a directory with onnxruntime_cxx_api.h") from None
    got = hashlib.sha256(data).hexdigest()
    if got != sha:
        raise KernelUnavailable(f"{url} has SHA-256 {got}, expected {sha}")
    member = next((v for k, v in _ar_members(data).items() if k.startswith("data.tar")), None)
    if member is None:
        raise KernelUnavailable(f"{url} has no data.tar member")
    tmp = Path(tempfile.mkdtemp(prefix="ort-include-", dir=cache_dir()))
    with tarfile.open(fileobj=io.BytesIO(member)) as tar:
        for f in HEADER_FILES:
            extracted = tar.extractfile(f"./usr/include/onnxruntime/{f}")
            if extracted is None:
                raise KernelUnavailable(f"{url} lacks {f}")
            (tmp / f).write_bytes(extracted.read())
    try:
        tmp.replace(target)
    except OSError:  # another process put it there first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _key(include: Path, compiler: str) -> str:
    h = hashlib.sha256()
    for f in SOURCES:
        h.update((HERE / f).read_bytes())
    for f in HEADER_FILES:
        h.update((include / f).read_bytes())
    h.update(" ".join((compiler, *FLAGS)).encode())
    return h.hexdigest()[:16]


def library() -> Path:
    """The compiled library, built now if this machine has none for these sources."""
    why = cpu_supported()
    if why:
        raise KernelUnavailable(f"the GGUF kernel needs AVX2, FMA and F16C: {why}")
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not compiler:
        raise KernelUnavailable("no C++ compiler (g++) to build the GGUF kernel; install g++ "
                                "(apt install g++) or export with --matmul nbits")
    include = headers()
    out = cache_dir() / _key(include, compiler) / LIBRARY
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{LIBRARY}.{os.getpid()}")
    cmd = [compiler, *FLAGS, f"-I{include}", f"-I{HERE}", str(HERE / "gguf_op.cc"), "-o", str(tmp)]
    log.info("building the GGUF kernel: %s", " ".join(cmd))
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        tmp.unlink(missing_ok=True)
        raise KernelUnavailable(f"building the GGUF kernel failed ({' '.join(cmd)}):\n{done.stderr[-3000:]}")
    tmp.replace(out)
    return out


def available() -> str | None:
    """None when the library builds (or is built) here, else why not."""
    try:
        library()
    except KernelUnavailable as e:
        return str(e)
    return None


def register(options: Any, manifest: dict[str, Any]) -> None:
    """Add the libraries an engine's manifest names to onnxruntime SessionOptions."""
    wanted = manifest.get(MANIFEST_KEY)
    if not wanted:
        return
    names = [wanted] if isinstance(wanted, str) else list(wanted)
    unknown = [n for n in names if n != NAME]
    if unknown:
        raise KernelUnavailable(f"the engine needs operator libraries {unknown}, which this cosine does not have")
    options.register_custom_ops_library(str(library()))


def main() -> int:
    """``python -m cosine.workers.kernels``: build the library now (make install does)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        print(library())
    except KernelUnavailable as e:
        print(f"GGUF kernel not built: {e}")
        return 1
    return 0
