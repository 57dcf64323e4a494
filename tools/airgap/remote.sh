#!/usr/bin/env bash
# Run cosine's export and benchmarks on the air-gapped GPU host (docs/gpu.md). Run it ON THE
# HOST, from the repo's working copy (each device call lands there), after
# tools/airgap/stage.sh built the bundle here:
#
#   remote.sh put [N]        copy .device/bundle.partNN (carried in this call, with .device/bundle.sha256)
#                            to $COSINE_STAGE, check its size and sha256; no N: every part carried
#   remote.sh install [--deps-only] [--dry-run] [--allow-no-cuda (rehearsal without GPU/torch)]
#                            all parts there? join, verify sha256, untar, pip install every wheel into
#                            $COSINE_SITE, write $COSINE_ENV, check onnxruntime's CUDA provider runs.
#                            --deps-only: only the first deps_parts parts (wheels, no models)
#   remote.sh smoke          tiny engine exported with CUDA parity + worker round trips on CUDA
#                            (no model weights needed: works after install --deps-only)
#   remote.sh export [--drafters gpu|cpu] [--force] [--dry-run]
#                            fp16 target and drafter engines, parity on CUDA, into engines/
#                            (--drafters cpu: the drafter as an int4 CPU engine instead)
#   remote.sh bench [--quick] [--drafters gpu|cpu] [--peers gpu|cpu|none] [--modes LIST]
#                   [--concurrency LIST] [--max-tokens N] [--per-domain N] [--worker-iters N] [--dry-run]
#                            worker benchmark on CUDA (cosine-bench worker: overhead, prefill, decode
#                            batch 1/4/16, verify vs tree size) + cosine-bench run (every
#                            mode) + HF peers; results into $OUT if set, else runs/gpu/
#   remote.sh all [any of the options above]     install + export + bench in one call
#   remote.sh status         what is staged, installed and exported
#
# Every step logs what it does and how long it took, fails with one clear ERROR line, and
# skips work already done (re-run freely). Paths (override for a local rehearsal):
# PYTHON (python3), COSINE_STAGE (/tmp/cosine-stage), COSINE_SITE (/tmp/cosine-site),
# COSINE_ENV (/tmp/cosine-env.sh), COSINE_HOST_MODELS (/tmp/cosine-models), COSINE_SRC
# (/tmp/cosine-src), COSINE_CODE (repo: run this working copy's code, linked into
# COSINE_SRC on every call; wheel: run the bundled cosine wheel), COSINE_KEEP_HOST (project
# names not to install from the bundle, e.g. "numpy sympy", to keep the host's own),
# COSINE_AIRGAP_PROVIDER (cuda; tensorrt to try that provider; cpu to rehearse without a GPU).
# COSINE_GPU_BANDWIDTH_GBS (unset; the GPU's memory bandwidth: the worker bench then reports
# batch-1 decode against the weight-bytes / bandwidth floor).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO"
HERE="$REPO/tools/airgap"
PYTHON="${PYTHON:-python3}"
STAGE="${COSINE_STAGE:-/tmp/cosine-stage}"
SITE="${COSINE_SITE:-/tmp/cosine-site}"
WHEEL_SITE="${SITE}-cosine"
ENVFILE="${COSINE_ENV:-/tmp/cosine-env.sh}"
HMODELS="${COSINE_HOST_MODELS:-/tmp/cosine-models}"
SRCDIR="${COSINE_SRC:-/tmp/cosine-src}"
CODE="${COSINE_CODE:-repo}"
KEEP_HOST="${COSINE_KEEP_HOST:-}"
RESULTS="${OUT:-$REPO/runs/gpu}"   # what comes back: at most 8 files (the device tool's limit)
WORK="$REPO/runs/gpu"              # everything, on the host
LOGS="$WORK/logs"
BENCH="$WORK/bench"
ENGINES="$REPO/engines"
# the accelerator's execution provider: cuda; tensorrt to try ONNX Runtime's TensorRT provider;
# cpu only for a rehearsal of these steps on a machine without a GPU
GPU_PROVIDER="${COSINE_AIRGAP_PROVIDER:-cuda}"
GPU_DEVICE="cuda:0"
[[ "$GPU_PROVIDER" == cpu ]] && GPU_DEVICE="cpu"
TARGET="qwen2.5-coder-1.5b"       # cosine models names (cosine/models.py)
DRAFTER="qwen2.5-coder-0.5b"
MANIFEST="$STAGE/bundle.sha256"

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
case "${1:-}" in ""|-h|--help|help) usage; exit 0 ;; esac

