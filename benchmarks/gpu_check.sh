#!/usr/bin/env bash
# One GPU check, sized for at most 8 minutes on one H200: each section prints the ratios it measured in this run.
#
#   (a) compaction kernels vs a device-to-device copy      benchmarks/compaction.py
#   (b) head-row decode attention at 3x vs dense decode    benchmarks/head_row_attention.py
#   (c) KVzip+ scoring vs plain prefill                    benchmarks/kvzip_scoring.py
#   (d) HF adapter decode vs stock (random ~1B Llama)      benchmarks/hf_cache.py --preset gpu
#
# Usage:  bash benchmarks/gpu_check.sh            # on the GPU machine
#         bash benchmarks/gpu_check.sh --dry-run  # tiny sizes on CPU, to check the wiring (seconds to minutes)
#
# Sections are independent: one that fails (or runs past its time limit) prints FAILED and the next one runs;
# the exit status is nonzero if any failed. The GPU image has no kvpolicy install (and no pydantic): the source is
# staged as an importable package (kvpolicy/ with policies/ and adapters/ inside, the layout the package-dir
# mapping of pyproject.toml gives an install) and put on PYTHONPATH; wheels in .whl/ are installed if present.
# Environment: PYTHON (interpreter; default .venv/bin/python if there, else python), KVP_STAGE (staging directory;
# default a fresh one under /tmp), KVP_LIMIT_A..KVP_LIMIT_D (per-section limits in seconds).

set -u

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DRY_RUN=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    *) echo "usage: $0 [--dry-run]" >&2; exit 2 ;;
  esac
done

