"""Compare kvpolicy with kvpress 0.5.5 on a tiny random Qwen3: KVzip(+) scores, KVzap keep-masks, wall time.

Run in the parity environment (``requirements/kvpress-parity.txt``), from the repository root::

    .venv-kvpress/bin/python parity/check_kvpress.py            # all comparisons + timing
    .venv-kvpress/bin/python parity/check_kvpress.py --no-timing

Prints per-layer differences and exits 1 when a comparison that must match does not. The differences that
are intended (and what is aligned to show they are the only ones) are listed in ``docs/parity.md``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `parity` importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from parity import kvpress_parity as kp


def _print_scores(title: str, diffs: list[kp.ScoreDiff], tol: float) -> bool:
    ok = all(d.ok(tol) for d in diffs)
    print(f"\n[{'PASS' if ok else 'FAIL'}] {title}")
    for d in diffs:
        print(f"  layer {d.layer}: {d.entries} entries  max|log diff| {d.max_abs_log:.2e}  "
              f"max rel diff {d.max_rel:.2e}  zero mismatches {d.zero_mismatch}")
    return ok


def _print_expected_gap(title: str, diffs: list[kp.ScoreDiff], tol: float) -> bool:
    """A difference that must exist (the setting really matters), reported rather than matched."""
    ok = any(not d.ok(tol) for d in diffs)
    print(f"\n[{'PASS' if ok else 'FAIL'}] {title} (differs, as documented)")
    for d in diffs:
        print(f"  layer {d.layer}: max|log diff| {d.max_abs_log:.2e}  max rel diff {d.max_rel:.2e}")
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=192, help="context length of the score comparisons")
    parser.add_argument("--chunk", type=int, default=80, help="chunk size of the multi-chunk comparison")
    parser.add_argument("--timing-tokens", type=int, default=1024, help="context length of the timing runs")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per side (after one warm-up)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (same for both sides)")
    parser.add_argument("--no-timing", action="store_true")
    parser.add_argument("--workdir", type=Path, default=None, help="keep tokenizer/surrogates here")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    logging.getLogger("kvpress").setLevel(logging.ERROR)  # KVzipPress warns about its cost on every build
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tmp = None
    if args.workdir is None:
        tmp = kp.default_workdir()
        workdir = Path(tmp.name)
    else:
        workdir = args.workdir
        workdir.mkdir(parents=True, exist_ok=True)
    try:
        return _run(args, workdir)
    finally:
        if tmp is not None:
            tmp.cleanup()


def _run(args, workdir: Path) -> int:
    import kvpress
    import transformers

    fx = kp.make_fixture(workdir / "model")
    print(f"kvpress {kvpress.__version__ if hasattr(kvpress, '__version__') else '0.5.5'}, "
          f"transformers {transformers.__version__}, torch {torch.__version__}, threads {args.threads}")
    print(f"model: Qwen3 {fx.config.num_hidden_layers} layers, hidden {fx.config.hidden_size}, "
          f"{fx.config.num_attention_heads} q heads / {fx.config.num_key_value_heads} kv heads, "
          f"head_dim {fx.config.head_dim}, vocab {fx.config.vocab_size}, float32, seed {fx.seed}")
    results: list[bool] = []
    if not kp.adapter_mask_sizes_ok():
        results.append(False)
        print("\n[FAIL] kvpolicy's HF adapter under this transformers: PolicyLayer.get_mask_sizes must accept the "
              "cache_position tensor that transformers < 5.3 passes (see docs/parity.md, 'transformers 5.0-5.2')")

    # -- KVzip(+) scores ------------------------------------------------------------------------------
    ids = fx.token_ids(args.tokens, seed=1)
    for plus, name in ((True, "KVzip+"), (False, "KVzip")):
        diffs = kp.kvzip_single_chunk(fx, ids, plus=plus)
        results.append(_print_scores(f"{name}, one chunk ({args.tokens} tokens): ours vs KVzipPress"
                                     f"(kvzip_plus_normalization={plus})", diffs, kp.SCORE_TOL))
    chunked, aligned = kp.kvzip_multi_chunk(fx, ids, chunk_size=args.chunk)
    results.append(_print_expected_gap(f"KVzip+, chunks of {args.chunk}: ours vs KVzipPress", chunked,
                                       kp.SCORE_TOL))
    results.append(_print_scores(f"KVzip+, chunks of {args.chunk}: ours vs KVzipPress with full-sequence "
                                 "softmax (the one aligned setting)", aligned, kp.SCORE_TOL))
    sel = kp.kvzip_selection(fx, ids)
    ok = sel.disagree == 0 and sel.boundary_gap > kp.SCORE_TOL
    results.append(ok)
    print(f"\n[{'PASS' if ok else 'FAIL'}] KVzip+ selection, ratio 0.5 over all layers and heads, 4 sinks, no window: "
          f"ours (scope=model, masked layout) vs KVzipPress masks\n  {sel.entries} entries, {sel.disagree} disagree; "
          f"pruned ours {sel.pruned_ours} / kvpress {sel.pruned_ref}; score gap at the cut {sel.boundary_gap:.2e}")
    print("\n(in every KVzip case our repeat passes, built from our default prompts and the same tokenizer, "
          "were checked token-identical to kvpress's first)")

    # -- KVzap keep-masks -------------------------------------------------------------------------------
    for case in kp.KVZAP_CASES:
        res = kp.kvzap_case(fx, workdir / "surrogates", case)
        ok = res.ok
        results.append(ok)
        print(f"\n[{'PASS' if ok else 'FAIL'}] KVzap-{case.kind}: DMSPress(KVzapPress) vs ours, {case.describe()}"
              f", threshold {res.threshold:+.4f}")
        for d in res.masks:
            print(f"  layer {d.layer}: {d.entries} entries, {d.disagree} disagree; pruned ours {d.pruned_ours} / "
                  f"kvpress {d.pruned_ref}; closest score to threshold {d.margin:.2e}")
        print(f"  surrogate scores max|diff| {res.score_diff:.2e}; next-token logits max|diff|: "
              f"masked layout {res.logits_masked:.2e}, ragged layout {res.logits_ragged:.2e}; "
              f"KV bytes kvpress {res.bytes_ref} vs ours ragged {res.bytes_ragged}")
        comp = ", ".join(f"L{layer} {res.compression_ours[layer]:.4f}/{res.compression_ref[layer]:.4f}"
                         for layer in res.compression_ref)
        print(f"  reported compression ours/kvpress: {comp}")

    # -- wall time ----------------------------------------------------------------------------------------
    if not args.no_timing:
        n = args.timing_tokens
        print(f"\n[TIME] {n}-token context, one chunk, window 128, {args.threads} thread(s); median (best) of "
              f"{args.repeats} runs after a warm-up (scoring alone: {args.repeats * 10} runs)")
        plain = kp.time_plain_prefill(fx, fx.token_ids(n, seed=2), repeats=args.repeats)
        print(f"  model prefill alone (sdpa, no policy): {plain.median * 1e3:.1f} ms ({plain.best * 1e3:.1f})")
        pairs = kp.time_kvzip(fx, fx.token_ids(n, seed=2), repeats=args.repeats)
        pairs += kp.time_kvzap(fx, workdir / "surrogates", fx.token_ids(n, seed=2), repeats=args.repeats)
        for t in pairs:
            print(f"  {t.what}: ours {t.ours.median * 1e3:.2f} ms ({t.ours.best * 1e3:.2f}), kvpress "
                  f"{t.ref.median * 1e3:.2f} ms ({t.ref.best * 1e3:.2f}); ours/kvpress {t.ratio:.2f}")

    failed = results.count(False)
    print(f"\n{len(results) - failed} comparisons passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
