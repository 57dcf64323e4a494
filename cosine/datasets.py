"""`cosine datasets build`: domain text corpora and benchmark prompts from Debian packages.

For each domain the sources' documents (files; KJV books; set.mm sections) are split
deterministically BY DOCUMENT (sha256 of "source:path") into train (80 %), bench (10 %)
and heldout (10 %), so benchmark prompts never come from a document the drafters were
trained on. Outputs in OUT:

    train/DOMAIN.txt   drafter training text (documents separated by a blank line)
    prompts.json       {"domain": [prompt, ...]}   from bench documents
    heldout.json       {"domain": [prompt, ...]}   from heldout documents
    manifest.json      sources, package versions and licences, counts

A prompt is a window of exactly ``prompt_tokens`` target-tokenizer tokens cut from a
document, decoded to text; windows whose text does not re-encode to the same length,
that contain a broken character, or that occur verbatim in the domain's train text are
skipped. Sources and licences: docs/datasets.md.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import html
import json
import logging
import re
import struct
import subprocess
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

log = logging.getLogger("cosine.datasets")

DOMAINS = ("code", "docs", "prose", "german", "math")
SPLITS = ("train", "bench", "heldout")
MAX_DOC_BYTES = 1 << 20  # skip generated giants (tables, test vectors)


@dataclass(frozen=True)
class Source:
    name: str                         # unique label, part of every document id
    root: Path
    patterns: tuple[str, ...]         # globs under root (Path.glob syntax)
    kind: str = "text"                # text | man | html | kjv | mm: how to extract text
    packages: tuple[str, ...] = field(default_factory=tuple)


SOURCES: dict[str, list[Source]] = {
    "code": [
        Source("go", Path("/usr/share/go-1.19/src"), ("**/*.go",), packages=("golang-1.19-src",)),
        Source("rust", Path("/usr/src/rustc-1.63.0/library"), ("**/*.rs",), packages=("rust-src",)),
        Source("python", Path("/usr/lib/python3.11"), ("**/*.py",), packages=("libpython3.11-minimal", "libpython3.11-stdlib")),
    ],
    "docs": [
        Source("python-doc", Path("/usr/share/doc/python3.11/html/_sources"), ("**/*.rst.txt",),
               packages=("python3.11-doc",)),
        Source("manpages", Path("/usr/share/man"), ("man[1-8]/*.gz",), "man", packages=("manpages",)),
    ],
    "prose": [
        Source("kjv", Path("/usr/share/sword/modules/texts/ztext/engKJV2006eb"), ("*.bzz",), "kjv",
               packages=("sword-text-kjv",)),
    ],
    "german": [
        Source("manpages-de", Path("/usr/share/man/de"), ("man[1-8]/*.gz",), "man", packages=("manpages-de",)),
        Source("debian-handbook-de", Path("/usr/share/doc/debian-handbook/html/de-DE"), ("*.html",), "html",
               packages=("debian-handbook",)),
    ],
    "math": [
        Source("set.mm", Path("/usr/share/metamath/databases"), ("set.mm",), "mm", packages=("metamath-databases",)),
    ],
}


# ----- the split ------------------------------------------------------------------------

def split_of(doc_id: str, train: float = 0.8, bench: float = 0.1) -> str:
    """Deterministic split of one document from the hash of its id (never the content)."""
    u = int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:8], "big") / 2.0**64
    return "train" if u < train else "bench" if u < train + bench else "heldout"


# ----- text extraction ------------------------------------------------------------------

_ROFF_FONT = re.compile(r"\\f(\[[^\]]*\]|\(..|.)")
_ROFF_SPECIAL = {r"\(em": "—", r"\(en": "–", r"\(aq": "'", r"\(dq": '"', r"\(lq": '"', r"\(rq": '"',
                 r"\(bu": "•", r"\(co": "©", r"\(oq": "'", r"\(cq": "'", r"\(mu": "×", r"\(ha": "^",
                 r"\(ti": "~", r"\(rs": "\\", r"\(:a": "ä", r"\(:o": "ö", r"\(:u": "ü", r"\(:A": "Ä",
                 r"\(:O": "Ö", r"\(:U": "Ü", r"\(ss": "ß"}


def strip_roff(src: str) -> str:
    """Crude man(7) to text: keep macro arguments of headings and font macros, drop the
    other requests and comments, resolve common escapes."""
    out = []
    for line in src.splitlines():
        if line.startswith(('.\\"', "'\\\"", '.\\"')) or line.startswith('\\"'):
            continue
        if line.startswith((".", "'")):
            m = re.match(r"[.'](\S+)\s*(.*)", line)
            if not m:
                continue
            macro, args = m.groups()
            if macro in ("SH", "SS"):
                out.append("")
                out.append(args.strip('"'))
            elif macro in ("B", "I", "SM", "SB"):
                out.append(args.replace('"', ""))
            elif macro in ("BR", "BI", "IB", "IR", "RB", "RI"):
                out.append("".join(a or b for a, b in re.findall(r'"([^"]*)"|(\S+)', args)))
            elif macro in ("PP", "LP", "P", "TP", "IP", "sp", "br"):
                out.append("")
                if macro == "IP" and args:
                    out.append(args.split('"')[1] if args.startswith('"') else args.split()[0])
            continue
        out.append(line)
    text = "\n".join(out)
    for k, v in _ROFF_SPECIAL.items():
        text = text.replace(k, v)
    text = _ROFF_FONT.sub("", text)
    text = text.replace(r"\-", "-").replace(r"\&", "").replace(r"\e", "\\").replace(r"\ ", " ")
    text = re.sub(r"\\\(..|\\\*\(..|\\\*.|\\[a-zA-Z|^%/,]", "", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def strip_html(src: str) -> str:
    src = re.sub(r"(?is)<(script|style|head)\b.*?</\1>", "", src)
    src = re.sub(r"(?i)<br\s*/?>|</(p|div|h[1-6]|li|pre|tr|dt|dd)>", "\n", src)
    text = html.unescape(re.sub(r"<[^>]+>", "", src))
    text = re.sub(r"[ \t]+", " ", text)
    return re.sub(r"\n\s*\n+", "\n\n", text).strip() + "\n"


def kjv_books(bzz: Path) -> Iterator[tuple[str, str]]:
    """Sword zText: the .bzs index holds (offset, size, uncompressed size) uint32 triples of
    zlib blocks in the .bzz file; this module stores one book per block (OSIS markup)."""
    index = bzz.with_suffix(".bzs").read_bytes()
    data = bzz.read_bytes()
    for i in range(len(index) // 12):
        off, size, _ = struct.unpack_from("<III", index, 12 * i)
        if size == 0:
            continue
        osis = zlib.decompress(data[off:off + size]).decode("utf-8", "replace")
        osis = re.sub(r"(?s)<note\b.*?</note>", "", osis)
        osis = re.sub(r"<chapter\b[^>]*sID[^>]*>", "\n\n", osis)
        osis = re.sub(r"<title\b[^>]*>(.*?)</title>", r"\n\1\n", osis)
        text = re.sub(r"<[^>]+>", "", osis)
        text = re.sub(r"[ \t]+", " ", html.unescape(text))
        text = re.sub(r" *\n *", "\n", text).strip()
        if text:
            yield f"{bzz.stem}/{i:03d}", text + "\n"


def mm_sections(path: Path, target: int = 32 * 1024) -> Iterator[tuple[str, str]]:
    """set.mm is one 40 MB file: cut it at comment openings ("$(" lines) into ~32 kB
    sections so the split has documents to work with."""
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)
    buf: list[str] = []
    size, n = 0, 0
    for line in lines:
        if size >= target and line.lstrip().startswith("$("):
            yield f"{path.name}/{n:05d}", "".join(buf)
            buf, size, n = [], 0, n + 1
        buf.append(line)
        size += len(line)
    if buf:
        yield f"{path.name}/{n:05d}", "".join(buf)


def documents(src: Source) -> Iterator[tuple[str, Path, str | None]]:
    """(doc id, file, text or None = read the file later) in id-hash order, so a size cap
    keeps a uniform sample rather than the alphabetically first directories."""
    files = sorted({p for pat in src.patterns for p in src.root.glob(pat) if p.is_file()})
    if src.kind in ("kjv", "mm"):
        docs = [(f"{src.name}:{i}", f, t) for f in files
                for i, t in (kjv_books(f) if src.kind == "kjv" else mm_sections(f))]
    else:
        docs = [(f"{src.name}:{f.relative_to(src.root)}", f, None) for f in files]
    docs.sort(key=lambda d: hashlib.sha256(d[0].encode()).digest())
    yield from docs


def read_doc(src: Source, path: Path) -> str:
    if src.kind == "man":
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        return strip_roff(raw.decode("utf-8", "replace"))
    text = path.read_text(encoding="utf-8", errors="replace")
    return strip_html(text) if src.kind == "html" else text


# ----- packages ---------------------------------------------------------------------------

def package_info(pkg: str) -> dict | None:
    """Installed version and licence line (first "License:" of the copyright file, else its
    first line), or None when not installed."""
    r = subprocess.run(["dpkg-query", "-W", "-f=${Status}\t${Version}", pkg], capture_output=True, text=True)
    if r.returncode != 0 or "install ok installed" not in r.stdout:
        return None
    info = {"version": r.stdout.split("\t")[1].strip(), "license": None}
    cp = Path("/usr/share/doc") / pkg / "copyright"
    if cp.is_file():
        lines = [ln.strip() for ln in cp.read_text(errors="replace").splitlines() if ln.strip()]
        lic = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("License:")), None)
        info["license"] = lic or (lines[0] if lines else None)
    return info


def ensure_packages(pkgs: list[str], install: bool) -> dict[str, dict | None]:
    missing = [p for p in pkgs if package_info(p) is None]
    if missing and install:
        log.info("installing Debian packages: %s (apt-get install --no-install-recommends)", " ".join(missing))
        cmd = ["apt-get", "install", "-y", "--no-install-recommends", *missing]
        r = subprocess.run(cmd, capture_output=True, text=True, env={"DEBIAN_FRONTEND": "noninteractive",
                                                                      "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
        if r.returncode != 0:
            log.warning("apt-get install failed (%s); trying apt-get update first", r.stderr.strip()[-200:])
            subprocess.run(["apt-get", "update"], capture_output=True)
            subprocess.run(cmd, capture_output=True)
    elif missing:
        log.warning("not installed (install=False): %s; their sources are skipped", " ".join(missing))
    return {p: package_info(p) for p in pkgs}


# ----- tokenizer and prompts --------------------------------------------------------------

def load_tokenizer(tokenizer):
    """A tokenizers.Tokenizer, a tokenizer.json path, or an engine directory holding one."""
    from tokenizers import Tokenizer

    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    p = Path(tokenizer)
    return Tokenizer.from_file(str(p / "tokenizer.json" if p.is_dir() else p))


def cut_prompts(texts: list[str], tok, n: int, prompt_tokens: int, rng: np.random.Generator,
                forbidden: str = "", tries_per_doc: int = 4) -> list[str]:
    """n windows of exactly ``prompt_tokens`` tokens from ``texts``, one document at a time
    round-robin (documents in the given order), each re-encoding to the same length and
    absent from ``forbidden`` (the train text)."""
    out: list[str] = []
    encs = [np.asarray(e.ids) for e in tok.encode_batch(texts, add_special_tokens=False)] if texts else []
    pool = [i for i, ids in enumerate(encs) if ids.size >= prompt_tokens]
    rounds, max_rounds = 0, tries_per_doc * (1 + n // max(len(pool), 1))  # few documents: more windows each
    while len(out) < n and pool and rounds < max_rounds:
        for i in pool:
            if len(out) >= n:
                break
            ids = encs[i]
            start = int(rng.integers(0, ids.size - prompt_tokens + 1))
            text = tok.decode(ids[start:start + prompt_tokens].tolist(), skip_special_tokens=False)
            if ("\ufffd" in text or len(tok.encode(text, add_special_tokens=False).ids) != prompt_tokens
                    or text in forbidden or text in out):
                continue
            out.append(text)
        rounds += 1
    return out


# ----- build ------------------------------------------------------------------------------

def build(out_dir: str | Path, tokenizer, domains: tuple[str, ...] = DOMAINS, prompt_tokens: int = 128,
          n_prompts: int = 16, n_heldout: int = 16, install: bool = True, max_mb: float = 20.0,
          sources: dict[str, list[Source]] | None = None, seed: int = 0) -> dict:
    """Build the dataset (see the module doc). ``sources`` replaces the Debian sources
    (tests point it at temporary files); ``max_mb`` caps each domain's text."""
    t0 = time.time()
    out = Path(out_dir)
    (out / "train").mkdir(parents=True, exist_ok=True)
    sources = SOURCES if sources is None else sources
    unknown = [d for d in domains if d not in sources]
    if unknown:
        raise ValueError(f"unknown domains {unknown}; known: {sorted(sources)}")
    tok = load_tokenizer(tokenizer)
    pkgs = sorted({p for d in domains for s in sources[d] for p in s.packages})
    pkg_info = ensure_packages(pkgs, install) if pkgs else {}
    prompts: dict[str, list[str]] = {}
    heldout: dict[str, list[str]] = {}
    manifest_domains = {}
    for d in domains:
        live = [s for s in sources[d] if all(pkg_info.get(p) for p in s.packages) and s.root.exists()]
        for s in sources[d]:
            if s not in live:
                log.warning("%s: source %s unavailable (packages %s, root %s); skipped", d, s.name,
                            ",".join(s.packages) or "-", s.root)
        cap = int(max_mb * 2**20 / max(len(live), 1))  # bytes per source and split budget share
        texts: dict[str, list[str]] = {k: [] for k in SPLITS}
        src_rows = []
        for s in live:
            used = {k: 0 for k in SPLITS}
            counts = {k: 0 for k in SPLITS}
            for doc_id, path, text in documents(s):
                sp = split_of(doc_id)
                limit = cap * (0.8 if sp == "train" else 0.1)
                if used[sp] >= limit:
                    if all(used[k] >= cap * (0.8 if k == "train" else 0.1) for k in SPLITS):
                        break
                    continue
                if text is None:
                    if path.stat().st_size > MAX_DOC_BYTES:
                        continue
                    text = read_doc(s, path)
                if not text.strip():
                    continue
                texts[sp].append(text)
                used[sp] += len(text.encode())
                counts[sp] += 1
            src_rows.append({"name": s.name, "root": str(s.root), "patterns": list(s.patterns), "kind": s.kind,
                             "packages": {p: pkg_info.get(p) for p in s.packages},
                             "documents": counts, "bytes": used})
            log.info("%s/%s: documents %s, bytes %s", d, s.name, counts, used)
        train_text = "\n\n".join(texts["train"])
        (out / "train" / f"{d}.txt").write_text(train_text + "\n", encoding="utf-8")
        # One generator per domain, from the seed and the domain's name: a domain's prompts
        # must not depend on which domains were built before it (one shared generator gave
        # other prose and German prompts when the domain list changed).
        rng = np.random.default_rng([seed, int.from_bytes(hashlib.sha256(d.encode()).digest()[:4], "big")])
        prompts[d] = cut_prompts(texts["bench"], tok, n_prompts, prompt_tokens, rng, train_text)
        heldout[d] = cut_prompts(texts["heldout"], tok, n_heldout, prompt_tokens, rng, train_text)
        if len(prompts[d]) < n_prompts or len(heldout[d]) < n_heldout:
            log.warning("%s: only %d/%d bench and %d/%d heldout prompts", d, len(prompts[d]), n_prompts,
                        len(heldout[d]), n_heldout)
        manifest_domains[d] = {"sources": src_rows, "train_bytes": len(train_text.encode()),
                               "train_documents": len(texts["train"]),
                               "prompts": len(prompts[d]), "heldout": len(heldout[d])}
    (out / "prompts.json").write_text(json.dumps(prompts, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / "heldout.json").write_text(json.dumps(heldout, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    manifest = {"format": "cosine-datasets", "format_version": 1, "prompt_tokens": prompt_tokens,
                "split": {"train": 0.8, "bench": 0.1, "heldout": 0.1, "by": "sha256(source:document id)"},
                "max_mb_per_domain": max_mb, "seed": seed, "domains": manifest_domains,
                "build_s": round(time.time() - t0, 1), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return manifest


def main(argv: list[str] | None = None) -> int:
    """`cosine datasets build ...` (a leading "build" is accepted and skipped)."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["build"]:
        argv = argv[1:]
    p = argparse.ArgumentParser(prog="cosine datasets build",
                                description="domain corpora + benchmark prompts from Debian packages")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tokenizer", required=True, help="the target's engine directory or tokenizer.json")
    p.add_argument("--domains", nargs="+", default=list(DOMAINS), choices=list(SOURCES))
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--n-prompts", type=int, default=16)
    p.add_argument("--n-heldout", type=int, default=16)
    p.add_argument("--max-mb", type=float, default=20.0, help="text cap per domain")
    p.add_argument("--no-install", action="store_true", help="never apt-get install missing packages")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    m = build(a.out, a.tokenizer, tuple(a.domains), a.prompt_tokens, a.n_prompts, a.n_heldout,
              not a.no_install, a.max_mb, seed=a.seed)
    for d, row in m["domains"].items():
        print(f"{d}: train {row['train_bytes'] / 2**20:.1f} MB, {row['prompts']} prompts, {row['heldout']} heldout")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
