#!/usr/bin/env bash
# Build the air-gap bundle for the GPU host (docs/gpu.md). Run HERE, where PyPI is
# reachable, from any directory:
#
#     tools/airgap/stage.sh [--force] [--no-pin] [--part-bytes N] [--models "NAME ..."]
#
# Into .device/ (git-ignored) it gathers
#   (a) onnxruntime-gpu, through ../shared/device/stage-ort-gpu.sh (its parts are joined back),
#   (b) every runtime and export dependency of cosine as CPython 3.12 manylinux x86-64 wheels
#       (torch excluded: the host has it),
#   (c) the cosine wheel (a fallback: remote.sh runs the host's working copy by default),
#   (d) the GGUF files of the target and the drafter from the cosine model cache,
# packs them into one tar written straight into numbered parts .device/bundle.partNN of
# 60,000,000 bytes, writes the manifest .device/bundle.sha256 (part count, total size,
# sha256 of the tar and of each part), and prints the exact sequence of device calls.
# Re-running skips what is done (unchanged wheels, cached models, an unchanged bundle).
#
# Environment: STAGE_PYTHON (a Python 3.12 that runs pip; found automatically),
# VENV (.venv: the dev venv with cosine installed, for the model cache and the version
# pins), PART_BYTES (60000000), ORT_GPU_VERSION (1.31.1, read by the shared script),
# ORT_SCRIPT (../shared/device/stage-ort-gpu.sh), COSINE_AIRGAP_MODELS.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
HERE="tools/airgap"
DEV=".device"
SRC="$DEV/bundle-src"          # what goes into the tar: wheels/ models/ cosine/
MANIFEST="$DEV/bundle.sha256"
PYVER="3.12"                   # the host's Python
PART_BYTES="${PART_BYTES:-60000000}"
VENV="${VENV:-.venv}"
ORT_SCRIPT="${ORT_SCRIPT:-../shared/device/stage-ort-gpu.sh}"
export ORT_GPU_VERSION="${ORT_GPU_VERSION:-1.31.1}"
MODELS="${COSINE_AIRGAP_MODELS:-qwen2.5-coder-1.5b qwen2.5-coder-0.5b}"
LIMIT_BYTES=$((64 * 1024 * 1024))   # what one device call may carry, working tree included
PLATFORMS=(manylinux2014_x86_64 manylinux_2_17_x86_64 manylinux_2_24_x86_64 manylinux_2_27_x86_64
           manylinux_2_28_x86_64)
# cosine's runtime dependencies (pyproject [project] dependencies, onnxruntime -> onnxruntime-gpu)
RUNTIME=(numpy pyzmq pykka msgpack tokenizers tqdm)
# what cosine-export from a GGUF, the int4 drafter and the HF peers import:
#   transformers (GGUF reader, reference model, tokenizer), gguf (transformers' GGUF
#   parser), onnx (graph builder), onnx-ir (onnxruntime's int4 MatMulNBits quantizer),
#   safetensors (transformers needs it), accelerate (from_pretrained(gguf_file=) in the
#   HF peers insists on it; it requires torch, so it is fetched without dependencies)
EXPORT=(transformers gguf onnx onnx-ir safetensors)
NODEPS=(accelerate)
HOST_PROVIDED="torch,onnxruntime"   # torch: on the host; onnxruntime: onnxruntime-gpu provides it
PIN=1
FORCE=0

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --force) FORCE=1 ;;
    --no-pin) PIN=0 ;;
    --part-bytes) PART_BYTES="$2"; shift ;;
    --models) MODELS="$2"; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "stage.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

T0=$SECONDS
say() { printf '[stage %s] %s\n' "$(date +%T)" "$*"; }
die() { printf '[stage %s] ERROR: %s\n' "$(date +%T)" "$*" >&2; exit 1; }
step() {  # step NAME FUNCTION: run it, log its duration
  local t=$SECONDS
  say "== $1"
  "$2"
  say "== $1 done in $((SECONDS - t)) s"
}

find_python312() {
  local c
  for c in "${STAGE_PYTHON:-}" python3.12 /root/.pyenv/versions/3.12*/bin/python3.12 /usr/bin/python3.12 python3; do
    [[ -n "$c" ]] || continue
    if "$c" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null \
        && "$c" -m pip --version >/dev/null 2>&1; then
      echo "$c"; return 0
    fi
  done
  return 1
}
if PY="$(find_python312)"; then
  :
else
  PY="python3"
  say "WARNING: no Python 3.12 with pip found (set STAGE_PYTHON); using $("$PY" -V 2>&1) for pip."
  say "         Dependency markers are then evaluated for that Python; the closure check below"
  say "         (which evaluates them for 3.12) still fails loudly if a 3.12-only dependency is missing."
