#!/usr/bin/env bash
# Set up everything on a fresh machine (CPU is fine), in three virtualenvs under the repository root:
#   .venv          kvpolicy with its test extras (torch 2.13.0 CPU build first: no CUDA download)
#   .venv-sglang   SGLang 0.5.19 for CPU (--no-deps + the pinned light dependencies + test stand-ins)
#   .venv-kvpress  kvpress 0.5.5 for the parity check (it needs transformers < 5.3)
# Skip the optional ones with --no-sglang / --no-parity.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
with_sglang=1
with_parity=1
for arg in "$@"; do
  case "$arg" in
    --no-sglang) with_sglang=0 ;;
    --no-parity) with_parity=0 ;;
    *) echo "unknown option: $arg (use --no-sglang, --no-parity)" >&2; exit 2 ;;
  esac
done

quiet() { "$@" -q --disable-pip-version-check; }

echo "[setup] .venv: kvpolicy + test extras"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
quiet .venv/bin/python -m pip install --upgrade pip
quiet .venv/bin/python -m pip install torch==2.13.0
quiet .venv/bin/python -m pip install -e ".[test]"

if [ "$with_sglang" = 1 ]; then
  echo "[setup] .venv-sglang: SGLang 0.5.19 (CPU)"
  [ -x .venv-sglang/bin/python ] || "$PYTHON" -m venv .venv-sglang
  quiet .venv-sglang/bin/python -m pip install --upgrade pip
  quiet .venv-sglang/bin/python -m pip install -r requirements/sglang-cpu.txt
  # Never without --no-deps: SGLang's own metadata pulls CUDA wheels.
  quiet .venv-sglang/bin/python -m pip install --no-deps sglang==0.5.19
  quiet .venv-sglang/bin/python -m pip install --no-deps -e .
  purelib=$(.venv-sglang/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  .venv-sglang/bin/python tests/support/sglang_cpu_standins.py > "$purelib/kvpolicy_sglang_cpu_standins.pth"
fi

if [ "$with_parity" = 1 ] && [ -f requirements/kvpress-parity.txt ]; then
  echo "[setup] .venv-kvpress: kvpress 0.5.5 parity environment"
  [ -x .venv-kvpress/bin/python ] || "$PYTHON" -m venv .venv-kvpress
  quiet .venv-kvpress/bin/python -m pip install --upgrade pip
  quiet .venv-kvpress/bin/python -m pip install -r requirements/kvpress-parity.txt
  quiet .venv-kvpress/bin/python -m pip install --no-deps -e .
fi
echo "[setup] done"