if [ -z "${PYTHON:-}" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python; fi
fi
START=$SECONDS
FAILED=()
LOGS="$(mktemp -d /tmp/gpu_check_logs.XXXXXX)"

# -- staging: an importable kvpolicy from this checkout ----------------------------------------------------------
if [ -n "${KVP_STAGE:-}" ]; then
  STAGE="$KVP_STAGE"
  trap 'rm -rf "$LOGS"' EXIT
else
  STAGE="$(mktemp -d /tmp/kvp.XXXXXX)"
  trap 'rm -rf "$LOGS" "$STAGE"' EXIT
fi
rm -rf "$STAGE/kvpolicy"
mkdir -p "$STAGE"
cp -r "$ROOT/kvpolicy" "$STAGE/kvpolicy"
cp -r "$ROOT/policies" "$STAGE/kvpolicy/policies"
cp -r "$ROOT/adapters" "$STAGE/kvpolicy/adapters"
find "$STAGE" -name __pycache__ -type d -prune -exec rm -rf {} +
export PYTHONPATH="$STAGE${PYTHONPATH:+:$PYTHONPATH}"
if [ -d "$ROOT/.whl" ]; then
  "$PYTHON" -m pip install --quiet --no-index --find-links "$ROOT/.whl" pydantic \
    || echo "WARNING: installing pydantic from .whl/ failed; sections that need it will fail"
fi
if [ "$DRY_RUN" = 1 ]; then
  export CUDA_VISIBLE_DEVICES=""  # CPU only, even where a GPU exists
else
  unset TRITON_INTERPRET  # compiled kernels, never the interpreter
fi

# Each script runs with the checkout as its working directory but neither it nor benchmarks/ at the front of
# sys.path: `import kvpolicy` must find the staged copy, not the checkout's kvpolicy/ (which lacks the policies and
# adapters folders). benchmarks/ goes last, for helpers the scripts may share.
RUNNER='import os, runpy, sys
path = sys.argv[1]
sys.argv = sys.argv[1:]
sys.path[:] = [p for p in sys.path if p not in ("", os.getcwd())]
sys.path.append(os.path.dirname(os.path.abspath(path)))
runpy.run_path(path, run_name="__main__")'

echo "=== gpu_check ($([ "$DRY_RUN" = 1 ] && echo dry run, CPU || echo GPU)) from $ROOT, staged at $STAGE"
command -v nvidia-smi >/dev/null && [ "$DRY_RUN" = 0 ] && nvidia-smi -L
(cd "$STAGE" && "$PYTHON" -) <<'EOF' || echo "WARNING: the environment check failed"
import importlib.util, platform, torch, kvpolicy
print(f"python {platform.python_version()}; torch {torch.__version__}; cuda available: {torch.cuda.is_available()}")
for name in ("triton", "transformers", "pydantic"):
    spec = importlib.util.find_spec(name)
    print(f"{name}: {__import__(name).__version__ if spec else 'not installed'}")
print(f"kvpolicy from {kvpolicy.__file__}")
EOF

# -- sections -------------------------------------------------------------------------------------------------
section() {  # section NAME LIMIT_SECONDS COMMAND...
  local name="$1" limit="$2"
  shift 2
  local log="$LOGS/$name.log" began=$SECONDS status
  echo
  local shown=() word
  for word in "$@"; do [ "$word" = "$RUNNER" ] && shown+=("<runner>") || shown+=("$word"); done
  echo "=== [$name] (limit ${limit}s) ${shown[*]}"
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$log"
  status=${PIPESTATUS[0]}
  if [ "$status" = 0 ]; then
    echo "=== [$name] ok in $((SECONDS - began)) s"
  else
    [ "$status" = 124 ] && echo "=== [$name] timed out after ${limit}s"
    echo "=== [$name] FAILED (exit status $status, $((SECONDS - began)) s)"
    FAILED+=("$name")
  fi
}

cd "$ROOT" || exit 2
if [ "$DRY_RUN" = 1 ]; then
  section a-compaction "${KVP_LIMIT_A:-120}" "$PYTHON" -c "$RUNNER" benchmarks/compaction.py --device cpu --tokens 512 \
    --kv-heads 2 --head-dim 64 --iters 3 --warmup 1 --threads 1
  section b-head-row-decode "${KVP_LIMIT_B:-120}" "$PYTHON" -c "$RUNNER" benchmarks/head_row_attention.py --dry-run
  section c-kvzip-scoring "${KVP_LIMIT_C:-180}" "$PYTHON" -c "$RUNNER" benchmarks/kvzip_scoring.py --dry-run
  section d-hf-decode "${KVP_LIMIT_D:-180}" "$PYTHON" -c "$RUNNER" benchmarks/hf_cache.py --dry-run
else
  # Limits add up to 7 min 25 s, leaving the rest of 8 min for staging and start-up.
  section a-compaction "${KVP_LIMIT_A:-75}" "$PYTHON" -c "$RUNNER" benchmarks/compaction.py --device cuda
  section b-head-row-decode "${KVP_LIMIT_B:-100}" "$PYTHON" -c "$RUNNER" benchmarks/head_row_attention.py --device cuda
  section c-kvzip-scoring "${KVP_LIMIT_C:-120}" "$PYTHON" -c "$RUNNER" benchmarks/kvzip_scoring.py --device cuda
  section d-hf-decode "${KVP_LIMIT_D:-150}" "$PYTHON" -c "$RUNNER" benchmarks/hf_cache.py --device cuda --preset gpu
fi

# -- summary: the ratio lines each section printed ------------------------------------------------------------
echo
echo "=== summary ($((SECONDS - START)) s)"
for log in "$LOGS"/*.log; do
  name="$(basename "$log" .log)"
  if [[ " ${FAILED[*]} " == *" $name "* ]]; then echo "[$name] FAILED"; else echo "[$name] ok"; fi
  grep -E "of copy|^compact_heads|^varlen_attention|ratio|RESULT|x stock|speedup" "$log" | sed 's/^/    /' | head -20
done
if [ "${#FAILED[@]}" -gt 0 ]; then
  echo "FAILED sections: ${FAILED[*]}"
  exit 1
fi
echo "all sections ok"
