"""Bandwidth of the compaction and ragged-attention kernels against a device-to-device copy of the same bytes.

On a CUDA device: times each Triton kernel and the torch reference (indexing) with CUDA events, median of
``--iters`` runs after ``--warmup``, and prints effective GB/s plus the fraction of copy bandwidth (copy time
of the same number of bytes / kernel time). The target for ragged compaction is >= 0.8 of copy bandwidth at
32k tokens x 8 KV heads x 128 dims bf16 (the defaults).

On CPU: Triton would only run through its interpreter, which says nothing about speed, so only the torch
references are timed (wall clock, median), against ``Tensor.copy_`` of the same bytes. The output says so.

Bytes counted per op (the traffic the op cannot avoid; masks and metadata are ignored as small):

- compact_heads: kept K and V rows read once and written once;
- append: one K and one V row per selected segment, read and written;
- regrow: old rows read, every row of the new buffers written (unused rows are zero-filled);
- varlen_attention: every stored K and V row read once.

Example::

    python benchmarks/compaction.py                      # GPU defaults: 32k x 8 heads x 128 dims, bf16
    python benchmarks/compaction.py --tokens 4096 --kv-heads 4 --iters 20   # small CPU run
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch

from kvpolicy.kernels import reference as ref

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def median_ms(fn: Callable[[], object], warmup: int, iters: int, device: torch.device) -> float:
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(iters):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


class Table:
    def __init__(self, copy_ms: Callable[[int], float]):
        self.copy_ms = copy_ms
        print(f"{'op':<18} {'impl':<22} {'MB moved':>9} {'ms':>9} {'GB/s':>8} {'copy GB/s':>9} {'of copy':>8}")

    def row(self, op: str, impl: str, nbytes: int, ms: float) -> None:
        copy = self.copy_ms(nbytes)
        print(f"{op:<18} {impl:<22} {nbytes / 1e6:>9.2f} {ms:>9.4f} {nbytes / ms / 1e6:>8.1f} "
              f"{nbytes / copy / 1e6:>9.1f} {copy / ms:>8.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--keep", type=float, default=0.5, help="fraction of entries kept (random mask)")
    parser.add_argument("--group", type=int, default=4, help="queries per KV head for varlen_attention")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (CPU form; 1 gives steadier numbers on a shared machine)")
    parser.add_argument("--interpret", action="store_true",
                        help="CPU only: also run the Triton kernels through the interpreter, to exercise this "
                             "script's GPU code path (their timings mean nothing)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    on_gpu = device.type == "cuda"
    elt = torch.empty((), dtype=dtype).element_size()
    b, h, t, d = args.batch, args.kv_heads, args.tokens, args.head_dim
    segments = b * h
    torch.manual_seed(0)

    if on_gpu or args.interpret:
        if not on_gpu:
            os.environ["TRITON_INTERPRET"] = "1"  # read when triton is first imported, just below
        from kvpolicy.kernels import triton_ops  # only here: the CPU form must not need Triton
    if on_gpu:
        print(f"device: {torch.cuda.get_device_name(device)}; torch {torch.__version__}; timing: CUDA events, "
              f"median of {args.iters} after {args.warmup} warm-up")
    else:
        triton_ops = triton_ops if args.interpret else None
        print(f"device: CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads); "
              f"torch {torch.__version__}; timing: wall clock, median of {args.iters} after {args.warmup} warm-up")
        print("NOTE: no GPU -- only the torch references are timed meaningfully; Triton kernels run only "
              + ("through the interpreter here (timings meaningless)." if args.interpret else "on a GPU (not timed)."))
    print(f"shape: batch={b} kv_heads={h} tokens={t} head_dim={d} dtype={args.dtype} keep={args.keep}")

    copy_cache: dict[int, float] = {}

    def copy_ms(nbytes: int) -> float:
        """Time of a device-to-device copy that reads and writes nbytes / 2 bytes each."""
        if nbytes not in copy_cache:
            n = max(1, nbytes // 2)
            src = torch.empty(n, dtype=torch.uint8, device=device)
            dst = torch.empty_like(src)
            copy_cache[nbytes] = median_ms(lambda: dst.copy_(src), args.warmup, args.iters, device)
        return copy_cache[nbytes]

    table = Table(copy_ms)

    # compact_heads ----------------------------------------------------------------------------------------
    keys = torch.randn(b, h, t, d, device=device).to(dtype)
    values = torch.randn(b, h, t, d, device=device).to(dtype)
    keep = torch.rand(b, h, t, device=device) < args.keep
    kept = int(keep.sum())
    nbytes = 2 * 2 * kept * d * elt
    table.row("compact_heads", "torch reference", nbytes,
              median_ms(lambda: ref.compact_heads_ref(keys, values, keep), args.warmup, args.iters, device))
    if triton_ops is not None:
        out_k = torch.empty((kept, d), dtype=dtype, device=device)
        out_v = torch.empty_like(out_k)
        table.row("compact_heads", "triton (sizes N: sync)", nbytes,
                  median_ms(lambda: triton_ops.compact_heads(keys, values, keep), args.warmup, args.iters, device))
        table.row("compact_heads", "triton into buffer", nbytes,
                  median_ms(lambda: triton_ops.compact_heads_into(keys, values, keep, out_k, out_v),
                            args.warmup, args.iters, device))
    packed_k, packed_v, cu = ref.compact_heads_ref(keys, values, keep)
    keys = values = None  # free them before the append buffers are made
    starts, lengths = cu[:-1].contiguous(), (cu[1:] - cu[:-1]).contiguous()

    # append (decode step: every segment gets one entry) ------------------------------------------------------
    caps = lengths + 16
    key_buf, value_buf, starts = ref.regrow_ref(packed_k, packed_v, starts, lengths, caps)
    new_k = torch.randn(segments, d, device=device).to(dtype)
    new_v = torch.randn(segments, d, device=device).to(dtype)
    mask = torch.ones(segments, dtype=torch.bool, device=device)
    scratch = lengths.clone()

    def reset_then(fn):
        def run():
            scratch.copy_(lengths)  # keep appending into the same spare row; the copy is a few bytes
            fn()
        return run

    nbytes = 2 * 2 * segments * d * elt
    table.row("append", "torch reference", nbytes, median_ms(
        reset_then(lambda: ref.append_ref(key_buf, value_buf, starts, scratch, new_k, new_v, mask)),
        args.warmup, args.iters, device))
    if triton_ops is not None:
        table.row("append", "triton", nbytes, median_ms(
            reset_then(lambda: triton_ops.append(key_buf, value_buf, starts, scratch, new_k, new_v, mask)),
            args.warmup, args.iters, device))

    # regrow (every segment grows by 1/8) ---------------------------------------------------------------------
    new_caps = caps + torch.clamp(caps // 8, min=16)
    nbytes = 2 * (int(lengths.sum()) + int(new_caps.sum())) * d * elt
    table.row("regrow", "torch reference", nbytes, median_ms(
        lambda: ref.regrow_ref(key_buf, value_buf, starts, lengths, new_caps), args.warmup, args.iters, device))
    if triton_ops is not None:
        table.row("regrow", "triton (1 sync)", nbytes, median_ms(
            lambda: triton_ops.regrow(key_buf, value_buf, starts, lengths, new_caps), args.warmup, args.iters,
            device))

    # varlen_attention (decode: `group` query heads per KV head) ----------------------------------------------
    queries = torch.randn(segments, args.group, d, device=device).to(dtype)
    scale = 1 / math.sqrt(d)
    nbytes = 2 * int(lengths.sum()) * d * elt
    if on_gpu or segments * t <= 1 << 20:
        table.row("varlen_attention", "torch reference (loop)", nbytes, median_ms(
            lambda: ref.varlen_attention_ref(queries, key_buf, value_buf, starts, lengths, scale),
            args.warmup, args.iters, device))
    if triton_ops is not None:
        table.row("varlen_attention", "triton", nbytes, median_ms(
            lambda: triton_ops.varlen_attention(queries, key_buf, value_buf, starts, lengths, scale),
            args.warmup, args.iters, device))


if __name__ == "__main__":
    main()
