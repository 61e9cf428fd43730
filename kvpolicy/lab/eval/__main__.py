"""``python -m kvpolicy.lab.eval [--model DIR] [--policy NAME[:key=value,...]] [--n 20]``.

Prints the per-task, per-length exact-match table of the testbed model (shipped one by default) under a KV
policy (``none``, the default, is the full cache), and optionally writes the result as JSON. The policy spec is
the lab's one grammar (:mod:`kvpolicy.lab.specs`), without sweeps. On the shipped testbed the policy gets the
testbed's defaults (its trained surrogates, its oracle prompt ids) as ``kvpolicy compare`` does.
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
    parser.add_argument("--policy", default="none", help="NAME[:key=value,...]; none (default) = the full cache")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS))
    parser.add_argument("--lengths", nargs="+", type=int, default=list(DEFAULT_LENGTHS))
    parser.add_argument("--n", type=int, default=20, help="examples per task and length")
    parser.add_argument("--seed", type=int, default=EVAL_SEED)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--strict", action="store_true", help="also require the closing <eos>")
    parser.add_argument("--json", type=Path, default=None, help="write the result here")
    args = parser.parse_args(argv)
    from kvpolicy.lab.specs import SpecError, parse_spec

    try:
        specs = parse_spec(args.policy)
    except SpecError as exc:
        parser.error(str(exc))
    if len(specs) != 1:
        parser.error(f"--policy {args.policy!r} sweeps {len(specs)} configurations; use kvpolicy compare for sweeps")
    spec = specs[0]
    policy = None if spec.is_none else spec.name
    config = dict(spec.config)
    if args.model is None and policy is not None:
        from kvpolicy.lab.testbed import with_testbed_defaults

        config = with_testbed_defaults(policy, config)

    import torch

    torch.set_num_threads(args.threads)
    model, tokenizer = load(args.model)
    result = evaluate_policy(model, tokenizer, policy, config, args.tasks, args.lengths,
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
