"""HF decode step: stock transformers vs the kvpolicy adapter unpruned vs compressed, timed interleaved.

Builds a random model in code (no download), prefills a random context into three caches, then times decode
steps (teacher-forced: every cache decodes the same fixed tokens):

- ``stock``: transformers' own ``DynamicCache`` + SDPA, no kvpolicy (what a user has today);
- ``unpruned``: the kvpolicy adapter pruning nothing (``window`` policy, ``threshold=-inf``): its bookkeeping cost;
- ``compressed``: the adapter with KVzap-MLP (a random surrogate, threshold calibrated on the context's own
  scores so that about ``--compression`` of the entries are pruned at the end of the prefill), or any
  ``--policy`` / ``--policy-config``.

The methods are timed in blocks that alternate within one process (the order rotates from block to block), so
machine load hits all three alike; the table reports medians over all timed steps of CPU time
(``time.process_time``) and wall time (CUDA: CUDA-event time and synchronised wall time), their ratios, and the
range of the per-block ratios. Compression is reported twice: at the end of the prefill and after decoding.

Examples::

    python benchmarks/hf_cache.py                            # CPU: 1k/2k/4k batch 1 and 8k batch 4
    python benchmarks/hf_cache.py --configs 4096x1 --blocks 12
    python benchmarks/hf_cache.py --device cuda --preset gpu  # random ~1B Llama, 8k x batch 8, bf16
    python benchmarks/hf_cache.py --dry-run                  # tiny sizes, seconds on a CPU (CI)
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

import kvpolicy
from kvpolicy.adapters.hf import PolicySession
from kvpolicy.adapters.hf._compat import cache_kwarg
from kvpolicy.adapters.hf.capture import hook_attention_inputs
from kvpolicy.surrogate import KVzapSurrogate, SurrogateConfig, load_surrogate, save_surrogate

METHODS = ("stock", "unpruned", "compressed")

PRESETS = {
    # The random Qwen3 of docs/benchmarks.md; one torch thread, fp32.
    "cpu": dict(arch="qwen3", layers=4, hidden=256, heads=8, kv_heads=2, head_dim=32, intermediate=768, vocab=512,
                dtype="float32", configs="1024x1,2048x1,4096x1,8192x4", blocks=12, steps=8, warmup=2, window=128),
    # A random Llama of ~1.0B parameters (Llama-3.2-1B's shape with a 32k vocabulary), 8k context x batch 8.
    "gpu": dict(arch="llama", layers=16, hidden=2048, heads=32, kv_heads=8, head_dim=64, intermediate=8192,
                vocab=32000, dtype="bfloat16", configs="8192x8", blocks=6, steps=8, warmup=3, window=128),
    # Seconds on a CPU: checks the wiring, measures nothing.
    "dry-run": dict(arch="qwen3", layers=2, hidden=64, heads=4, kv_heads=2, head_dim=16, intermediate=128, vocab=97,
                    dtype="float32", configs="96x2", blocks=2, steps=2, warmup=1, window=16),
}


def build_model(args, device: torch.device):
    torch.manual_seed(0)
    common = dict(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                  num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                  head_dim=args.head_dim, max_position_embeddings=65536)
    config, cls = (Qwen3Config(**common), Qwen3ForCausalLM) if args.arch == "qwen3" else (
        LlamaConfig(**common), LlamaForCausalLM)
    dtype = getattr(torch, args.dtype)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise in the target dtype on the target device: no 4 GB fp32 detour
    try:
        with device:
            model = cls(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval().requires_grad_(False)


class Clock:
    """Per-step timing: CPU time + wall time on a CPU; CUDA-event time + synchronised wall time on CUDA."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.labels = ("GPU ms", "wall ms") if self.cuda else ("CPU ms", "wall ms")

    def time(self, fn) -> tuple[float, float]:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            wall0 = time.perf_counter()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end), 1000 * (time.perf_counter() - wall0)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        fn()
        return 1000 * (time.process_time() - cpu0), 1000 * (time.perf_counter() - wall0)


@dataclass
class Method:
    name: str
    session: PolicySession | None
    cache: object
    prefill_compression: float = 0.0
    prefill_bytes: int = 0
    primary: list[float] = field(default_factory=list)  # CPU ms (or GPU ms) per timed step
    wall: list[float] = field(default_factory=list)
    blocks: list[float] = field(default_factory=list)  # median primary time of each block

    def kv_bytes(self) -> int:
        if self.session is None:
            return sum(layer.keys.nbytes + layer.values.nbytes for layer in self.cache.layers)
        return self.session.kv_bytes(self.cache)

    def compression(self) -> float:
        return 0.0 if self.session is None else self.session.report(self.cache).compression


