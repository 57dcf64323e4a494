#!/usr/bin/env python3
"""The bundle that carries the GPU measurement's inputs in parts (docs/gpu.md).

A bundle is the files of four groups laid end to end, in the order of GROUPS, cut into
parts of `part_bytes`. Its manifest, bundle.json, gives every part's size and sha256 and
every file's group, offset, size and sha256, so the host can unpack a group (and start
working on it) as soon as the parts that hold it have arrived, in any order. Standard
library only: it runs on the bare host.

    bundle.py pack SRC OUT [--part-bytes N]   SRC/<group>/... -> OUT/bundle.partNN + OUT/bundle.json
    bundle.py put CARRIED STAGE N             check part N (carried with bundle.json) and keep it in STAGE
    bundle.py complete STAGE GROUP            exit 0 when every part holding GROUP is in STAGE
    bundle.py extract STAGE GROUP DEST        write GROUP's files under DEST (sha256 checked)
    bundle.py status STAGE                    what is staged, what is missing
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

GROUPS = ("wheels", "data", "target", "drafter")  # bundle order: what the host can use first goes first
MANIFEST = "bundle.json"
CHUNK = 1 << 22


class BundleError(Exception):
    """One line for the user: what is wrong and what to do."""


def part_name(i: int) -> str:
    return f"bundle.part{i:02d}"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _digest(path: Path) -> str:
    """A file's sha256; a GGUF from the model cache has it in its verified .sha256 stamp."""
    stamp = path.with_name(path.name + ".sha256")
    if path.suffix == ".gguf" and stamp.is_file():
        return stamp.read_text().split()[0]
    return sha256_file(path)


# ---------------------------------------------------------------- pack (here)

def members(src: Path) -> list[tuple[str, str, Path]]:
    """(group, path inside the bundle, file) in bundle order."""
    unknown = sorted(p.name for p in src.iterdir() if p.name not in GROUPS)
    if unknown:
        raise BundleError(f"unexpected entries in {src}: {unknown} (only {', '.join(GROUPS)})")
    out = []
    for g in GROUPS:
        d = src / g
        files = sorted(p for p in d.rglob("*") if p.is_file() and not p.name.endswith(".sha256")) if d.is_dir() else []
        out += [(g, p.relative_to(src).as_posix(), p) for p in files]
    if not out:
        raise BundleError(f"nothing to pack in {src}")
    return out


def _write_parts(files: list[tuple[str, str, Path]], out: Path, part_bytes: int) -> list[dict]:
    parts: list[dict] = []
    f, h, n = None, None, 0

    def close() -> None:
        if f is not None:
            f.close()
            parts.append({"name": part_name(len(parts)), "bytes": n, "sha256": h.hexdigest()})

    for _, _, path in files:
        with open(path, "rb") as src:
            while chunk := src.read(CHUNK):
                view = memoryview(chunk)
                while view:
                    if f is None or n == part_bytes:
                        close()
                        f, h, n = open(out / part_name(len(parts)), "wb"), hashlib.sha256(), 0
                    take = view[:part_bytes - n]
                    f.write(take)
                    h.update(take)
                    n += len(take)
                    view = view[len(take):]
    close()
    return parts


def pack(src: Path, out: Path, part_bytes: int) -> dict:
    """Write the parts and bundle.json; skipped when bundle.json already describes this content."""
    files = members(src)
    entries, offset = [], 0
    for group, rel, path in files:
        size = path.stat().st_size
        entries.append({"path": rel, "group": group, "offset": offset, "bytes": size, "sha256": _digest(path)})
        offset += size
    key = hashlib.sha256(json.dumps([entries, part_bytes]).encode()).hexdigest()
    out.mkdir(parents=True, exist_ok=True)
    old = out / MANIFEST
    if old.is_file():
        m = json.loads(old.read_text())
        if m.get("content_key") == key and all((out / p["name"]).is_file() for p in m["parts"]):
            print(f"bundle unchanged ({len(m['parts'])} parts in {out}); nothing packed")
            return m
    for stale in out.glob("bundle.part[0-9][0-9]"):
        stale.unlink()
    parts = _write_parts(files, out, part_bytes)
    m = {"format": 2, "content_key": key, "part_bytes": part_bytes, "total_bytes": offset, "parts": parts,
         "files": entries}
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(m, indent=1))
    os.replace(tmp, old)
    print(f"packed {len(entries)} files, {offset} bytes, into {len(parts)} parts of {part_bytes} bytes in {out}")
    for g in GROUPS:
        span = group_parts(m, g)
        if span:
            print(f"  {g:8} parts {span[0]:2d}..{span[-1]:2d}  {sum(e['bytes'] for e in entries if e['group'] == g):>13} bytes")
    return m


