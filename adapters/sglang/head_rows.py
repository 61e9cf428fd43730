"""A head-row KV pool: per-(layer, slot, KV head) storage that frees single heads (pure torch, no SGLang).

SGLang's dense pool stores every token (slot) in every layer with all its KV heads, so a policy that drops
some heads of some layers frees nothing. Here the unit of storage is one *head-row* (the K or V vector of one
KV head of one layer of one token), taken from ONE pool shared by all layers, and ``row_of`` maps
``(layer, slot, head)`` to its row. A dropped entry's row goes back on the free stack at once.

This module is the storage core and a torch reference for attention over it; the SGLang 0.5.23 integration
(pool, allocator and attention-backend subclasses, not built yet) is to wrap it. Importing it imports only torch
and the standard library.
"""

from __future__ import annotations

import operator
from typing import NamedTuple

import torch

__all__ = ["DUMMY_ROW", "HeadRowPool", "OutOfRows", "PoolInvariantError", "RowPlan", "head_row_attention", "plan_rows"]

DUMMY_ROW = 0
"""The row of every absent entry. It absorbs writes to absent entries and padding, and is never handed out."""


class OutOfRows(RuntimeError):
    """:meth:`HeadRowPool.alloc` needed more free rows than the pool has (the pool is left unchanged)."""


class PoolInvariantError(RuntimeError):
    """:meth:`HeadRowPool.check` found a row with no owner or several, or a ``live`` count that is wrong."""