fi
# pip configs here may name find-links folders that do not exist: drop that noise only
pipdl() { "${PIPDL[@]}" "$@" 2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2); }
PIPDL=("$PY" -m pip download --disable-pip-version-check -q --only-binary=:all: --python-version "$PYVER")
for p in "${PLATFORMS[@]}"; do PIPDL+=(--platform "$p"); done

mkdir -p "$SRC/wheels" "$SRC/models" "$SRC/cosine"
command -v sha256sum >/dev/null || die "sha256sum is needed"

# ------------------------------------------------------------------ (a) onnxruntime-gpu
ORT_WHEEL=""
stage_ort() {
  local want="onnxruntime_gpu-${ORT_GPU_VERSION}-"
  local name=""
  [[ -f "$DEV/ortgpu.name" ]] && name="$(cat "$DEV/ortgpu.name")"
  if [[ $FORCE == 1 || "$name" != "$want"* || ! -f "$DEV/ortgpu.part00" ]]; then
    [[ -x "$ORT_SCRIPT" || -f "$ORT_SCRIPT" ]] || die "$ORT_SCRIPT not found (set ORT_SCRIPT)"
    say "downloading onnxruntime-gpu ${ORT_GPU_VERSION} with $ORT_SCRIPT"
    bash "$ORT_SCRIPT" || die "$ORT_SCRIPT failed"
    name="$(cat "$DEV/ortgpu.name")"
  else
    say "onnxruntime-gpu already downloaded by $ORT_SCRIPT: $name"
  fi
  ORT_WHEEL="$SRC/wheels/$name"
  if [[ -f "$ORT_WHEEL" && $FORCE == 0 && "$(cat "$DEV/ortgpu.joined" 2>/dev/null)" == "$(cat "$DEV"/ortgpu.part* | sha256sum | cut -d' ' -f1)" ]]; then
    say "$name already joined into $SRC/wheels"
  else
    find "$SRC/wheels" -maxdepth 1 -name 'onnxruntime_gpu-*' -delete
    cat "$DEV"/ortgpu.part* > "$ORT_WHEEL.tmp"
    "$PY" -m zipfile -t "$ORT_WHEEL.tmp" >/dev/null || die "joined $name is not a valid zip (re-run with --force)"
    mv "$ORT_WHEEL.tmp" "$ORT_WHEEL"
    cat "$DEV"/ortgpu.part* | sha256sum | cut -d' ' -f1 > "$DEV/ortgpu.joined"
    say "joined $(ls "$DEV"/ortgpu.part* | wc -l) parts into $ORT_WHEEL ($(stat -c %s "$ORT_WHEEL") bytes)"
  fi
}

# ------------------------------------------------------------------ (b) dependency wheels
pinned() {  # NAME -> NAME==VERSION from the dev venv (the versions the test suite runs), else NAME
  local n="$1" v=""
  if [[ $PIN == 1 && -x "$VENV/bin/python" ]]; then
    v="$("$VENV/bin/python" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$n" 2>/dev/null || true)"
  fi
  if [[ -n "$v" ]]; then echo "$n==$v"; else echo "$n"; fi
}
stage_deps() {
  local reqs=() n tmp key
  for n in "${RUNTIME[@]}" "${EXPORT[@]}"; do reqs+=("$(pinned "$n")"); done
  local acc; acc="$(pinned "${NODEPS[0]}")"
  mapfile -t ortdeps < <("$PY" "$HERE/bundle.py" requires "$ORT_WHEEL")
  key="$(printf '%s\n' "$PYVER" "${PLATFORMS[@]}" "${reqs[@]}" "$acc" "${ortdeps[@]}" | sha256sum | cut -d' ' -f1)"
  if [[ $FORCE == 0 && "$(cat "$DEV/wheels.key" 2>/dev/null)" == "$key" ]] \
      && "$PY" "$HERE/bundle.py" closure "$SRC/wheels" --ignore "$HOST_PROVIDED" >/dev/null 2>&1; then
    say "dependency wheels unchanged (requirements key ${key:0:12}); skipping pip download"
    "$PY" "$HERE/bundle.py" closure "$SRC/wheels" --ignore "$HOST_PROVIDED"
    return
  fi
  say "requirements: ${reqs[*]} $acc (no deps) + onnxruntime-gpu's: ${ortdeps[*]}"
  [[ $PIN == 1 && -x "$VENV/bin/python" ]] && say "versions pinned to $VENV (the tested ones); --no-pin takes the newest"
  find "$SRC/wheels" -maxdepth 1 -name '*.whl' ! -name 'onnxruntime_gpu-*' -delete
  rm -f "$DEV/wheels.key"
  tmp="$(mktemp -d)"
  pipdl --no-deps -d "$tmp" "$acc" || die "pip download $acc failed"
  local accwhl; accwhl="$(ls "$tmp"/accelerate-*.whl)"
  mapfile -t accdeps < <("$PY" "$HERE/bundle.py" requires "$accwhl" | grep -v -i -E '^torch([^a-z0-9_.-]|$)' || true)
  say "accelerate's dependencies without torch: ${accdeps[*]}"
  pipdl -d "$SRC/wheels" "${reqs[@]}" "${ortdeps[@]}" "${accdeps[@]}" \
    || die "pip download of the dependency wheels failed (see above)"
  mv "$accwhl" "$SRC/wheels/"
  rm -rf "$tmp"
  local heavy
  heavy="$(find "$SRC/wheels" -maxdepth 1 \( -name 'torch-*' -o -name 'nvidia_*' -o -name 'triton-*' -o -name 'onnxruntime-[0-9]*' \) -printf '%f ')"
  [[ -z "$heavy" ]] || die "these wheels must not be bundled (the host has them or onnxruntime-gpu replaces them): $heavy; a requirement pulled them in"
  "$PY" "$HERE/bundle.py" closure "$SRC/wheels" --ignore "$HOST_PROVIDED" \
    || die "the dependency wheels are not self-contained (see above)"
  echo "$key" > "$DEV/wheels.key"
}

