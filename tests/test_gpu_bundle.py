"""tools/gpu/bundle.py (docs/gpu.md): a small bundle packed into parts, carried one device
call at a time into a stage folder through its command line (what `measure.sh put` runs),
unpacked group by group as soon as a group's parts are in, with clear refusals of missing,
cut-off and corrupted parts; and the wheel checks that decide what the bundle brings."""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.gpu_tools import ROOT, load_tool

bundle = load_tool("bundle")
wheels = load_tool("wheels")
PART = 8192


def _wheel(d: Path, name: str, version: str, requires: tuple[str, ...] = (), pad: int = 100) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    whl = d / f"{name}-{version}-py3-none-any.whl"
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(whl, "w", zipfile.ZIP_STORED) as z:
        z.writestr(f"{name}-{version}.dist-info/METADATA", meta)
        z.writestr(f"{name}/data.bin", random.Random(name).randbytes(pad))
    return whl


@pytest.fixture
def packed(tmp_path: Path) -> Path:
    """A bundle in tmp/dev: a wheel, a data file, a target GGUF (with its stamp) and a drafter folder."""
    src = tmp_path / "src"
    _wheel(src / "wheels", "alpha", "1.0", pad=6000)
    (src / "data").mkdir()
    (src / "data" / "data.tar.xz").write_bytes(random.Random(1).randbytes(3000))
    (src / "target").mkdir()
    gguf = src / "target" / "m.gguf"
    gguf.write_bytes(b"GGUF" + random.Random(0).randbytes(20000))
    (src / "target" / "m.gguf.sha256").write_text(hashlib.sha256(gguf.read_bytes()).hexdigest() + "\n")
    (src / "drafter" / "sub").mkdir(parents=True)
    (src / "drafter" / "config.json").write_text("{}")
    (src / "drafter" / "sub" / "w.bin").write_bytes(random.Random(2).randbytes(9000))
    dev = tmp_path / "dev"
    bundle.pack(src, dev, PART)
    return dev


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tools" / "gpu" / "bundle.py"), *args], capture_output=True,
                          text=True, timeout=60)


def _carry(dev: Path, call: Path, *parts: int, manifest: bool = True) -> Path:
    """What one device call brings: the named parts (and the manifest), nothing else."""
    shutil.rmtree(call, ignore_errors=True)
    call.mkdir(parents=True)
    for i in parts:
        shutil.copy(dev / bundle.part_name(i), call)
    if manifest:
        shutil.copy(dev / bundle.MANIFEST, call)
    return call


