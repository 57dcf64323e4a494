#!/usr/bin/env python3
"""Helpers for the air-gap bundle (docs/gpu.md). Standard library only, plus
`packaging` (or pip's vendored copy) for the two wheel checks.

Here (tools/airgap/stage.sh runs these):
    bundle.py requires WHEEL
        the wheel's unconditional requirements (no extras; markers evaluated for
        CPython 3.12 on Linux x86-64), one per line
    bundle.py closure DIR [--ignore torch,onnxruntime]
        one version per project, and every requirement of every wheel met inside DIR
        (ignored projects are expected on the host); exit 1 with the problems otherwise
    bundle.py pack SRC PREFIX MANIFEST [--part-bytes N] [--python 3.12]
        one tar of SRC written straight into parts PREFIX00, PREFIX01, ... of N bytes
        (the tar itself never lands on disk), then MANIFEST: header lines
        `# key=value` (parts, part_bytes, total_bytes, deps_parts, content_key, ...)
        and sha256sum-style lines for bundle.tar and every part. Member order:
        wheels/ (onnxruntime-gpu first), models/, cosine/, BUNDLE-INFO.json, so the
        first deps_parts parts hold every dependency wheel whole, and a rebuilt
        cosine wheel only changes the last part(s). Skips the work when MANIFEST
        already describes the same content and the parts are there.

On the GPU host (tools/airgap/remote.sh runs this):
    bundle.py extract-wheels DEST PART...
        stream the tar out of the given leading parts and extract the wheels/
        members only (install --deps-only), failing if a wheel is cut off
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import math
import os
import re
import sys
import tarfile
import zipfile
from email.parser import Parser
from pathlib import Path

PY = "3.12"
CHUNK = 1 << 22


# ---------------------------------------------------------------- wheel metadata

def _packaging():
    try:
        from packaging.requirements import Requirement
        from packaging.utils import canonicalize_name
        from packaging.version import Version
    except ImportError:  # pip always vendors it
        from pip._vendor.packaging.requirements import Requirement  # type: ignore
        from pip._vendor.packaging.utils import canonicalize_name  # type: ignore
        from pip._vendor.packaging.version import Version  # type: ignore
    return Requirement, canonicalize_name, Version


def _env(py: str) -> dict[str, str]:
    return {"python_version": py, "python_full_version": f"{py}.3", "sys_platform": "linux",
            "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
            "implementation_name": "cpython", "platform_python_implementation": "CPython",
            "platform_release": "", "platform_version": "", "implementation_version": f"{py}.3", "extra": ""}


def wheel_name_version(whl: Path) -> tuple[str, str]:
    _, canonicalize_name, _ = _packaging()
    parts = whl.name[:-4].split("-")
    if not whl.name.endswith(".whl") or len(parts) < 5:
        raise SystemExit(f"bundle.py: {whl.name} is not a wheel file name")
    return canonicalize_name(parts[0]), parts[1]


def requirements(whl: Path, py: str = PY) -> list:
    Requirement, _, _ = _packaging()
    with zipfile.ZipFile(whl) as z:
        meta = next((n for n in z.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n)), None)
        if meta is None:
            raise SystemExit(f"bundle.py: {whl.name} has no .dist-info/METADATA")
        msg = Parser().parsestr(z.read(meta).decode("utf-8", "replace"))
    out = []
    for line in msg.get_all("Requires-Dist") or []:
        r = Requirement(line)
        if r.marker is None or r.marker.evaluate(_env(py)):
            out.append(r)
    return out


def closure(directory: Path, ignore: set[str], py: str = PY) -> int:
    _, canonicalize_name, Version = _packaging()
    wheels = sorted(directory.glob("*.whl"))
    if not wheels:
        print(f"bundle.py: no wheels in {directory}", file=sys.stderr)
        return 1
    have: dict[str, tuple[str, Path]] = {}
    problems: list[str] = []
    for w in wheels:
        name, version = wheel_name_version(w)
        if name in have:
            problems.append(f"two versions of {name}: {have[name][1].name} and {w.name} (keep one)")
        have[name] = (version, w)
    for name, (version, w) in sorted(have.items()):
        for r in requirements(w, py):
            dep = canonicalize_name(r.name)
            if dep in ignore:
                continue
            if dep not in have:
                problems.append(f"{w.name} needs {r} but no {dep} wheel is in the bundle")
            elif r.specifier and not r.specifier.contains(Version(have[dep][0]), prereleases=True):
                problems.append(f"{w.name} needs {r} but the bundle has {dep} {have[dep][0]}")
    for name, (version, w) in sorted(have.items()):
        print(f"  {name:28} {version:16} {w.stat().st_size / 1e6:9.1f} MB")
    total = sum(w.stat().st_size for w in wheels)
    print(f"  {len(wheels)} wheels, {total / 1e6:.1f} MB; expected on the host, not bundled: "
          f"{', '.join(sorted(ignore)) or 'nothing'}")
    if problems:
        print("bundle.py: the wheel set is not self-contained:", file=sys.stderr)
        for p in problems:
            print(f"  - {p}", file=sys.stderr)
        return 1
    return 0


# ---------------------------------------------------------------- pack (here)

def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _members(src: Path) -> list[tuple[str, Path]]:
    """(arcname, path) in bundle order; see the module docstring."""
    def files(sub: str, pattern: str = "*") -> list[Path]:
        d = src / sub
        return sorted(p for p in d.glob(pattern) if p.is_file()) if d.is_dir() else []

    wheels = files("wheels", "*.whl")
    wheels.sort(key=lambda p: (not p.name.startswith("onnxruntime_gpu-"), p.name))
    out = [(f"wheels/{p.name}", p) for p in wheels]
    out += [(f"models/{p.name}", p) for p in files("models")]
    out += [(f"cosine/{p.name}", p) for p in files("cosine", "*.whl")]
    unknown = sorted(p.name for p in src.iterdir() if p.name not in ("wheels", "models", "cosine"))
    if unknown:
        raise SystemExit(f"bundle.py: unexpected entries in {src}: {unknown} (only wheels/, models/, cosine/)")
    if not out:
        raise SystemExit(f"bundle.py: nothing to pack in {src}")
    return out


def _digest(arc: str, path: Path) -> str:
    """sha256 of a member; a GGUF's comes from its verified .sha256 stamp beside it."""
    stamp = path.with_name(path.name + ".sha256")
    if arc.startswith("models/") and path.suffix == ".gguf" and stamp.is_file():
        return stamp.read_text().split()[0]
    return sha256_file(path)