# ------------------------------------------------------------------ logging and steps
mkdir -p "$RESULTS" "$LOGS"
LOGFILE="$RESULTS/remote.log"
T0=$SECONDS
STEPS=()
CURRENT=""
log() { printf '[remote %s] %s\n' "$(date +%T)" "$*" | tee -a "$LOGFILE" >&2; }
die() {
  printf '[remote %s] ERROR: %s\n' "$(date +%T)" "$*" | tee -a "$LOGFILE" >&2
  exit 1
}
step() {  # step NAME COMMAND...: run it, record its duration
  local t=$SECONDS prev="$CURRENT"
  CURRENT="$1"; shift
  log "== $CURRENT"
  "$@"
  STEPS+=("$(printf '%-44s %5d s' "$CURRENT" $((SECONDS - t)))")
  log "== $CURRENT: done in $((SECONDS - t)) s"
  CURRENT="$prev"
}
summary() {
  local rc=$?
  if ((${#STEPS[@]})); then
    log "step timings:"
    local s
    for s in "${STEPS[@]}"; do log "  $s"; done
  fi
  if ((rc != 0)) && [[ -n "$CURRENT" ]]; then
    log "FAILED in step '$CURRENT' after $((SECONDS - T0)) s (exit $rc)"
  else
    log "total $((SECONDS - T0)) s (exit $rc)"
  fi
}
trap summary EXIT

# ------------------------------------------------------------------ options
DRY=0; DEPS_ONLY=0; ALLOW_NO_CUDA=0; FORCE=0; QUICK=0
DRAFTERS="gpu"; PEERS="gpu"; MODES="autoregressive,speculative,specinfer,cosine"
CONC=""; MAXTOK=""; PERDOM=""; ITERS=""; DRAFTER_THREADS=8; PART=""
CMD="${1:-}"
[[ $# -gt 0 ]] && shift
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --deps-only) DEPS_ONLY=1 ;;
    --allow-no-cuda) ALLOW_NO_CUDA=1 ;;
    --force) FORCE=1 ;;
    --quick) QUICK=1 ;;
    --drafters) DRAFTERS="${2:-}"; shift ;;
    --peers) PEERS="${2:-}"; shift ;;
    --modes) MODES="${2:-}"; shift ;;
    --concurrency) CONC="${2:-}"; shift ;;
    --max-tokens) MAXTOK="${2:-}"; shift ;;
    --per-domain) PERDOM="${2:-}"; shift ;;
    --worker-iters) ITERS="${2:-}"; shift ;;
    --drafter-threads) DRAFTER_THREADS="${2:-}"; shift ;;
    [0-9]*) PART="$1" ;;
    *) die "unknown argument '$1' for '$CMD' (see the header of $0)" ;;
  esac
  shift
done
[[ "$DRAFTERS" == gpu || "$DRAFTERS" == cpu ]] || die "--drafters takes gpu or cpu, not '$DRAFTERS'"
[[ "$PEERS" == gpu || "$PEERS" == cpu || "$PEERS" == none ]] || die "--peers takes gpu, cpu or none, not '$PEERS'"
[[ "$CODE" == repo || "$CODE" == wheel ]] || die "COSINE_CODE is repo or wheel, not '$CODE'"
if ((QUICK)); then
  : "${CONC:=1,4}" "${MAXTOK:=64}" "${PERDOM:=1}" "${ITERS:=100}"
else
  : "${CONC:=1,4,16}" "${MAXTOK:=128}" "${PERDOM:=0}" "${ITERS:=200}"
fi

