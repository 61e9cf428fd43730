"""``python -m kvpolicy.lab.eval [--model DIR] [--policy NAME --config '{"threshold": -4}'] [--n 20]``.

Prints the per-task, per-length exact-match table of the testbed model (shipped one by default) under a KV
policy (full cache when --policy is omitted), and optionally writes the result as JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main(argv=None) -> None:
    from kvpolicy.lab.eval.suite import DEFAULT_LENGTHS, EVAL_SEED, evaluate_policy
    from kvpolicy.lab.testbed import load
    from kvpolicy.lab.testbed.tasks import TASKS

    parser = argparse.ArgumentParser(description="testbed long-context suite")
    parser.add_argument("--model", type=Path, default=None, help="model directory (default: shipped testbed)")
    parser.add_argument("--policy", default=None, help="registry name; omit for the full cache")
    parser.add_argument("--config", default="{}", help="policy config as JSON")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS))
    parser.add_argument("--lengths", nargs="+", type=int, default=list(DEFAULT_LENGTHS))
    parser.add_argument("--n", type=int, default=20, help="examples per task and length")
    parser.add_argument("--seed", type=int, default=EVAL_SEED)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--strict", action="store_true", help="also require the closing <eos>")
    parser.add_argument("--json", type=Path, default=None, help="write the result here")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    model, tokenizer = load(args.model)
    result = evaluate_policy(model, tokenizer, args.policy, json.loads(args.config), args.tasks, args.lengths,
                             args.n, seed=args.seed, batch_size=args.batch_size, progress=True,
                             strict=args.strict)
    print(result.summary())
    if args.json is not None:
        args.json.write_text(json.dumps(dict(
            policy=result.policy, policy_config=result.policy_config, n=args.n, seed=args.seed,
            scores={t: {str(k): v for k, v in cells.items()} for t, cells in result.scores.items()},
            average=result.average, compression=result.compression, kv_bytes=result.kv_bytes,
            full_kv_bytes=result.full_kv_bytes, prefill_seconds=result.prefill_seconds,
            decode_seconds=result.decode_seconds), indent=1))


if __name__ == "__main__":
    main()
