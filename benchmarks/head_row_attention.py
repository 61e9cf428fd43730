"""Decode attention over the head-row pool at 3x compression against dense decode over the same logical length.

One layer, one decode step: ``batch`` requests of ``context`` tokens, ``kv_heads`` KV heads with ``group`` query
heads each. The head-row pool is laid out as a long-running server leaves it (request slots and rows scattered at
random); at 3x compression each (token, KV head) entry is present with probability 1/3 (``--keep``), per head.

Timed in one process, interleaved (every iteration runs each implementation once, in rotating order, so drifts in
clock or load hit all of them alike); medians of wall time (with a device sync around each call), of process CPU
time and, on CUDA, of GPU time (CUDA events):

- ``head-row triton, kept``: :func:`~kvpolicy.adapters.sglang.row_kernels.decode_attention` (CUDA only);
- ``head-row triton, all``: the same kernel and pool with every entry present (dense over the same length, read
  through the same indirection, like SGLang's Triton decode reading ``kv_indices``; CUDA only);
- ``dense SDPA``: ``torch`` SDPA over contiguous per-request K/V ``(B, H, T, D)``, the GQA group as the query
  length (no gather: the best case for dense);
- ``head-row torch ref, kept`` / ``all``: the torch references (CPU and ``--dry-run``; on CUDA only as a check).

Prints the ratio of the compressed head-row decode to each dense baseline. Target on a GPU: <= 0.5 of the dense
time. ``--dry-run``: tiny sizes on CPU, torch references only, seconds; add ``--interpret`` to run the Triton
kernels there too, through Triton's interpreter (exercises the GPU code path; its timings mean nothing).

Examples::

    python benchmarks/head_row_attention.py --device cuda            # defaults: 8 x 16k tokens, 8 KV heads, bf16
    python benchmarks/head_row_attention.py --dry-run
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
from torch.nn.functional import scaled_dot_product_attention

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TARGET = 0.5


def build(batch: int, context: int, kv_heads: int, group: int, dim: int, dtype: torch.dtype, keep: float,
          device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """A scattered head-row pool holding ``batch`` requests of ``context`` tokens, plus the dense copy."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    slots = batch * context
    rows = slots * kv_heads
    keys = torch.randn(batch, kv_heads, context, dim, generator=g).to(device=device, dtype=dtype)
    values = torch.randn(batch, kv_heads, context, dim, generator=g).to(device=device, dtype=dtype)
    slot_of = (torch.randperm(slots, generator=g) + 1).view(batch, context)  # request b's t-th token -> slot
    row_ids = (torch.randperm(rows, generator=g) + 1).view(slots, kv_heads)  # (slot, head) -> row, scattered
    row_all = torch.zeros(slots + 1, kv_heads, dtype=torch.int32)
    row_all[1:] = row_ids.int()
    k_rows = torch.zeros(rows + 1, dim, dtype=dtype, device=device)
    v_rows = torch.zeros(rows + 1, dim, dtype=dtype, device=device)
    flat_rows = row_all[slot_of.reshape(-1)].long().to(device)  # (B*T, H), in (b, t) order
    k_rows[flat_rows.reshape(-1)] = keys.permute(0, 2, 1, 3).reshape(-1, dim)
    v_rows[flat_rows.reshape(-1)] = values.permute(0, 2, 1, 3).reshape(-1, dim)
    row_kept = row_all.clone()
    row_kept[torch.rand(slots + 1, kv_heads, generator=g) >= keep] = 0  # random per head
    table = torch.zeros(batch + 1, context, dtype=torch.int32)
    table[1:] = slot_of.int()  # request b in table row b + 1 (row 0 unused, as SGLang's padding request)
    query = torch.randn(batch, kv_heads * group, dim, generator=g).to(device=device, dtype=dtype)
    return dict(keys=keys, values=values, k_rows=k_rows, v_rows=v_rows, row_all=row_all.to(device),
                row_kept=row_kept.to(device), table=table.to(device), query=query,
                indices=torch.arange(1, batch + 1, device=device), lengths=torch.full((batch,), context, device=device))


