"""Ragged KV storage: each (batch, kv_head) segment is its own variable-length sequence.

This is what makes per-head pruning free memory: a segment holds only its kept entries. Segments live in
two flat buffers ``(capacity, head_dim)`` (keys, values); segment ``s = b * kv_heads + h`` occupies rows
``starts[s] : starts[s] + lengths[s]`` and may have spare rows up to ``capacities[s]`` for decoding appends.
All data movement goes through :mod:`kvpolicy.kernels` (Triton on GPU, torch reference on CPU).

Decoding appends (:meth:`RaggedStore.append_one`) read nothing back to the host per step: the store keeps a
host-side lower bound of every segment's spare rows and checks the real ones only when that bound runs out.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvpolicy import kernels

# When the spare rows run out, segments with fewer spare rows than this are grown (by their usual step), so the
# exact check, which reads the lengths back to the host, runs at most once every this many decoding appends.
_RESERVE_AHEAD = 8


@dataclass
class RaggedStore:
    key_buf: torch.Tensor  # (capacity, D)
    value_buf: torch.Tensor  # (capacity, D)
    starts: torch.Tensor  # (S,) int64
    lengths: torch.Tensor  # (S,) int64
    capacities: torch.Tensor  # (S,) int64
    backend: str = "auto"
    # Host-side lower bound of min(capacities - lengths): appends that fit in it need no read-back.
    spare: int = 0
    _rows_of: tuple | None = field(default=None, repr=False, compare=False)  # see offset_rows

    @classmethod
    def empty(cls, segments: int, head_dim: int, dtype: torch.dtype, device: torch.device | str,
              backend: str = "auto") -> RaggedStore:
        zeros = torch.zeros(segments, dtype=torch.int64, device=device)
        buf = torch.empty((0, head_dim), dtype=dtype, device=device)
        return cls(buf, buf.clone(), zeros, zeros.clone(), zeros.clone(), backend)

    @property
    def segments(self) -> int:
        return self.starts.shape[0]

    @property
    def has_rows(self) -> bool:
        """False when the buffers have no row at all (so no entry either); known on the host."""
        return self.key_buf.shape[0] > 0

    @property
    def entries(self) -> int:
        """Number of stored entries over all segments."""
        return int(self.lengths.sum())

    def nbytes(self) -> int:
        """Bytes held: key/value buffers (including spare capacity) plus segment metadata."""
        meta = self.starts.nbytes + self.lengths.nbytes + self.capacities.nbytes
        return self.key_buf.nbytes + self.value_buf.nbytes + meta

    def extend(self, keys: torch.Tensor, values: torch.Tensor, keep: torch.Tensor) -> None:
        """Append the kept entries of a block, in order.

        ``keys``/``values``: ``(B, H, n, D)`` with ``B * H == segments``; ``keep``: ``(B, H, n)`` bool.
        """
        if keys.shape[0] * keys.shape[1] != self.segments:
            raise ValueError(f"block has {keys.shape[0] * keys.shape[1]} segments, store has {self.segments}")
        if keys.shape[2] == 0:
            return
        if keys.shape[2] == 1:
            self.append_one(keys[:, :, 0].reshape(self.segments, -1), values[:, :, 0].reshape(self.segments, -1),
                            keep.reshape(self.segments))
            return
        packed_k, packed_v, cu = kernels.compact_heads(keys.contiguous(), values.contiguous(), keep,
                                                       backend=self.backend)
        counts = cu[1:] - cu[:-1]
        if not self.has_rows:
            # First fill (the prefill): the packed block is the store, with no spare capacity at all.
            self.key_buf, self.value_buf = packed_k, packed_v
            self.starts, self.lengths, self.capacities = cu[:-1].clone(), counts.clone(), counts.clone()
            self.spare = 0
            return
        self._ensure_capacity(counts)
        seg = torch.repeat_interleave(torch.arange(self.segments, device=cu.device), counts)
        rows = self.starts[seg] + self.lengths[seg] + (torch.arange(packed_k.shape[0], device=cu.device) - cu[seg])
        self.key_buf[rows] = packed_k
        self.value_buf[rows] = packed_v
        self.lengths += counts
        self.spare = int((self.capacities - self.lengths).min())

    def append_one(self, new_keys: torch.Tensor, new_values: torch.Tensor, keep: torch.Tensor | None) -> None:
        """Append one entry to every segment where ``keep`` ``(S,)`` bool is True (None: every segment).

        ``new_keys``/``new_values``: ``(S, D)``. Nothing is read back to the host unless the spare rows known
        on the host have run out (then segments short of room are grown, see ``_RESERVE_AHEAD``).
        """
        if self.spare < 1:
            self._reserve()
        kernels.append_spare(self.key_buf, self.value_buf, self.starts, self.lengths, new_keys, new_values, keep,
                             backend=self.backend)
        self.spare -= 1  # every segment's first spare row was written, appended or not

    def _reserve(self) -> None:
        """Give every segment at least one spare row; grow those with fewer than ``_RESERVE_AHEAD``."""
        self._ensure_capacity(torch.full_like(self.lengths, _RESERVE_AHEAD))
        self.spare = int((self.capacities - self.lengths).min())

    def _ensure_capacity(self, extra: torch.Tensor) -> None:
        needed = self.lengths + extra
        if bool((needed <= self.capacities).all()):
            return
        # Grow every short segment by at least 1/8 of its size (and 16 rows) so appends amortise.
        grown = torch.maximum(needed, self.capacities + torch.clamp(self.capacities // 8, min=16))
        new_caps = torch.where(needed > self.capacities, grown, self.capacities)
        self.key_buf, self.value_buf, self.starts = kernels.regrow(
            self.key_buf, self.value_buf, self.starts, self.lengths, new_caps, backend=self.backend
        )
        self.capacities = new_caps

    def attention(self, queries: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``queries (S, M, D)`` → ``(out (S, M, D) float32, lse (S, M))`` over each segment's entries."""
        return kernels.varlen_attention(queries, self.key_buf, self.value_buf, self.starts, self.lengths, scale,
                                        backend=self.backend)

    def decode_attention(self, queries: torch.Tensor, scale: float, block_keys: torch.Tensor | None = None,
                         block_values: torch.Tensor | None = None) -> torch.Tensor:
        """``queries (S, M, D)`` → ``out (S, M, D)`` float32 over each segment's entries, plus its own dense block
        ``block_keys``/``block_values`` ``(S, P, D)`` if given (all visible): one softmax, no log-sum-exp."""
        return kernels.decode_attention(queries, self.key_buf, self.value_buf, self.starts, self.lengths, scale,
                                        block_keys, block_values, backend=self.backend)

    # -- a prefix in front of every segment: the HF adapter keeps its pending window there while decoding, so that
    # -- one pass over each segment attends to the stored and the pending entries (no second block, no merge)
    def add_prefix(self, keys: torch.Tensor, values: torch.Tensor, rows: int) -> None:
        """Put ``rows`` rows in front of every segment's entries, the first ``P`` from ``keys``/``values``
        ``(S, P, D)`` (the rest zero); they count as the segment's first entries (lengths and capacities grow by
        ``rows``). One copy of the store."""
        self.key_buf, self.value_buf, self.starts = kernels.prefix_segments(
            self.key_buf, self.value_buf, self.starts, self.lengths, self.capacities, keys, values, rows,
            backend=self.backend)
        self.lengths = self.lengths + rows
        self.capacities = self.capacities + rows

    def remove_prefix(self, rows: int, offsets: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Undo :meth:`add_prefix`: drop the first ``rows`` rows of every segment and return the entries at
        ``offsets`` among them, ``(S, len(offsets), D)`` keys and values. One copy of the store."""
        keys, values = self.read_offsets(offsets)
        capacities = self.capacities - rows
        self.key_buf, self.value_buf, self.starts = kernels.regrow(
            self.key_buf, self.value_buf, self.starts + rows, self.lengths - rows, capacities, backend=self.backend)
        self.lengths = self.lengths - rows
        self.capacities = capacities
        return keys, values

    def read_offsets(self, offsets: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Entries at ``offsets`` (relative to each segment's start): ``(S, len(offsets), D)`` keys and values."""
        index = torch.tensor(offsets, dtype=torch.int64, device=self.starts.device)
        rows = (self.starts[:, None] + index).reshape(-1)
        keys = self.key_buf.index_select(0, rows).reshape(self.segments, len(offsets), self.key_buf.shape[1])
        return keys, self.value_buf.index_select(0, rows).reshape(self.segments, len(offsets), self.value_buf.shape[1])

    # -- the last entries of every segment: while the HF adapter decodes under decisions that keep everything, its
    # -- pending window is simply the newest entries of every segment (appended there, nothing moves when judged)
    def read_tail(self, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The last ``count`` entries of every segment, oldest first: ``(S, count, D)`` keys and values (copies).
        Every segment must hold at least ``count`` entries."""
        index = torch.arange(-count, 0, dtype=torch.int64, device=self.starts.device)
        rows = ((self.starts + self.lengths)[:, None] + index).reshape(-1)
        keys = self.key_buf.index_select(0, rows).reshape(self.segments, count, self.key_buf.shape[1])
        return keys, self.value_buf.index_select(0, rows).reshape(self.segments, count, self.value_buf.shape[1])

    def remove_tail(self, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Remove the last ``count`` entries of every segment and return them as :meth:`read_tail` does; their rows
        become spare rows (no copy of the store)."""
        keys, values = self.read_tail(count)
        self.lengths = self.lengths - count
        self.spare += count
        return keys, values

    def offset_rows(self, offset: int) -> torch.Tensor:
        """``starts + offset`` ``(S,)``, computed once per offset and layout (decoding steps reuse it)."""
        if self._rows_of is None or self._rows_of[0] is not self.starts:
            self._rows_of = (self.starts, {})
        rows = self._rows_of[1].get(offset)
        if rows is None:
            rows = self._rows_of[1][offset] = self.starts + offset
        return rows

    def write_offset(self, offset: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Overwrite each segment's entry at ``offset`` with ``keys``/``values`` ``(S, D)`` (in place, no read-back)."""
        kernels.write_rows(self.key_buf, self.value_buf, self.offset_rows(offset), keys, values, backend=self.backend)

    def append_from_offset(self, offset: int, keep: torch.Tensor | None) -> None:
        """Append a copy of each segment's entry at ``offset`` where ``keep`` ``(S,)`` (None: everywhere); like
        :meth:`append_one`, nothing is read back unless the spare rows known on the host have run out."""
        if self.spare < 1:
            self._reserve()
        kernels.append_rows(self.key_buf, self.value_buf, self.starts, self.lengths, self.offset_rows(offset), keep,
                            backend=self.backend)
        self.spare -= 1

    def segment(self, s: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of segment ``s`` (views), for inspection and tests."""
        start, n = int(self.starts[s]), int(self.lengths[s])
        return self.key_buf[start:start + n], self.value_buf[start:start + n]