def read_manifest(path: Path) -> tuple[dict[str, str], dict[str, str]]:
    """(header key=value pairs, {file name: sha256})."""
    meta: dict[str, str] = {}
    sums: dict[str, str] = {}
    for line in path.read_text().splitlines():
        if line.startswith("# ") and "=" in line and " " not in line[2:].split("=", 1)[0]:
            k, v = line[2:].split("=", 1)
            meta[k] = v.strip()
        elif line and not line.startswith("#"):
            digest, name = line.split(None, 1)
            sums[name.strip().lstrip("*")] = digest
    return meta, sums


class _PartWriter(io.RawIOBase):
    """A write-only stream cut into files PREFIX00, PREFIX01, ... of part_bytes each."""

    def __init__(self, prefix: Path, part_bytes: int) -> None:
        self.prefix, self.part_bytes = prefix, part_bytes
        self.pos, self.index, self.total = 0, -1, hashlib.sha256()
        self.parts: list[tuple[Path, int, str]] = []  # final path, size, sha256
        self._f = None
        self._h = None
        self._n = 0

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def _next(self) -> None:
        self._close_part()
        self.index += 1
        if self.index >= 100:
            raise SystemExit("bundle.py: more than 100 parts; raise --part-bytes")
        self._f = open(self._tmp(self.index), "wb")
        self._h, self._n = hashlib.sha256(), 0

    def _tmp(self, i: int) -> Path:
        return self.prefix.with_name(f"{self.prefix.name}{i:02d}.tmp")

    def _close_part(self) -> None:
        if self._f is not None:
            self._f.close()
            self.parts.append((self.prefix.with_name(f"{self.prefix.name}{self.index:02d}"), self._n,
                               self._h.hexdigest()))
            self._f = None

    def write(self, b) -> int:
        mv = memoryview(b).cast("B")
        self.total.update(mv)
        done = 0
        while done < len(mv):
            if self._f is None or self._n == self.part_bytes:
                self._next()
            take = min(len(mv) - done, self.part_bytes - self._n)
            chunk = mv[done:done + take]
            self._f.write(chunk)
            self._h.update(chunk)
            self._n += take
            done += take
        self.pos += len(mv)
        return len(mv)

    def finish(self) -> None:
        self._close_part()
        for i, (final, _, _) in enumerate(self.parts):
            os.replace(self._tmp(i), final)


