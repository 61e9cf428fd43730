"""Accuracy cost of token granularity (what SGLang can free) vs per-head granularity, at equal compression.

SGLang's KV slot holds a token for all layers and heads, so the SGLang adapter turns per-(layer, head)
decisions into one decision per token with a vote (default ``any``: keep the token if any layer/head keeps it,
i.e. its max score over layers and heads is >= threshold). This script measures what that costs on the testbed
suite with the HF adapter: per-head KVzap-MLP vs token-vote KVzap-MLP, each over a threshold sweep, and prints
score vs achieved compression for both (compare at equal compression).

    python benchmarks/granularity.py --lengths 512 1024 -n 12
"""

from __future__ import annotations

import argparse
import math

import torch

import kvpolicy
from kvpolicy import LayerInputs, OraclePolicy, PolicyConfig
from kvpolicy.eval import evaluate_policy
from kvpolicy.testbed import SURROGATES, load


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", nargs="+", type=int, default=[512, 1024])
    parser.add_argument("-n", type=int, default=12)
    parser.add_argument("--tasks", nargs="+", default=["single_needle", "multi_key", "variable_tracking", "repeat"])
    parser.add_argument("--head-thresholds", nargs="+", type=float, default=[-4, -2, 0.45, 0.5, 0.6, 0.7])
    parser.add_argument("--token-thresholds", nargs="+", type=float, default=[0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
    parser.add_argument("--window", type=int, default=32)
    args = parser.parse_args()
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
