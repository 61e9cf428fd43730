#!/usr/bin/env bash
# Set up everything on a fresh machine (CPU is fine), in four virtualenvs under the repository root:
#   .venv          kvpolicy with its test extras and the newest transformers tested (torch 2.13.0 CPU build
#                  first: no CUDA download)
#   .venv-oldest   the same with the oldest transformers supported (the other end of the supported range)
#   .venv-sglang   SGLang 0.5.23 for CPU (--no-deps + the pinned light dependencies + test stand-ins)
#   .venv-kvpress  kvpress 0.5.5 for the parity check (it needs transformers < 5.3)
# Skip the optional ones with --no-oldest / --no-sglang / --no-parity.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
# The two ends of the supported transformers range that CI tests (adapters/hf/_compat.py names the same).
TRANSFORMERS_NEWEST=5.25.0
TRANSFORMERS_OLDEST=5.0.0
with_oldest=1
with_sglang=1
with_parity=1
for arg in "$@"; do
  case "$arg" in
    --no-oldest) with_oldest=0 ;;
    --no-sglang) with_sglang=0 ;;
    --no-parity) with_parity=0 ;;
    *) echo "unknown option: $arg (use --no-oldest, --no-sglang, --no-parity)" >&2; exit 2 ;;
  esac
done

quiet() { "$@" -q --disable-pip-version-check; }

# Free disk needed per environment not yet built, in MiB (measured sizes, 2026-11: 2.2 / 2.7 / 1.4 GiB, plus
# room for pip's unpacking). Checked up front: a full disk half-way through leaves a broken venv behind.
need_mib=0
[ -x .venv/bin/python ] || need_mib=$((need_mib + 2600))
if [ "$with_oldest" = 1 ] && [ ! -x .venv-oldest/bin/python ]; then need_mib=$((need_mib + 2600)); fi
if [ "$with_sglang" = 1 ] && [ ! -x .venv-sglang/bin/python ]; then need_mib=$((need_mib + 3100)); fi
if [ "$with_parity" = 1 ] && [ ! -x .venv-kvpress/bin/python ]; then need_mib=$((need_mib + 1800)); fi
free_mib=$(df -Pm . | awk 'NR == 2 { print $4 }')
if [ "$need_mib" -gt 0 ] && [ "$free_mib" -lt "$need_mib" ]; then
  echo "[setup] not enough disk: the environments to build need about ${need_mib} MiB, $(pwd) has ${free_mib} MiB free." >&2
  echo "[setup] Free some space, or skip the optional environments with --no-sglang / --no-parity." >&2
  exit 1
fi

# torch first (the CPU build: nothing in kvpolicy's metadata caps torch), then the transformers under test, then
# kvpolicy, whose lower bounds those satisfy, so pip changes neither.
main_env() {
  local venv=$1 transformers=$2
  [ -x "$venv/bin/python" ] || "$PYTHON" -m venv "$venv"
  quiet "$venv/bin/python" -m pip install --upgrade pip
  quiet "$venv/bin/python" -m pip install torch==2.13.0
  quiet "$venv/bin/python" -m pip install "transformers==$transformers"
  quiet "$venv/bin/python" -m pip install -e ".[test]"
}

echo "[setup] .venv: kvpolicy + test extras, transformers $TRANSFORMERS_NEWEST"
main_env .venv "$TRANSFORMERS_NEWEST"
if [ "$with_oldest" = 1 ]; then
  echo "[setup] .venv-oldest: kvpolicy + test extras, transformers $TRANSFORMERS_OLDEST"
  main_env .venv-oldest "$TRANSFORMERS_OLDEST"
fi

if [ "$with_sglang" = 1 ]; then
  echo "[setup] .venv-sglang: SGLang 0.5.23 (CPU)"
  [ -x .venv-sglang/bin/python ] || "$PYTHON" -m venv .venv-sglang
  quiet .venv-sglang/bin/python -m pip install --upgrade pip
  quiet .venv-sglang/bin/python -m pip install -r requirements/sglang-cpu.txt
  # Never without --no-deps: SGLang's own metadata pulls CUDA wheels.
  quiet .venv-sglang/bin/python -m pip install --no-deps sglang==0.5.23
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