def test_pack_lays_files_end_to_end_in_parts(packed: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    m = json.loads((packed / bundle.MANIFEST).read_text())
    parts = [packed / p["name"] for p in m["parts"]]
    assert len(parts) >= 4 and all(p.stat().st_size == PART for p in parts[:-1])
    assert all(hashlib.sha256(p.read_bytes()).hexdigest() == q["sha256"] for p, q in zip(parts, m["parts"]))
    blob = b"".join(p.read_bytes() for p in parts)
    assert len(blob) == m["total_bytes"]
    for e in m["files"]:  # every file at its offset, in group order, its sha256 recorded
        src = tmp_path / "src" / e["path"]
        assert blob[e["offset"]:e["offset"] + e["bytes"]] == src.read_bytes()
    assert [e["group"] for e in m["files"]] == sorted((e["group"] for e in m["files"]), key=bundle.GROUPS.index)
    assert not any(e["path"].endswith(".sha256") for e in m["files"])  # stamps are not carried
    capsys.readouterr()
    bundle.pack(tmp_path / "src", packed, PART)
    assert "bundle unchanged" in capsys.readouterr().out


def test_groups_unpack_as_soon_as_their_parts_are_in(packed: Path, tmp_path: Path) -> None:
    m = json.loads((packed / bundle.MANIFEST).read_text())
    stage, call = tmp_path / "stage", tmp_path / "call"
    for i in bundle.group_parts(m, "wheels"):
        r = _cli("put", str(_carry(packed, call, i)), str(stage), str(i))
        assert r.returncode == 0, r.stderr
    assert "wheels   parts" in r.stdout and "complete" in r.stdout
    assert _cli("complete", str(stage), "wheels").returncode == 0
    assert _cli("complete", str(stage), "drafter").returncode == 1
    r = _cli("extract", str(stage), "drafter", str(tmp_path / "out"))
    assert r.returncode == 1 and "missing" in r.stderr
    r = _cli("extract", str(stage), "wheels", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out" / "wheels" / "alpha-1.0-py3-none-any.whl").read_bytes() == \
        (tmp_path / "src" / "wheels" / "alpha-1.0-py3-none-any.whl").read_bytes()
    for i in reversed(range(len(m["parts"]))):  # any order
        assert _cli("put", str(_carry(packed, call, i)), str(stage), str(i)).returncode == 0
    for g in ("target", "drafter"):
        assert _cli("extract", str(stage), g, str(tmp_path / "out")).returncode == 0
    assert (tmp_path / "out" / "drafter" / "sub" / "w.bin").read_bytes() == \
        (tmp_path / "src" / "drafter" / "sub" / "w.bin").read_bytes()
    assert "staged " + str(len(m["parts"])) in _cli("status", str(stage)).stdout


def test_bad_transfers_are_refused_with_the_call_that_fixes_them(packed: Path, tmp_path: Path) -> None:
    stage, call = tmp_path / "stage", tmp_path / "call"
    r = _cli("put", str(_carry(packed, call, 1, manifest=False)), str(stage), "1")
    assert r.returncode == 1 and "carry .device/bundle.json" in r.stderr
    r = _cli("put", str(_carry(packed, call)), str(stage), "1")
    assert r.returncode == 1 and "was not carried" in r.stderr and '".device/bundle.part01"' in r.stderr
    carried = _carry(packed, call, 1) / bundle.part_name(1)
    carried.write_bytes(carried.read_bytes()[:100])
    r = _cli("put", str(call), str(stage), "1")
    assert r.returncode == 1 and "has 100 bytes" in r.stderr and "carry it again" in r.stderr
    carried = _carry(packed, call, 1) / bundle.part_name(1)
    data = bytearray(carried.read_bytes())
    data[7] ^= 0xFF
    carried.write_bytes(bytes(data))
    r = _cli("put", str(call), str(stage), "1")
    assert r.returncode == 1 and "corrupted" in r.stderr and not (stage / bundle.part_name(1)).exists()
    r = _cli("put", str(_carry(packed, call, 1)), str(stage), "99")
    assert r.returncode == 1 and "does not exist" in r.stderr
    assert _cli("put", str(call), str(stage), "1").returncode == 0
    r = _cli("put", str(call), str(stage), "1")  # again: already there, still fine
    assert r.returncode == 0 and "already staged" in r.stdout


def test_a_part_corrupted_after_staging_fails_the_unpacking(packed: Path, tmp_path: Path) -> None:
    m = json.loads((packed / bundle.MANIFEST).read_text())
    stage, call = tmp_path / "stage", tmp_path / "call"
    for i in range(len(m["parts"])):
        assert _cli("put", str(_carry(packed, call, i)), str(stage), str(i)).returncode == 0
    i = bundle.group_parts(m, "target")[-1]
    p = stage / bundle.part_name(i)
    data = bytearray(p.read_bytes())
    data[10] ^= 0xFF
    p.write_bytes(bytes(data))
    r = _cli("extract", str(stage), "target", str(tmp_path / "out"))
    assert r.returncode == 1 and "sha256" in r.stderr and not (tmp_path / "out" / "target" / "m.gguf").exists()


def test_a_new_bundle_keeps_the_staged_parts_it_shares(packed: Path, tmp_path: Path) -> None:
    stage, call = tmp_path / "stage", tmp_path / "call"
    for i in (0, 1):
        assert _cli("put", str(_carry(packed, call, i)), str(stage), str(i)).returncode == 0
    man = json.loads((packed / bundle.MANIFEST).read_text())
    man["parts"][0]["sha256"] = "0" * 64  # part 0 changed, part 1 not
    man["content_key"] = "another"
    (packed / bundle.MANIFEST).write_text(json.dumps(man))
    r = _cli("put", str(_carry(packed, call, 2)), str(stage), "2")
    assert r.returncode == 0 and "kept 1 staged part(s) it shares, dropped 1" in r.stdout
    assert not (stage / "bundle.part00").exists() and (stage / "bundle.part01").exists()


def test_closure_and_needs_judge_against_the_hosts_packages(tmp_path: Path) -> None:
    d = tmp_path / "w"
    _wheel(d, "alpha", "1.0", ("beta>=2", "numpy>=1.20", 'gamma; python_version < "3.0"'))
    host = tmp_path / "host.txt"
    host.write_text("# comment\nnumpy==2.5.2\n")
    assert any("beta" in p for p in wheels.closure(d, wheels.read_host(host)))
    host.write_text("numpy==1.19\nbeta\n")
    problems = wheels.closure(d, wheels.read_host(host))
    assert problems == ["alpha-1.0-py3-none-any.whl needs numpy>=1.20 but the host has numpy 1.19"]
    _wheel(d, "numpy", "2.0")
    assert wheels.closure(d, wheels.read_host(host)) == []
    # what cosine needs beyond the real host's list: the packages the bundle must bring
    real = wheels.read_host(ROOT / "tools" / "gpu" / "host-packages.txt")
    need = wheels.needs(ROOT / "pyproject.toml", real, ["export"],
                        {"torch", "onnxruntime", "starlette", "uvicorn", "httptools"})  # the gateway runs no GPU step
    assert sorted(n.split(">")[0].split("=")[0] for n in need) == ["gguf", "pykka", "pyzmq"]
