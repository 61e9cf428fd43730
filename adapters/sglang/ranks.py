"""Tensor parallelism on the head-row pool: which KV heads a rank holds, and how the ranks of a TP group agree.

Pure torch and ``torch.distributed``; importing this module does not import SGLang.

Under SGLang's tensor parallelism every rank of a TP group stores the K/V of its own KV heads only, so each rank
has its own head-row pool, ``row_of`` and policy frees, and its free rows differ from the other ranks'. But every
rank runs the same scheduler over the same requests, and the ranks run each batch together: they must admit,
evict, retract and match prefixes identically, or they run different batches and the group hangs. Slots, tree
nodes and locks are the same on every rank (they follow the same scheduler decisions); only row counts differ.

**What is agreed.** The scheduler reads the pool through three row totals (:class:`RowTotals`): free rows
``F``, free + evictable ``F + E`` and free + cached ``F + E + P`` (``E``/``P``: rows held by unlocked/locked tree
nodes). Each size it sees is ``min(slots, rows // (L·H))`` of one of them. The ranks agree on the element-wise
MIN over the group, which is what the rank with the least room can honour; since the slot counts are common,
``min_r min(s, F_r // LH) = min(s, min_r F_r // LH)``, so the telescoping identity of the idle check still holds
(at idle every rank has ``F + E + P`` = all rows).

**Protocol** (:class:`TPRowAgreement`): one ``all_gather`` of a fixed row of int64 per rank over the TP group's
CPU (gloo) group; every rank then takes the same MIN / MAX of the same table:

- after every forward, before its results are processed (always): the totals, plus whether any rank's policy
  freed rows (the scheduler re-opens admission), how many requests failed (then one ``all_gather_object`` of
  the failures, rare) and the slots that lost their first entry on this rank (the window rule of prefix
  matching must see the same intact tokens on every rank; up to :data:`BROKEN_INLINE` ride in the row, more
  take one more ``all_gather``);
- before the scheduler plans the next batch and before its idle pass, only when something moved since the last
  agreement (an allocation, a free, a lock, a tree insert or eviction): idle loops cost nothing;
- inside an eviction: one ``all_reduce(MAX)`` of the number of least-recently-used leaves each rank needs freed,
  then a full agreement.

Its cost is measured in docs/scaling.md.

**Between agreements** the totals are lower bounds, updated by events every rank sees identically: an allocation
of ``n`` slots takes ``n·L·H`` rows on every rank (exact); locking tree nodes of ``t`` slots moves at most ``t·L·H``
rows out of ``F + E``; everything else (frees, inserts, unlocks, pruning) only adds rows, which count at the next
agreement. So whatever the agreed view allows, every rank can do, and every rank gets the same answer.

Tensor parallelism with one rank uses :class:`LocalRows`: the local totals, no communication.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

BROKEN_INLINE = 256  # slot ids each rank sends inline with its totals (2 KiB of int64)
_HEADER = 8  # F, F + E, F + E + P, freed entries, freed flag, failures, broken slots, spare

__all__ = ["AgreementStats", "KVHeadShard", "LocalRows", "RowAgreement", "RowTotals", "StepOutcome",
           "TPRowAgreement"]


class KVHeadShard(NamedTuple):
    """The global KV heads one tensor-parallel rank holds, as SGLang's ``QKVParallelLinear`` shards them.

    With ``tp_size <= total_heads`` rank ``r`` holds the ``total_heads // tp_size`` heads starting at
    ``r * local``; with more ranks than heads each head is replicated on ``tp_size // total_heads`` consecutive
    ranks and every rank holds one. ``heads``: the global head ids, in the rank's local order.
    """

    tp_rank: int
    tp_size: int
    total_heads: int
    heads: tuple[int, ...]
    replicas: int

    @classmethod
    def of(cls, tp_rank: int, tp_size: int, total_heads: int) -> KVHeadShard:
        """Raises ``ValueError`` when the heads do not divide over the ranks (SGLang refuses those too, or pads
        heads on CPU, which the adapter refuses before this is called)."""
        if tp_size < 1 or not 0 <= tp_rank < tp_size or total_heads < 1:
            raise ValueError(f"bad tensor-parallel layout: rank {tp_rank} of {tp_size}, {total_heads} KV heads")
        if tp_size >= total_heads:
            if tp_size % total_heads:
                raise ValueError(f"{tp_size} tensor-parallel ranks cannot replicate {total_heads} KV heads evenly")
            replicas = tp_size // total_heads
            return cls(tp_rank, tp_size, total_heads, (tp_rank // replicas,), replicas)
        if total_heads % tp_size:
            raise ValueError(f"{total_heads} KV heads do not divide over {tp_size} tensor-parallel ranks")
        local = total_heads // tp_size
        return cls(tp_rank, tp_size, total_heads, tuple(range(tp_rank * local, (tp_rank + 1) * local)), 1)

    @property
    def local_heads(self) -> int:
        return len(self.heads)

    def own_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """This rank's heads of ``scores`` ``(B, H, T)``: a policy that scores from hidden states (KVzap) returns
        every global head, one that scores this rank's keys/values returns the local heads already. Raises
        ``ValueError`` for any other head count."""
        heads = scores.shape[1]
        if heads == self.local_heads:
            return scores
        if heads == self.total_heads:
            index = torch.tensor(self.heads, device=scores.device)
            return scores.index_select(1, index)
        raise ValueError(f"scores for {heads} KV heads; this rank holds {self.local_heads} of {self.total_heads}")

    def label(self) -> str:
        """``tp0/2 kv heads 0,1``: the tag of this rank's log lines."""
        return f"tp{self.tp_rank}/{self.tp_size} kv heads {','.join(map(str, self.heads))}"


