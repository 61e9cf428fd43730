"""``kvpolicy`` command line: list policies, run the demo, compare policies, train KVzap surrogates, serve.

Policy specs follow one grammar everywhere (:mod:`kvpolicy.lab.specs`; ``none`` = no policy). A command line
that cannot work (a bad spec, a non-local ``--model``, an ``--out`` that is a file or not empty without
``--overwrite``) is refused before any model is loaded: ``kvpolicy CMD: error: ...`` on stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

EXIT_USAGE = 2
DEMO_OUT = "results/demo"


class CommandError(Exception):
    """A command line refused before any work: ``main`` prints ``kvpolicy CMD: error: MESSAGE`` and exits 2."""


def _cmd_list(args: argparse.Namespace) -> int:
    import warnings

    from kvpolicy.registry import (
        ALLOWLIST_ENV,
        PluginWarning,
        allowlist_problems,
        available_policies,
        get_policy_class,
        skipped_plugins,
    )

    with warnings.catch_warnings():  # printed below, in the listing, instead
        warnings.simplefilter("ignore", PluginWarning)
        names = available_policies()
    for name in names:
        try:
            cls = get_policy_class(name)
        except (ImportError, TypeError) as exc:  # an allowlisted plugin that does not load: say why, go on
            print(f"{name:<16} (failed to load: {exc})")
            continue
        doc = (cls.__doc__ or sys.modules[cls.__module__].__doc__ or "").strip().splitlines()
        decode = "decoding" if cls.supports_decoding else "prefill-only"
        print(f"{name:<16} {decode:<13} {doc[0] if doc else ''}")
    for skipped in skipped_plugins():
        print(f"{skipped.name:<16} (not loaded: {skipped.reason}; from {skipped.distribution})")
    problems = allowlist_problems()
    if problems:
        print(f"\nwarning: {ALLOWLIST_ENV} was not understood in full:")
        for problem in problems:
            print(f"  {problem}")
    return 0


def _output_dir(path: str, overwrite: bool) -> Path:
    """``--out`` checked before any work: a directory, empty or absent unless ``--overwrite``."""
    out = Path(path)
    blocking = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise CommandError(f"--out {out}: {blocking} is an existing file, not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise CommandError(f"--out {out} is not empty; choose a new directory, or give --overwrite to write into "
                           "it (files of the same names are replaced)")
    return out


def _local_model_dir(path: str) -> Path:
    """``--model`` must be a local directory: nothing is fetched from a model hub."""
    directory = Path(path)
    if not directory.is_dir():
        raise CommandError(f"--model {path!r} is not a local directory; kvpolicy loads local models only "
                           "(download the model first and pass its directory)")
    return directory


def _load_model(directory: Path | None):
    if directory is None:
        from kvpolicy.lab.testbed import load

        return load()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (AutoModelForCausalLM.from_pretrained(directory, local_files_only=True).eval(),
            AutoTokenizer.from_pretrained(directory, local_files_only=True))


def _model_info(directory: Path | None):
    """The model's dimensions from its ``config.json`` (None when unreadable: loading the model reports it)."""
    import json

    from kvpolicy.policy import ModelInfo

    if directory is None:
        from kvpolicy.lab.testbed import MODEL_DIR

        directory = MODEL_DIR
    try:
        return ModelInfo.from_hf_config(json.loads((directory / "config.json").read_text()))
    except (OSError, ValueError):
        return None


def _policy_config(spec, args: argparse.Namespace) -> dict:
    """The config a spec runs with: on the bundled testbed, its trained surrogates and its oracle prompt ids
    fill in what the spec does not set."""
    if args.model is not None:
        return dict(spec.config)
    from kvpolicy.lab.testbed import with_testbed_defaults

    return with_testbed_defaults(spec.name, spec.config)


def _evaluator(model, tokenizer, args):
    from kvpolicy.lab.compare import PolicySpec, Row
    from kvpolicy.lab.eval import evaluate_policy

    def evaluate(spec: PolicySpec) -> Row:
        result = evaluate_policy(model, tokenizer, None if spec.is_none else spec.name, _policy_config(spec, args),
                                 tasks=args.tasks, lengths=args.lengths, n=args.n, batch_size=args.batch_size)
        return Row(spec.label, spec.name, spec.config, {t: result.suite.task_score(t) for t in result.scores},
                   result.average, result.compression, result.kv_bytes, result.full_kv_bytes,
                   result.prefill_seconds, result.decode_seconds,
                   {t: result.suite.n * len(result.scores[t]) for t in result.scores})

    return evaluate