def _int_in_range(name: str, value: object, low: int, high: int | None, what: str) -> int:
    """``value`` as an int in ``[low, high]`` (``high`` None: no upper end); ValueError naming ``name`` otherwise."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be {what}, got {value!r}")
    try:
        number = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(f"{name} must be {what}, got {value!r}") from None
    if number < low or (high is not None and number > high):
        raise ValueError(f"{name} must be {what}, got {number}")
    return number


def _positive_int(name: str, value: object) -> int:
    return _int_in_range(name, value, 1, None, "a positive int")


class HeadRowPool:
    """One pool of K/V head-rows shared by all layers, addressed through ``row_of[layer, slot, head]``.

    Sizes: ``L = num_layers``, ``H = num_kv_heads``, ``S = num_slots``, ``R = num_rows``, ``Dk = k_head_dim``,
    ``Dv = v_head_dim``. Slots are SGLang's token slots ``1..S``; slot 0 is SGLang's padding slot and never
    holds rows. An *entry* is one ``(layer, slot, head)``.

    Tensors (on ``device`` unless noted):

    - ``k_rows`` ``(R+1, Dk)`` and ``v_rows`` ``(R+1, Dv)``, ``dtype``. Row 0 (:data:`DUMMY_ROW`) absorbs
      writes to absent entries and is never handed out, so rows ``1..R`` are the capacity.
    - ``row_of`` int32 ``(L, S+1, H)``: the row holding each entry, 0 if absent. ``row_of[:, 0, :]`` is 0.
    - ``free_stack`` int32 ``(R,)``: ``free_stack[:free_rows]`` are the free rows; the rest is stale.
    - ``live`` int32 ``(S+1,)`` on the host (CPU): rows each slot still holds, between 0 and ``L*H``.

    The number of free rows is a host-side int, so counting never waits for the device.

    Contract:

    - :meth:`alloc` gives a slot all ``L*H`` rows at once; a slot can be allocated again only after
      :meth:`free_slots`. :meth:`free_entries` returns single rows; :meth:`free_slots` returns whatever a slot
      still holds. Nothing else moves rows.
    - Every method validates all its arguments before changing anything: a refusal (``ValueError``, or
      :class:`OutOfRows` from :meth:`alloc`) leaves the pool exactly as it was. Bad argument types raise
      ``ValueError`` too, naming the argument.
    - Allocation and frees read the slot ids (and ``drop``) on the host to validate them, so with device
      tensors they synchronise; :meth:`write` and :meth:`gather` do not (they check shapes and dtypes only, so
      out-of-range slot ids there are torch's ``IndexError`` on CPU and a device assert on a GPU).
    - Invariant, verified by :meth:`check`: every row ``1..R`` is owned by exactly one entry of ``row_of`` or
      sits once in ``free_stack[:free_rows]``, and ``live[s]`` counts the entries of slot ``s`` that hold a row.
      ``free_rows + held_rows == R`` always.
    """

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        num_slots: int,
        num_rows: int,
        k_head_dim: int,
        v_head_dim: int,
        dtype: torch.dtype,
        device: str | torch.device = "cpu",
    ) -> None:
        self.num_layers = _positive_int("num_layers", num_layers)
        self.num_kv_heads = _positive_int("num_kv_heads", num_kv_heads)
        self.num_slots = _positive_int("num_slots", num_slots)
        self.num_rows = _positive_int("num_rows", num_rows)
        self.k_head_dim = _positive_int("k_head_dim", k_head_dim)
        self.v_head_dim = _positive_int("v_head_dim", v_head_dim)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
        try:
            self.device = torch.device(device)
        except (RuntimeError, TypeError):
            raise ValueError(f"device must name a torch device, got {device!r}") from None
        if self.num_rows >= 2**31:
            raise ValueError(f"num_rows must fit int32 row ids (< 2**31), got {self.num_rows}")
        self.dtype = dtype

        L, H, S, R = self.num_layers, self.num_kv_heads, self.num_slots, self.num_rows
        self.k_rows = torch.zeros(R + 1, self.k_head_dim, dtype=dtype, device=self.device)
        self.v_rows = torch.zeros(R + 1, self.v_head_dim, dtype=dtype, device=self.device)
        self.row_of = torch.zeros(L, S + 1, H, dtype=torch.int32, device=self.device)
        self.free_stack = torch.arange(1, R + 1, dtype=torch.int32, device=self.device)
        self.device = self.row_of.device  # "cuda" -> "cuda:0", so device checks compare equal
        self.live = torch.zeros(S + 1, dtype=torch.int32)
        self._top = R  # free_stack[:_top] are free

    # ----------------------------------------------------------------------------------------------- counts

    @property
    def rows_per_slot(self) -> int:
        """``L * H``: the rows :meth:`alloc` takes for one slot."""
        return self.num_layers * self.num_kv_heads

    @property
    def free_rows(self) -> int:
        """Rows on the free stack (host-side, no device sync)."""
        return self._top

    @property
    def held_rows(self) -> int:
        """Rows owned by entries: ``num_rows - free_rows``."""
        return self.num_rows - self._top

    # --------------------------------------------------------------------------------------- alloc / free

    def alloc(self, slots: torch.Tensor) -> None:
        """Give each slot of ``slots`` (``(N,)`` integer) all ``L*H`` rows: ``row_of[:, slots, :]`` is filled.

        Raises ``ValueError`` if a slot is 0, outside ``1..S``, repeated, or still holds rows, and
        :class:`OutOfRows` if fewer than ``N*L*H`` rows are free; either way before changing anything.
        ``N = 0`` does nothing. The rows' contents are stale until written.
        """
        host = self._slot_ids("slots", slots)
        if bool((self.live[host] != 0).any()):
            held = host[self.live[host] != 0].tolist()
            raise ValueError(f"slots {held} still hold rows; free_slots() them before alloc()")
        count = host.numel() * self.rows_per_slot
        if count > self._top:
            raise OutOfRows(f"alloc of {host.numel()} slots needs {count} rows ({self.rows_per_slot} per slot), "
                            f"only {self._top} are free")
        if count == 0:
            return
        rows = self.free_stack[self._top - count:self._top]
        index = slots.to(self.device, torch.int64)  # no copy back when the ids already live on the device
        self.row_of[:, index, :] = rows.view(self.num_layers, host.numel(), self.num_kv_heads)
        self._top -= count
        self.live[host] = self.rows_per_slot

    def free_slots(self, slots: torch.Tensor) -> int:
        """Return every row the slots of ``slots`` (``(N,)`` integer) still hold; returns how many.

        Afterwards ``row_of[:, slots, :]`` is 0 and ``live[slots]`` is 0; a slot that holds no rows is fine
        (nothing to do for it). Raises ``ValueError`` before changing anything if a slot is 0, outside
        ``1..S`` or repeated.
        """
        host = self._slot_ids("slots", slots)
        count = int(self.live[host].sum())
        if count == 0:
            return 0
        index = slots.to(self.device, torch.int64)
        held = self.row_of[:, index, :].reshape(-1)
        # `live` says how many of these are rows (> 0); sorting puts them first, so no mask (and no sync).
        rows = torch.sort(held, descending=True).values[:count]
        self.free_stack[self._top:self._top + count] = rows
        self._top += count
        self.row_of[:, index, :] = DUMMY_ROW
        self.live[host] = 0
        return count

    def free_entries(self, layer: int | torch.Tensor, slots: torch.Tensor, drop: torch.Tensor) -> int:
        """Return the rows of the entries a policy dropped; returns how many.

        ``layer``: an int (every entry's layer) or ``(N,)`` integer (one layer per row of ``drop``).
        ``slots``: ``(N,)`` integer. ``drop``: ``(N, H)`` bool; ``drop[i, h]`` frees entry
        ``(layer[i], slots[i], h)``. Rows of ``drop`` that are all False are fine.

        Raises ``ValueError`` before changing anything if a layer is outside ``0..L-1``, a slot is 0 or
        outside ``1..S``, a ``(layer, slot)`` pair repeats, shapes disagree, or a dropped entry is already
        absent (never a double free). Reads ``drop`` and ``row_of`` on the host (one sync on a GPU).
        """
        host_slots = self._slot_ids("slots", slots, unique=False)
        n = host_slots.numel()
        if isinstance(layer, torch.Tensor):
            if layer.dim() != 1 or layer.numel() != n or layer.dtype.is_floating_point or layer.dtype == torch.bool:
                raise ValueError(f"layer must be an int or an ({n},) integer tensor, got {tuple(layer.shape)} "
                                 f"{layer.dtype}")
            host_layers = layer.to("cpu", torch.int64)
            if n and (int(host_layers.min()) < 0 or int(host_layers.max()) >= self.num_layers):
                raise ValueError(f"layer values must be in 0..{self.num_layers - 1}, got {host_layers.tolist()}")
        else:
            host_layers = torch.full((n,), self._layer_id(layer), dtype=torch.int64)
        pairs = host_layers * (self.num_slots + 1) + host_slots
        if torch.unique(pairs).numel() != n:
            raise ValueError("free_entries got the same (layer, slot) twice; merge the drop masks first")
        heads = self.num_kv_heads
        if not isinstance(drop, torch.Tensor) or drop.dtype != torch.bool or tuple(drop.shape) != (n, heads):
            got = f"{tuple(drop.shape)} {drop.dtype}" if isinstance(drop, torch.Tensor) else type(drop).__name__
            raise ValueError(f"drop must be ({n}, {self.num_kv_heads}) bool, got {got}")
        if n == 0:
            return 0

        layers_dev, slots_dev = host_layers.to(self.device), host_slots.to(self.device)
        drop_dev = drop.to(self.device)
        held = self.row_of[layers_dev, slots_dev]  # (N, H)
        absent = drop_dev & (held == DUMMY_ROW)
        # one device->host copy for both the per-entry counts and the double-free check
        summary = torch.cat([drop_dev.sum(dim=1), absent.any().view(1).long()]).cpu()
        per_entry, double_free = summary[:n], bool(summary[n])
        if double_free:
            bad = torch.nonzero(absent.cpu(), as_tuple=False)[:5]
            where = [(int(host_layers[i]), int(host_slots[i]), int(h)) for i, h in bad.tolist()]
            raise ValueError(f"free_entries would free absent entries (layer, slot, head) {where}: double free")
        count = int(per_entry.sum())
        if count == 0:
            return 0
        rows = torch.sort(torch.where(drop_dev, held, DUMMY_ROW).reshape(-1), descending=True).values[:count]
        self.free_stack[self._top:self._top + count] = rows
        self._top += count
        self.row_of[layers_dev, slots_dev] = torch.where(drop_dev, DUMMY_ROW, held)
        self.live.index_add_(0, host_slots, -per_entry.to(torch.int32))
        return count

    # --------------------------------------------------------------------------------------- write / read

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store ``k`` ``(N, H, Dk)`` and ``v`` ``(N, H, Dv)`` (pool dtype and device) for the tokens in
        ``slots`` ``(N,)`` (integer, pool device) of ``layer``.

        Absent entries, and slot 0 (padding), land in the dummy row 0. Slots other than 0 should not repeat
        (which duplicate wins is unspecified). Raises ``ValueError`` on a bad layer, shape, dtype or device.
        """
        rows = self._rows(layer, slots).reshape(-1)
        n = slots.shape[0]
        for name, value, dim in (("k", k, self.k_head_dim), ("v", v, self.v_head_dim)):
            if not isinstance(value, torch.Tensor) or tuple(value.shape) != (n, self.num_kv_heads, dim):
                got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(f"{name} must be ({n}, {self.num_kv_heads}, {dim}), got {got}")
            if value.dtype != self.dtype or value.device != self.device:
                raise ValueError(f"{name} must be {self.dtype} on {self.device}, got {value.dtype} on {value.device}")
        self.k_rows.index_copy_(0, rows, k.reshape(-1, self.k_head_dim))
        self.v_rows.index_copy_(0, rows, v.reshape(-1, self.v_head_dim))

    def gather(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Read ``layer``'s entries of ``slots`` ``(N,)`` (integer, pool device).

        Returns ``k`` ``(N, H, Dk)``, ``v`` ``(N, H, Dv)`` and ``present`` ``(N, H)`` bool. Absent entries
        (and slot 0) read the dummy row 0, whose contents are garbage: mask them with ``present``.
        """
        rows = self._rows(layer, slots)
        return self.k_rows[rows], self.v_rows[rows], rows != DUMMY_ROW

    # ------------------------------------------------------------------------------------------- checking

    def check(self) -> None:
        """Verify the ownership invariant (see the class docstring); raise :class:`PoolInvariantError`
        (a ``RuntimeError``) naming the first problem found. Reads the whole index: a debugging aid."""
        L, H, S, R = self.num_layers, self.num_kv_heads, self.num_slots, self.num_rows
        if not 0 <= self._top <= R:
            raise PoolInvariantError(f"free stack top {self._top} is outside 0..{R}")
        row_of = self.row_of.to("cpu", torch.int64)
        if tuple(row_of.shape) != (L, S + 1, H):
            raise PoolInvariantError(f"row_of has shape {tuple(row_of.shape)}, expected {(L, S + 1, H)}")
        if bool((row_of[:, 0, :] != DUMMY_ROW).any()):
            raise PoolInvariantError("the padding slot 0 holds rows")
        held = row_of[row_of != DUMMY_ROW]
        free = self.free_stack[:self._top].to("cpu", torch.int64)
        for what, rows in (("row_of", held), ("the free stack", free)):
            bad = rows[(rows < 1) | (rows > R)]
            if bad.numel():
                raise PoolInvariantError(f"{what} holds rows outside 1..{R}: {bad[:5].tolist()}")
        owners_held = torch.bincount(held, minlength=R + 1)
        owners_free = torch.bincount(free, minlength=R + 1)
        for problem, mask in (
            ("owned by several entries", owners_held > 1),
            ("on the free stack more than once", owners_free > 1),
            ("both held and free", (owners_held > 0) & (owners_free > 0)),
            ("neither held nor free (leaked)", (owners_held + owners_free) == 0),
        ):
            mask[DUMMY_ROW] = False
            if bool(mask.any()):
                rows = torch.nonzero(mask).flatten()[:5].tolist()
                raise PoolInvariantError(f"rows {rows} are {problem}")
        counts = (row_of != DUMMY_ROW).sum(dim=(0, 2))
        wrong = torch.nonzero(counts != self.live.to(torch.int64)).flatten()
        if wrong.numel():
            s = int(wrong[0])
            raise PoolInvariantError(f"live[{s}] = {int(self.live[s])} but slot {s} holds {int(counts[s])} rows")

    # -------------------------------------------------------------------------------------------- helpers

    def _layer_id(self, layer: object) -> int:
        return _int_in_range("layer", layer, 0, self.num_layers - 1, f"an int in 0..{self.num_layers - 1}")

    def _slot_ids(self, name: str, slots: object, unique: bool = True) -> torch.Tensor:
        """Validated host copy (int64) of real slot ids: 1-D, integer, in ``1..S``, distinct if ``unique``."""
        if (not isinstance(slots, torch.Tensor) or slots.dim() != 1 or slots.dtype.is_floating_point
                or slots.dtype.is_complex or slots.dtype == torch.bool):
            got = f"{tuple(slots.shape)} {slots.dtype}" if isinstance(slots, torch.Tensor) else type(slots).__name__
            raise ValueError(f"{name} must be a 1-D integer tensor, got {got}")
        host = slots.to("cpu", torch.int64)
        if host.numel() == 0:
            return host
        if int(host.min()) < 1 or int(host.max()) > self.num_slots:
            bad = host[(host < 1) | (host > self.num_slots)][:5].tolist()
            raise ValueError(f"{name} must be in 1..{self.num_slots} (0 is the padding slot), got {bad}")
        if unique and torch.unique(host).numel() != host.numel():
            raise ValueError(f"{name} repeats a slot: {host.tolist()}")
        return host

    def _rows(self, layer: int, slots: torch.Tensor) -> torch.Tensor:
        """``(N, H)`` int64 rows of ``layer``'s entries of ``slots``, checking shapes only (no sync)."""
        index = self._layer_id(layer)
        if (not isinstance(slots, torch.Tensor) or slots.dim() != 1 or slots.dtype.is_floating_point
                or slots.dtype.is_complex or slots.dtype == torch.bool):
            got = f"{tuple(slots.shape)} {slots.dtype}" if isinstance(slots, torch.Tensor) else type(slots).__name__
            raise ValueError(f"slots must be a 1-D integer tensor, got {got}")
        if slots.device != self.device:
            raise ValueError(f"slots must be on {self.device}, got {slots.device}")
        # int64 so that any row * D offset computed from these cannot overflow
        return self.row_of[index, slots.long()].long()


def head_row_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    present: torch.Tensor,
    visible: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Reference attention over gathered head-rows (float32 math, output in ``q``'s dtype).

    ``q`` ``(M, Hq, Dk)``; ``k`` ``(N, H, Dk)``; ``v`` ``(N, H, Dv)``; ``present`` ``(N, H)`` bool (from
    :meth:`HeadRowPool.gather`); ``visible`` ``(M, N)`` bool (e.g. causal); ``scale`` multiplies ``q·k``.
    Query head ``j`` reads KV head ``j // (Hq // H)`` (GQA). Query ``m`` uses key ``n`` of its KV head ``h``
    iff ``visible[m, n] and present[n, h]``. A query head that uses no key outputs 0, never NaN, and the
    contents of unused keys and values (NaN, inf, huge) never reach the output.

    Returns ``(M, Hq, Dv)``. Raises ``ValueError`` if ``Hq`` is not a multiple of ``H`` or shapes disagree.
    """
    for name, t, dims in (("q", q, 3), ("k", k, 3), ("v", v, 3), ("present", present, 2), ("visible", visible, 2)):
        if not isinstance(t, torch.Tensor) or t.dim() != dims:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a {dims}-D tensor, got {got}")
    M, Hq, Dk = q.shape
    N, H, _ = k.shape
    Dv = v.shape[2]
    if tuple(k.shape) != (N, H, Dk):
        raise ValueError(f"k must be ({N}, {H}, {Dk}) to match q's head dim, got {tuple(k.shape)}")
    if tuple(v.shape[:2]) != (N, H):
        raise ValueError(f"v must be ({N}, {H}, Dv) to match k, got {tuple(v.shape)}")
    if Hq % H:
        raise ValueError(f"query heads ({Hq}) must be a multiple of KV heads ({H})")
    if tuple(present.shape) != (N, H) or present.dtype != torch.bool:
        raise ValueError(f"present must be ({N}, {H}) bool, got {tuple(present.shape)} {present.dtype}")
    if tuple(visible.shape) != (M, N) or visible.dtype != torch.bool:
        raise ValueError(f"visible must be ({M}, {N}) bool, got {tuple(visible.shape)} {visible.dtype}")

    group = Hq // H
    qf = q.float().view(M, H, group, Dk)
    # An absent key's score is replaced by -inf below whatever it is, but an absent value must be zeroed:
    # its weight is 0, and 0 * NaN in weights @ v would still be NaN.
    vf = torch.where(present[..., None], v.float(), 0.0)
    scores = torch.einsum("mhgd,nhd->mhgn", qf, k.float()) * float(scale)
    used = (visible[:, None, None, :] & present.t()[None, :, None, :])  # (M, H, 1, N)
    scores = scores.masked_fill(~used, float("-inf"))
    top = scores.amax(dim=-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, 0.0)  # all-masked: exp(-inf - 0) = 0 instead of NaN
    weights = torch.exp(scores - top)
    total = weights.sum(dim=-1, keepdim=True)
    weights = weights / torch.where(total > 0, total, 1.0)
    out = torch.einsum("mhgn,nhd->mhgd", weights, vf)
    return out.reshape(M, Hq, Dv).to(q.dtype)


ROW_ID_BYTES = 4  # int32 row ids in row_of and in the free stack


class RowPlan(NamedTuple):
    """``tokens``: dense-token capacity reported to SGLang (``N'``); ``slots``: logical slots (``k·N'``);
    ``rows``: head-rows (``N'·L·H``); ``bytes``: what the plan allocates, index included."""

    tokens: int
    slots: int
    rows: int
    bytes: int


def plan_rows(dense_tokens: int, *, num_layers: int, num_kv_heads: int, k_head_dim: int, v_head_dim: int,
              element_size: int, slot_expansion: int = 2) -> RowPlan:
    """Fit the head-row pool and its index into the bytes ``dense_tokens`` dense tokens would take."""
    for name, value in (("dense_tokens", dense_tokens), ("num_layers", num_layers), ("num_kv_heads", num_kv_heads),
                        ("k_head_dim", k_head_dim), ("v_head_dim", v_head_dim), ("element_size", element_size),
                        ("slot_expansion", slot_expansion)):
        _positive_int(name, value)
    per_slot = num_layers * num_kv_heads
    row_bytes = (k_head_dim + v_head_dim) * element_size
    cell = per_slot * row_bytes  # dense KV bytes per token
    index = slot_expansion * per_slot * ROW_ID_BYTES + per_slot * ROW_ID_BYTES  # row_of + free stack per token
    fixed = row_bytes + per_slot * ROW_ID_BYTES  # the dummy row 0 and the padding slot 0's row_of entries
    budget = dense_tokens * cell
    tokens = (budget - fixed) // (cell + index)
    if tokens < 1:
        raise ValueError(f"{dense_tokens} dense tokens leave no room for a head-row pool and its index")
    rows = tokens * per_slot
    slots = tokens * slot_expansion
    used = (rows + 1) * row_bytes + (slots + 1) * per_slot * ROW_ID_BYTES + rows * ROW_ID_BYTES
    return RowPlan(tokens, slots, rows, used)