def random_surrogate(args, directory: Path) -> Path:
    torch.manual_seed(1)
    surrogate = KVzapSurrogate(SurrogateConfig(model_type="kvzap", input_dim=args.hidden, output_dim=args.kv_heads,
                                               n_modules=args.layers, hidden_dim=max(1, args.hidden // 8)))
    return save_surrogate(surrogate, directory)


def calibrate_threshold(model, surrogate_dir: Path, ids: torch.Tensor, window: int, target: float) -> float:
    """The threshold that prunes about ``target`` of all entries at the end of the prefill of ``ids``: the
    ``target * T / (T - window)`` quantile of the surrogate's scores of the tokens that leave the window."""
    surrogate = load_surrogate(surrogate_dir).to(ids.device)
    judged = ids.shape[1] - window
    if judged <= 0:
        return -math.inf
    scores = []

    def score(layer_idx: int, hidden: torch.Tensor, _kwargs) -> None:
        scores.append(surrogate(layer_idx, hidden[:, :judged].float()).flatten())

    handles = hook_attention_inputs(model, score)
    try:
        with torch.no_grad():
            model(ids, use_cache=False, logits_to_keep=1)
    finally:
        for handle in handles:
            handle.remove()
    flat = torch.sort(torch.cat(scores)).values
    fraction = min(1.0, target * ids.shape[1] / judged)
    index = min(flat.numel() - 1, int(fraction * flat.numel()))
    return float(flat[index])


def prepare(model, args, ids: torch.Tensor, policies: dict) -> list[Method]:
    kw = cache_kwarg(model)
    methods = []
    with torch.no_grad():
        stock = DynamicCache(config=model.config)
        model(ids, use_cache=True, logits_to_keep=1, **{kw: stock})
        methods.append(Method("stock", None, stock))
        for name in ("unpruned", "compressed"):
            session = PolicySession(model, policies[name])
            with session:
                cache = session.new_cache()
                model(ids, use_cache=True, logits_to_keep=1, **{kw: cache})
            methods.append(Method(name, session, cache))
    for method in methods:
        method.prefill_bytes, method.prefill_compression = method.kv_bytes(), method.compression()
    return methods


def run_blocks(model, methods: list[Method], tokens: torch.Tensor, args, clock: Clock) -> None:
    """Decode ``tokens (B, N)`` one column per step, methods alternating in blocks (rotating order)."""
    kw = cache_kwarg(model)
    position = {m.name: 0 for m in methods}

    def step(method: Method) -> None:
        column = position[method.name]
        position[method.name] += 1
        model(tokens[:, column:column + 1], use_cache=True, **{kw: method.cache})

    with torch.no_grad():
        for block in range(-1, args.blocks):  # block -1: warm-up, untimed
            order = methods[block % len(methods):] + methods[:block % len(methods)]
            for method in order:
                if method.session is not None:
                    method.session.attach()
                try:
                    gc.collect()
                    gc.disable()
                    if block < 0:
                        for _ in range(args.warmup):
                            step(method)
                        continue
                    times = [clock.time(lambda m=method: step(m)) for _ in range(args.steps)]
                finally:
                    gc.enable()
                    if method.session is not None:
                        method.session.detach()
                method.primary.extend(t for t, _ in times)
                method.wall.extend(w for _, w in times)
                method.blocks.append(statistics.median(t for t, _ in times))


def report(methods: list[Method], context: int, batch: int, decoded: int, clock: Clock) -> dict:
    by_name = {m.name: m for m in methods}
    primary, wall = clock.labels
    print(f"\ncontext {context}, batch {batch}: {len(methods[0].primary)} timed decode steps per cache "
          f"(medians); compression = pruned / all entries")
    print(f"{'cache':<12}{'KV bytes after prefill':>24}{'compression after prefill':>27}"
          f"{f'after +{decoded} decoded':>22}{primary + '/step':>14}{wall + '/step':>14}")
    rows = {}
    for m in methods:
        row = dict(kv_bytes_prefill=m.prefill_bytes, kv_bytes_end=m.kv_bytes(),
                   compression_prefill=m.prefill_compression, compression_end=m.compression(),
                   primary_ms=statistics.median(m.primary), wall_ms=statistics.median(m.wall))
        rows[m.name] = row
        print(f"{m.name:<12}{row['kv_bytes_prefill']:>24,}{row['compression_prefill']:>27.3f}"
              f"{row['compression_end']:>22.3f}{row['primary_ms']:>14.2f}{row['wall_ms']:>14.2f}")
    ratios = {}
    for name in ("unpruned", "compressed"):
        blocks = [a / b for a, b in zip(by_name[name].blocks, by_name["stock"].blocks)]
        ratios[name] = dict(primary=rows[name]["primary_ms"] / rows["stock"]["primary_ms"],
                            wall=rows[name]["wall_ms"] / rows["stock"]["wall_ms"],
                            block_min=min(blocks), block_max=max(blocks))
        r = ratios[name]
        print(f"RESULT ctx={context} batch={batch} {name}/stock decode step: {primary} {r['primary']:.2f}x stock, "
              f"{wall} {r['wall']:.2f}x stock (per-block {primary} ratio {r['block_min']:.2f}-{r['block_max']:.2f})")
    full, comp = rows["stock"]["kv_bytes_prefill"], rows["compressed"]["kv_bytes_prefill"]
    print(f"KV bytes after prefill stock/compressed: {full / comp:.2f}x")
    return dict(context=context, batch=batch, decoded=decoded, rows=rows, ratios=ratios)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--preset", default=None, choices=["cpu", "gpu"],
                        help="model and sizes (default: cpu; --dry-run: tiny)")
    parser.add_argument("--dry-run", action="store_true", help="tiny model and sizes: seconds on a CPU")
    parser.add_argument("--configs", help="comma-separated CONTEXTxBATCH, e.g. 1024x1,8192x4 (default: preset's)")
    parser.add_argument("--blocks", type=int, help="timed blocks per cache (default: preset's)")
    parser.add_argument("--steps", type=int, help="decode steps per block (default: preset's)")
    parser.add_argument("--warmup", type=int, help="untimed decode steps per cache first (default: preset's)")
    parser.add_argument("--window", type=int, help="protected window of both adapter policies (default: preset's)")
    parser.add_argument("--compression", type=float, default=0.65,
                        help="KVzap target compression at the end of the prefill (threshold calibrated to it)")
    parser.add_argument("--policy", default="kvzap_mlp", help="policy of the compressed cache")
    parser.add_argument("--policy-config", default=None,
                        help="JSON config of --policy (default for kvzap_mlp: random surrogate + calibration)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on a CPU (default 1)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    preset = "dry-run" if args.dry_run else (args.preset or "cpu")
    for key, value in PRESETS[preset].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no CUDA device")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    clock = Clock(device)
    configs = [tuple(int(x) for x in c.lower().split("x")) for c in args.configs.split(",")]

    model = build_model(args, device)
    params = sum(p.numel() for p in model.parameters())
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"{torch.get_num_threads()} thread(s)"
    print(f"date {datetime.date.today()}; {platform.machine()} {platform.processor() or ''}; "
          f"torch {torch.__version__}; transformers {transformers.__version__}; device {device}, {where}")
    print(f"model: random {args.arch} {params / 1e6:.1f}M parameters, {args.layers} layers, hidden {args.hidden}, "
          f"{args.heads}/{args.kv_heads} heads, head_dim {args.head_dim}, {args.dtype}; window {args.window}; "
          f"{args.blocks} blocks x {args.steps} steps per cache after {args.warmup} warm-up steps")

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        surrogate_dir = random_surrogate(args, Path(tmp) / "kvzap-mlp") if args.policy == "kvzap_mlp" else None
        for context, batch in configs:
            gen = torch.Generator().manual_seed(context * 31 + batch)
            decoded = args.warmup + args.blocks * args.steps
            ids = torch.randint(0, args.vocab, (batch, context + decoded), generator=gen).to(device)
            prompt, tokens = ids[:, :context], ids[:, context:]
            if args.policy_config is not None:
                config = json.loads(args.policy_config)
                label = f"{args.policy} {config}"
            else:
                config = dict(window=args.window)
                if surrogate_dir is not None:
                    threshold = calibrate_threshold(model, surrogate_dir, prompt, args.window, args.compression)
                    config.update(surrogate=str(surrogate_dir), threshold=threshold)
                label = f"{args.policy} {config}"
            print(f"\ncompressed = {label}")
            policies = dict(unpruned=kvpolicy.get_policy("window", threshold=-math.inf, window=args.window),
                            compressed=kvpolicy.get_policy(args.policy, **config))
            methods = prepare(model, args, prompt, policies)
            run_blocks(model, methods, tokens, args, clock)
            results.append(report(methods, context, batch, decoded, clock))
            del methods
            gc.collect()
    if args.json:
        args.json.write_text(json.dumps(dict(date=str(datetime.date.today()), device=str(device), preset=preset,
                                              args={k: str(v) for k, v in vars(args).items()},
                                              results=results), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
