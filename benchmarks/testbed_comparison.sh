#!/usr/bin/env bash
# The policy comparison of docs/results.md section 2: every policy on the bundled testbed, all five tasks,
# contexts of 512 and 1024 tokens, 20 held-out examples per (task, length). About 10 minutes on 2 free cores.
set -euo pipefail
cd "$(dirname "$0")/.."
"${PYTHON:-.venv/bin/python}" -m kvpolicy compare \
  --policy none \
  --policy "window:window=32|64|128|256" \
  --policy "kvzap_mlp:threshold=-4|-3|-2|-1.5|-1|-0.5|-0.25|-0.15|-0.1|0|0.25|0.45|0.5|0.6|0.7,window=32" \
  --policy "kvzap_linear:threshold=-4|-3|-2|-1.5|-1|-0.5|-0.25|-0.15|-0.1|0|0.25|0.45|0.5|0.6|0.7,window=32" \
  --policy "kvzip_plus:ratio=0.5|0.6|0.67|0.7|0.75|0.85,window=32,scope=model" \
  --policy "kvzip_plus:ratio=0.5,window=32" \
  --policy "knorm:ratio=0.67,window=32" \
  --policy "snapkv:ratio=0.67,window=32" \
  --policy "random:threshold=-0.4,window=32" \
  --policy "streaming_llm:budget_tokens=256,sinks=4" \
  --lengths 512 1024 -n 20 --out docs/results --overwrite "$@"
