"""Logical vs physical layout of one request's KV row (pure torch, no SGLang import).

SGLang keeps a request's KV slots in ``req_to_token[row, 0:seq_len]``, one per token, and derives RoPE
positions and attention lengths from ``seq_len``. After pruning the row is compacted, so two lengths exist:

- the *logical* length: tokens the request has seen (prompt + output); new tokens get logical positions;
- the *physical* length: slots left in the row; attention reads ``row[0:physical_len]``.

``slots[p]`` is the slot of logical token ``p``, or ``DUMMY_SLOT`` (0, SGLang's padding slot, never
allocated) once ``p`` was pruned; the same encoding as the tombstones in the radix tree, so a finished
request's ``slots`` can be inserted into the tree as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DUMMY_SLOT = 0


@dataclass
class SequenceLayout:
    """``slots``: ``(logical_len,)`` int64, ``DUMMY_SLOT`` where pruned. ``shared_len``: logical tokens
    ``[0, shared_len)`` whose slots the radix tree owns (matched or inserted), the rest the request owns."""

    slots: torch.Tensor
    shared_len: int = 0

    @classmethod
    def from_row(cls, row: torch.Tensor, shared_len: int = 0) -> SequenceLayout:
        """Layout of an uncompressed row (every token present)."""
        return cls(row.to(torch.int64).clone(), shared_len)

    @property
    def logical_len(self) -> int:
        return int(self.slots.shape[0])

    @property
    def present(self) -> torch.Tensor:
        """``(logical_len,)`` bool: tokens that still have a slot."""
        return self.slots != DUMMY_SLOT

    @property
    def physical_len(self) -> int:
        return int(self.present.sum())

    @property
    def pruned_count(self) -> int:
        """Tokens pruned so far = logical_len - physical_len: the offset between SGLang's physical seq_len
        and the RoPE position of the next token."""
        return self.logical_len - self.physical_len

    def physical_row(self) -> torch.Tensor:
        """The slots as the compacted ``req_to_token`` row must hold them, in logical order."""
        return self.slots[self.present]

    def kept_positions(self) -> torch.Tensor:
        """``(physical_len,)`` int64: the original absolute position of each entry of the physical row."""
        return torch.nonzero(self.present, as_tuple=False).flatten()

    def next_positions(self, count: int) -> torch.Tensor:
        """Absolute RoPE positions of the next ``count`` tokens: they continue the logical sequence."""
        return torch.arange(self.logical_len, self.logical_len + count, dtype=torch.int64)

    def append(self, new_slots: torch.Tensor) -> None:
        """Record ``new_slots`` (owned by the request) for the next logical tokens."""
        if bool((new_slots == DUMMY_SLOT).any()):
            raise ValueError("new tokens must have real slots (the dummy slot 0 is never allocated)")
        self.slots = torch.cat([self.slots, new_slots.to(torch.int64)])


def decode_positions(physical_seq_lens: torch.Tensor, pruned_counts: torch.Tensor) -> torch.Tensor:
    """RoPE positions of a decode step's new tokens.

    SGLang computes ``seq_lens - 1`` where ``seq_lens`` counts the row *including* the new token. After
    pruning, ``seq_lens`` must stay physical (attention reads that many slots) and the position must add the
    request's ``pruned_count``: ``positions = physical_seq_lens - 1 + pruned_counts``.
    """
    return physical_seq_lens.to(torch.int64) - 1 + pruned_counts.to(torch.int64)


def extend_positions(physical_prefix_lens: torch.Tensor, extend_lens: torch.Tensor,
                     pruned_counts: torch.Tensor) -> torch.Tensor:
    """RoPE positions of an extend (prefill) batch, flattened request after request.

    Request ``i`` contributes ``pruned_counts[i] + physical_prefix_lens[i] + arange(extend_lens[i])``.
    """
    starts = (physical_prefix_lens + pruned_counts).to(torch.int64)
    pieces = [torch.arange(int(s), int(s) + int(n), dtype=torch.int64) for s, n in zip(starts, extend_lens)]
    return torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.int64)