class RowTotals(NamedTuple):
    """Row counts the scheduler-visible sizes are computed from (see the module docstring)."""

    free: int  # F
    free_or_evictable: int  # F + E
    free_or_cached: int  # F + E + P


class StepOutcome(NamedTuple):
    """What the ranks agreed after a forward: ``freed``: some rank's policy freed rows (re-open admission);
    ``failures``: ``{rid: reason}`` of requests whose policy failed on some rank."""

    freed: bool
    failures: dict[str, str]


@dataclass
class AgreementStats:
    """Wall time spent in the group's collectives, for the reports (``summary()`` is logged at idle)."""

    forwards: int = 0  # agreements right after a forward (one per forward)
    agreements: int = 0  # full agreements (the gather of the totals), those after forwards included
    evictions: int = 0  # eviction agreements (all-reduce MAX of leaf counts)
    gathers: int = 0  # extra all_gather(_object) for failures and broken slots
    seconds: float = 0.0
    max_seconds: float = 0.0
    logged: int = 0  # collectives when summary() was last logged

    def record(self, seconds: float) -> None:
        self.seconds += seconds
        self.max_seconds = max(self.max_seconds, seconds)

    @property
    def collectives(self) -> int:
        return self.agreements + self.evictions + self.gathers

    def summary(self) -> str:
        """One line, parsed by ``kvpolicy bench-serve``: counts, then the time per collective (the wait for the
        slowest rank included)."""
        mean = self.seconds / self.collectives * 1e3 if self.collectives else 0.0
        return (f"{self.forwards} forwards, {self.agreements} agreements, {self.evictions} eviction agreements, "
                f"{self.gathers} gathers; mean {mean:.3f} ms, max {self.max_seconds * 1e3:.3f} ms, total "
                f"{self.seconds * 1e3:.1f} ms")


class RowAgreement:
    """The row numbers a scheduler may act on, for one rank; the base class is the single-rank case
    (:class:`LocalRows`): local numbers, nothing to agree.

    Contract for subclasses: every method returns the same value on every rank of the group whenever the ranks
    called the same methods in the same order with the same slot arguments (local row counts may differ), and the
    totals never exceed any rank's local totals.
    """

    size = 1

    def totals(self, local: RowTotals) -> RowTotals:
        return local

    def free_rows(self, local_free: int) -> int:
        return local_free

    def intact(self, slots: torch.Tensor, local_intact: torch.Tensor) -> torch.Tensor:
        """``(N,)`` bool: tokens of ``slots`` (host int64) that hold every entry (``local_intact`` on this rank)."""
        return local_intact

    def freed_entries(self, local_freed: int) -> int:
        """Rows the policy freed so far, for the admission's keep estimate."""
        return local_freed

    def agree_max(self, value: int) -> int:
        return value

    # -- events every rank sees identically ------------------------------------------------------------
    def on_alloc(self, slots: torch.Tensor, rows: int) -> None:
        pass

    def on_lock(self, rows_bound: int) -> None:
        pass

    def moved(self) -> None:
        """Something changed the local rows (a free, an unlock, an insert); agree before acting on sizes."""

    def note_broken(self, slots: torch.Tensor) -> None:
        """Slots (host int64) that lost their first entry on this rank."""

    def reset(self) -> None:
        """Everything was freed (cache flush)."""

    # -- agreement points ---------------------------------------------------------------------------------
    @property
    def pending(self) -> bool:
        return False

    def sync(self, local: Callable[[], RowTotals], local_freed: int, freed_since: int,
             failures: dict[str, str], *, forward: bool = False) -> StepOutcome:
        """Agree on the totals (``local()``, this rank's), the policy's freed count, whether rows were freed since
        the last call and which requests failed; ``forward``: called right after a forward (for the stats)."""
        return StepOutcome(freed_since > 0, dict(failures))


class LocalRows(RowAgreement):
    """One rank: the scheduler reads the local pool directly."""


