#!/usr/bin/env bash
# Build the bundle that carries the GPU measurement's inputs to the host (docs/gpu.md).
# Run HERE, where PyPI is reachable, in the checkout whose working tree the device calls
# carry (the session's own checkout), after `make install` (and `make demo` for data/):
#
#     tools/gpu/stage.sh [--data DIR] [--part-bytes N] [--force]
#     tools/gpu/stage.sh --rehearse --out DIR     tiny bundle for the CPU rehearsal
#
# Into .device/ (git-ignored) it writes bundle.part00.. and bundle.json, holding in order:
#   wheels   onnxruntime-gpu and the few packages cosine needs that the host lacks
#            (wheels.py needs: cosine's requirements against tools/gpu/host-packages.txt),
#            versions pinned to the dev venv's; their closure is checked against the host
#   data     data.tar.xz: DIR/train/*.txt (the n-gram drafters' corpora) and DIR/prompts.json
#   target   the target's GGUF (config.toml's target `source`, from the cosine model cache)
#   drafter  the 0.5B drafter's GGUF
# Parts are as large as a call can carry: 64 MiB less the working tree that travels with
# every call (tracked and untracked-not-ignored files), less 1 MiB, at most 60 MB. It ends
# by printing the device calls, in order. Re-running skips what has not changed.
# Environment: VENV (.venv), ORT_GPU_VERSION (1.31.1), STAGE_PYTHON (a python with pip).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
HERE="tools/gpu"
VENV="${VENV:-.venv}"
ORT_GPU_VERSION="${ORT_GPU_VERSION:-1.31.1}"
CALL_BYTES=$((64 * 1024 * 1024))
MAX_PART=60000000
DATA="data"; PART_BYTES=""; FORCE=0; REHEARSE=0; OUTDIR=".device"

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --data) DATA="$2"; shift ;;
    --part-bytes) PART_BYTES="$2"; shift ;;
    --force) FORCE=1 ;;
    --rehearse) REHEARSE=1 ;;
    --out) OUTDIR="$2"; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "stage.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

T0=$SECONDS
say() { printf '[stage %s] %s\n' "$(date +%T)" "$*"; }
die() { printf '[stage %s] ERROR: %s\n' "$(date +%T)" "$*" >&2; exit 1; }
PY="${STAGE_PYTHON:-$VENV/bin/python}"
[[ -x "$PY" ]] || PY=python3
SRC="$OUTDIR/src"

rehearse() {  # tiny stand-ins, small parts: the same pack and the same host steps, in seconds
  rm -rf "$SRC"
  mkdir -p "$SRC"
  "$PY" "$HERE/tiny_inputs.py" "$SRC" || die "tiny_inputs.py failed"
  local total; total="$(du -sb "$SRC" | cut -f1)"
  "$PY" "$HERE/bundle.py" pack "$SRC" "$OUTDIR" --part-bytes "${PART_BYTES:-$((total / 7 + 1))}" \
    || die "packing failed"
}

pinned() {  # REQUIREMENT -> NAME==VERSION of the dev venv (what the test suite runs), else as given
  "$PY" - "$1" <<'EOF'
import importlib.metadata as md, re, sys
name = re.match(r"[A-Za-z0-9_.-]+", sys.argv[1]).group(0)
try:
    print(f"{name}=={md.version(name)}")
except md.PackageNotFoundError:
    print(sys.argv[1])
EOF
}

stage_wheels() {
  local d="$SRC/wheels" reqs=("onnxruntime-gpu==$ORT_GPU_VERSION") r key
  mapfile -t need < <("$PY" "$HERE/wheels.py" needs pyproject.toml --host "$HERE/host-packages.txt" \
                        --extras export --skip torch,onnxruntime,starlette,uvicorn,httptools)
  for r in "${need[@]}"; do reqs+=("$(pinned "$r")"); done
  key="$(printf '%s\n' "${reqs[@]}" | sha256sum | cut -c1-16)"
  if ((FORCE == 0)) && [[ "$(cat "$OUTDIR/wheels.key" 2>/dev/null)" == "$key" ]]; then
    say "wheels unchanged: ${reqs[*]}"
    return
  fi
  say "the host lacks: ${need[*]:-nothing}; downloading ${reqs[*]}"
  rm -rf "$d"; mkdir -p "$d"
  "$PY" -m pip download --disable-pip-version-check -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$d" "${reqs[@]}" \
    2> >(grep -v 'neither a file nor a directory' >&2) || die "pip download failed (see above)"
  "$PY" "$HERE/wheels.py" closure "$d" --host "$HERE/host-packages.txt" \
    || die "the bundled wheels need packages the host lacks (above): add them to the bundle"
  echo "$key" > "$OUTDIR/wheels.key"
  ls -l "$d" | awk 'NR > 1 {printf "  %12d  %s\n", $5, $9}'
}

