"""A normal wheel installs every module under the one `cosine` namespace, and no generic
top-level names (`control`, `workers`, `export`) that would collide with PyPI packages."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAPPING = {"cosine": "cosine", "control": "cosine/control", "workers": "cosine/workers", "export": "cosine/export"}


def test_wheel_contains_every_module_under_cosine(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                        "-w", str(tmp_path), str(REPO)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    (whl,) = tmp_path.glob("cosine-*.whl")
    names = set(zipfile.ZipFile(whl).namelist())
    tops = {n.split("/")[0] for n in names}
    assert tops <= {"cosine", f"{whl.name.split('-')[0]}-{whl.name.split('-')[1]}.dist-info"}, tops
    for folder, pkg in MAPPING.items():
        for py in (REPO / folder).rglob("*.py"):
            rel = py.relative_to(REPO / folder)
            assert f"{pkg}/{rel.as_posix()}" in names, f"{py} is missing from the wheel"
