"""Accuracy cost of token granularity (what SGLang can free) vs per-head granularity, at equal compression.

SGLang's KV slot holds a token for all layers and heads, so the SGLang adapter turns per-(layer, head)
decisions into one decision per token with a vote (default ``any``: keep the token if any layer/head keeps it,
i.e. its max score over layers and heads is >= threshold). This script measures what that costs on the testbed
suite with the HF adapter: per-head KVzap-MLP vs token-vote KVzap-MLP, each over a threshold sweep, and prints
score vs achieved compression for both (compare at equal compression).

    python benchmarks/granularity.py --lengths 512 1024 -n 12
    python benchmarks/granularity.py --token-kinds      # which tokens the vote frees (needle parts vs filler)
    python benchmarks/granularity.py --token-kinds --oracle   # the same, and the KVzip+ oracle's own ranking
"""

from __future__ import annotations

import argparse
import math

import torch

import kvpolicy
from kvpolicy import LayerInputs, OraclePolicy, PolicyConfig
from kvpolicy.lab.eval import evaluate_policy
from kvpolicy.lab.testbed import SURROGATES, load


class TokenVoteConfig(PolicyConfig):
    surrogate: str
    default_selection = {"threshold": -4.0}


class TokenVoteKVzap(OraclePolicy[TokenVoteConfig]):
    """KVzap-MLP scores, max over every layer and KV head of a token, given to all of them (``any`` vote).

    An oracle only in its lifecycle: it needs every layer's hidden states before the first layer's decision,
    so it scores the context with one observed pass before the prefill. The first token (``<bos>``) is only
    prefilled, never observed, and is kept.
    """

    config_class = TokenVoteConfig

    def __init__(self, config: TokenVoteConfig) -> None:
        super().__init__(config)
        self.base = kvpolicy.get_policy("kvzap_mlp", surrogate=config.surrogate, threshold=config.threshold)

    def bind(self, model) -> None:
        self.base.bind(model)

    def compute_scores(self, runner, context_ids: torch.Tensor) -> dict[int, torch.Tensor]:
        runner.prefill(context_ids[:, :1])
        per_layer: dict[int, torch.Tensor] = {}

        def observe(layer: int, obs) -> None:
            new = obs.hidden_states.shape[1]
            values = obs.values[:, :, -new:]
            inputs = LayerInputs(layer, keys=values, values=values,
                                 positions=torch.arange(1, 1 + new), hidden_states=obs.hidden_states)
            per_layer[layer] = self.base.score(inputs)  # (B, H, T-1)

        runner.forward(context_ids[:, 1:], observe)
        stacked = torch.stack([per_layer[i] for i in sorted(per_layer)])  # (L, B, H, T-1)
        token = stacked.amax(dim=(0, 2))  # (B, T-1)
        first = torch.full_like(token[:, :1], math.inf)
        token = torch.cat([first, token], dim=1)[:, None, :].expand(-1, stacked.shape[2], -1)
        return {layer: token.contiguous() for layer in per_layer}


