#!/usr/bin/env python3
"""What the bundle must bring: cosine's requirements the GPU host does not meet, and a check
that the bundled wheels' own requirements are met by the bundle plus the host
(tools/gpu/stage.sh; the host's packages are listed in tools/gpu/host-packages.txt).

    wheels.py needs PYPROJECT --host FILE [--extras a,b] [--skip a,b]
    wheels.py closure DIR --host FILE
"""

from __future__ import annotations

import re
import sys
import zipfile
from email.parser import Parser
from pathlib import Path


class WheelError(Exception):
    pass


def _packaging():
    try:
        from packaging.requirements import Requirement
        from packaging.utils import canonicalize_name
        from packaging.version import Version
    except ImportError:  # pip vendors it
        from pip._vendor.packaging.requirements import Requirement  # type: ignore
        from pip._vendor.packaging.utils import canonicalize_name  # type: ignore
        from pip._vendor.packaging.version import Version  # type: ignore
    return Requirement, canonicalize_name, Version


ENV_312 = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
           "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
           "implementation_name": "cpython", "platform_python_implementation": "CPython",
           "platform_release": "", "platform_version": "", "implementation_version": "3.12.3", "extra": ""}


def requirements(whl: Path) -> list:
    Requirement, _, _ = _packaging()
    with zipfile.ZipFile(whl) as z:
        meta = next((n for n in z.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n)), None)
        if meta is None:
            raise WheelError(f"{whl.name} has no .dist-info/METADATA")
        msg = Parser().parsestr(z.read(meta).decode("utf-8", "replace"))
    reqs = [Requirement(line) for line in msg.get_all("Requires-Dist") or []]
    return [r for r in reqs if r.marker is None or r.marker.evaluate(ENV_312)]


def read_host(path: Path) -> dict[str, str | None]:
    """The host's packages: NAME or NAME==VERSION per line, # comments."""
    _, canonicalize_name, _ = _packaging()
    out: dict[str, str | None] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            out[canonicalize_name(name)] = version or None
    return out


def closure(directory: Path, host: dict[str, str | None]) -> list[str]:
    """Problems: a requirement of a bundled wheel that neither the bundle nor the host meets."""
    _, canonicalize_name, Version = _packaging()
    have: dict[str, tuple[str, str]] = {}
    problems = []
    for w in sorted(directory.glob("*.whl")):
        name, version = canonicalize_name(w.name.split("-")[0]), w.name.split("-")[1]
        if name in have:
            problems.append(f"two versions of {name}: {have[name][1]} and {w.name} (keep one)")
        have[name] = (version, w.name)
    for w in sorted(directory.glob("*.whl")):
        for r in requirements(w):
            dep = canonicalize_name(r.name)
            version = have[dep][0] if dep in have else host.get(dep) if dep in host else "missing"
            if version == "missing":
                problems.append(f"{w.name} needs {r}, which neither the bundle nor the host has")
            elif version and r.specifier and not r.specifier.contains(Version(version), prereleases=True):
                where = "bundle" if dep in have else "host"
                problems.append(f"{w.name} needs {r} but the {where} has {dep} {version}")
    return problems


def needs(pyproject: Path, host: dict[str, str | None], extras: list[str], skip: set[str]) -> list[str]:
    """cosine's requirements (its dependencies and ``extras``) that the host's packages do not
    meet, as pip requirement strings: what the bundle must bring."""
    import tomllib

    Requirement, canonicalize_name, Version = _packaging()
    proj = tomllib.loads(pyproject.read_text())["project"]
    lines = list(proj["dependencies"]) + [r for e in extras for r in proj["optional-dependencies"][e]]
    out = []
    for r in map(Requirement, lines):
        name = canonicalize_name(r.name)
        if name in skip or (r.marker is not None and not r.marker.evaluate(ENV_312)):
            continue
        have = host.get(name, "missing") if name in host else "missing"
        if have == "missing" or (have and r.specifier and not r.specifier.contains(Version(have), prereleases=True)):
            out.append(str(r))
    return out


def main(argv: list[str]) -> int:
    cmd, args = (argv[0], argv[1:]) if argv else ("", [])
    opts = {args[i][2:]: args[i + 1] for i in range(len(args) - 1) if args[i].startswith("--")}
    pos = [a for i, a in enumerate(args) if not a.startswith("--") and not (i and args[i - 1].startswith("--"))]
    if cmd == "needs" and len(pos) == 1 and "host" in opts:
        extras = [e for e in opts.get("extras", "").split(",") if e]
        skip = {e for e in opts.get("skip", "").split(",") if e}
        print("\n".join(needs(Path(pos[0]), read_host(Path(opts["host"])), extras, skip)))
        return 0
    if cmd == "closure" and len(pos) == 1 and "host" in opts:
        problems = closure(Path(pos[0]), read_host(Path(opts["host"])))
        for p in problems:
            print(f"  - {p}", file=sys.stderr)
        return 1 if problems else 0
    print(__doc__.strip(), file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