def _cmd_compare(args: argparse.Namespace) -> int:
    from kvpolicy.lab import compare
    from kvpolicy.lab.specs import SpecError, check_specs, parse_specs

    if not args.policy:
        raise CommandError("give at least one --policy (e.g. --policy none --policy window:window=64)")
    # Everything that can be checked is checked before the first evaluation: a bad last spec or --out must not
    # cost the evaluations before it.
    try:
        specs = parse_specs(args.policy)
    except SpecError as exc:
        raise CommandError(str(exc)) from None
    out = _output_dir(args.out, args.overwrite)
    model_dir = None if args.model is None else _local_model_dir(args.model)
    problems = check_specs(specs, lambda spec: _policy_config(spec, args), _model_info(model_dir))
    if problems:
        raise CommandError("invalid --policy (nothing was evaluated):\n  " + "\n  ".join(problems))
    if args.tasks is None:
        from kvpolicy.lab.testbed.tasks import TASKS

        args.tasks = list(TASKS)
    model, tokenizer = _load_model(model_dir)
    rows = compare.run(specs, _evaluator(model, tokenizer, args))
    print(compare.to_markdown(rows))
    paths = compare.write_outputs(rows, out, title=f"{args.model or 'testbed'}: score vs compression")
    print("written:", ", ".join(str(p) for p in paths.values()))
    if "plot" not in paths:
        print("plot skipped: matplotlib is not installed (pip install 'kvpolicy[plots]')")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    args.policy = args.policy or ["none", "window:window=64", "kvzap_mlp:threshold=-2,window=32",
                                  "kvzip_plus:ratio=0.5,window=32,scope=model"]
    # The demo's own scratch directory is replaced on every run; any other --out follows compare's rule.
    args.overwrite = args.overwrite or Path(args.out) == Path(DEMO_OUT)
    return _cmd_compare(args)


def _cmd_train_kvzap(args: argparse.Namespace) -> int:
    import json

    import torch

    from kvpolicy.lab import train_kvzap as tk
    from kvpolicy.lab.testbed import testbed_oracle_config

    out = _output_dir(args.out, args.overwrite)
    model_dir = None if args.model is None else _local_model_dir(args.model)
    if args.model is not None and not args.prompts:
        raise CommandError("give --prompts (JSONL with 'text' or 'input_ids') for --model")
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = _load_model(model_dir)
    if args.prompts:
        prompts = []
        with open(args.prompts) as fh:
            for line in fh:
                item = json.loads(line)
                ids = item["input_ids"] if "input_ids" in item else tokenizer(item["text"])["input_ids"]
                prompts.append(torch.tensor([ids]))
        oracle_config = json.loads(args.oracle_config) if args.oracle_config else {}
    else:
        prompts = tk.testbed_prompts(args.num_prompts, args.lengths, args.seed)
        oracle_config = {**testbed_oracle_config(), **json.loads(args.oracle_config or "{}")}
    reports = tk.train_kvzap(model, prompts, out, oracle_config=oracle_config, kinds=args.kinds,
                             positions=args.positions, held_out_fraction=args.held_out, tokenizer=tokenizer,
                             seed=args.seed, mlp_hidden_dim=args.mlp_hidden_dim, mlp_kwargs={"epochs": args.epochs})
    for report in reports:
        print(report.table())
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _cmd_bench_serve(args: argparse.Namespace) -> int:
    from kvpolicy.lab import serve_bench
    from kvpolicy.lab.testbed import MODEL_DIR

    try:
        runs = serve_bench.parse_policy_runs(args.policy or ["none", "window:window=64"])
        runs = [r.with_granularity(args.kv_granularity, args.kv_token_vote, args.kv_min_keep_fraction)
                for r in runs]
    except ValueError as exc:  # SpecError, or a vote that contradicts the granularity
        raise CommandError(str(exc)) from None
    out = _output_dir(args.out, args.overwrite)
    model = MODEL_DIR if args.model is None else _local_model_dir(args.model)
    if args.model is None:   # the bundled testbed: its trained KVzap surrogates unless one is given
        from kvpolicy.lab.testbed import with_testbed_defaults

        runs = [dataclasses.replace(r, config=with_testbed_defaults(r.policy, r.config)) for r in runs]
    servers = runs
    if args.shared:
        try:
            servers = [serve_bench.shared_server_run(runs)[0]]
        except ValueError as exc:
            raise CommandError(str(exc)) from None
    problems = serve_bench.check_runs(servers, model)
    if problems:
        raise CommandError("invalid --policy (no server was started):\n  " + "\n  ".join(problems))
    examples = serve_bench.suite_examples(args.tasks, args.lengths, args.n)
    if args.repeat > 1:
        examples = examples * args.repeat
    bench = serve_bench.run_shared_bench if args.shared else serve_bench.run_bench
    rows = bench(model, runs, examples, args.concurrency, out, max_total_tokens=args.max_total_tokens,
                 server_python=args.server_python, timeout=args.timeout, deadline_s=args.deadline,
                 max_new_tokens=args.max_new_tokens, tp_size=args.tp_size, dp_size=args.dp_size)
    print(serve_bench.to_markdown(rows))
    print("written:", out)
    return 0


