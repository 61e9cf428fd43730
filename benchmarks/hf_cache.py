"""KV bytes and decode step time, full cache vs compressed, through the HF adapter.

Builds a tiny random Qwen3 (no download), prefills a long context, then times greedy decode steps:

- ``stock``: transformers' own DynamicCache + SDPA (the baseline a user has today);
- ``kvpolicy-full``: the kvpolicy adapter with a policy that prunes nothing (threshold -inf);
- ``kvpolicy-compressed``: the adapter with the chosen policy (default: knorm at ratio 0.67, ~3x).

Prints measured ratios. Example::

    python benchmarks/hf_cache.py --context 4096 --steps 32
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time

import torch
from transformers import DynamicCache, Qwen3Config, Qwen3ForCausalLM

import kvpolicy
from kvpolicy.adapters.hf import PolicySession


def build_model(layers: int, hidden: int, heads: int, kv_heads: int, head_dim: int, dtype) -> Qwen3ForCausalLM:
    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=512, hidden_size=hidden, intermediate_size=hidden * 3, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                      max_position_embeddings=65536)
    return Qwen3ForCausalLM(cfg).to(dtype).eval()


def time_decode(model, cache, first_token, steps: int, warmup: int = 3) -> list[float]:
    times = []
    token = first_token
    with torch.no_grad():
        for i in range(warmup + steps):
            start = time.perf_counter()
            out = model(token, past_key_values=cache)
            elapsed = time.perf_counter() - start
            token = out.logits[:, -1:].argmax(-1)
            if i >= warmup:
                times.append(elapsed)
    return times


def dense_bytes(cache: DynamicCache) -> int:
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--policy", default="knorm")
    parser.add_argument("--policy-config", default='{"ratio": 0.67, "window": 128}', help="JSON")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    model = build_model(args.layers, args.hidden, args.heads, args.kv_heads, args.head_dim, dtype)
    ids = torch.randint(0, 512, (args.batch, args.context), generator=torch.Generator().manual_seed(1))
    first = ids[:, -1:]

    rows = {}
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, past_key_values=cache)
    rows["stock"] = (dense_bytes(cache), time_decode(model, cache, first, args.steps), 0.0)
    del cache

    configs = {
        "kvpolicy-full": ("window", {"threshold": -math.inf}),
        "kvpolicy-compressed": (args.policy, json.loads(args.policy_config)),
    }
    for label, (name, cfg) in configs.items():
        policy = kvpolicy.get_policy(name, **cfg)
        with PolicySession(model, policy) as session:
            cache = session.new_cache()
            with torch.no_grad():
                t0 = time.perf_counter()
                model(ids, past_key_values=cache)
                prefill = time.perf_counter() - t0
            held = session.kv_bytes(cache)
            comp = session.report(cache).compression
            times = time_decode(model, cache, first, args.steps)
            rows[label] = (held, times, comp)
            print(f"{label}: prefill {prefill:.2f}s  report: {session.report(cache)}")
        del cache

    print(f"\nmachine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}")
    print(f"model: Qwen3 {args.layers} layers, hidden {args.hidden}, {args.heads} q heads, {args.kv_heads} kv heads, "
          f"head_dim {args.head_dim}, {args.dtype}; context {args.context}, batch {args.batch}")
    print(f"policy: {args.policy} {args.policy_config}\n")
    print(f"{'cache':<22}{'KV bytes':>14}{'compression':>13}{'decode ms/step (median)':>26}")
    for label, (held, times, comp) in rows.items():
        print(f"{label:<22}{held:>14,}{comp:>13.3f}{1000 * statistics.median(times):>26.2f}")
    full_b, full_t = rows["kvpolicy-full"][0], statistics.median(rows["kvpolicy-full"][1])
    comp_b, comp_t = rows["kvpolicy-compressed"][0], statistics.median(rows["kvpolicy-compressed"][1])
    stock_b, stock_t = rows["stock"][0], statistics.median(rows["stock"][1])
    print(f"\nKV bytes  full/compressed: {full_b / comp_b:.2f}x   (stock/compressed: {stock_b / comp_b:.2f}x)")
    print(f"decode step compressed/full: {comp_t / full_t:.2f}   (compressed/stock: {comp_t / stock_t:.2f})")


if __name__ == "__main__":
    main()
