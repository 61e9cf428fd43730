"""``kvpolicy`` command line: list policies, run the demo, compare policies, train KVzap surrogates."""

from __future__ import annotations

import argparse
import sys


def _cmd_list(args: argparse.Namespace) -> int:
    from kvpolicy.registry import available_policies, get_policy_class, skipped_plugins

    for name in available_policies():
        cls = get_policy_class(name)
        doc = (cls.__doc__ or sys.modules[cls.__module__].__doc__ or "").strip().splitlines()
        decode = "decoding" if cls.supports_decoding else "prefill-only"
        print(f"{name:<16} {decode:<13} {doc[0] if doc else ''}")
    for skipped in skipped_plugins():
        print(f"{skipped.name:<16} (not loaded: {skipped.reason}; from {skipped.distribution})")
    return 0


def _load_model(path: str | None):
    if path is None:
        from kvpolicy.lab.testbed import load

        return load()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def _evaluator(model, tokenizer, args):
    from kvpolicy.lab.compare import FULL, PolicySpec, Row
    from kvpolicy.lab.eval import evaluate_policy

    if args.tasks is None:
        from kvpolicy.lab.testbed.tasks import TASKS

        args.tasks = list(TASKS)

    def evaluate(spec: PolicySpec) -> Row:
        config = dict(spec.config)
        if args.model is None and spec.name in ("kvzap_linear", "kvzap_mlp") and "surrogate" not in config:
            from kvpolicy.lab.testbed import SURROGATES  # the surrogates trained on the bundled testbed

            config["surrogate"] = str(SURROGATES[spec.name.removeprefix("kvzap_")])
        if args.model is None and spec.name == "kvzip_plus":
            from kvpolicy.lab.train_kvzap import testbed_oracle_config

            config = {**testbed_oracle_config(), **config}
        result = evaluate_policy(model, tokenizer, None if spec.name == FULL else spec.name, config,
                                 tasks=args.tasks, lengths=args.lengths, n=args.n, batch_size=args.batch_size)
        return Row(spec.label, spec.name, spec.config, {t: result.suite.task_score(t) for t in result.scores},
                   result.average, result.compression, result.kv_bytes, result.full_kv_bytes,
                   result.prefill_seconds, result.decode_seconds)

    return evaluate


def _cmd_compare(args: argparse.Namespace) -> int:
    from pathlib import Path

    from kvpolicy.lab import compare

    if not args.policy:
        raise SystemExit("kvpolicy compare: give at least one --policy (e.g. --policy full --policy window:window=64)")
    specs = compare.parse_specs(args.policy)
    model, tokenizer = _load_model(args.model)
    rows = compare.run(specs, _evaluator(model, tokenizer, args))
    paths = compare.write_outputs(rows, Path(args.out), title=f"{args.model or 'testbed'}: score vs compression")
    print(compare.to_markdown(rows))
    print("written:", ", ".join(str(p) for p in paths.values()))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    args.policy = args.policy or ["full", "window:window=64", "kvzap_mlp:threshold=-2,window=32",
                                  "kvzip_plus:ratio=0.5,window=32,scope=model"]
    return _cmd_compare(args)


def _cmd_train_kvzap(args: argparse.Namespace) -> int:
    import json

    import torch

    from kvpolicy.lab import train_kvzap as tk

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = _load_model(args.model)
    if args.prompts:
        prompts = []
        with open(args.prompts) as fh:
            for line in fh:
                item = json.loads(line)
                ids = item["input_ids"] if "input_ids" in item else tokenizer(item["text"])["input_ids"]
                prompts.append(torch.tensor([ids]))
        oracle_config = json.loads(args.oracle_config) if args.oracle_config else {}
    else:
        if args.model is not None:
            raise SystemExit("kvpolicy train-kvzap: give --prompts (JSONL with 'text' or 'input_ids') for --model")
        prompts = tk.testbed_prompts(args.num_prompts, args.lengths, args.seed)
        oracle_config = {**tk.testbed_oracle_config(), **json.loads(args.oracle_config or "{}")}
    reports = tk.train_kvzap(model, prompts, args.out, oracle_config=oracle_config, kinds=args.kinds,
                             positions=args.positions, held_out_fraction=args.held_out, tokenizer=tokenizer,
                             seed=args.seed, mlp_hidden_dim=args.mlp_hidden_dim, mlp_kwargs={"epochs": args.epochs})
    for report in reports:
        print(report.table())
    return 0


def _cmd_bench_serve(args: argparse.Namespace) -> int:
    from pathlib import Path

    from kvpolicy.lab import serve_bench
    from kvpolicy.lab.testbed import MODEL_DIR

    runs = [serve_bench.parse_policy_run(spec) for spec in (args.policy or ["none", 'window:{"window": 64}'])]
    if args.model is None:   # the bundled testbed: its trained KVzap surrogates unless one is given
        from kvpolicy.lab.testbed import SURROGATES

        runs = [serve_bench.PolicyRun(r.label, r.policy, {"surrogate": str(SURROGATES[r.policy.removeprefix("kvzap_")]),
                                                          **r.config})
                if r.policy in ("kvzap_linear", "kvzap_mlp") and "surrogate" not in r.config else r for r in runs]
    runs = [r.with_granularity(args.kv_granularity, args.kv_token_vote, args.kv_min_keep_fraction) for r in runs]
    examples = serve_bench.suite_examples(args.tasks, args.lengths, args.n)
    if args.repeat > 1:
        examples = examples * args.repeat
    rows = serve_bench.run_bench(args.model or MODEL_DIR, runs, examples, args.concurrency, Path(args.out),
                                 max_total_tokens=args.max_total_tokens, server_python=args.server_python,
                                 timeout=args.timeout, deadline_s=args.deadline, max_new_tokens=args.max_new_tokens)
    print(serve_bench.to_markdown(rows))
    print("written:", args.out)
    return 0