def pack(src: Path, prefix: Path, manifest: Path, part_bytes: int, py: str) -> int:
    members = _members(src)
    digests = {arc: _digest(arc, p) for arc, p in members}
    key_src = "\n".join(f"{arc} {p.stat().st_size} {digests[arc]}" for arc, p in members) + f"\n{part_bytes}\n"
    key = hashlib.sha256(key_src.encode()).hexdigest()
    if manifest.is_file():
        meta, sums = read_manifest(manifest)
        n = int(meta.get("parts", "0") or 0)
        names = [f"{prefix.name}{i:02d}" for i in range(n)]
        if meta.get("content_key") == key and n and all((prefix.parent / f).is_file() for f in names) \
                and sum((prefix.parent / f).stat().st_size for f in names) == int(meta.get("total_bytes", -1)):
            print(f"bundle unchanged (content key {key[:12]}): {n} parts already in {prefix.parent}; "
                  f"nothing packed")
            return 0
    info = {"format": 1, "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "python": py, "members": [{"name": arc, "bytes": p.stat().st_size, "sha256": digests[arc]}
                                      for arc, p in members]}
    old_sums = read_manifest(manifest)[1] if manifest.is_file() else {}
    for old in prefix.parent.glob(f"{prefix.name}[0-9][0-9]*"):
        old.unlink()
    manifest.unlink(missing_ok=True)
    w = _PartWriter(prefix, part_bytes)
    deps_end = 0
    with tarfile.open(fileobj=w, mode="w", format=tarfile.GNU_FORMAT, dereference=True) as tar:
        for arc, p in members:
            ti = tar.gettarinfo(str(p), arcname=arc)
            ti.uid = ti.gid = 0
            ti.uname = ti.gname = ""
            ti.mode = 0o644
            ti.mtime = 0
            with open(p, "rb") as f:
                tar.addfile(ti, f)
            if arc.startswith("wheels/"):
                deps_end = tar.offset
            print(f"  packed {arc} ({p.stat().st_size / 1e6:.1f} MB)", flush=True)
        blob = json.dumps(info, indent=1).encode()
        ti = tarfile.TarInfo("BUNDLE-INFO.json")
        ti.size, ti.mode = len(blob), 0o644
        tar.addfile(ti, io.BytesIO(blob))
    w.finish()
    total = w.pos
    deps_parts = math.ceil(deps_end / part_bytes) if deps_end else 0
    lines = ["# cosine air-gap bundle manifest (tools/airgap/stage.sh); docs/gpu.md",
             "# format=1", f"# created={info['created']}", f"# parts={len(w.parts)}", f"# part_bytes={part_bytes}",
             f"# total_bytes={total}", f"# deps_parts={deps_parts}", f"# python={py}", f"# content_key={key}",
             f"{w.total.hexdigest()}  bundle.tar"]
    lines += [f"{sha}  {path.name}" for path, _, sha in w.parts]
    tmp = manifest.with_name(manifest.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, manifest)
    print(f"packed {len(members)} files: {total} bytes in {len(w.parts)} parts of {part_bytes} bytes "
          f"(the first {deps_parts} hold every dependency wheel); manifest {manifest}")
    if old_sums:
        changed = [str(i) for i, (path, _, sha) in enumerate(w.parts) if old_sums.get(path.name) != sha]
        print(f"parts that differ from the previous bundle (a host that staged it needs only these again): "
              f"{' '.join(changed) or 'none'}")
    return 0


# ---------------------------------------------------------------- extract-wheels (host)

class _Concat(io.RawIOBase):
    def __init__(self, paths: list[Path]) -> None:
        self.paths, self.i, self.f = list(paths), 0, None

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while self.i < len(self.paths):
            if self.f is None:
                self.f = open(self.paths[self.i], "rb")
            n = self.f.readinto(b)
            if n:
                return n
            self.f.close()
            self.f, self.i = None, self.i + 1
        return 0


def extract_wheels(dest: Path, parts: list[Path]) -> int:
    dest.mkdir(parents=True, exist_ok=True)
    n = 0
    stream = io.BufferedReader(_Concat(parts), CHUNK)
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for m in tar:
                if not m.name.startswith("wheels/"):
                    break
                if not m.isfile() or "/" in m.name[len("wheels/"):] or ".." in m.name:
                    raise SystemExit(f"bundle.py: unexpected tar member {m.name!r}")
                src = tar.extractfile(m)
                tmp = dest / (Path(m.name).name + ".part")
                with open(tmp, "wb") as out:
                    while chunk := src.read(CHUNK):
                        out.write(chunk)
                if tmp.stat().st_size != m.size:
                    raise SystemExit(f"bundle.py: {m.name} is cut off in the first {len(parts)} parts")
                os.replace(tmp, dest / Path(m.name).name)
                n += 1
    except (tarfile.ReadError, EOFError) as e:
        raise SystemExit(f"bundle.py: the first {len(parts)} parts end inside a wheel ({e}); "
                         f"stage more parts") from None
    print(f"extracted {n} wheels into {dest}")
    return 0 if n else 1


def main(argv: list[str]) -> int:
    cmd, args = (argv[0], argv[1:]) if argv else ("", [])
    opts: dict[str, str] = {}
    pos: list[str] = []
    while args:
        a = args.pop(0)
        if a.startswith("--") and args:
            opts[a[2:]] = args.pop(0)
        else:
            pos.append(a)
    if cmd == "requires" and len(pos) == 1:
        for r in requirements(Path(pos[0]), opts.get("python", PY)):
            print(str(r))
        return 0
    if cmd == "closure" and len(pos) == 1:
        _, canonicalize_name, _ = _packaging()
        ignore = {canonicalize_name(x) for x in opts.get("ignore", "").split(",") if x}
        return closure(Path(pos[0]), ignore, opts.get("python", PY))
    if cmd == "pack" and len(pos) == 3:
        return pack(Path(pos[0]), Path(pos[1]), Path(pos[2]), int(opts.get("part-bytes", "60000000")),
                    opts.get("python", PY))
    if cmd == "extract-wheels" and len(pos) >= 2:
        return extract_wheels(Path(pos[0]), [Path(p) for p in pos[1:]])
    print(__doc__.strip(), file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
