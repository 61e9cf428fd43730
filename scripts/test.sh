#!/usr/bin/env bash
# Run the linter (ruff, configured in pyproject.toml), then the whole test suite: the main environment (newest
# transformers tested), then the oldest-transformers, SGLang and kvpress-parity environments when set up
# (scripts/setup.sh). Extra arguments go to every pytest run. pytest's "no tests collected" (exit 5) counts as a failure.
set -uo pipefail
cd "$(dirname "$0")/.."
status=0
run() {
  local label=$1; shift
  echo "=== $label: $*"
  "$@"
  local rc=$?
  if [ "$rc" -eq 5 ]; then echo "=== $label: no tests collected (failure)" >&2; rc=1; fi
  if [ "$rc" -ne 0 ]; then status=1; fi
}
run lint .venv/bin/ruff check .
run main .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
if [ -x .venv-oldest/bin/python ]; then
  run oldest-transformers .venv-oldest/bin/python -m pytest -q -p no:cacheprovider "$@"
fi
if [ -x .venv-sglang/bin/python ]; then
  # The HF adapter's tests too: this venv has SGLang's own transformers pin (5.19.0).
  run sglang .venv-sglang/bin/python -m pytest -q -p no:cacheprovider tests/adapters/sglang tests/serving \
    tests/adapters/test_hf_adapter.py tests/adapters/test_all_policies.py tests/adapters/test_hf_versions.py "$@"
fi
if [ -x .venv-kvpress/bin/python ] && [ -d tests/parity ]; then
  run kvpress-parity .venv-kvpress/bin/python -m pytest -q -p no:cacheprovider tests/parity "$@"
fi
exit $status