def token_kinds(thresholds, window: int, length: int = 1024, per_task: int = 3, oracle: bool = False) -> None:
    """Count what the ``any`` vote frees by kind of token, and each layer's median score per kind.

    Contexts: ``per_task`` evaluation contexts (EVAL_SEED) of each question task and of repeat, ``length``
    tokens; ``<bos>`` and the last ``window`` tokens (always kept) are left out. A token's vote score is its
    max over layers and KV heads; a layer's score is the max over that layer's KV heads. With ``oracle``, the
    KVzip+ scores of the same contexts too, and for both what freeing the lowest 10-70% of tokens by the vote
    frees (the two score scales differ, so equal shares are compared, not equal thresholds).
    """
    from kvpolicy.adapters.hf.capture import capture_attention_inputs
    from kvpolicy.lab.eval import EVAL_SEED
    from kvpolicy.lab.testbed.tasks import generate
    from kvpolicy.lab.testbed.tokenizer import VOCAB
    from kvpolicy.surrogate import load_surrogate

    model, tokenizer = load()
    surrogate = load_surrogate(SURROGATES["mlp"])
    if oracle:
        from kvpolicy.adapters.hf import PolicySession
        kvzip = kvpolicy.get_policy("kvzip_plus")
        session = PolicySession(model, kvzip, tokenizer=tokenizer)
    oracle_scores = []
    kinds = {"key": set(VOCAB.keys), "value": set(VOCAB.values), ".": {VOCAB.dot}, "filler": set(VOCAB.filler)}
    tokens, layer_scores = [], []
    for task in ("single_needle", "multi_key", "variable_tracking", "repeat"):
        for index in range(per_task):
            example = generate(task, length, EVAL_SEED, index)
            context = example.prompt[:example.context_len]
            hidden = capture_attention_inputs(model, torch.tensor([context]))
            with torch.no_grad():
                per_layer = torch.stack([surrogate(i, h).amax(-1) for i, h in enumerate(hidden)])  # (L, T)
            tokens += context[1:len(context) - window]
            layer_scores.append(per_layer[:, 1:len(context) - window])
            if oracle:
                with session:
                    exact = kvzip.compute_scores(session.oracle_runner(), torch.tensor([context]))
                oracle_scores.append(torch.stack([exact[layer][0].float().amax(0) for layer in range(len(hidden))])
                                     [:, 1:len(context) - window])
    scores = torch.cat(layer_scores, dim=1)          # (L, N)
    masks = {kind: torch.tensor([t in members for t in tokens]) for kind, members in kinds.items()}

    def freed_by_kind(freed: torch.Tensor) -> str:
        return ", ".join(f"{k} {int((freed & m).sum())}/{int(m.sum())}" for k, m in masks.items())

    def medians(label: str, per_layer: torch.Tensor) -> None:
        for layer in range(per_layer.shape[0]):
            print(f"{label}layer {layer} median: " + ", ".join(
                f"{k} {per_layer[layer][m].median().item():.2f}" for k, m in masks.items()))

    if oracle:
        exact = torch.cat(oracle_scores, dim=1)
        medians("kvzip_plus oracle ", exact)   # the surrogate's medians follow below
        for name, per_layer in (("kvzip_plus oracle", exact), ("kvzap_mlp", scores)):
            votes = per_layer.amax(0)
            for share in (0.1, 0.3, 0.5, 0.7):
                print(f"{name}: the lowest {share:.0%} by vote frees "
                      + freed_by_kind(votes < votes.quantile(share)))
    vote = scores.amax(0)
    print(f"{len(tokens)} context tokens: " + ", ".join(f"{k} {int(m.sum())}" for k, m in masks.items()))
    for threshold in thresholds:
        print(f"threshold {threshold}: frees " + freed_by_kind(vote < threshold))
    medians("", scores)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", nargs="+", type=int, default=[512, 1024])
    parser.add_argument("-n", type=int, default=12)
    parser.add_argument("--tasks", nargs="+", default=["single_needle", "multi_key", "variable_tracking", "repeat"])
    parser.add_argument("--head-thresholds", nargs="+", type=float, default=[-4, -2, 0.45, 0.5, 0.6, 0.7])
    parser.add_argument("--token-thresholds", nargs="+", type=float, default=[0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--token-kinds", action="store_true",
                        help="instead of the sweep: what the token vote frees at 0.5 and 0.6, by kind of token")
    parser.add_argument("--oracle", action="store_true",
                        help="with --token-kinds: also rank the same tokens by the KVzip+ oracle's own scores")
    args = parser.parse_args()
    if args.token_kinds:
        token_kinds([0.5, 0.6], args.window, oracle=args.oracle)
        return
    model, tokenizer = load()
    surrogate = str(SURROGATES["mlp"])
    rows = []
    for granularity, thresholds in (("head", args.head_thresholds), ("token", args.token_thresholds)):
        for threshold in thresholds:
            if granularity == "head":
                policy = kvpolicy.get_policy("kvzap_mlp", surrogate=surrogate, threshold=threshold,
                                             window=args.window)
            else:
                policy = TokenVoteKVzap(TokenVoteConfig(surrogate=surrogate, threshold=threshold,
                                                        window=args.window))
            result = evaluate_policy(model, tokenizer, policy, {}, tasks=args.tasks, lengths=args.lengths, n=args.n)
            rows.append((granularity, threshold, result.compression, result.average))
            print(f"{granularity:<6} threshold {threshold:>6.2f}  compression {result.compression:.3f}  "
                  f"score {100 * result.average:.1f}", flush=True)
    print("\n| granularity | threshold | compression | average score (%) |\n|---|---:|---:|---:|")
    for granularity, threshold, compression, score in rows:
        print(f"| {granularity} | {threshold} | {compression:.3f} | {100 * score:.1f} |")


if __name__ == "__main__":
    main()
