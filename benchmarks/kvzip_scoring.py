"""KVzip+ oracle cost: prefill + scoring against a plain prefill, kvpolicy beside kvpress.

Builds a random Qwen3 (no download) and a character-level tokenizer (every printable ASCII character is one
token, so both sides tokenize the repeat prompts identically), then times, on the same model weights and the
same random context of ``T`` tokens:

- ``plain prefill``: the model's own forward over the context (SDPA, DynamicCache, no policy);
- ``kvpolicy KVzip+``: ``KVzipPlusPolicy.compute_scores`` through the HF adapter's oracle runner (its prefill
  of the context, the repeat passes, the two-pass scoring), default config (``chunk_size=2048``);
- ``kvpress KVzip+`` (only when kvpress is importable, i.e. run with ``.venv-kvpress``): ``KVzipPress(
  compression_ratio=0.5, kvzip_plus_normalization=True)`` around the same prefill (prefill, repeat passes,
  scores, its final top-k and masking).

Methods run interleaved in blocks (one run of each per block, the order rotating between blocks) after one
warm-up run each; the medians of CPU time (``time.process_time``) and wall time are reported, on CUDA the
median of CUDA-event time instead of CPU time. Ratios are medians over plain prefill's median.

    python benchmarks/kvzip_scoring.py                          # CPU: 4 layers, hidden 256, 8/2 heads, fp32
    .venv-kvpress/bin/python benchmarks/kvzip_scoring.py        # the same with kvpress beside it
    python benchmarks/kvzip_scoring.py --device cuda            # bigger model, bf16, CUDA events
    python benchmarks/kvzip_scoring.py --dry-run                # tiny sizes, seconds (CI wiring check)
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import platform
import statistics
import string
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from transformers import DynamicCache, PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

import kvpolicy
from kvpolicy.adapters.hf import PolicySession
from kvpolicy.adapters.hf._compat import cache_kwarg

CHARACTERS = ("\n", " ", *string.ascii_letters, *string.digits, *string.punctuation)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Model sizes per device: (layers, hidden, q heads, kv heads, head_dim, dtype, context lengths).
PRESETS = {
    "cpu": (4, 256, 8, 2, 32, "fp32", [1024, 2048, 4096]),
    "cuda": (8, 2048, 16, 4, 128, "bf16", [1024, 2048, 4096, 8192, 16384]),
    "dry-run": (2, 64, 4, 2, 16, "fp32", [64, 160]),
}


def build_tokenizer() -> PreTrainedTokenizerFast:
    """One token per printable ASCII character (and ``<unk>``); no chat template, no download."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<unk>": 0, **{ch: i + 1 for i, ch in enumerate(CHARACTERS)}}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", clean_up_tokenization_spaces=False)


def build_model(layers, hidden, heads, kv_heads, head_dim, dtype, device, max_tokens) -> Qwen3ForCausalLM:
    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=len(CHARACTERS) + 1, hidden_size=hidden, intermediate_size=3 * hidden,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      head_dim=head_dim, max_position_embeddings=max(4096, 2 * max_tokens + 256),
                      attn_implementation="sdpa")
    with torch.device(device):
        return Qwen3ForCausalLM(cfg).to(dtype).eval()