stage_data() {
  local f
  for f in train/code.txt train/docs.txt train/prose.txt train/german.txt prompts.json; do
    [[ -f "$DATA/$f" ]] || die "$DATA/$f is missing: build the data with 'cosine datasets build --out $DATA' (make demo does)"
  done
  local key; key="$(cd "$DATA" && stat -c '%n %s %Y' train/*.txt prompts.json | sha256sum | cut -c1-16)"
  if ((FORCE == 0)) && [[ "$(cat "$OUTDIR/data.key" 2>/dev/null)" == "$key" && -f "$SRC/data/data.tar.xz" ]]; then
    say "data unchanged"
    return
  fi
  rm -rf "$SRC/data"; mkdir -p "$SRC/data"
  tar -C "$DATA" -cf - train/code.txt train/docs.txt train/prose.txt train/german.txt prompts.json \
    | xz -6 -T2 > "$SRC/data/data.tar.xz"
  echo "$key" > "$OUTDIR/data.key"
  say "data.tar.xz: $(stat -c %s "$SRC/data/data.tar.xz") bytes"
}

stage_models() {  # the target's and the first model drafter's GGUF, from config.toml's sources
  local group name file size sha path
  while read -r group name; do
    read -r file size sha path < <("$PY" -c 'import sys
from cosine import models
a = models.asset(sys.argv[1]); print(a.filename, a.size, a.sha256, models.cached_path(sys.argv[1]) or "-")' "$name") \
      || die "$name is not a cosine models name"
    if [[ "$path" == - ]]; then
      say "$name is not cached: cosine models fetch $name"
      "$PY" -m cosine.cli models fetch "$name" || die "cosine models fetch $name failed"
      path="$("$PY" -c 'import sys; from cosine import models; print(models.cached_path(sys.argv[1]))' "$name")"
    fi
    if [[ "$(cat "$SRC/$group/$file.sha256" 2>/dev/null)" != "$sha" ]]; then
      rm -rf "$SRC/$group"; mkdir -p "$SRC/$group"
      ln "$path" "$SRC/$group/$file" 2>/dev/null || cp "$path" "$SRC/$group/$file"
      echo "$sha" > "$SRC/$group/$file.sha256"
    fi
    say "$group: $file ($size bytes, sha256 ${sha:0:12} checked at fetch)"
  done < <("$PY" -c 'from cosine import config
c = config.load("config.toml", check_engines=False)
d = next(m for m in c.models if m.role == "drafter" and m.kind == "neural")
print("target", c.target_model().source); print("drafter", d.source)')
}

stage_pack() { "$PY" "$HERE/bundle.py" pack "$SRC" "$OUTDIR" --part-bytes "$PART_BYTES" || die "packing failed"; }

tree_bytes() {  # what travels with every call besides the carried paths
  { git ls-files -z -co --exclude-standard; if [[ -d shared ]]; then find shared -type f -print0; fi; } \
    | xargs -0 -r stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}'
}

plan() {
  local n; n="$("$PY" -c 'import json, sys; print(len(json.load(open(sys.argv[1]))["parts"]))' "$OUTDIR/bundle.json")"
  echo
  echo "Device calls, back to back (the host is given back ~30 s after a call, and the staged parts with it):"
  local i
  for ((i = 0; i < n; i++)); do
    printf '  %2d. carry [".device/bundle.part%02d", ".device/bundle.json"]  command: tools/gpu/measure.sh put %d' \
      $((i + 1)) "$i" "$i"
    ((i == n - 1)) && printf ' && tools/gpu/measure.sh run   (timeout_s 480)'
    echo
  done
  echo "  (docs/gpu.md: what each call prints, what comes back, and the rerun)"
}

if ((REHEARSE)); then
  rehearse
  say "rehearsal bundle in $OUTDIR in $((SECONDS - T0)) s"
  exit 0
fi
[[ -x "$VENV/bin/python" ]] || die "$VENV/bin/python not found: run 'make install' first"
mkdir -p "$SRC"
TREE="$(tree_bytes)"
if [[ -z "$PART_BYTES" ]]; then
  PART_BYTES=$(( (CALL_BYTES - TREE - 1048576 - 262144) / 1000000 * 1000000 ))
  ((PART_BYTES > MAX_PART)) && PART_BYTES=$MAX_PART
fi
((PART_BYTES >= 10000000)) || die "the working tree ($TREE bytes) leaves no room for parts under 64 MiB per call"
say "working tree that travels with every call: $TREE bytes; parts of $PART_BYTES bytes"
step() { local t=$SECONDS; say "== $1"; "$2"; say "== $1: $((SECONDS - t)) s"; }
step "wheels" stage_wheels
step "data from $DATA" stage_data
step "GGUF models" stage_models
step "pack" stage_pack
plan
say "stage.sh finished in $((SECONDS - T0)) s"