class TPRowAgreement(RowAgreement):
    """The agreement of one TP group's ranks (see the module docstring).

    ``group``: the TP group's CPU (gloo) process group (SGLang's ``CacheInitParams.tp_cache_group``);
    ``num_rows``/``num_slots``: the pool's rows and slots (the same on every rank).
    """

    def __init__(self, group, *, size: int, num_rows: int, num_slots: int) -> None:
        if size < 2:
            raise ValueError(f"a TP agreement needs at least 2 ranks, got {size}")
        self.group = group
        self.size = size
        self.num_rows = num_rows
        self.view = RowTotals(num_rows, num_rows, num_rows)
        self._freed_entries = 0
        self.broken = torch.zeros(num_slots + 1, dtype=torch.bool)  # lost an entry on some rank (agreed)
        self._pending_broken: list[torch.Tensor] = []
        self._moved = False
        self._row = torch.zeros(_HEADER + BROKEN_INLINE, dtype=torch.int64)  # reused: stale ids past the count
        self.stats = AgreementStats()

    # -- reads --------------------------------------------------------------------------------------------
    def totals(self, local: RowTotals) -> RowTotals:
        return self.view

    def free_rows(self, local_free: int) -> int:
        return self.view.free

    def intact(self, slots: torch.Tensor, local_intact: torch.Tensor) -> torch.Tensor:
        return ~self.broken[slots]

    def freed_entries(self, local_freed: int) -> int:
        return self._freed_entries

    # -- events -------------------------------------------------------------------------------------------
    def on_alloc(self, slots: torch.Tensor, rows: int) -> None:
        free, reclaimable, cached = self.view
        self.view = RowTotals(free - rows, reclaimable - rows, cached - rows)
        self.broken[slots] = False
        self._moved = True

    def on_lock(self, rows_bound: int) -> None:
        free, reclaimable, cached = self.view
        self.view = RowTotals(free, max(free, reclaimable - rows_bound), cached)
        self._moved = True

    def moved(self) -> None:
        self._moved = True

    def note_broken(self, slots: torch.Tensor) -> None:
        if slots.numel():
            self._pending_broken.append(slots.to("cpu", torch.int64))

    def reset(self) -> None:
        self.view = RowTotals(self.num_rows, self.num_rows, self.num_rows)
        self.broken.zero_()
        self._pending_broken.clear()
        self._moved = True

    # -- collectives --------------------------------------------------------------------------------------
    @property
    def pending(self) -> bool:
        return self._moved

    def _all_reduce(self, values: list[int], op) -> list[int]:
        import torch.distributed as dist

        tensor = torch.tensor(values, dtype=torch.int64)
        started = time.perf_counter()
        dist.all_reduce(tensor, op=op, group=self.group)
        self.stats.record(time.perf_counter() - started)
        return tensor.tolist()

    def agree_max(self, value: int) -> int:
        import torch.distributed as dist

        self.stats.evictions += 1
        return self._all_reduce([value], dist.ReduceOp.MAX)[0]

    def _all_gather(self, row: torch.Tensor) -> torch.Tensor:
        """``(size, len(row))``: every rank's ``row``, in rank order (the same table on every rank)."""
        import torch.distributed as dist

        table = torch.empty((self.size, row.numel()), dtype=row.dtype)
        started = time.perf_counter()
        dist.all_gather(list(table.unbind(0)), row, group=self.group)
        self.stats.record(time.perf_counter() - started)
        return table

    def sync(self, local: Callable[[], RowTotals], local_freed: int, freed_since: int,
             failures: dict[str, str], *, forward: bool = False) -> StepOutcome:
        import torch.distributed as dist

        totals = local()
        broken = torch.cat(self._pending_broken) if self._pending_broken else None
        self._pending_broken.clear()
        count = 0 if broken is None else broken.numel()
        # One all_gather of a fixed-size row per rank: the numbers to take the MIN / MAX of, and the first
        # BROKEN_INLINE slots that lost an entry here (a decode step breaks about one slot per running request).
        row = self._row
        row[:_HEADER - 1] = torch.tensor([*totals, local_freed, int(freed_since > 0), len(failures), count])
        inline = min(count, BROKEN_INLINE)
        if inline:
            row[_HEADER:_HEADER + inline] = broken[:inline]
        table = self._all_gather(row)
        self.stats.agreements += 1
        self.stats.forwards += int(forward)
        header = table[:, :_HEADER - 1].tolist()
        columns = list(zip(*header))
        self.view = RowTotals(min(columns[0]), min(columns[1]), min(columns[2]))
        self._freed_entries = min(columns[3])
        any_freed, any_failed, counts = max(columns[4]), max(columns[5]), columns[6]
        for rank, n in enumerate(counts):
            if n:
                self.broken[table[rank, _HEADER:_HEADER + min(n, BROKEN_INLINE)]] = True
        overflow = max(counts) - BROKEN_INLINE
        if overflow > 0:  # e.g. a prefill's tokens leaving the window: the rest in one more gather
            rest = torch.zeros(overflow, dtype=torch.int64)  # slot 0: padding, never a real slot
            if count > inline:
                rest[:count - inline] = broken[inline:]
            self.stats.gathers += 1
            slots = self._all_gather(rest).flatten()
            self.broken[slots[slots > 0]] = True
        merged: dict[str, str] = {}
        if any_failed:
            gathered: list = [None] * self.size
            started = time.perf_counter()
            dist.all_gather_object(gathered, dict(failures), group=self.group)
            self.stats.record(time.perf_counter() - started)
            self.stats.gathers += 1
            for part in gathered:  # in rank order, the first reason wins: the same message on every rank
                for rid, reason in part.items():
                    merged.setdefault(rid, reason)
        self._moved = False
        return StepOutcome(bool(any_freed), merged)
