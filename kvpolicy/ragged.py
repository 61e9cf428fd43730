"""Ragged KV storage: each (batch, kv_head) segment is its own variable-length sequence.

This is what makes per-head pruning free memory: a segment holds only its kept entries. Segments live in
two flat buffers ``(capacity, head_dim)`` (keys, values); segment ``s = b * kv_heads + h`` occupies rows
``starts[s] : starts[s] + lengths[s]`` and may have spare rows up to ``capacities[s]`` for decoding appends.
All data movement goes through :mod:`kvpolicy.kernels` (Triton on GPU, torch reference on CPU).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvpolicy import kernels


@dataclass
class RaggedStore:
    key_buf: torch.Tensor  # (capacity, D)
    value_buf: torch.Tensor  # (capacity, D)
    starts: torch.Tensor  # (S,) int64
    lengths: torch.Tensor  # (S,) int64
    capacities: torch.Tensor  # (S,) int64
    backend: str = "auto"

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
            self._append_one(keys[:, :, 0].reshape(self.segments, -1), values[:, :, 0].reshape(self.segments, -1),
                             keep.reshape(self.segments))
            return
        packed_k, packed_v, cu = kernels.compact_heads(keys.contiguous(), values.contiguous(), keep,
                                                       backend=self.backend)
        counts = cu[1:] - cu[:-1]
        if self.entries == 0 and self.key_buf.shape[0] == 0:
            # First fill (the prefill): the packed block is the store, with no spare capacity at all.
            self.key_buf, self.value_buf = packed_k, packed_v
            self.starts, self.lengths, self.capacities = cu[:-1].clone(), counts.clone(), counts.clone()
            return
        self._ensure_capacity(counts)
        seg = torch.repeat_interleave(torch.arange(self.segments, device=cu.device), counts)
        rows = self.starts[seg] + self.lengths[seg] + (torch.arange(packed_k.shape[0], device=cu.device) - cu[seg])
        self.key_buf[rows] = packed_k
        self.value_buf[rows] = packed_v
        self.lengths += counts

    def _append_one(self, new_keys: torch.Tensor, new_values: torch.Tensor, mask: torch.Tensor) -> None:
        self._ensure_capacity(mask.to(torch.int64))
        kernels.append(self.key_buf, self.value_buf, self.starts, self.lengths, new_keys, new_values, mask,
                       backend=self.backend)

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

    def segment(self, s: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of segment ``s`` (views), for inspection and tests."""
        start, n = int(self.starts[s]), int(self.lengths[s])
        return self.key_buf[start:start + n], self.value_buf[start:start + n]