class Clock:
    """Times one call: (CPU seconds or CUDA-event seconds, wall seconds)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self, fn: Callable[[], object]) -> tuple[float, float]:
        if self.cuda:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            wall = time.perf_counter()
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3, time.perf_counter() - wall
        cpu, wall = time.process_time(), time.perf_counter()
        fn()
        return time.process_time() - cpu, time.perf_counter() - wall


def interleaved(methods: dict[str, Callable[[], object]], blocks: int, clock: Clock) -> dict[str, dict]:
    """One warm-up run of each, then ``blocks`` blocks of one run of each (order rotating); medians."""
    for fn in methods.values():
        fn()
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in methods}
    names = list(methods)
    for block in range(blocks):
        for name in names[block % len(names):] + names[:block % len(names)]:
            samples[name].append(clock(methods[name]))
    return {name: {"time": statistics.median(s[0] for s in runs), "wall": statistics.median(s[1] for s in runs),
                   "runs": len(runs)} for name, runs in samples.items()}


def kvpress_available() -> bool:
    try:
        import kvpress  # noqa: F401
    except ImportError:
        return False
    return True


class Bench:
    """Models, tokenizer and an attached kvpolicy session; :meth:`methods` gives the timed callables for one
    context length. Use as a context manager."""

    def __init__(self, args) -> None:
        self.device = torch.device(args.device)
        layers, hidden, heads, kv_heads, head_dim, dtype_name, lengths = PRESETS[
            "dry-run" if args.dry_run else args.device]
        self.shape = {"layers": layers, "hidden": hidden, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim}
        self.dtype = DTYPES[args.dtype or dtype_name]
        self.lengths = args.tokens or lengths
        # The dry run uses small chunks so that the multi-chunk path (continue prompt) runs too.
        self.chunk_size = 96 if args.dry_run else 2048
        self.with_kvpress = kvpress_available() and not args.no_kvpress
        if self.with_kvpress:
            logging.getLogger("kvpress").setLevel(logging.ERROR)  # KVzipPress warns about its cost on every build
        self.tokenizer = build_tokenizer()
        self.plain_model = build_model(layers, hidden, heads, kv_heads, head_dim, self.dtype, self.device,
                                       max(self.lengths))
        self.our_model = copy.deepcopy(self.plain_model)
        self.policy = kvpolicy.get_policy("kvzip_plus", chunk_size=self.chunk_size)

    def __enter__(self) -> Bench:
        self._workdir = tempfile.TemporaryDirectory()
        self.tokenizer.save_pretrained(self._workdir.name)
        self.plain_model.config.name_or_path = self._workdir.name  # kvpress loads the tokenizer from here
        self.session = PolicySession(self.our_model, self.policy, tokenizer=self.tokenizer).attach()
        return self

    def __exit__(self, *exc) -> None:
        self.session.detach()
        self._workdir.cleanup()

    def context(self, tokens: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(tokens)
        return torch.randint(1, len(CHARACTERS) + 1, (1, tokens), generator=gen).to(self.device)

    def methods(self, context: torch.Tensor) -> dict[str, Callable[[], object]]:
        plain_model, policy, session = self.plain_model, self.policy, self.session

        def plain() -> None:
            with torch.no_grad():
                plain_model(input_ids=context, **{cache_kwarg(plain_model): DynamicCache(config=plain_model.config)})

        def ours() -> dict:
            return policy.compute_scores(session.oracle_runner(), context)

        methods = {"plain prefill": plain, "kvpolicy KVzip+": ours}
        if self.with_kvpress:
            from kvpress import KVzipPress

            def theirs() -> None:
                press = KVzipPress(compression_ratio=0.5, kvzip_plus_normalization=True, chunk_size=self.chunk_size)
                with torch.no_grad(), press(plain_model):
                    plain_model(input_ids=context, past_key_values=DynamicCache(config=plain_model.config))

            methods["kvpress KVzip+"] = theirs
        return methods


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_memory_mib(args, bench: Bench, name: str, tokens: int) -> float:
    """Peak memory of one run of ``name`` above what was held before it, MiB. CUDA: allocator peak, in this
    process. CPU: peak resident set (``VmHWM``) of a fresh process that builds the same setup and runs the
    method once (a fresh process, so memory the allocator kept from earlier runs cannot hide the peak)."""
    if bench.device.type == "cuda":
        method = bench.methods(bench.context(tokens))[name]
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        method()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    cmd = [sys.executable, str(Path(__file__).resolve()), "--device", "cpu", "--threads", str(args.threads),
           "--tokens", str(tokens), "--peak-of", name]
    cmd += ["--dry-run"] if args.dry_run else []
    cmd += ["--no-kvpress"] if args.no_kvpress else []
    cmd += ["--dtype", args.dtype] if args.dtype else []
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("PEAK_KIB ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"peak-memory child failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return int(lines[-1].split()[1]) / 1024


def _peak_child(args) -> int:
    with Bench(args) as bench:
        method = bench.methods(bench.context(args.tokens[0]))[args.peak_of]
        before = _status_kib("VmRSS")
        method()
        print(f"PEAK_KIB {_status_kib('VmHWM') - before}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dry-run", action="store_true", help="tiny model and contexts: checks the wiring")
    parser.add_argument("--tokens", type=int, nargs="+", default=None, help="context lengths (default: preset)")
    parser.add_argument("--blocks", type=int, default=None, help="timed blocks (default 5; dry run 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: fp32 on CPU, bf16 on CUDA")
    parser.add_argument("--no-kvpress", action="store_true", help="skip kvpress even when it is importable")
    parser.add_argument("--memory", action="store_true",
                        help="also measure each method's peak memory (CPU: one fresh process per method and T)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--peak-of", default=None, help=argparse.SUPPRESS)  # internal: the --memory child
    args = parser.parse_args(argv)

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no CUDA device")
    torch.set_num_threads(args.threads)
    if args.peak_of is not None:
        return _peak_child(args)
    blocks = args.blocks or (1 if args.dry_run else 5)
    clock = Clock(torch.device(args.device))
    results = []
    with Bench(args) as bench:
        shape = bench.shape
        print(f"torch {torch.__version__}, transformers {transformers.__version__}, python "
              f"{platform.python_version()}, device {bench.device}, threads {torch.get_num_threads()}, kvpress: "
              f"{'yes' if bench.with_kvpress else 'skipped' if args.no_kvpress else 'not importable'}")
        print(f"random Qwen3: {shape['layers']} layers, hidden {shape['hidden']}, {shape['heads']}/{shape['kv_heads']}"
              f" heads, head_dim {shape['head_dim']}, {str(bench.dtype).removeprefix('torch.')}; kvzip_plus "
              f"chunk_size {bench.chunk_size}; {blocks} blocks")
        kind = "gpu" if bench.device.type == "cuda" else "cpu"
        for tokens in bench.lengths:
            methods = bench.methods(bench.context(tokens))
            scores = methods["kvpolicy KVzip+"]()
            if not all(bool(torch.isfinite(s).all()) for s in scores.values()):
                print(f"T={tokens}: kvpolicy scores are not all finite", file=sys.stderr)
                return 1
            timed = interleaved(methods, blocks, clock)
            if args.memory:
                for name in methods:
                    timed[name]["peak_mib"] = peak_memory_mib(args, bench, name, tokens)
            base = timed["plain prefill"]
            print(f"\nT={tokens}")
            print(f"  {'method':<18} {kind + ' ms':>10} {'wall ms':>10} {'x plain (' + kind + ')':>16} "
                  f"{'x plain (wall)':>15}" + (f" {'peak MiB':>9}" if args.memory else ""))
            for name, t in timed.items():
                t["ratio_time"], t["ratio_wall"] = t["time"] / base["time"], t["wall"] / base["wall"]
                print(f"  {name:<18} {t['time'] * 1e3:>10.1f} {t['wall'] * 1e3:>10.1f} {t['ratio_time']:>16.2f} "
                      f"{t['ratio_wall']:>15.2f}" + (f" {t['peak_mib']:>9.1f}" if args.memory else ""))
            for name in methods:
                if name != "plain prefill":
                    t = timed[name]
                    print(f"RESULT T={tokens} {name} prefill+score / plain prefill ratio: {t['ratio_time']:.2f} "
                          f"({kind} time), {t['ratio_wall']:.2f} (wall)")
            results.append({"tokens": tokens, **timed})
    if args.json is not None:
        meta = {"device": args.device, "threads": torch.get_num_threads(), "torch": torch.__version__,
                "transformers": transformers.__version__, "dtype": str(bench.dtype), **bench.shape,
                "chunk_size": bench.chunk_size, "blocks": blocks, "kvpress": bench.with_kvpress}
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
