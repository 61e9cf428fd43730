"""A first-in first-out ring of tensors along the token axis, for per-step appends and removals without copying.

Decoding appends one token per layer per step and, once the protected window is full, removes the oldest one.
``torch.cat`` for the append and a slice copy for the removal would move the whole window every step;
:class:`TokenQueue` writes the new token over the slot of the one that left, so a steady decode step copies
nothing, and the storage holds exactly ``window + 1`` tokens.
"""

from __future__ import annotations

import torch


class TokenQueue:
    """Tensors that share every dimension except ``axis`` (the token axis), first in first out, in a ring.

    Storage grows to exactly what an append needs (no spare room: a prefill or a growing window holds no extra
    memory), with the live tokens copied into it oldest first. :meth:`pop` moves the ring's head; once more than
    half of the storage (and more than one slot) is free, the live part is copied into exact-size storage, so a
    long prefill's memory is returned when its judged tokens leave, while a steady ring of ``window + 1`` slots
    is never copied.

    :meth:`view` gives the live tokens oldest first (a view unless they wrap around the end of the ring, then a
    copy); :meth:`storage` gives the whole ring in slot order, for consumers that do not care about order
    (attention over a set of entries) when :meth:`is_full`.
    """

    __slots__ = ("axis", "buf", "head", "length")

    def __init__(self, axis: int) -> None:
        self.axis = axis
        self.buf: torch.Tensor | None = None
        self.head = 0  # slot of the oldest live token
        self.length = 0

    def __len__(self) -> int:
        return self.length

    @property
    def capacity(self) -> int:
        """Tokens the storage has room for."""
        return 0 if self.buf is None else self.buf.shape[self.axis]

    @property
    def nbytes(self) -> int:
        """Bytes of the storage, free slots included."""
        return 0 if self.buf is None else self.buf.nbytes

    def is_full(self) -> bool:
        return self.buf is not None and self.length == self.buf.shape[self.axis]

    def storage(self) -> torch.Tensor | None:
        """The whole ring in slot order (not token order); every slot is live when :meth:`is_full`."""
        return self.buf

    def view(self) -> torch.Tensor | None:
        """The live tokens, oldest first (None before the first append)."""
        return None if self.buf is None else self.front(self.length)

    def front(self, n: int) -> torch.Tensor:
        """The ``n`` oldest live tokens, oldest first: a view, or a copy when they wrap around the ring's end."""
        first = min(n, self.buf.shape[self.axis] - self.head)
        part = self.buf.narrow(self.axis, self.head, first)
        if first == n:
            return part
        return torch.cat([part, self.buf.narrow(self.axis, 0, n - first)], dim=self.axis)

    def append(self, block: torch.Tensor) -> None:
        """Append ``block`` (same shape as the storage except along ``axis``)."""
        n = block.shape[self.axis]
        if self.buf is None:
            self.buf = block.clone(memory_format=torch.contiguous_format)
            self.head, self.length = 0, n
            return
        if n == 0:
            return
        if self.length + n > self.buf.shape[self.axis]:
            self._move(self.length + n)
        self._write((self.head + self.length) % self.buf.shape[self.axis], block)
        self.length += n

    def set_last(self, block: torch.Tensor) -> None:
        """Overwrite the ``block.shape[axis]`` newest live tokens with ``block``."""
        n = block.shape[self.axis]
        if not 0 <= n <= self.length:
            raise ValueError(f"cannot overwrite the last {n} of {self.length} tokens")
        if n:
            self._write((self.head + self.length - n) % self.buf.shape[self.axis], block)

    def pop(self, n: int) -> None:
        """Drop the ``n`` oldest tokens."""
        if not 0 <= n <= self.length:
            raise ValueError(f"cannot pop {n} of {self.length} tokens")
        if n == 0:
            return
        self.head = (self.head + n) % self.buf.shape[self.axis]
        self.length -= n
        if self.buf.shape[self.axis] - self.length > max(self.length, 1):
            self._move(self.length)

    def _write(self, slot: int, block: torch.Tensor) -> None:
        """Write ``block`` into consecutive slots from ``slot``, wrapping around the ring's end."""
        n = block.shape[self.axis]
        first = self.buf.shape[self.axis] - slot
        if n <= first:
            self.buf.narrow(self.axis, slot, n).copy_(block)
            return
        self.buf.narrow(self.axis, slot, first).copy_(block.narrow(self.axis, 0, first))
        self.buf.narrow(self.axis, 0, n - first).copy_(block.narrow(self.axis, first, n - first))

    def _move(self, capacity: int) -> None:
        """Copy the live tokens, oldest first, into new storage of ``capacity`` tokens."""
        shape = list(self.buf.shape)
        shape[self.axis] = capacity
        fresh = self.buf.new_empty(shape)
        if self.length:
            fresh.narrow(self.axis, 0, self.length).copy_(self.front(self.length))
        self.buf, self.head = fresh, 0