def _add_suite_args(p: argparse.ArgumentParser, *, n: int, lengths: list[int]) -> None:
    p.add_argument("--model", default=None, help="HF model directory (default: the bundled testbed)")
    p.add_argument("--policy", action="append", help="NAME or NAME:key=v1|v2,key=v (repeatable; 'full' = no policy)")
    p.add_argument("--tasks", nargs="+", default=None, help="default: every testbed task")
    p.add_argument("--lengths", nargs="+", type=int, default=lengths)
    p.add_argument("-n", type=int, default=n, help="examples per (task, length)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", default="results/compare")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvpolicy", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list the available policies").set_defaults(func=_cmd_list)
    p = sub.add_parser("compare", help="compare policies on the same model and suite (table, CSV, plot)")
    _add_suite_args(p, n=20, lengths=[512, 1024, 2048])
    p.set_defaults(func=_cmd_compare)
    p = sub.add_parser("demo", help="a small comparison on the bundled testbed model")
    _add_suite_args(p, n=4, lengths=[512])
    p.set_defaults(func=_cmd_demo, out="results/demo")
    p = sub.add_parser("train-kvzap", help="train KVzap surrogates (linear, MLP) from the KVzip+ oracle")
    p.add_argument("--model", default=None, help="HF model directory (default: the bundled testbed)")
    p.add_argument("--prompts", default=None, help="JSONL of training prompts ({'text': ...} or {'input_ids': [...]})")
    p.add_argument("--num-prompts", type=int, default=60, help="testbed only: generated training prompts")
    p.add_argument("--lengths", nargs="+", type=int, default=[512, 1024], help="testbed only: context lengths")
    p.add_argument("--positions", type=int, default=500, help="sampled positions per prompt")
    p.add_argument("--kinds", nargs="+", default=["linear", "mlp"], choices=["linear", "mlp"])
    p.add_argument("--held-out", type=float, default=0.2, help="fraction of prompts held out for R2")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--mlp-hidden-dim", type=int, default=None, help="MLP width (default: hidden_size / 8)")
    p.add_argument("--oracle-config", default=None, help="JSON config for kvzip_plus (e.g. prompt ids)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="results/kvzap")
    p.set_defaults(func=_cmd_train_kvzap)
    # Listed for --help only: main() hands everything after "serve" to the launcher before parsing.
    sub.add_parser("serve", add_help=False,
                   help="SGLang server with a policy: kvpolicy serve --kv-policy NAME [--kv-policy-config JSON] "
                        "--model-path M ... (same as python -m sglang.launch_server --kv-policy ...)")
    p = sub.add_parser("bench-serve", help="serve the testbed suite through real SGLang servers, one per policy")
    p.add_argument("--model", default=None, help="model directory (default: the bundled testbed)")
    p.add_argument("--policy", action="append",
                   help="'none' (SGLang without kvpolicy), NAME or NAME:JSON, e.g. 'window:{\"window\": 64}' or "
                        "'kvzap_mlp:{\"surrogate\": \"DIR\", \"threshold\": -4}' (repeatable)")
    p.add_argument("--tasks", nargs="+", default=["single_needle", "multi_key"])
    p.add_argument("--lengths", nargs="+", type=int, default=[256])
    p.add_argument("-n", type=int, default=8, help="examples per (task, length)")
    p.add_argument("--repeat", type=int, default=1, help="send the example list this many times (load tests)")
    p.add_argument("--concurrency", nargs="+", type=int, default=[1, 8], help="client threads (e.g. 1 8 200)")
    p.add_argument("--max-total-tokens", type=int, default=4096, help="KV pool of every server (slots)")
    p.add_argument("--kv-granularity", choices=["head", "token"], default=None,
                   help="what an eviction frees, for every policy run: a (layer, KV head) entry (the launcher's "
                        "default) or a whole token by a vote")
    p.add_argument("--kv-token-vote", choices=["any", "fraction"], default=None,
                   help="token granularity: how per-head decisions become token frees (default: any)")
    p.add_argument("--kv-min-keep-fraction", type=float, default=None,
                   help="fraction vote: keep a token when at least this share of (layer, head) pairs keeps it")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="generate exactly this many tokens per request, EOS ignored (memory/concurrency runs; "
                        "default: the answer's length)")
    p.add_argument("--server-python", default=None, help="interpreter with sglang (default: this one)")
    p.add_argument("--timeout", type=float, default=120.0, help="per-request timeout (s)")
    p.add_argument("--deadline", type=float, default=1800.0, help="no request is started after this many s")
    p.add_argument("--out", default="results/serve")
    p.set_defaults(func=_cmd_bench_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:  # every argument goes to the launcher (SGLang's flags start with "--")
        from kvpolicy.adapters.sglang.launch import main as launch_main

        return launch_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)