# ------------------------------------------------------------------ manifest helpers
meta() { sed -n "s/^# $1=//p" "$MANIFEST" | head -1; }
sum_of() { awk -v f="$1" '$2 == f {print $1}' "$MANIFEST"; }
bundle_sha() { sum_of bundle.tar; }
part_name() { printf 'bundle.part%02d' "$((10#$1))"; }
M_PARTS=""; M_PB=""; M_TOTAL=""
load_meta() { M_PARTS="$(meta parts)"; M_PB="$(meta part_bytes)"; M_TOTAL="$(meta total_bytes)"; }
part_size() {  # expected size of part I (the manifest's numbers, read once)
  local i=$((10#$1))
  [[ -n "$M_PARTS" ]] || load_meta
  if ((i < M_PARTS - 1)); then echo "$M_PB"; else echo $((M_TOTAL - (M_PARTS - 1) * M_PB)); fi
}
fsize() { stat -c %s "$1"; }
sha() { sha256sum "$1" | cut -d' ' -f1; }
need_manifest() {
  [[ -f "$MANIFEST" ]] || die "no bundle manifest in $STAGE: carry .device/bundle.sha256 with the first 'put' call"
  [[ "$(meta format)" == 1 ]] || die "$MANIFEST is not a format-1 bundle manifest"
  load_meta
}
missing_parts() {  # MAX: the part numbers below MAX that are not staged with the right size
  local i
  for ((i = 0; i < $1; i++)); do
    local f; f="$STAGE/$(part_name "$i")"
    if [[ ! -f "$f" || "$(fsize "$f")" != "$(part_size "$i")" ]]; then printf '%d ' "$i"; fi
  done
}

# ------------------------------------------------------------------ put
put_one() {
  local i="$1" n name src dst want_size want_sha
  n="$(meta parts)"
  [[ "$i" =~ ^[0-9]+$ ]] && ((10#$i < n)) || die "part '$i' does not exist: this bundle has parts 0..$((n - 1))"
  name="$(part_name "$i")"; src="$REPO/.device/$name"; dst="$STAGE/$name"
  want_size="$(part_size "$i")"; want_sha="$(sum_of "$name")"
  if [[ -f "$dst" && "$(fsize "$dst")" == "$want_size" && "$(sha "$dst")" == "$want_sha" ]]; then
    log "$name already staged and verified; skipping"
    return 0
  fi
  [[ -f "$src" ]] || die "$name was not carried into this call (.device/$name is missing here); run the call with carry [\".device/$name\", \".device/bundle.sha256\"]"
  local got; got="$(fsize "$src")"
  [[ "$got" == "$want_size" ]] || die "$name has $got bytes, expected $want_size: truncated or wrong file in transfer; carry it again"
  cp "$src" "$dst.tmp"
  local s; s="$(sha "$dst.tmp")"
  if [[ "$s" != "$want_sha" ]]; then
    rm -f "$dst.tmp"
    die "$name is corrupted (sha256 $s, manifest says $want_sha); carry it again"
  fi
  mv "$dst.tmp" "$dst"
  log "$name staged in $STAGE ($want_size bytes, sha256 ok)"
}
cmd_put() {
  mkdir -p "$STAGE"
  local carried="$REPO/.device/bundle.sha256"
  if [[ -f "$carried" ]]; then
    local changed=0
    if [[ -f "$MANIFEST" ]] && ! cmp -s "$carried" "$MANIFEST"; then changed=1; fi
    cp "$carried" "$MANIFEST"
    if ((changed)); then  # a new bundle: keep the staged parts it shares with the old one
      load_meta
      local f kept=0 dropped=0
      for f in "$STAGE"/bundle.part[0-9][0-9]; do
        [[ -f "$f" ]] || continue
        if [[ "$(sha "$f")" == "$(sum_of "$(basename "$f")")" ]]; then kept=$((kept + 1)); else rm -f "$f"; dropped=$((dropped + 1)); fi
      done
      log "the carried manifest describes a different bundle: kept $kept staged part(s) it shares, dropped $dropped"
    fi
  fi
  need_manifest
  if [[ -n "$PART" ]]; then
    put_one "$PART"
  else
    local f any=0
    for f in "$REPO"/.device/bundle.part[0-9][0-9]; do
      [[ -f "$f" ]] || continue
      any=1; put_one "${f##*.part}"
    done
    ((any)) || die "no .device/bundle.partNN was carried into this call; name one in carry, or give N"
  fi
  local n miss deps
  n="$(meta parts)"; deps="$(meta deps_parts)"; miss="$(missing_parts "$n")"
  log "staged $((n - $(wc -w <<<"$miss"))) of $n parts${miss:+; missing: $miss}"
  if [[ -z "$miss" ]]; then
    log "all parts are here: next 'remote.sh install' (or 'remote.sh all --quick')"
  elif [[ -z "$(missing_parts "$deps")" ]]; then
    log "the first $deps parts (every dependency wheel) are here: 'remote.sh install --deps-only' + 'remote.sh smoke' work now"
  fi
}

# ------------------------------------------------------------------ install
verify_parts() {  # COUNT: every one of the first COUNT parts present, right size and sha256
  local count="$1" miss bad=() i
  miss="$(missing_parts "$count")"
  if [[ -n "$miss" ]]; then
    local calls=""
    for i in $miss; do calls+="    put $i   (carry .device/$(part_name "$i"))"$'\n'; done
    die "$(wc -w <<<"$miss") of the $count parts needed are missing or have the wrong size in $STAGE: $miss
  stage them first, one device call each:
$calls"
  fi
  # sha256 of every part, in parallel (the host has 16 cores)
  local list; list="$(mktemp)"
  for ((i = 0; i < count; i++)); do printf '%s  %s\n' "$(sum_of "$(part_name "$i")")" "$(part_name "$i")"; done > "$list"
  local out; out="$(cd "$STAGE" && awk '{print $2}' "$list" | xargs -P 8 -n 4 sha256sum | sort -k2)"
  for ((i = 0; i < count; i++)); do
    local name want got; name="$(part_name "$i")"; want="$(sum_of "$name")"
    got="$(awk -v f="$name" '$2 == f {print $1}' <<<"$out")"
    [[ "$got" == "$want" ]] || bad+=("$i")
  done
  rm -f "$list"
  if ((${#bad[@]})); then
    for i in "${bad[@]}"; do rm -f "$STAGE/$(part_name "$i")"; done
    die "corrupted part(s) ${bad[*]} (sha256 differs from the manifest); removed them from $STAGE: run 'put' for them again"
  fi
  log "parts 0..$((count - 1)) present, sizes and sha256 ok"
}
extract_full() {
  local want; want="$(bundle_sha)"
  if [[ "$(cat "$STAGE/bundle/.extracted" 2>/dev/null)" == "$want" ]]; then
    log "bundle ${want:0:12} already extracted in $STAGE/bundle; skipping"
    return 0
  fi
  local n; n="$(meta parts)"
  local parts=(); local i
  for ((i = 0; i < n; i++)); do parts+=("$STAGE/$(part_name "$i")"); done
  log "joining $n parts into $STAGE/bundle.tar"
  cat "${parts[@]}" > "$STAGE/bundle.tar"
  local got; got="$(sha "$STAGE/bundle.tar")"
  [[ "$got" == "$want" ]] || { rm -f "$STAGE/bundle.tar"; die "joined bundle sha256 $got != manifest $want"; }
  log "bundle.tar sha256 ok ($(fsize "$STAGE/bundle.tar") bytes); untarring"
  rm -rf "$STAGE/bundle" "$STAGE/bundle.tmp"
  mkdir -p "$STAGE/bundle.tmp"
  tar -xf "$STAGE/bundle.tar" -C "$STAGE/bundle.tmp" --no-same-owner || die "tar could not unpack $STAGE/bundle.tar"
  mv "$STAGE/bundle.tmp" "$STAGE/bundle"
  rm -f "$STAGE/bundle.tar"
  echo "$want" > "$STAGE/bundle/.extracted"
  log "unpacked: $(ls "$STAGE/bundle/wheels" | wc -l) dependency wheels, $(ls "$STAGE/bundle/models" 2>/dev/null | grep -c '\.gguf$' || true) GGUF files, $(ls "$STAGE/bundle/cosine" 2>/dev/null | wc -l) cosine wheel"
}
extract_wheels() {
  local want; want="$(bundle_sha)"
  if [[ "$(cat "$STAGE/bundle/.extracted" 2>/dev/null)" == "$want" || "$(cat "$STAGE/bundle/.wheels" 2>/dev/null)" == "$want" ]]; then
    log "wheels of bundle ${want:0:12} already extracted; skipping"
    return 0
  fi
  local n; n="$(meta deps_parts)"
  local parts=(); local i
  for ((i = 0; i < n; i++)); do parts+=("$STAGE/$(part_name "$i")"); done
  rm -rf "$STAGE/bundle"
  mkdir -p "$STAGE/bundle"
  "$PYTHON" "$HERE/bundle.py" extract-wheels "$STAGE/bundle/wheels" "${parts[@]}" || die "could not extract the wheels from the first $n parts"
  echo "$want" > "$STAGE/bundle/.wheels"
}
pip_install_deps() {
  local want; want="$(bundle_sha)"
  if [[ "$(cat "$SITE/.cosine-deps" 2>/dev/null)" == "$want|$KEEP_HOST" ]]; then
    log "dependency wheels of bundle ${want:0:12} already installed in $SITE; skipping"
    return 0
  fi
  local wheels=() w skip
  for w in "$STAGE"/bundle/wheels/*.whl; do
    skip=0
    for k in $KEEP_HOST; do
      local norm; norm="$(tr 'A-Z-.' 'a-z__' <<<"$k")"
      [[ "$(basename "$w" | cut -d- -f1 | tr 'A-Z-.' 'a-z__')" == "$norm" ]] && skip=1
    done
    if ((skip)); then log "keeping the host's own $(basename "$w" | cut -d- -f1) (COSINE_KEEP_HOST)"; else wheels+=("$w"); fi
  done
  ((${#wheels[@]})) || die "no wheels in $STAGE/bundle/wheels"
  "$PYTHON" -m pip --version >/dev/null 2>&1 || die "$PYTHON has no pip; set PYTHON to the host's Python 3.12 with pip"
  rm -rf "$SITE"
  log "pip install --no-deps --no-index --target $SITE (${#wheels[@]} wheels)"
  "$PYTHON" -m pip install --disable-pip-version-check --root-user-action=ignore -q --no-deps --no-index --no-compile --target "$SITE" \
    "${wheels[@]}" || die "pip install of the bundled wheels failed (see above)"
  echo "$want|$KEEP_HOST" > "$SITE/.cosine-deps"
}
pip_install_cosine() {
  local w; w="$(ls "$STAGE"/bundle/cosine/cosine-*.whl 2>/dev/null | head -1 || true)"
  [[ -n "$w" ]] || { log "no cosine wheel staged (install --deps-only): the working copy's code is used"; return 0; }
  local want; want="$(sha "$w")"
  if [[ "$(cat "$WHEEL_SITE/.cosine-wheel" 2>/dev/null)" == "$want" ]]; then
    log "cosine wheel already installed in $WHEEL_SITE; skipping"
    return 0
  fi
  rm -rf "$WHEEL_SITE"
  "$PYTHON" -m pip install --disable-pip-version-check --root-user-action=ignore -q --no-deps --no-index --no-compile --target "$WHEEL_SITE" "$w" \
    || die "pip install of $(basename "$w") failed"
  echo "$want" > "$WHEEL_SITE/.cosine-wheel"
  log "installed $(basename "$w") into $WHEEL_SITE (used when COSINE_CODE=wheel)"
}
link_models() {
  mkdir -p "$HMODELS"
  local f n=0
  for f in "$STAGE"/bundle/models/*; do
    [[ -f "$f" ]] || continue
    ln -f "$f" "$HMODELS/" 2>/dev/null || cp -f "$f" "$HMODELS/"
    n=$((n + 1))
  done
  ((n)) && log "models in $HMODELS (COSINE_MODELS_DIR): $(cd "$HMODELS" && ls *.gguf 2>/dev/null | tr '\n' ' ')"
  return 0
}
link_source() {  # the working copy's code as the `cosine` package (setuptools' folder mapping)
  [[ "$CODE" == repo ]] || return 0
  rm -rf "$SRCDIR"
  mkdir -p "$SRCDIR/cosine"
  local f
  for f in "$REPO"/cosine/*; do
    [[ "$(basename "$f")" == __pycache__ ]] && continue
    ln -s "$f" "$SRCDIR/cosine/$(basename "$f")"
  done
  ln -s "$REPO/control" "$SRCDIR/cosine/control"
  ln -s "$REPO/workers" "$SRCDIR/cosine/workers"
  ln -s "$REPO/export" "$SRCDIR/cosine/export"
}
write_env() {
  local code="$SRCDIR"
  [[ "$CODE" == wheel ]] && code="$WHEEL_SITE"
  cat > "$ENVFILE.tmp" <<EOF
# Written by tools/airgap/remote.sh install ($(date -u +%FT%TZ)). Source it before any cosine command:
#     . $ENVFILE
# The bundle's packages (onnxruntime-gpu among them) come first on PYTHONPATH, so they
# shadow the host's CPU onnxruntime; torch stays the host's.
export PYTHONPATH="$code:$SITE\${PYTHONPATH:+:\$PYTHONPATH}"
# 'python -m' from the repo root must not import ./cosine (it lacks control/ workers/ export/)
export PYTHONSAFEPATH=1
export PYTHONUNBUFFERED=1
export COSINE_MODELS_DIR="$HMODELS"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export COSINE_AIRGAP_CODE="$CODE"
EOF
  mv "$ENVFILE.tmp" "$ENVFILE"
  log "wrote $ENVFILE (code from $CODE: $code)"
}
use_env() {
  [[ -f "$ENVFILE" && -f "$SITE/.cosine-deps" ]] || die "not installed on this host: run 'remote.sh install' first (the machine may have been replaced: stage the parts again)"
  link_source
  # shellcheck disable=SC1090
  . "$ENVFILE"
}
check_runtime() {
  use_env
  local rc=0
  ALLOW_NO_CUDA="$ALLOW_NO_CUDA" COSINE_SITE="$SITE" "$PYTHON" - <<'EOF' 2>&1 | tee -a "$LOGFILE" || rc=$?
import importlib, os, sys, time
site = os.path.realpath(os.environ["COSINE_SITE"])
allow_no_cuda = os.environ.get("ALLOW_NO_CUDA") == "1"
print(f"python {sys.version.split()[0]} at {sys.executable}")
# 1. onnxruntime first, alone, as a worker loads it (no torch imported yet)
import onnxruntime as ort
origin = "bundle" if os.path.realpath(ort.__file__).startswith(site + os.sep) else "HOST (not the bundle!)"
print(f"onnxruntime {ort.__version__} from {origin}: {os.path.dirname(ort.__file__)}")
if not origin == "bundle":
    sys.exit("onnxruntime is not the bundled onnxruntime-gpu: PYTHONPATH does not put the bundle first")
t = time.perf_counter()
if hasattr(ort, "preload_dlls"):
    try:
        ort.preload_dlls()
        print(f"onnxruntime.preload_dlls() ok ({time.perf_counter() - t:.2f} s)")
    except Exception as e:
        print(f"onnxruntime.preload_dlls() failed: {e}")
providers = ort.get_available_providers()
print(f"available providers: {providers}")
cuda_ok = False
if "CUDAExecutionProvider" in providers:
    import numpy as np
    from onnx import TensorProto, helper
    g = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "g",
                          [helper.make_tensor_value_info(n, TensorProto.FLOAT, [64, 64]) for n in "ab"],
                          [helper.make_tensor_value_info("c", TensorProto.FLOAT, [64, 64])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    try:
        s = ort.InferenceSession(m.SerializeToString(), providers=["CUDAExecutionProvider"])
        a = np.random.default_rng(0).standard_normal((64, 64), dtype=np.float32)
        c = s.run(None, {"a": a, "b": a})[0]
        err = float(np.abs(c - a @ a).max())
        cuda_ok = s.get_providers()[0] == "CUDAExecutionProvider" and err < 1e-2
        print(f"CUDA session: runs on {s.get_providers()[0]}, 64x64 MatMul max error {err:.1e}")
    except Exception as e:
        print(f"CUDA session failed: {type(e).__name__}: {e}")
# 2. everything cosine imports, and where it comes from
bad = []
for mod in ("numpy", "zmq", "pykka", "msgpack", "tokenizers", "tqdm", "onnx", "onnx_ir", "gguf", "safetensors",
            "transformers", "accelerate", "torch", "cosine", "cosine.control.serve", "cosine.workers.main",
            "cosine.export.build", "cosine.bench.run"):
    try:
        m = importlib.import_module(mod)
        f = os.path.realpath(getattr(m, "__file__", "") or "")
        where = "bundle" if f.startswith(site + os.sep) else "host" if "cosine" not in mod else f"code {os.path.dirname(f)}"
        print(f"  {mod:22} {str(getattr(m, '__version__', '')):14} {where}")
    except Exception as e:
        bad.append(f"{mod}: {type(e).__name__}: {e}")
try:
    import torch
    print(f"torch {torch.__version__}: cuda available {torch.cuda.is_available()}"
          + (f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""))
except Exception:
    pass
host_only = [b for b in bad if b.split(":")[0] in ("torch", "accelerate")]
if bad and allow_no_cuda and bad == host_only:
    print("WARNING (--allow-no-cuda rehearsal): " + "; ".join(bad))
elif bad:
    print("IMPORT FAILURES:\n  " + "\n  ".join(bad))
    sys.exit(1)
if not cuda_ok:
    msg = "onnxruntime's CUDAExecutionProvider is not usable here"
    if allow_no_cuda:
        print(f"WARNING: {msg} (--allow-no-cuda: continuing)")
    else:
        sys.exit(msg)
print("runtime check ok")
EOF
  ((rc == 0)) || die "runtime check failed (see above)"
}
install_done() {  # this bundle already unpacked and installed (full, or deps-only when asked for)
  local want; want="$(bundle_sha)"
  [[ -f "$ENVFILE" && "$(cat "$SITE/.cosine-deps" 2>/dev/null)" == "$want|$KEEP_HOST" ]] || return 1
  if ((DEPS_ONLY)); then
    [[ "$(cat "$STAGE/bundle/.wheels" 2>/dev/null)" == "$want" || "$(cat "$STAGE/bundle/.extracted" 2>/dev/null)" == "$want" ]]
  else
    [[ "$(cat "$STAGE/bundle/.extracted" 2>/dev/null)" == "$want" && -f "$WHEEL_SITE/.cosine-wheel" ]] \
      && ls "$HMODELS"/*.gguf >/dev/null 2>&1
  fi
}
cmd_install() {
  need_manifest
  local count; count="$(meta parts)"
  ((DEPS_ONLY)) && count="$(meta deps_parts)"
  if ((DRY == 0 && FORCE == 0)) && install_done; then
    log "bundle $(bundle_sha | cut -c1-12) is already installed ($SITE, $ENVFILE); only re-checking the runtime (--force redoes it)"
    link_source
    write_env
    step "runtime check (imports, onnxruntime CUDA)" check_runtime
    return 0
  fi
  if ((FORCE)); then rm -f "$STAGE/bundle/.extracted" "$STAGE/bundle/.wheels" "$SITE/.cosine-deps" "$WHEEL_SITE/.cosine-wheel"; fi
  step "verify parts" verify_parts "$count"
  if ((DRY)); then
    if ((DEPS_ONLY)); then
      log "dry run: would extract the wheels from parts 0..$((count - 1)) and pip install them into $SITE"
    else
      local i parts=()
      for ((i = 0; i < count; i++)); do parts+=("$STAGE/$(part_name "$i")"); done
      local got; got="$(cat "${parts[@]}" | sha256sum | cut -d' ' -f1)"
      [[ "$got" == "$(bundle_sha)" ]] || die "joined parts sha256 $got != manifest $(bundle_sha)"
      log "dry run: the joined parts match the bundle sha256; contents:"
      cat "${parts[@]}" | tar -tvf - | awk '{printf "  %12s  %s\n", $3, $6}' | tee -a "$LOGFILE" >&2
      log "dry run: would untar into $STAGE/bundle, pip install --no-deps --no-index --target $SITE every wheel, write $ENVFILE"
    fi
    return 0
  fi
  if ((DEPS_ONLY)); then step "extract wheels (deps only)" extract_wheels; else step "join + sha256 + untar" extract_full; fi
  step "pip install dependency wheels" pip_install_deps
  ((DEPS_ONLY)) || step "pip install cosine wheel" pip_install_cosine
  ((DEPS_ONLY)) || step "models into $HMODELS" link_models
  link_source
  write_env
  step "runtime check (imports, onnxruntime CUDA)" check_runtime
}

# ------------------------------------------------------------------ smoke
cmd_smoke() {
  use_env
  step "tiny engine: export (parity on CUDA) + worker bench on CUDA" \
    run_logged smoke "$PYTHON" "$HERE/gpu_worker_bench.py" --provider "$GPU_PROVIDER" --device "$GPU_DEVICE" --iters 100 \
      --json "$RESULTS/smoke.json"
}
run_logged() {  # NAME CMD...: output to runs/gpu/logs/NAME.log and the console; fail loudly
  local name="$1"; shift
  log "\$ $*"
  local rc=0
  "$@" 2>&1 | tee "$LOGS/$name.log" || rc=$?
  ((rc == 0)) || die "$name failed (exit $rc); log: $LOGS/$name.log"
}

# ------------------------------------------------------------------ export
gguf_of() {  # cosine models name -> the staged, stamp-verified GGUF path
  "$PYTHON" -c 'import sys; from cosine import models; p = models.cached_path(sys.argv[1]); print(p or "")' "$1"
}
engine_ok() {  # DIR DTYPE [quantized]: an exported engine with a passed parity check (or quantization)
  [[ -f "$1/manifest.json" ]] || return 1
  "$PYTHON" - "$@" <<'EOF'
import json, sys
m = json.load(open(sys.argv[1] + "/manifest.json"))
q = len(sys.argv) > 3
ok = (m.get("quantization") if q else (m.get("dtype") == sys.argv[2] and (m.get("parity") or {}).get("passed")))
sys.exit(0 if ok else 1)
EOF
}
export_jobs() {  # prints: NAME OUTDIR MODEL-NAME ARGS...
  echo "target $ENGINES/$TARGET-fp16 $TARGET --dtype float16 --provider $GPU_PROVIDER"
  if [[ "$DRAFTERS" == gpu ]]; then
    echo "drafter $ENGINES/$DRAFTER-fp16 $DRAFTER --dtype float16 --provider $GPU_PROVIDER"
  else
    echo "drafter-int4 $ENGINES/$DRAFTER-int4 $DRAFTER --quantize int4 --dtype float32 --provider cpu"
  fi
}
run_exports() {
  local pids=() names=() line name out model args gguf todo=0
  while read -r name out model args; do
    local q=""; [[ "$args" == *--quantize* ]] && q=quantized
    local dt=float16; [[ "$args" == *float32* ]] && dt=float32
    if ((FORCE == 0)) && engine_ok "$out" "$dt" $q; then
      log "$name: $out already exported (manifest ok); skipping (--force redoes it)"
      continue
    fi
    gguf="$(gguf_of "$model")"
    [[ -n "$gguf" ]] || die "$model's GGUF is not in $HMODELS: run 'remote.sh install' with all parts staged"
    # shellcheck disable=SC2086
    local cmd=("$PYTHON" -m cosine.export --model "$gguf" --out "$out" --name "$model" $args)
    if ((DRY)); then log "dry run: would run: ${cmd[*]}"; continue; fi
    log "$name: ${cmd[*]}  (log: $LOGS/export-$name.log)"
    "${cmd[@]}" < /dev/null > "$LOGS/export-$name.log" 2>&1 &
    pids+=($!); names+=("$name"); todo=1
  done < <(export_jobs)
  ((todo)) || return 0
  local i failed=()
  for i in "${!pids[@]}"; do
    if wait "${pids[$i]}"; then
      log "${names[$i]}: done; phases:"
      grep -E 's \(peak RSS|parity' "$LOGS/export-${names[$i]}.log" | sed 's/^/    /' | tee -a "$LOGFILE" >&2 || true
      tail -n 1 "$LOGS/export-${names[$i]}.log" | tee -a "$LOGFILE" >&2
    else
      failed+=("${names[$i]}")
      log "${names[$i]} FAILED; last lines of $LOGS/export-${names[$i]}.log:"
      tail -n 40 "$LOGS/export-${names[$i]}.log" | tr '\r' '\n' | tail -n 40 >&2
    fi
  done
  ((${#failed[@]} == 0)) || die "export failed for: ${failed[*]} (logs in $LOGS)"
}
cmd_export() {
  use_env
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
    | sed 's/^/GPU: /' | tee -a "$LOGFILE" >&2 || true
  step "export engines (drafters on $DRAFTERS, in parallel)" run_exports
}

# ------------------------------------------------------------------ bench
write_config() {  # PATH
  local d_engine d_dtype d_quant d_dev d_prov d_threads
  if [[ "$DRAFTERS" == gpu ]]; then
    d_engine="$ENGINES/$DRAFTER-fp16"; d_dtype=float16; d_quant=""; d_dev="$GPU_DEVICE"; d_prov="$GPU_PROVIDER"; d_threads=0
  else
    d_engine="$ENGINES/$DRAFTER-int4"; d_dtype=float32; d_quant='quantize = "int4"'; d_dev=cpu; d_prov=cpu
    d_threads="$DRAFTER_THREADS"
  fi
  cat > "$1" <<EOF
# Written by tools/airgap/remote.sh bench on $(hostname) ($(date -u +%FT%TZ)).
# Verifier on the GPU; the 0.5B drafter on $DRAFTERS; prompt lookup on CPU. Controller
# settings as in the repo's config.toml, so the ratios compare with docs/benchmarks/.
[logging]
level = "INFO"
file = ""

[limits]
max_prompt_tokens = 2048
max_new_tokens = 1024
max_tree_nodes = 64
max_message_bytes = 67108864

[[models]]
name = "$TARGET"
role = "target"
source = "$TARGET"
engine = "$ENGINES/$TARGET-fp16"
dtype = "float16"

[[models]]
name = "$DRAFTER"
role = "drafter"
source = "$DRAFTER"
engine = "$d_engine"
dtype = "$d_dtype"
$d_quant
domains = ["code", "docs"]

[[models]]
name = "prompt-lookup"
role = "drafter"
kind = "lookup"
domains = ["code", "docs"]

[[workers]]
name = "verifier-0"
model = "$TARGET"
host = "127.0.0.1"
port = 5711
device = "$GPU_DEVICE"
provider = "$GPU_PROVIDER"
max_batch = 16
kv_budget_tokens = 65536
idle_timeout_s = 600.0

[[workers]]
name = "drafter-0"
model = "$DRAFTER"
host = "127.0.0.1"
port = 5712
device = "$d_dev"
provider = "$d_prov"
threads = $d_threads
max_batch = 16
kv_budget_tokens = 65536
idle_timeout_s = 600.0

[[workers]]
name = "drafter-lookup"
model = "prompt-lookup"
host = "127.0.0.1"
port = 5713
max_batch = 64
kv_budget_tokens = 262144
idle_timeout_s = 600.0

[controller]
endpoint = "tcp://127.0.0.1:5710"
mode = "cosine"
request_timeout_s = 600.0
worker_timeout_s = 60.0
temperature = 0.0

[controller.speculation]
draft_len = 4
min_draft_len = 1
max_draft_len = 8
tree_width = 1
adaptive = true

[controller.routing]
max_drafters_per_request = 2
ema = 0.5
explore_threshold = 1.5

[controller.fusion]
rule = "max"
min_confidence = 0.0

[controller.scheduling]
max_batch = 8
max_verify_tokens = 256
latency_weight = 0.5
EOF
  "$PYTHON" - "$1" "$((1 - DRY))" <<'EOF' || die "the generated config $1 does not load (see above)"
import sys
from cosine import config
cfg = config.load(sys.argv[1], check_engines=sys.argv[2] == "1")
print(f"config {sys.argv[1]}: " + ", ".join(f"{w.name} on {w.device}/{w.provider}" for w in cfg.workers))
EOF
}
cmd_bench() {
  use_env
  local cfg="$RESULTS/config.toml" t_engine="$ENGINES/$TARGET-fp16"
  if ((DRY == 0)); then
    engine_ok "$t_engine" float16 || die "no exported target engine at $t_engine: run 'remote.sh export' first"
    if [[ "$DRAFTERS" == gpu ]]; then
      engine_ok "$ENGINES/$DRAFTER-fp16" float16 || die "no fp16 drafter engine: run 'remote.sh export' first"
    else
      engine_ok "$ENGINES/$DRAFTER-int4" float32 quantized || die "no int4 drafter engine: run 'remote.sh export --drafters cpu' first"
    fi
  fi
  step "write + validate $cfg" write_config "$cfg"
  local peers_arg=none; [[ "$PEERS" == cpu ]] && peers_arg="hf,hf-assisted"
  # per-engine worker numbers: overhead, prefill, decode at batch 1/4/16, verify vs tree size;
  # COSINE_GPU_BANDWIDTH_GBS (e.g. 3350 for an H100 SXM) adds the memory-bandwidth floor ratio
  local wb=("$PYTHON" "$HERE/gpu_worker_bench.py" --engine "$t_engine" --provider "$GPU_PROVIDER" --device "$GPU_DEVICE"
            --iters "$ITERS" --json "$RESULTS/worker-bench.json" --md "$LOGS/worker-bench.md")
  if [[ -n "${COSINE_GPU_BANDWIDTH_GBS:-}" ]]; then wb+=(--bandwidth-gbs "$COSINE_GPU_BANDWIDTH_GBS"); fi
  local run=("$PYTHON" -m cosine.bench run --config "$cfg" --modes "$MODES" --concurrency "$CONC"
             --domains code,docs,prose,german --per-domain "$PERDOM" --max-tokens "$MAXTOK" --peers "$peers_arg"
             --out "$BENCH")
  local peers=("$PYTHON" "$HERE/gpu_peers.py" --results "$BENCH" --device "$GPU_DEVICE" --dtype float16)
  log "profile: $( ((QUICK)) && echo quick || echo full ): modes $MODES, concurrency $CONC, $MAXTOK tokens, per-domain ${PERDOM} (0 = all), drafters on $DRAFTERS, peers $PEERS"
  if ((DRY)); then
    log "dry run: would run: ${wb[*]}"
    log "dry run: would run: ${run[*]}"
    [[ "$PEERS" == gpu ]] && log "dry run: would run: ${peers[*]}"
    return 0
  fi
  rm -rf "$BENCH"
  step "worker round trips on $GPU_PROVIDER (cosine-bench worker, target)" run_logged worker-bench "${wb[@]}"
  step "cosine-bench run" run_logged bench "${run[@]}"
  if [[ "$PEERS" == gpu ]]; then
    step "HF peers on $GPU_DEVICE fp16" run_logged peers "${peers[@]}"
  fi
  collect_results
  cat "$BENCH/results.md" >&2
}
collect_results() {  # into $OUT: 8 files at most come back, so the timeline plots and logs go as one tar
  if [[ -z "${OUT:-}" ]]; then
    log "results in $BENCH (results.json, results.md, plots), $RESULTS/worker-bench.json, logs in $LOGS"
    return 0
  fi
  mkdir -p "$OUT/bench"
  local f
  for f in results.json results.md throughput.png accepted_length.png; do
    [[ -f "$BENCH/$f" ]] && cp "$BENCH/$f" "$OUT/bench/"
  done
  tar -czf "$OUT/extras.tar.gz" -C "$WORK" --exclude=results.json bench logs
  log "results in \$OUT: bench/results.{json,md}, bench/*.png, worker-bench.json, config.toml, remote.log, extras.tar.gz (timeline plots, logs)"
}

# ------------------------------------------------------------------ status
cmd_status() {
  if [[ -f "$MANIFEST" ]]; then
    load_meta
    local n miss; n="$(meta parts)"; miss="$(missing_parts "$n")"
    log "bundle $(bundle_sha | cut -c1-12): $n parts, $(meta total_bytes) bytes, deps in the first $(meta deps_parts)"
    log "staged in $STAGE: $((n - $(wc -w <<<"$miss"))) of $n${miss:+; missing: $miss}"
  else
    log "no bundle staged in $STAGE"
  fi
  [[ -f "$STAGE/bundle/.extracted" ]] && log "extracted: $STAGE/bundle (full)"
  [[ -f "$STAGE/bundle/.wheels" ]] && log "extracted: $STAGE/bundle/wheels (deps only)"
  [[ -f "$SITE/.cosine-deps" ]] && log "installed: $SITE ($(ls "$SITE" | wc -l) entries); env: $ENVFILE" || log "not installed"
  local m
  for m in "$ENGINES"/*/manifest.json; do
    [[ -f "$m" ]] && log "engine: $(dirname "$m")"
  done
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader \
    | sed 's/^/GPU: /' >&2 || true
}

case "$CMD" in
  put) cmd_put ;;
  install) cmd_install ;;
  smoke) cmd_smoke ;;
  export) cmd_export ;;
  bench) cmd_bench ;;
  all)
    cmd_install
    ((DRY)) && { log "dry run: export and bench need the install; stopping here"; exit 0; }
    cmd_export
    cmd_bench ;;
  status) cmd_status ;;
  *) die "unknown command '$CMD': put, install, smoke, export, bench, all, status (see the header of $0)" ;;
esac