POLICY_HELP = ("policy spec NAME[:key=value[,key=value...]] (repeatable): values are JSON scalars (-4, 0.5, true) "
               "or text (scope=model, surrogate=DIR); '|' in a value sweeps it (threshold=-4|-2|0); 'none' = no "
               "policy (the full cache). E.g. --policy none --policy window:window=32|64 --policy "
               "kvzap_mlp:threshold=-2,window=32")
OVERWRITE_HELP = "write into a non-empty --out directory (files of the same names are replaced)"
MODEL_HELP = "local model directory (default: the bundled testbed); nothing is fetched from a hub"


def _add_suite_args(p: argparse.ArgumentParser, *, n: int, lengths: list[int], out: str) -> None:
    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument("--policy", action="append", help=POLICY_HELP)
    p.add_argument("--tasks", nargs="+", default=None, help="default: every testbed task")
    p.add_argument("--lengths", nargs="+", type=int, default=lengths)
    p.add_argument("-n", type=int, default=n, help="examples per (task, length)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", default=out, help=f"output directory (default: {out})")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvpolicy", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list the available policies").set_defaults(func=_cmd_list)
    p = sub.add_parser("compare", help="compare policies on the same model and suite (table, CSV, plot)")
    _add_suite_args(p, n=20, lengths=[512, 1024, 2048], out="results/compare")
    p.set_defaults(func=_cmd_compare)
    p = sub.add_parser("demo", help="a small comparison on the bundled testbed model")
    _add_suite_args(p, n=4, lengths=[512], out=DEMO_OUT)
    p.set_defaults(func=_cmd_demo)
    p = sub.add_parser("train-kvzap", help="train KVzap surrogates (linear, MLP) from the KVzip+ oracle")
    p.add_argument("--model", default=None, help=MODEL_HELP)
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
    p.add_argument("--out", default="results/kvzap",
                   help="output directory: kvzap-linear/ and kvzap-mlp/ are written in it (default: results/kvzap)")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.set_defaults(func=_cmd_train_kvzap)
    # Listed for --help only: main() hands everything after "serve" to the launcher before parsing.
    sub.add_parser("serve", add_help=False,
                   help="SGLang server with a policy: kvpolicy serve --kv-policy NAME [--kv-policy-config JSON] "
                        "--model-path M ... (same as python -m sglang.launch_server --kv-policy ...; "
                        "--kv-policy none: plain SGLang)")
    p = sub.add_parser("bench-serve", help="serve the testbed suite through real SGLang servers, one per policy "
                                           "(or one for all: --shared)")
    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument("--policy", action="append",
                   help=POLICY_HELP.replace("(the full cache)", "(plain SGLang, without kvpolicy)")
                   + "; one server per configuration (default: none and window:window=64)")
    p.add_argument("--tasks", nargs="+", default=["single_needle", "multi_key"])
    p.add_argument("--lengths", nargs="+", type=int, default=[256])
    p.add_argument("-n", type=int, default=8, help="examples per (task, length)")
    p.add_argument("--repeat", type=int, default=1, help="send the example list this many times (load tests)")
    p.add_argument("--concurrency", nargs="+", type=int, default=[1, 8], help="client threads (e.g. 1 8 200)")
    p.add_argument("--max-total-tokens", type=int, default=4096,
                   help="KV pool of every server (slots; per DP replica)")
    p.add_argument("--tp-size", type=_positive_int, default=1,
                   help="tensor-parallel ranks per server (each holds its own KV heads; per-rank rows reported)")
    p.add_argument("--dp-size", type=_positive_int, default=1,
                   help="data-parallel replicas per server (each its own scheduler, pool and policy; reported one "
                        "by one and summed)")
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
    p.add_argument("--shared", action="store_true",
                   help="one server for all policies: every example is sent once per policy, interleaved, each "
                        "request naming its policy (custom_params.kv_policy); a row per policy plus the server total")
    p.add_argument("--server-python", default=None, help="interpreter with sglang (default: this one)")
    p.add_argument("--timeout", type=float, default=120.0, help="per-request timeout (s)")
    p.add_argument("--deadline", type=float, default=1800.0, help="no request is started after this many s")
    p.add_argument("--out", default="results/serve", help="output directory (default: results/serve)")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.set_defaults(func=_cmd_bench_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:  # every argument goes to the launcher (SGLang's flags start with "--")
        from kvpolicy.adapters.sglang.launch import main as launch_main

        return launch_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CommandError as exc:
        print(f"kvpolicy {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
