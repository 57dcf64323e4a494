#!/usr/bin/env bash
# The whole GPU measurement as one prepared script (docs/gpu.md); tools/gpu/measure.py does
# the work. On the GPU host, from the repo's working copy, one device call each:
#
#     tools/gpu/measure.sh put N              keep carried part N; prepares in the background
#     tools/gpu/measure.sh run [--budget S]   measure within S seconds (default 330); results in $OUT
#     tools/gpu/measure.sh status
#
# Here, the same end to end on this CPU with the tiny test models (what CI runs):
#
#     tools/gpu/measure.sh --rehearse [--work DIR]
#
# Python: $PYTHON, else the repo's .venv for --rehearse, else python3 (the host's, with torch).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  PY=python3
  if [[ " $* " == *" --rehearse "* && -x "$REPO/.venv/bin/python" ]]; then PY="$REPO/.venv/bin/python"; fi
fi
exec "$PY" "$HERE/measure.py" "$@"
