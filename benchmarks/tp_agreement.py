"""What the tensor-parallel agreement of the SGLang adapter costs by itself (no SGLang, no model).

Starts ``--ranks`` processes in a ``torch.distributed`` gloo group (what SGLang's TP CPU group is on a CPU
machine, and on GPU machines too: the adapter agrees over the CPU group), then times back to back, with every rank
ready:

- ``all_reduce``: one ``all_reduce(MIN)`` of 7 int64, the smallest collective the group can do;
- ``sync``: :meth:`~kvpolicy.adapters.sglang.ranks.TPRowAgreement.sync`, one agreement as the scheduler runs it
  after a forward, with ``--broken`` slots that lost their first entry on each rank since the last one (a decode
  step breaks about one per running request; more than ``BROKEN_INLINE`` take a second gather);
- ``agree_max``: the eviction agreement.

Inside a server an agreement also waits for the slowest rank to finish its own step: the servers log that total
per rank (``kvpolicy: rank ... agreement: ... mean X ms``), and ``kvpolicy bench-serve`` reports it
(``agreement_ms``); this script isolates the communication. Numbers are wall-clock microseconds per call.

    python benchmarks/tp_agreement.py                      # 2 ranks, 2000 calls each, 0 / 16 / 300 broken slots
    python benchmarks/tp_agreement.py --ranks 4 --calls 500
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import tempfile
import time
from pathlib import Path


def _rank(rank: int, ranks: int, init_file: str, calls: int, broken_counts: list[int], results) -> None:
    import torch
    import torch.distributed as dist

    from kvpolicy.adapters.sglang.ranks import RowTotals, TPRowAgreement

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=ranks)
    agreement = TPRowAgreement(dist.group.WORLD, size=ranks, num_rows=1_000_000, num_slots=200_000)
    local = RowTotals(900_000 - rank, 950_000 - rank, 1_000_000)
    timings: dict[str, list[float]] = {}

    def timed(name: str, fn) -> None:
        for _ in range(max(10, calls // 20)):  # warm-up
            fn()
        dist.barrier()
        samples = []
        for _ in range(calls):
            started = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - started)
        timings[name] = samples

    tensor = torch.zeros(7, dtype=torch.int64)
    timed("all_reduce (7 x int64)", lambda: dist.all_reduce(tensor, op=dist.ReduceOp.MIN))
    for count in broken_counts:
        slots = torch.arange(1 + rank * 50_000, 1 + rank * 50_000 + count)

        def one_sync(slots=slots) -> None:
            agreement.note_broken(slots)
            agreement.sync(lambda: local, 1000, 1, {})

        timed(f"sync, {count} broken slots per rank", one_sync)
    timed("agree_max (eviction)", lambda: agreement.agree_max(rank))
    results.put((rank, {name: (statistics.median(v), sorted(v)[int(0.99 * (len(v) - 1))], statistics.fmean(v))
                        for name, v in timings.items()}))
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--broken", type=int, nargs="+", default=[0, 16, 300])
    args = parser.parse_args(argv)
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = str(Path(tmp) / "gloo-init")
        procs = [context.Process(target=_rank, args=(r, args.ranks, init_file, args.calls, args.broken, results))
                 for r in range(args.ranks)]
        for proc in procs:
            proc.start()
        got = dict(results.get(timeout=600) for _ in procs)
        for proc in procs:
            proc.join(timeout=60)
    print(f"{args.ranks} ranks (gloo, this machine), {args.calls} calls each; microseconds per call, rank 0")
    print("| collective | p50 | p99 | mean |")
    print("|---|---|---|---|")
    for name, (p50, p99, mean) in got[0].items():
        print(f"| {name} | {p50 * 1e6:.0f} | {p99 * 1e6:.0f} | {mean * 1e6:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