# ------------------------------------------------------------------ (c) the cosine wheel
stage_cosine() {
  local tmp; tmp="$(mktemp -d)"
  # build from a copy of the sources, so nothing is written into the working tree
  mkdir -p "$tmp/src"
  cp pyproject.toml README.md "$tmp/src/"
  tar -cf - --exclude=__pycache__ --exclude='*.pyc' cosine control workers export | tar -xf - -C "$tmp/src"
  "$PY" -m pip wheel --disable-pip-version-check -q --no-deps -w "$tmp/dist" "$tmp/src" >/dev/null \
    || die "pip wheel of cosine failed"
  local whl; whl="$(ls "$tmp"/dist/cosine-*.whl)"
  "$PY" - "$whl" <<'EOF' || die "the cosine wheel lacks cosine.control/.workers/.export"
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
for mod in ("cosine/control/serve.py", "cosine/workers/main.py", "cosine/export/cli.py", "cosine/bench/run.py"):
    assert mod in names, mod
EOF
  # keep the old file when the contents are equal (zip timestamps differ), so the bundle stays unchanged
  local old; old="$(ls "$SRC"/cosine/cosine-*.whl 2>/dev/null | head -1 || true)"
  if [[ -n "$old" ]] && cmp -s <(unzip_list "$old") <(unzip_list "$whl"); then
    say "cosine wheel unchanged: $(basename "$old")"
  else
    rm -f "$SRC"/cosine/*.whl
    mv "$whl" "$SRC/cosine/"
    say "built $(basename "$whl") ($(stat -c %s "$SRC/cosine/$(basename "$whl")") bytes)"
  fi
  rm -rf "$tmp"
}
unzip_list() {  # name, size and CRC of every member: content identity without timestamps
  "$PY" -c 'import sys, zipfile
for i in sorted(zipfile.ZipFile(sys.argv[1]).infolist(), key=lambda i: i.filename):
    print(i.filename, i.file_size, i.CRC)' "$1"
}

# ------------------------------------------------------------------ (d) the GGUF files
stage_models() {
  [[ -x "$VENV/bin/python" ]] || die "$VENV/bin/python not found: run 'make install' first (the model cache is read through cosine.models)"
  local keep=() n info path size sha file
  for n in $MODELS; do
    info="$("$VENV/bin/python" -c 'import sys
from cosine import models
a = models.asset(sys.argv[1]); p = models.cached_path(sys.argv[1])
print(a.filename, a.size, a.sha256, p or "")' "$n")" || die "unknown model $n"
    read -r file size sha path <<<"$info"
    if [[ -z "$path" ]]; then
      say "$n is not in the model cache: fetching it (cosine models fetch $n)"
      "$VENV/bin/python" -m cosine.cli models fetch --no-progress "$n" || die "cosine models fetch $n failed"
      path="$("$VENV/bin/python" -c 'import sys; from cosine import models; print(models.cached_path(sys.argv[1]) or "")' "$n")"
      [[ -n "$path" ]] || die "$n still not cached after fetching"
    fi
    keep+=("$file")
    if [[ -f "$SRC/models/$file" && "$(stat -c %s "$SRC/models/$file")" == "$size" \
          && "$(cat "$SRC/models/$file.sha256" 2>/dev/null)" == "$sha" ]]; then
      say "$n: $file already staged ($size bytes, sha256 ${sha:0:12}…)"
      continue
    fi
    rm -f "$SRC/models/$file"
    ln "$path" "$SRC/models/$file" 2>/dev/null || cp "$path" "$SRC/models/$file"
    [[ "$(stat -c %s "$SRC/models/$file")" == "$size" ]] || die "$path has the wrong size"
    echo "$sha" > "$SRC/models/$file.sha256"   # the stamp cosine.models.cached_path checks on the host
    say "$n: staged $file ($size bytes, verified sha256 ${sha:0:12}… at fetch time)"
  done
  local f
  for f in "$SRC"/models/*; do
    [[ -e "$f" ]] || continue
    local b; b="$(basename "$f")"; b="${b%.sha256}"
    printf '%s\n' "${keep[@]}" | grep -qxF "$b" || { rm -f "$f"; say "removed $f (not in --models)"; }
  done
}

# ------------------------------------------------------------------ pack + plan
stage_pack() {
  "$PY" "$HERE/bundle.py" pack "$SRC" "$DEV/bundle.part" "$MANIFEST" --part-bytes "$PART_BYTES" --python "$PYVER" \
    || die "packing failed"
}

meta() { sed -n "s/^# $1=//p" "$MANIFEST" | head -1; }

plan() {
  local parts total deps last tree head
  parts="$(meta parts)"; total="$(meta total_bytes)"; deps="$(meta deps_parts)"; last=$((parts - 1))
  # the working tree travels with every call: tracked + untracked-not-ignored files
  tree="$(du -sb --exclude=.git --exclude=.venv --exclude=.device --exclude=build --exclude=dist \
          --exclude=engines --exclude=runs --exclude=data --exclude='*.egg-info' --exclude=__pycache__ \
          --exclude=.hypothesis --exclude=.pytest_cache . | cut -f1)"
  head=$((LIMIT_BYTES - tree - PART_BYTES - $(stat -c %s "$MANIFEST")))
  echo
  echo "================================================================================"
  echo "bundle: $parts parts, $total bytes ($(awk -v b="$total" 'BEGIN{printf "%.2f GB", b/1e9}')), sha256 $(awk '$2=="bundle.tar"{print $1}' "$MANIFEST")"
  echo "        parts of $PART_BYTES bytes in $DEV/bundle.part00 .. part$(printf %02d "$last"); manifest $MANIFEST"
  echo "        the first $deps part(s) hold every dependency wheel (onnxruntime-gpu first)"
  echo "working tree ~$tree bytes + one part + manifest: $((LIMIT_BYTES - head)) of $LIMIT_BYTES bytes per call"
  if (( head < 1048576 )); then
    echo "WARNING: less than 1 MiB headroom under the 64 MiB a call may carry; lower --part-bytes"
  fi
  echo
  echo "Device calls, in this order, back to back (the machine goes back ~30 s after a call"
  echo "and /tmp/cosine-stage with it; then staging starts over). Each call carries two paths:"
  local i n
  for ((i = 0; i < parts; i++)); do
    n="$(printf %02d "$i")"
    printf '  %2d. carry [".device/bundle.part%s", ".device/bundle.sha256"]  command: tools/airgap/remote.sh put %d' \
      $((i + 1)) "$n" "$i"
    if (( i == last )); then printf ' && tools/airgap/remote.sh install'; fi
    if (( i == deps - 1 && deps < parts )); then printf '   # optional here: && tools/airgap/remote.sh install --deps-only && tools/airgap/remote.sh smoke'; fi
    echo
  done
  echo "  $((parts + 1)). command: tools/airgap/remote.sh export              (both fp16 engines, --provider cuda; ~5 min)"
  echo "  $((parts + 2)). command: tools/airgap/remote.sh bench --quick      (4 prompts x 64 tokens, concurrency 1,4; results in \$OUT)"
  echo "  or, after the last put: tools/airgap/remote.sh all --quick  (install + export + bench in one call; may approach 10 min)"
  echo "  Any call: tools/airgap/remote.sh status   (what is staged, installed, exported)"
  echo "================================================================================"
}

step "onnxruntime-gpu (shared script)" stage_ort
step "dependency wheels (pip download, py${PYVER} manylinux x86_64)" stage_deps
step "cosine wheel" stage_cosine
step "GGUF models: $MODELS" stage_models
step "pack + split into $PART_BYTES-byte parts" stage_pack
plan
say "stage.sh finished in $((SECONDS - T0)) s"
