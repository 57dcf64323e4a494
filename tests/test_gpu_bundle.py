"""tools/airgap (docs/gpu.md): pack a tiny fake bundle into parts, carry them one call at a
time into a fake host checkout with `remote.sh put N`, and check `install --dry-run`,
including the clear reports of missing, truncated and corrupted parts. No network, no
GPU, no pip install; a few seconds."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import random
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
AIRGAP = ROOT / "tools" / "airgap"
PART = 8192

pytestmark = pytest.mark.skipif(sys.platform != "linux" or not all(shutil.which(t) for t in ("bash", "sha256sum", "tar")),
                                reason="tools/airgap targets a Linux host (bash, coreutils, tar)")


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _wheel(d: Path, name: str, version: str, requires: tuple[str, ...] = (), pad: int = 6000) -> Path:
    whl = d / f"{name}-{version}-py3-none-any.whl"
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(whl, "w", zipfile.ZIP_STORED) as z:
        z.writestr(f"{name}-{version}.dist-info/METADATA", meta)
        z.writestr(f"{name}/data.bin", random.Random(name).randbytes(pad))  # spans several parts
    return whl


def _bundle_module():
    spec = importlib.util.spec_from_file_location("airgap_bundle", AIRGAP / "bundle.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


BUNDLE = _bundle_module()


def _pack(src: Path, dev: Path) -> int:
    return BUNDLE.pack(src, dev / "bundle.part", dev / "bundle.sha256", PART, "3.12")


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    """A fake bundle in tmp/dev: two dependency wheels, one GGUF, one cosine wheel."""
    src = tmp_path / "src"
    for sub in ("wheels", "models", "cosine"):
        (src / sub).mkdir(parents=True)
    _wheel(src / "wheels", "alpha", "1.0", ("beta>=2",))
    _wheel(src / "wheels", "beta", "2.1")
    gguf = src / "models" / "m.gguf"
    gguf.write_bytes(b"GGUF" + random.Random(0).randbytes(20000))
    (src / "models" / "m.gguf.sha256").write_text(_sha(gguf) + "\n")
    _wheel(src / "cosine", "cosine", "0.1.0", pad=500)
    dev = tmp_path / "dev"
    dev.mkdir()
    assert _pack(src, dev) == 0
    return dev


def _meta(dev: Path) -> dict[str, str]:
    return {k: v for k, v in (ln[2:].split("=", 1) for ln in (dev / "bundle.sha256").read_text().splitlines()
                              if ln.startswith("# ") and "=" in ln)}


class Host:
    """A fake GPU-host checkout: tools/airgap copied in, its own stage/site paths."""

    def __init__(self, root: Path, dev: Path) -> None:
        self.repo, self.dev = root / "host", dev
        (self.repo / "tools" / "airgap").mkdir(parents=True)
        (self.repo / ".device").mkdir()
        for f in ("remote.sh", "bundle.py"):
            shutil.copy(AIRGAP / f, self.repo / "tools" / "airgap" / f)
        self.stage = root / "stage"
        self.env = {**os.environ, "PYTHON": sys.executable, "COSINE_STAGE": str(self.stage),
                    "COSINE_SITE": str(root / "site"), "COSINE_ENV": str(root / "env.sh"),
                    "COSINE_HOST_MODELS": str(root / "models"), "COSINE_SRC": str(root / "src"),
                    "OUT": str(root / "out")}

    def carry(self, *parts: int, manifest: bool = True) -> None:
        """What one device call brings: the named parts (and the manifest), nothing else."""
        for old in (self.repo / ".device").glob("bundle.*"):
            old.unlink()
        for i in parts:
            shutil.copy(self.dev / f"bundle.part{i:02d}", self.repo / ".device")
        if manifest:
            shutil.copy(self.dev / "bundle.sha256", self.repo / ".device")

    def run(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(self.repo / "tools" / "airgap" / "remote.sh"), *args], cwd=self.repo,
                              env=self.env, capture_output=True, text=True, timeout=60)

    def put_all(self, n: int, skip: tuple[int, ...] = ()) -> None:
        """One `put` call per part, each carrying only its part (slow-ish: one bash run per part)."""
        for i in range(n):
            if i in skip:
                continue
            self.carry(i)
            r = self.run("put", str(i))
            assert r.returncode == 0, r.stderr

    def staged(self, n: int, skip: tuple[int, ...] = ()) -> None:
        """What the put calls leave behind, placed directly (put itself is tested above)."""
        self.stage.mkdir(parents=True, exist_ok=True)
        shutil.copy(self.dev / "bundle.sha256", self.stage)
        for i in range(n):
            if i not in skip:
                shutil.copy(self.dev / f"bundle.part{i:02d}", self.stage)


def test_pack_writes_parts_and_manifest(bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    meta = _meta(bundle)
    parts = sorted(bundle.glob("bundle.part[0-9][0-9]"))
    total = sum(p.stat().st_size for p in parts)
    assert len(parts) == int(meta["parts"]) >= 4 and total == int(meta["total_bytes"])
    assert all(p.stat().st_size == PART for p in parts[:-1]) and 0 < parts[-1].stat().st_size <= PART
    sums = dict(reversed(ln.split()) for ln in (bundle / "bundle.sha256").read_text().splitlines() if ln[:1] != "#")
    assert all(sums[p.name] == _sha(p) for p in parts)
    assert sums["bundle.tar"] == hashlib.sha256(b"".join(p.read_bytes() for p in parts)).hexdigest()
    assert 1 <= int(meta["deps_parts"]) < len(parts)
    # the same content again: nothing is rewritten
    capsys.readouterr()
    assert _pack(tmp_path / "src", bundle) == 0 and "bundle unchanged" in capsys.readouterr().out


def test_new_cosine_wheel_changes_only_the_tail(bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    before = {p.name: _sha(p) for p in bundle.glob("bundle.part[0-9][0-9]")}
    src = tmp_path / "src"
    (src / "cosine" / "cosine-0.1.0-py3-none-any.whl").unlink()
    _wheel(src / "cosine", "cosine", "0.1.0", pad=900)  # a code change: another wheel, another size
    capsys.readouterr()
    assert _pack(src, bundle) == 0
    assert "parts that differ from the previous bundle" in capsys.readouterr().out
    after = {p.name: _sha(p) for p in bundle.glob("bundle.part[0-9][0-9]")}
    changed = sorted(n for n in after if before.get(n) != after[n])
    first = min(int(n[-2:]) for n in changed)
    assert changed == [f"bundle.part{i:02d}" for i in range(first, len(after))]  # a tail only
    assert first >= int(_meta(bundle)["deps_parts"]) and first > 0


def test_put_each_part_then_install_dry_run(bundle: Path, tmp_path: Path) -> None:
    host, n = Host(tmp_path, bundle), int(_meta(bundle)["parts"])
    host.carry(0)
    r = host.run("put", "0")
    assert r.returncode == 0 and f"staged 1 of {n} parts" in r.stderr
    host.put_all(n)
    r = host.run("put", str(n - 1))  # already there: skipped, still fine
    assert r.returncode == 0 and "already staged" in r.stderr and "all parts are here" in r.stderr
    r = host.run("install", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "sizes and sha256 ok" in r.stderr and "match the bundle sha256" in r.stderr
    for member in ("wheels/alpha-1.0-py3-none-any.whl", "models/m.gguf", "cosine/cosine-0.1.0-py3-none-any.whl"):
        assert member in r.stderr
    assert not (tmp_path / "site").exists()  # a dry run installs nothing
    st = host.run("status")
    assert st.returncode == 0 and f"{n} of {n}" in st.stderr


def test_missing_part_is_named_with_the_call_that_fixes_it(bundle: Path, tmp_path: Path) -> None:
    host, n = Host(tmp_path, bundle), int(_meta(bundle)["parts"])
    host.staged(n, skip=(1,))
    r = host.run("install", "--dry-run")
    assert r.returncode == 1
    assert "ERROR: 1 of the" in r.stderr and "missing" in r.stderr
    assert "put 1" in r.stderr and ".device/bundle.part01" in r.stderr
    # the dependency wheels sit in the first deps_parts parts only: deps-only still needs part 1 here
    deps = int(_meta(bundle)["deps_parts"])
    r = host.run("install", "--deps-only", "--dry-run")
    assert (r.returncode == 0) == (deps <= 1)


def test_corrupted_staged_part_is_reported_and_dropped(bundle: Path, tmp_path: Path) -> None:
    host, n = Host(tmp_path, bundle), int(_meta(bundle)["parts"])
    host.staged(n)
    p = host.stage / "bundle.part02"
    data = bytearray(p.read_bytes())
    data[100] ^= 0xFF
    p.write_bytes(bytes(data))
    r = host.run("install", "--dry-run")
    assert r.returncode == 1 and "corrupted part(s) 2" in r.stderr and "put" in r.stderr
    assert not p.exists()  # removed, so the next put of part 2 stages it again
    host.carry(2)
    assert host.run("put", "2").returncode == 0
    assert host.run("install", "--dry-run").returncode == 0


def test_put_rejects_bad_transfers_clearly(bundle: Path, tmp_path: Path) -> None:
    host = Host(tmp_path, bundle)
    host.carry(3, manifest=False)
    r = host.run("put", "3")
    assert r.returncode == 1 and "no bundle manifest" in r.stderr
    host.carry()
    r = host.run("put", "3")
    assert r.returncode == 1 and "was not carried" in r.stderr and '".device/bundle.part03"' in r.stderr
    host.carry(3)
    carried = host.repo / ".device" / "bundle.part03"
    carried.write_bytes(carried.read_bytes()[:100])
    r = host.run("put", "3")
    assert r.returncode == 1 and "has 100 bytes, expected" in r.stderr
    host.carry(3)
    data = bytearray(carried.read_bytes())
    data[0] ^= 0xFF
    carried.write_bytes(bytes(data))
    r = host.run("put", "3")
    assert r.returncode == 1 and "is corrupted" in r.stderr and not (host.stage / "bundle.part03").exists()
    r = host.run("put", "99")
    assert r.returncode == 1 and "does not exist" in r.stderr


def test_new_manifest_keeps_shared_parts_and_drops_the_rest(bundle: Path, tmp_path: Path) -> None:
    host = Host(tmp_path, bundle)
    for i in (0, 1):
        host.carry(i)
        assert host.run("put", str(i)).returncode == 0
    man = bundle / "bundle.sha256"
    old0 = next(ln for ln in man.read_text().splitlines() if ln.endswith("  bundle.part00"))
    man.write_text(man.read_text().replace(old0, "0" * 64 + "  bundle.part00"))  # part 0 changed, part 1 not
    host.carry(2)
    r = host.run("put", "2")
    assert r.returncode == 0 and "kept 1 staged part(s) it shares, dropped 1" in r.stderr
    assert not (host.stage / "bundle.part00").exists() and (host.stage / "bundle.part01").exists()


def test_wheels_come_out_of_the_leading_parts(bundle: Path, tmp_path: Path) -> None:
    deps = int(_meta(bundle)["deps_parts"])
    out = tmp_path / "wheels"
    assert BUNDLE.extract_wheels(out, [bundle / f"bundle.part{i:02d}" for i in range(deps)]) == 0
    got = sorted(p.name for p in out.iterdir())
    assert got == ["alpha-1.0-py3-none-any.whl", "beta-2.1-py3-none-any.whl"]
    assert _sha(out / got[0]) == _sha(tmp_path / "src" / "wheels" / got[0])
    if deps > 1:  # one part short: the cut-off wheel is an error, not a silent partial file
        with pytest.raises(SystemExit, match="stage more parts"):
            BUNDLE.extract_wheels(tmp_path / "w2", [bundle / "bundle.part00"])


def test_closure_finds_missing_and_conflicting_wheels(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    d = tmp_path / "w"
    d.mkdir()
    _wheel(d, "alpha", "1.0", ("beta>=2", "torch>=2", 'gamma; python_version < "3.0"'), pad=10)

    def check(*ignore: str) -> tuple[int, str]:
        rc = BUNDLE.closure(d, set(ignore))
        return rc, capsys.readouterr().err

    rc, err = check("torch")
    assert rc == 1 and "no beta wheel" in err and "gamma" not in err
    _wheel(d, "beta", "1.5", pad=10)
    rc, err = check("torch")
    assert rc == 1 and "the bundle has beta 1.5" in err
    (d / "beta-1.5-py3-none-any.whl").unlink()
    _wheel(d, "beta", "2.0", pad=10)
    assert check("torch")[0] == 0
    rc, err = check()
    assert rc == 1 and "no torch wheel" in err