# ---------------------------------------------------------------- on the host

def load(stage: Path) -> dict:
    p = stage / MANIFEST
    if not p.is_file():
        raise BundleError(f"no {MANIFEST} in {stage}: carry .device/{MANIFEST} with every 'put' call")
    m = json.loads(p.read_text())
    if m.get("format") != 2:
        raise BundleError(f"{p} is not a format-2 bundle manifest; stage the bundle again with tools/gpu/stage.sh")
    return m


def group_parts(m: dict, group: str) -> list[int]:
    """Indices of the parts that hold any byte of ``group``'s files."""
    pb, idx = m["part_bytes"], set()
    for e in m["files"]:
        if e["group"] == group and e["bytes"]:
            idx.update(range(e["offset"] // pb, (e["offset"] + e["bytes"] - 1) // pb + 1))
    return sorted(idx)


def _staged(stage: Path, m: dict, i: int) -> bool:
    p = stage / part_name(i)
    return p.is_file() and p.stat().st_size == m["parts"][i]["bytes"]


def missing(stage: Path, m: dict) -> list[int]:
    return [i for i in range(len(m["parts"])) if not _staged(stage, m, i)]


def _adopt_manifest(carried: Path, stage: Path) -> dict:
    """Take the carried manifest; a different bundle keeps only the staged parts it shares."""
    new = json.loads((carried / MANIFEST).read_text())
    old_path = stage / MANIFEST
    if old_path.is_file() and json.loads(old_path.read_text()).get("content_key") != new.get("content_key"):
        want = {p["name"]: p["sha256"] for p in new["parts"]}
        kept = dropped = 0
        for f in stage.glob("bundle.part[0-9][0-9]"):
            if want.get(f.name) == sha256_file(f):
                kept += 1
            else:
                f.unlink()
                dropped += 1
        print(f"the carried manifest describes another bundle: kept {kept} staged part(s) it shares, dropped {dropped}")
    shutil.copyfile(carried / MANIFEST, stage / (MANIFEST + ".tmp"))
    os.replace(stage / (MANIFEST + ".tmp"), old_path)
    return load(stage)


def put(carried: Path, stage: Path, i: int) -> dict:
    """Check carried part ``i`` against the manifest and keep it in ``stage``."""
    stage.mkdir(parents=True, exist_ok=True)
    if not (carried / MANIFEST).is_file() and not (stage / MANIFEST).is_file():
        raise BundleError(f"no bundle manifest: carry .device/{MANIFEST} with this call")
    m = _adopt_manifest(carried, stage) if (carried / MANIFEST).is_file() else load(stage)
    n = len(m["parts"])
    if not 0 <= i < n:
        raise BundleError(f"part {i} does not exist: this bundle has parts 0..{n - 1}")
    want, dst = m["parts"][i], stage / part_name(i)
    if _staged(stage, m, i) and sha256_file(dst) == want["sha256"]:
        print(f"{want['name']} already staged; skipping")
        return m
    src = carried / want["name"]
    if not src.is_file():
        raise BundleError(f"{want['name']} was not carried into this call; carry [\".device/{want['name']}\", "
                          f"\".device/{MANIFEST}\"]")
    if src.stat().st_size != want["bytes"]:
        raise BundleError(f"{want['name']} has {src.stat().st_size} bytes, expected {want['bytes']}: "
                          f"cut off in transfer; carry it again")
    tmp = stage / (want["name"] + ".tmp")
    shutil.copyfile(src, tmp)
    if sha256_file(tmp) != want["sha256"]:
        tmp.unlink()
        raise BundleError(f"{want['name']} is corrupted (sha256 differs from the manifest); carry it again")
    os.replace(tmp, dst)
    print(f"{want['name']} staged ({want['bytes']} bytes, sha256 ok)")
    return m


def complete(stage: Path, group: str) -> bool:
    m = load(stage)
    span = group_parts(m, group)
    return bool(span) and all(_staged(stage, m, i) for i in span)


def _read_range(stage: Path, m: dict, offset: int, size: int, out) -> str:
    """Copy bytes [offset, offset+size) of the bundle from the parts to ``out``; their sha256."""
    pb, h = m["part_bytes"], hashlib.sha256()
    while size:
        i, at = divmod(offset, pb)
        with open(stage / part_name(i), "rb") as f:
            f.seek(at)
            left = min(size, pb - at)
            while left:
                chunk = f.read(min(CHUNK, left))
                out.write(chunk)
                h.update(chunk)
                left -= len(chunk)
                offset += len(chunk)
                size -= len(chunk)
    return h.hexdigest()


def extract(stage: Path, group: str, dest: Path) -> list[Path]:
    """Write ``group``'s files under ``dest`` (paths as packed), each sha256-checked."""
    m = load(stage)
    if not complete(stage, group):
        raise BundleError(f"group {group} is not staged yet: parts {group_parts(m, group)} are needed, "
                          f"missing {[i for i in group_parts(m, group) if i in missing(stage, m)]}")
    written = []
    for e in (e for e in m["files"] if e["group"] == group):
        path = dest / e["path"]
        if ".." in Path(e["path"]).parts or Path(e["path"]).is_absolute():
            raise BundleError(f"unsafe path in the manifest: {e['path']!r}")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as out:
            got = _read_range(stage, m, e["offset"], e["bytes"], out)
        if got != e["sha256"]:
            tmp.unlink()
            raise BundleError(f"{e['path']}: sha256 {got[:12]} differs from the manifest's {e['sha256'][:12]}")
        os.replace(tmp, path)
        written.append(path)
    return written


def status(stage: Path) -> list[str]:
    m = load(stage)
    miss = missing(stage, m)
    lines = [f"staged {len(m['parts']) - len(miss)} of {len(m['parts'])} parts"
             + (f"; missing {' '.join(map(str, miss))}" if miss else "")]
    for g in GROUPS:
        span = group_parts(m, g)
        if span:
            lines.append(f"  {g:8} parts {span[0]}..{span[-1]}: {'complete' if complete(stage, g) else 'waiting'}")
    return lines


def main(argv: list[str]) -> int:
    cmd, args = (argv[0], argv[1:]) if argv else ("", [])
    opts = {args[i][2:]: args[i + 1] for i in range(len(args) - 1) if args[i].startswith("--")}
    pos = [a for i, a in enumerate(args) if not a.startswith("--") and not (i and args[i - 1].startswith("--"))]
    try:
        if cmd == "pack" and len(pos) == 2:
            pack(Path(pos[0]), Path(pos[1]), int(opts.get("part-bytes", "60000000")))
        elif cmd == "put" and len(pos) == 3:
            put(Path(pos[0]), Path(pos[1]), int(pos[2]))
            print("\n".join(status(Path(pos[1]))))
        elif cmd == "complete" and len(pos) == 2:
            return 0 if complete(Path(pos[0]), pos[1]) else 1
        elif cmd == "extract" and len(pos) == 3:
            n = len(extract(Path(pos[0]), pos[1], Path(pos[2])))
            print(f"extracted {pos[1]}: {n} file(s) into {pos[2]}")
        elif cmd == "status" and len(pos) == 1:
            print("\n".join(status(Path(pos[0]))))
        else:
            print(__doc__.strip(), file=sys.stderr)
            return 2
    except (BundleError, OSError, ValueError) as e:
        print(f"ERROR: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