def timed(fns: dict[str, Callable[[], object]], warmup: int, iters: int, device: torch.device
          ) -> dict[str, tuple[float, float, float | None]]:
    """Median (wall ms, CPU ms, GPU ms or None) per implementation, interleaved, rotating the order each iteration.
    Wall time includes the Python and launch overhead a server pays per layer; GPU time (CUDA events) does not."""
    names = list(fns)
    on_gpu = device.type == "cuda"
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    sync()
    wall: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    gpu: dict[str, list[float]] = {name: [] for name in names}
    for i in range(iters):
        for name in names[i % len(names):] + names[:i % len(names)]:
            sync()
            if on_gpu:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
            w0, c0 = time.perf_counter(), time.process_time()
            fns[name]()
            if on_gpu:
                end.record()
            sync()
            wall[name].append((time.perf_counter() - w0) * 1e3)
            cpu[name].append((time.process_time() - c0) * 1e3)
            if on_gpu:
                gpu[name].append(start.elapsed_time(end))
    return {name: (statistics.median(wall[name]), statistics.median(cpu[name]),
                   statistics.median(gpu[name]) if on_gpu else None) for name in names}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on CPU, torch references only")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--context", type=int, default=16384, help="tokens per request (the logical length)")
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--group", type=int, default=4, help="query heads per KV head")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--keep", type=float, default=1 / 3, help="fraction of entries present (1/3: 3x compression)")
    parser.add_argument("--splits", type=int, default=None, help="decode splits (default: the kernel's heuristic)")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--interpret", action="store_true",
                        help="CPU only: also run the Triton kernels through the interpreter (timings meaningless)")
    args = parser.parse_args(argv)
    if args.dry_run:
        args.device, args.batch, args.context, args.kv_heads, args.head_dim = "cpu", 2, 300, 2, 64
        args.dtype, args.warmup, args.iters = "fp32", min(args.warmup, 1), min(args.iters, 5)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")
    on_gpu = device.type == "cuda"
    use_triton = on_gpu or args.interpret
    if args.interpret and not on_gpu:
        os.environ["TRITON_INTERPRET"] = "1"  # read when triton is first imported, just below
    from kvpolicy.adapters.sglang import row_kernels  # imports triton when it is installed

    dtype = DTYPES[args.dtype]
    b, t, h, g, d = args.batch, args.context, args.kv_heads, args.group, args.head_dim
    scale = 1 / math.sqrt(d)

    if on_gpu:
        import triton

        print(f"device: {torch.cuda.get_device_name(device)}; torch {torch.__version__}; triton {triton.__version__}")
    else:
        print(f"device: CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads); "
              f"torch {torch.__version__}; "
              + ("Triton through its interpreter (timings meaningless)" if use_triton
                 else "torch references only (Triton is timed on CUDA)"))
    splits = args.splits if args.splits is not None else row_kernels.decode_splits(b, h, t)
    print(f"shape: batch={b} context={t} kv_heads={h} group={g} head_dim={d} dtype={args.dtype} keep={args.keep:.3f} "
          f"splits={splits if use_triton else '-'}; timing: interleaved, median of {args.iters} after {args.warmup} "
          "warm-up, wall with a device sync around each call")

    data = build(b, t, h, g, d, dtype, args.keep, device)
    q, k_rows, v_rows, table, idx, lens = (data[n] for n in ("query", "k_rows", "v_rows", "table", "indices",
                                                              "lengths"))
    kept = float((data["row_kept"][1:] != 0).float().mean())

    def head_rows(row_of, backend):
        return lambda: row_kernels.decode_attention(q, k_rows, v_rows, row_of, table, idx, lens, scale,
                                                    num_splits=splits, backend=backend)

    dense_q = q.view(b, h, g, d)  # GQA decode: the group's heads as h's query positions, all keys visible

    def dense_sdpa():
        return scaled_dot_product_attention(dense_q, data["keys"], data["values"], scale=scale)

    fns: dict[str, Callable[[], object]] = {}
    if use_triton:
        fns["head-row triton, kept"] = head_rows(data["row_kept"], "triton")
        fns["head-row triton, all"] = head_rows(data["row_all"], "triton")
    else:
        fns["head-row torch ref, kept"] = head_rows(data["row_kept"], "torch")
        fns["head-row torch ref, all"] = head_rows(data["row_all"], "torch")
    fns["dense SDPA"] = dense_sdpa

    # The implementations must agree before their times mean anything.
    dense_out = dense_sdpa().float().reshape(b, h * g, d)
    first = next(iter(fns))
    all_out, _ = fns[first.replace("kept", "all")]()
    print(f"check: max |{first.replace('kept', 'all')} - dense SDPA| = {float((all_out - dense_out).abs().max()):.2e}")
    if use_triton:
        ref_out, ref_lse = head_rows(data["row_kept"], "torch")()
        out, lse = fns[first]()
        print(f"check: max |{first} - torch reference| = {float((out - ref_out).abs().max()):.2e} (out), "
              f"{float((lse - ref_lse).abs().max()):.2e} (lse)")
    print(f"entries present: {kept:.3f}; K/V bytes a dense decode reads: "
          f"{2 * b * t * h * d * torch.empty((), dtype=dtype).element_size() / 1e6:.1f} MB")

    results = timed(fns, args.warmup, args.iters, device)
    print(f"{'impl':<28} {'wall ms':>10} {'cpu ms':>10} {'gpu ms':>10}")
    for name, (wall_ms, cpu_ms, gpu_ms) in results.items():
        print(f"{name:<28} {wall_ms:>10.4f} {cpu_ms:>10.4f} {'-' if gpu_ms is None else f'{gpu_ms:.4f}':>10}")
    baselines = [name for name in results if name != first]
    for name in baselines:
        gpu_ratio = "" if not on_gpu else f", GPU time {results[first][2] / results[name][2]:.3f}"
        print(f"ratio: {first} / {name} = {results[first][0] / results[name][0]:.3f} (wall){gpu_ratio}")
    best = min(baselines, key=lambda name: results[name][0])
    ratio = results[first][0] / results[best][0]
    verdict = ("met" if ratio <= TARGET else "missed") if on_gpu else "not judged (no GPU)"
    print(f"RESULT head_row_decode: {first} = {ratio:.3f} x the fastest dense baseline ({best}) in wall time; "
          f"target <= {TARGET} on GPU: {verdict}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
