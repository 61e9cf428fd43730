"""Attention over the head-row pool: Triton kernels, their torch references beside them, and a dispatcher.

The pool (:mod:`kvpolicy.adapters.sglang.head_rows`) stores one K row and one V row per (layer, token slot, KV
head) entry. Every op here reads ONE layer:

- ``k_rows`` ``(R+1, Dk)`` and ``v_rows`` ``(R+1, Dv)``: the row buffers (row 0 is the dummy row: garbage);
- ``row_of`` int32 ``(S+1, H)``: ``row_of[slot, head]`` is the entry's row, 0 when the policy evicted it
  (``HeadRowPool.row_of[layer]``, a view);
- ``req_to_token`` ``(P, C)`` int32/int64: SGLang's table; request ``b``'s tokens are the slots
  ``req_to_token[req_pool_indices[b], :length_b]`` in position order.

Query head ``j`` reads KV head ``j // (Hq // H)`` (GQA). Every op returns ``(out, lse)`` in float32: the
softmax-normalised output ``(..., Hq, Dv)`` and the natural-log sum-exp ``(..., Hq)`` of the scaled logits over
the keys it used, so results over disjoint key sets merge exactly (:func:`kvpolicy.kernels.merge_attention`).

- :func:`decode_attention`: one query per request over all its ``seq_lens[b]`` slots.
- :func:`extend_prefix_attention`: an extend's new tokens over the request's first ``prefix_lens[b]`` slots
  (already in the pool); every new token sees the whole prefix.
- :func:`extend_causal_attention`: the new tokens among themselves, causally, from the extend's own ``k``/``v``
  (they are all present: a token is judged only after its own forward).
- :func:`extend_attention`: the two merged.

Masking rules, the same in the references and the kernels: an absent entry (row 0) is not a key for its KV head
(so for that head's whole query group). The kernels do not load K/V for it at all (masked loads: an absent row
costs no K/V bandwidth). A query head with no key (all entries absent, an empty prefix, a split of the decode
with nothing present) has ``lse = -inf`` and ``out = 0``, never NaN; the contents of the dummy row, of absent
rows and of ``req_to_token`` past a request's length never reach the output. Row and slot offsets are int64
(``rows * head_dim`` overflows int32 on a large pool).

Backends (as in :mod:`kvpolicy.kernels.dispatch`): ``"auto"`` runs Triton when every tensor is on CUDA and
Triton imports, the torch reference otherwise; ``"torch"``/``"triton"`` force one (Triton on CPU tensors needs
``TRITON_INTERPRET=1`` set before triton is imported). Wrappers raise ValueError before launching anything.

Host syncs: the references read lengths on the host (they are the semantics, for tests and CPU). The Triton
decode path never syncs; the Triton extend paths need the longest new-token count for their grid, which the
caller passes (``max_q_len``; SGLang has it on the host) or which is read once otherwise.

This module imports neither SGLang nor anything that does; it imports triton only if it is installed.
"""

from __future__ import annotations

import os

import torch

from kvpolicy.kernels import merge_attention
from kvpolicy.kernels.dispatch import Backend, resolve_backend

try:  # The kernels are defined only where Triton is installed; the references never need it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the environment
    triton = None

__all__ = [
    "decode_attention",
    "decode_attention_ref",
    "decode_splits",
    "extend_attention",
    "extend_causal_attention",
    "extend_causal_attention_ref",
    "extend_prefix_attention",
    "extend_prefix_attention_ref",
]

# Keys per inner step of every kernel's loop over tokens.
_BLOCK_N = 64
# Query rows per extend program (new tokens x the GQA group, flattened).
_BLOCK_M = 64
# tl.dot needs every block dimension >= 16.
_MIN_DOT = 16
# Decode splits: enough (request, head, split) programs to fill a GPU several times over (each program waits on a
# chain of dependent loads: slot, then row, then K/V, so more of them in flight hide more latency), never fewer
# than this many tokens a split.
_TARGET_PROGRAMS = 1024
_MIN_TOKENS_PER_SPLIT = 256
_MAX_SPLITS = 64


# ------------------------------------------------------------------------------------------ torch references


def _attend_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, present: torch.Tensor,
                visible: torch.Tensor | None, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``q`` ``(M, Hq, D)`` over ``k`` ``(T, H, D)`` / ``v`` ``(T, H, Dv)``; key ``t`` is used by query ``m`` of KV
    head ``h`` iff ``present[t, h]`` and (``visible`` None or ``visible[m, t]``). Float32 ``(out, lse)``."""
    m, heads_q, dim = q.shape
    tokens, heads, _ = k.shape
    group = heads_q // heads
    scores = torch.einsum("mhgd,thd->mhgt", q.float().reshape(m, heads, group, dim), k.float()) * float(scale)
    used = present.t()[None, :, None, :]
    if visible is not None:
        used = used & visible[:, None, None, :]
    scores = scores.masked_fill(~used, float("-inf"))  # also hides NaN/inf read from absent rows
    lse = torch.logsumexp(scores, dim=-1)  # -inf where no key is used
    weights = torch.exp(scores - torch.where(torch.isfinite(lse), lse, 0.0)[..., None])  # unused keys: exp(-inf) = 0
    # weight 0 times a NaN value is still NaN: absent values are zeroed, not just weighted out.
    values = torch.where(present[..., None], v.float(), 0.0)
    out = torch.einsum("mhgt,thd->mhgd", weights, values)
    return out.reshape(m, heads_q, v.shape[2]), lse.reshape(m, heads_q)


def _request_rows(row_of: torch.Tensor, req_to_token: torch.Tensor, req: int, length: int) -> torch.Tensor:
    """``(length, H)`` int64 rows of a request's first ``length`` tokens."""
    slots = req_to_token[req, :length].long()
    return row_of[slots].long()


def decode_attention_ref(q, k_rows, v_rows, row_of, req_to_token, req_pool_indices, seq_lens, scale):
    """Reference decode: ``q`` ``(B, Hq, D)``, one query per request, over its ``seq_lens[b]`` slots.

    Returns ``out`` ``(B, Hq, Dv)`` and ``lse`` ``(B, Hq)``, float32. Reads the lengths on the host.
    """
    batch, heads_q, _ = q.shape
    out = torch.zeros((batch, heads_q, v_rows.shape[1]), dtype=torch.float32, device=q.device)
    lse = torch.full((batch, heads_q), float("-inf"), dtype=torch.float32, device=q.device)
    for b, (req, length) in enumerate(zip(req_pool_indices.tolist(), seq_lens.tolist())):
        rows = _request_rows(row_of, req_to_token, req, length)
        out[b], lse[b] = _attend_ref(q[b:b + 1], k_rows[rows], v_rows[rows], rows != 0, None, scale)
    return out, lse


def extend_prefix_attention_ref(q, k_rows, v_rows, row_of, req_to_token, req_pool_indices, prefix_lens, q_starts,
                                q_lens, scale):
    """Reference extend prefix: request ``b``'s new tokens ``q[q_starts[b] : q_starts[b] + q_lens[b]]`` (``q``
    ``(N, Hq, D)``) over its first ``prefix_lens[b]`` slots, all visible to every new token.

    Returns ``out`` ``(N, Hq, Dv)`` and ``lse`` ``(N, Hq)``, float32; rows of ``q`` outside every request are 0 /
    -inf. Reads the lengths on the host.
    """
    total, heads_q, _ = q.shape
    out = torch.zeros((total, heads_q, v_rows.shape[1]), dtype=torch.float32, device=q.device)
    lse = torch.full((total, heads_q), float("-inf"), dtype=torch.float32, device=q.device)
    for req, prefix, start, new in zip(req_pool_indices.tolist(), prefix_lens.tolist(), q_starts.tolist(),
                                       q_lens.tolist()):
        rows = _request_rows(row_of, req_to_token, req, prefix)
        out[start:start + new], lse[start:start + new] = _attend_ref(q[start:start + new], k_rows[rows],
                                                                     v_rows[rows], rows != 0, None, scale)
    return out, lse


def extend_causal_attention_ref(q, k, v, q_starts, q_lens, scale):
    """Reference causal attention among an extend's new tokens: ``q`` ``(N, Hq, D)``, ``k`` ``(N, H, D)``, ``v``
    ``(N, H, Dv)``; request ``b`` owns rows ``q_starts[b] : q_starts[b] + q_lens[b]`` and its ``i``-th new token
    sees its new tokens ``0..i``. Returns float32 ``out`` ``(N, Hq, Dv)`` and ``lse`` ``(N, Hq)``.
    """
    total, heads_q, _ = q.shape
    out = torch.zeros((total, heads_q, v.shape[2]), dtype=torch.float32, device=q.device)
    lse = torch.full((total, heads_q), float("-inf"), dtype=torch.float32, device=q.device)
    for start, new in zip(q_starts.tolist(), q_lens.tolist()):
        span = slice(start, start + new)
        present = torch.ones((new, k.shape[1]), dtype=torch.bool, device=q.device)
        causal = torch.ones((new, new), dtype=torch.bool, device=q.device).tril()
        out[span], lse[span] = _attend_ref(q[span], k[span], v[span], present, causal, scale)
    return out, lse


# --------------------------------------------------------------------------------------------- Triton kernels

if triton is not None:

    @triton.jit
    def _softmax_step(m_i, l_i, acc, logits, v, visible, PRECISION: tl.constexpr):
        """One block of the online softmax: ``logits`` (M, N) already scaled, ``v`` (N, DV), ``visible`` (M, N)."""
        logits = tl.where(visible, logits, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(logits, axis=1))
        # A row that has seen no key yet keeps the max at -inf: exponents are taken against 0 instead, so a fully
        # masked block gives exp(-inf) = 0, never exp(-inf - (-inf)) = NaN.
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_use)
        p = tl.exp(logits - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        return m_new, l_i, acc

    @triton.jit
    def _operand(x, dtype, WIDEN: tl.constexpr):
        """``x`` as a dot operand: in ``dtype`` (the pool's), or float32 where ``WIDEN`` (see ``_widen``)."""
        if WIDEN:
            return x.to(tl.float32)
        return x.to(dtype)

    @triton.jit
    def _finish(m_i, l_i, acc):
        """``(out, lse)`` of an online softmax; rows that saw no key give 0 and -inf."""
        has_keys = l_i > 0
        out = tl.where(has_keys[:, None], acc / tl.where(has_keys, l_i, 1.0)[:, None], 0.0)
        lse = tl.where(has_keys, m_i + tl.log(tl.where(has_keys, l_i, 1.0)), float("-inf"))
        return out, lse

    @triton.jit
    def _load_rows(rtt_ptr, row_of_ptr, req, pos, n_ok, h, s_rtt_req, s_rtt_pos, s_row_slot, s_row_head):
        """int64 rows of KV head ``h`` for positions ``pos`` of request row ``req``; 0 (absent) where not ``n_ok``."""
        slot = tl.load(rtt_ptr + req * s_rtt_req + pos * s_rtt_pos, mask=n_ok, other=0).to(tl.int64)
        return tl.load(row_of_ptr + slot * s_row_slot + h * s_row_head, mask=n_ok, other=0).to(tl.int64)

    @triton.jit
    def _attend_rows(q, m_i, l_i, acc, pos, bound, req, h, rtt_ptr, row_of_ptr, k_rows_ptr, v_rows_ptr, offs_d, offs_dv,
                     d_ok, dv_ok, scale, s_k, s_v, s_rtt_req, s_rtt_pos, s_row_slot, s_row_head,
                     PRECISION: tl.constexpr, WIDEN: tl.constexpr):
        """One block of positions ``pos`` (those ``< bound``) of request row ``req``, KV head ``h``, folded into the
        online softmax ``(m_i, l_i, acc)``; absent rows load nothing and weigh nothing."""
        n_ok = pos < bound
        rows = _load_rows(rtt_ptr, row_of_ptr, req, pos, n_ok, h, s_rtt_req, s_rtt_pos, s_row_slot, s_row_head)
        present = rows != 0
        k = tl.load(k_rows_ptr + rows[:, None] * s_k + offs_d[None, :], mask=present[:, None] & d_ok[None, :],
                    other=0.0)
        v = tl.load(v_rows_ptr + rows[:, None] * s_v + offs_dv[None, :], mask=present[:, None] & dv_ok[None, :],
                    other=0.0)
        k = _operand(k, k.dtype, WIDEN)
        v = _operand(v, v.dtype, WIDEN)
        logits = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        return _softmax_step(m_i, l_i, acc, logits, v, present[None, :], PRECISION)

    @triton.jit
    def _decode_split_kernel(
        q_ptr, k_rows_ptr, v_rows_ptr, row_of_ptr, rtt_ptr, req_idx_ptr, seq_lens_ptr, part_out_ptr, part_lse_ptr,
        scale, G, D, DV, HQ,
        s_qb, s_qh, s_k, s_v, s_row_slot, s_row_head, s_rtt_req, s_rtt_pos,
        SPLITS: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr, WIDEN: tl.constexpr,
    ):
        """Grid (B, H, SPLITS): one KV head's query group of one request over one split of its tokens."""
        b = tl.program_id(0)
        h = tl.program_id(1)
        split = tl.program_id(2)
        offs_g = tl.arange(0, BLOCK_G)
        offs_d = tl.arange(0, BLOCK_D)
        offs_dv = tl.arange(0, BLOCK_DV)
        offs_n = tl.arange(0, BLOCK_N)
        g_ok = offs_g < G
        d_ok = offs_d < D
        dv_ok = offs_dv < DV
        heads = h * G + offs_g
        q = tl.load(q_ptr + b.to(tl.int64) * s_qb + heads[:, None] * s_qh + offs_d[None, :],
                    mask=g_ok[:, None] & d_ok[None, :], other=0.0)
        q = _operand(q, k_rows_ptr.dtype.element_ty, WIDEN)
        req = tl.load(req_idx_ptr + b).to(tl.int64)
        length = tl.load(seq_lens_ptr + b).to(tl.int64)
        # Splits are whole blocks; the last ones of a short request are empty and give lse = -inf.
        per_split = tl.cdiv(tl.cdiv(length, SPLITS), BLOCK_N) * BLOCK_N
        start = split * per_split
        end = tl.minimum(start + per_split, length)

        m_i = tl.full((BLOCK_G,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_G,), tl.float32)
        acc = tl.zeros((BLOCK_G, BLOCK_DV), tl.float32)
        for n0 in range(start, end, BLOCK_N):
            m_i, l_i, acc = _attend_rows(q, m_i, l_i, acc, n0 + offs_n, end, req, h, rtt_ptr, row_of_ptr,
                                         k_rows_ptr, v_rows_ptr, offs_d, offs_dv, d_ok, dv_ok, scale, s_k, s_v,
                                         s_rtt_req, s_rtt_pos, s_row_slot, s_row_head, PRECISION, WIDEN)

        out, lse = _finish(m_i, l_i, acc)
        part = (b.to(tl.int64) * HQ + heads) * SPLITS + split
        tl.store(part_out_ptr + part[:, None] * DV + offs_dv[None, :], out, mask=g_ok[:, None] & dv_ok[None, :])
        tl.store(part_lse_ptr + part, lse, mask=g_ok)

    @triton.jit
    def _decode_combine_kernel(part_out_ptr, part_lse_ptr, out_ptr, lse_ptr, DV,
                               SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_DV: tl.constexpr):
        """Grid (B * Hq,): merge one query head's splits by log-sum-exp; splits with lse -inf weigh 0."""
        bh = tl.program_id(0).to(tl.int64)
        offs_s = tl.arange(0, BLOCK_S)
        offs_dv = tl.arange(0, BLOCK_DV)
        s_ok = offs_s < SPLITS
        dv_ok = offs_dv < DV
        lse = tl.load(part_lse_ptr + bh * SPLITS + offs_s, mask=s_ok, other=float("-inf"))
        top = tl.max(lse, axis=0)
        top_use = tl.where(top == float("-inf"), 0.0, top)
        weights = tl.exp(lse - top_use)
        total = tl.sum(weights, axis=0)
        parts = tl.load(part_out_ptr + (bh * SPLITS + offs_s)[:, None] * DV + offs_dv[None, :],
                        mask=s_ok[:, None] & dv_ok[None, :], other=0.0)
        out = tl.sum(weights[:, None] * parts, axis=0) / tl.where(total > 0, total, 1.0)
        tl.store(out_ptr + bh * DV + offs_dv, out, mask=dv_ok)
        tl.store(lse_ptr + bh, tl.where(total > 0, top_use + tl.log(tl.where(total > 0, total, 1.0)), float("-inf")))

    @triton.jit
    def _extend_prefix_kernel(
        q_ptr, k_rows_ptr, v_rows_ptr, row_of_ptr, rtt_ptr, req_idx_ptr, prefix_lens_ptr, q_starts_ptr, q_lens_ptr,
        out_ptr, lse_ptr,
        scale, G, D, DV, HQ,
        s_qn, s_qh, s_k, s_v, s_row_slot, s_row_head, s_rtt_req, s_rtt_pos,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
        PRECISION: tl.constexpr, WIDEN: tl.constexpr,
    ):
        """Grid (B, H, query blocks): ``BLOCK_M`` (new token, group head) rows of one request and KV head over
        the request's prefix slots; blocks past the request's new tokens do nothing."""
        b = tl.program_id(0)
        h = tl.program_id(1)
        offs_m = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        offs_dv = tl.arange(0, BLOCK_DV)
        offs_n = tl.arange(0, BLOCK_N)
        d_ok = offs_d < D
        dv_ok = offs_dv < DV
        q_len = tl.load(q_lens_ptr + b).to(tl.int64)
        m_ok = offs_m < q_len * G
        tokens = tl.load(q_starts_ptr + b).to(tl.int64) + offs_m // G
        heads = h * G + offs_m % G
        q = tl.load(q_ptr + tokens[:, None] * s_qn + heads[:, None] * s_qh + offs_d[None, :],
                    mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        q = _operand(q, k_rows_ptr.dtype.element_ty, WIDEN)
        req = tl.load(req_idx_ptr + b).to(tl.int64)
        prefix = tl.load(prefix_lens_ptr + b).to(tl.int64)
        prefix = tl.where(tl.program_id(2) * BLOCK_M < q_len * G, prefix, 0)  # idle block: no loop

        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_DV), tl.float32)
        for n0 in range(0, prefix, BLOCK_N):
            m_i, l_i, acc = _attend_rows(q, m_i, l_i, acc, n0 + offs_n, prefix, req, h, rtt_ptr, row_of_ptr,
                                         k_rows_ptr, v_rows_ptr, offs_d, offs_dv, d_ok, dv_ok, scale, s_k, s_v,
                                         s_rtt_req, s_rtt_pos, s_row_slot, s_row_head, PRECISION, WIDEN)

        out, lse = _finish(m_i, l_i, acc)
        flat = tokens * HQ + heads
        tl.store(out_ptr + flat[:, None] * DV + offs_dv[None, :], out, mask=m_ok[:, None] & dv_ok[None, :])
        tl.store(lse_ptr + flat, lse, mask=m_ok)

    @triton.jit
    def _extend_causal_kernel(
        q_ptr, k_ptr, v_ptr, q_starts_ptr, q_lens_ptr, out_ptr, lse_ptr,
        scale, G, D, DV, HQ,
        s_qn, s_qh, s_kn, s_kh, s_vn, s_vh,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
        PRECISION: tl.constexpr, WIDEN: tl.constexpr,
    ):
        """Grid (B, H, query blocks): causal attention of one request's new tokens among themselves."""
        b = tl.program_id(0)
        h = tl.program_id(1)
        block = tl.program_id(2)
        offs_m = block * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        offs_dv = tl.arange(0, BLOCK_DV)
        offs_n = tl.arange(0, BLOCK_N)
        d_ok = offs_d < D
        dv_ok = offs_dv < DV
        q_len = tl.load(q_lens_ptr + b).to(tl.int64)
        q_start = tl.load(q_starts_ptr + b).to(tl.int64)
        m_ok = offs_m < q_len * G
        local = offs_m // G  # the query's index among the request's new tokens
        heads = h * G + offs_m % G
        q = tl.load(q_ptr + (q_start + local)[:, None] * s_qn + heads[:, None] * s_qh + offs_d[None, :],
                    mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        q = _operand(q, k_ptr.dtype.element_ty, WIDEN)
        # Keys up to this block's last query; an idle block (past the new tokens) loops over nothing.
        hi = tl.minimum((block * BLOCK_M + BLOCK_M - 1) // G + 1, q_len)
        hi = tl.where(block * BLOCK_M < q_len * G, hi, 0)

        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_DV), tl.float32)
        for n0 in range(0, hi, BLOCK_N):
            pos = n0 + offs_n
            n_ok = pos < hi
            keys = q_start + pos
            k = tl.load(k_ptr + keys[:, None] * s_kn + h * s_kh + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :],
                        other=0.0)
            v = tl.load(v_ptr + keys[:, None] * s_vn + h * s_vh + offs_dv[None, :],
                        mask=n_ok[:, None] & dv_ok[None, :], other=0.0)
            k = _operand(k, k.dtype, WIDEN)
            v = _operand(v, v.dtype, WIDEN)
            logits = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
            visible = n_ok[None, :] & (pos[None, :] <= local[:, None])
            m_i, l_i, acc = _softmax_step(m_i, l_i, acc, logits, v, visible, PRECISION)

        out, lse = _finish(m_i, l_i, acc)
        flat = (q_start + local) * HQ + heads
        tl.store(out_ptr + flat[:, None] * DV + offs_dv[None, :], out, mask=m_ok[:, None] & dv_ok[None, :])
        tl.store(lse_ptr + flat, lse, mask=m_ok)


def _pow2(n: int, minimum: int = _MIN_DOT) -> int:
    return max(minimum, 1 << max(int(n) - 1, 0).bit_length())


def decode_splits(batch: int, kv_heads: int, max_seq_len: int | None = None) -> int:
    """How many splits the Triton decode cuts each request's tokens into (flash-decoding).

    Enough ``(request, KV head, split)`` programs to fill a GPU (about ``_TARGET_PROGRAMS``), but no split shorter
    than ``_MIN_TOKENS_PER_SPLIT`` tokens of the longest request when its length is known (``max_seq_len``, a host
    int: no sync); between 1 and ``_MAX_SPLITS``.
    """
    want = -(-_TARGET_PROGRAMS // max(batch * kv_heads, 1))
    if max_seq_len is not None:
        want = min(want, -(-max(max_seq_len, 1) // _MIN_TOKENS_PER_SPLIT))
    else:
        want = min(want, 16)
    return max(1, min(want, _MAX_SPLITS))


def _dot_precision(t: torch.Tensor) -> str:
    # fp32 operands: no silent tf32 rounding. bf16/fp16 multiply exactly into fp32 accumulators either way.
    return "ieee" if t.dtype == torch.float32 or _widen(t) else "tf32"


def _widen(t: torch.Tensor) -> bool:
    # Triton's interpreter computes tl.dot on bf16 operands wrongly (values off by orders of magnitude; fp16 and
    # fp32 are right), so there bf16 operands are widened to fp32. Compiled kernels keep bf16 tensor-core dots.
    return t.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"


def _decode_triton(q, k_rows, v_rows, row_of, req_to_token, req_pool_indices, seq_lens, scale, num_splits):
    batch, heads_q, dim = q.shape
    heads = row_of.shape[1]
    group = heads_q // heads
    dv = v_rows.shape[1]
    out = torch.empty((batch, heads_q, dv), dtype=torch.float32, device=q.device)
    lse = torch.empty((batch, heads_q), dtype=torch.float32, device=q.device)
    if batch == 0 or heads_q == 0:
        return out, lse
    part_out = torch.empty((batch, heads_q, num_splits, dv), dtype=torch.float32, device=q.device)
    part_lse = torch.empty((batch, heads_q, num_splits), dtype=torch.float32, device=q.device)
    block_dv = _pow2(dv)
    _decode_split_kernel[(batch, heads, num_splits)](
        q, k_rows, v_rows, row_of, req_to_token, req_pool_indices, seq_lens, part_out, part_lse,
        float(scale), group, dim, dv, heads_q,
        q.stride(0), q.stride(1), k_rows.stride(0), v_rows.stride(0), row_of.stride(0), row_of.stride(1),
        req_to_token.stride(0), req_to_token.stride(1),
        SPLITS=num_splits, BLOCK_G=_pow2(group), BLOCK_N=_BLOCK_N, BLOCK_D=_pow2(dim), BLOCK_DV=block_dv,
        PRECISION=_dot_precision(k_rows), WIDEN=_widen(k_rows),
    )
    _decode_combine_kernel[(batch * heads_q,)](
        part_out, part_lse, out, lse, dv, SPLITS=num_splits, BLOCK_S=_pow2(num_splits, 1), BLOCK_DV=block_dv,
    )
    return out, lse


def _extend_grid(batch: int, heads: int, group: int, max_q_len: int) -> tuple[int, int, int]:
    return batch, heads, max(1, -(-max_q_len * group // _BLOCK_M))


def _extend_prefix_triton(q, k_rows, v_rows, row_of, req_to_token, req_pool_indices, prefix_lens, q_starts, q_lens,
                          scale, max_q_len):
    total, heads_q, dim = q.shape
    heads = row_of.shape[1]
    group = heads_q // heads
    dv = v_rows.shape[1]
    out = torch.empty((total, heads_q, dv), dtype=torch.float32, device=q.device)
    lse = torch.empty((total, heads_q), dtype=torch.float32, device=q.device)
    batch = q_lens.shape[0]
    if total == 0 or batch == 0 or heads_q == 0:
        return out, lse
    _extend_prefix_kernel[_extend_grid(batch, heads, group, max_q_len)](
        q, k_rows, v_rows, row_of, req_to_token, req_pool_indices, prefix_lens, q_starts, q_lens, out, lse,
        float(scale), group, dim, dv, heads_q,
        q.stride(0), q.stride(1), k_rows.stride(0), v_rows.stride(0), row_of.stride(0), row_of.stride(1),
        req_to_token.stride(0), req_to_token.stride(1),
        BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N, BLOCK_D=_pow2(dim), BLOCK_DV=_pow2(dv), PRECISION=_dot_precision(k_rows),
        WIDEN=_widen(k_rows),
    )
    return out, lse


def _extend_causal_triton(q, k, v, q_starts, q_lens, scale, max_q_len):
    total, heads_q, dim = q.shape
    heads = k.shape[1]
    group = heads_q // heads
    dv = v.shape[2]
    out = torch.empty((total, heads_q, dv), dtype=torch.float32, device=q.device)
    lse = torch.empty((total, heads_q), dtype=torch.float32, device=q.device)
    batch = q_lens.shape[0]
    if total == 0 or batch == 0 or heads_q == 0:
        return out, lse
    _extend_causal_kernel[_extend_grid(batch, heads, group, max_q_len)](
        q, k, v, q_starts, q_lens, out, lse,
        float(scale), group, dim, dv, heads_q,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N, BLOCK_D=_pow2(dim), BLOCK_DV=_pow2(dv), PRECISION=_dot_precision(k),
        WIDEN=_widen(k),
    )
    return out, lse


# ------------------------------------------------------------------------------------------------- dispatch


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


def _is_int(t: torch.Tensor) -> bool:
    return not t.is_floating_point() and not t.is_complex() and t.dtype != torch.bool


def _check_index(name: str, t: torch.Tensor, size: int) -> None:
    _check(isinstance(t, torch.Tensor) and tuple(t.shape) == (size,) and _is_int(t),
           f"{name} must be a ({size},) integer tensor, got "
           f"{(tuple(t.shape), t.dtype) if isinstance(t, torch.Tensor) else type(t).__name__}")
    _check(t.is_contiguous(), f"{name} must be contiguous")


def _check_queries(q: torch.Tensor, heads: int, dim: int) -> None:
    _check(isinstance(q, torch.Tensor) and q.dim() == 3 and q.is_floating_point(),
           f"q must be a 3-D float tensor (tokens, query heads, head_dim), got "
           f"{(tuple(q.shape), q.dtype) if isinstance(q, torch.Tensor) else type(q).__name__}")
    _check(heads > 0 and q.shape[1] % heads == 0,
           f"query heads ({q.shape[1]}) must be a multiple of KV heads ({heads})")
    _check(q.shape[2] == dim, f"q's head_dim {q.shape[2]} differs from the keys' head_dim {dim}")
    _check(q.shape[2] == 0 or q.stride(2) == 1, "q must have unit stride along head_dim")


def _check_pool(q, k_rows, v_rows, row_of, req_to_token, req_pool_indices, batch: int) -> None:
    for name, t in (("k_rows", k_rows), ("v_rows", v_rows)):
        _check(isinstance(t, torch.Tensor) and t.dim() == 2 and t.is_floating_point(),
               f"{name} must be a 2-D float tensor (rows, head_dim)")
        _check(t.shape[1] == 0 or t.stride(1) == 1, f"{name} must have unit stride along head_dim")
    _check(k_rows.shape[0] == v_rows.shape[0], f"k_rows and v_rows must have the same rows, got "
           f"{k_rows.shape[0]} and {v_rows.shape[0]}")
    _check(k_rows.dtype == v_rows.dtype, f"k_rows ({k_rows.dtype}) and v_rows ({v_rows.dtype}) dtypes differ")
    _check(isinstance(row_of, torch.Tensor) and row_of.dim() == 2 and row_of.dtype == torch.int32,
           "row_of must be one layer's (slots + 1, kv_heads) int32 index")
    _check(isinstance(req_to_token, torch.Tensor) and req_to_token.dim() == 2
           and req_to_token.dtype in (torch.int32, torch.int64), "req_to_token must be a 2-D int32/int64 table")
    _check_queries(q, row_of.shape[1], k_rows.shape[1])
    _check_index("req_pool_indices", req_pool_indices, batch)


def _same_device(*tensors: torch.Tensor) -> None:
    devices = {str(t.device) for t in tensors}
    _check(len(devices) == 1, f"all tensors must be on one device, got {sorted(devices)}")


def _use_triton(backend: Backend | str, *tensors: torch.Tensor) -> bool:
    if resolve_backend(backend, *tensors) is not Backend.TRITON:
        return False
    if triton is None:
        raise ValueError("backend='triton' requested but triton is not installed")
    if not all(t.is_cuda for t in tensors) and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before triton is imported)")
    return True


def decode_attention(q, k_rows, v_rows, row_of, req_to_token, req_pool_indices, seq_lens, scale: float, *,
                     num_splits: int | None = None, max_seq_len: int | None = None,
                     backend: Backend | str = Backend.AUTO) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode attention through ``row_of``: ``q`` ``(B, Hq, D)``, one query per request, over the request's
    ``seq_lens[b]`` slots (its own newest token included). Returns float32 ``out`` ``(B, Hq, Dv)`` and ``lse``
    ``(B, Hq)``; see the module docstring for the masking rules.

    Triton: grid ``(B, H, splits)``, each program one KV head's query group over one split of the tokens, then a
    combine launch over the splits (flash-decoding); no host sync. ``num_splits`` defaults to
    :func:`decode_splits` (``max_seq_len``: the longest request, if the caller knows it on the host).
    """
    _check(isinstance(q, torch.Tensor) and q.dim() == 3, "q must be (batch, query heads, head_dim)")
    batch = q.shape[0]
    _check_pool(q, k_rows, v_rows, row_of, req_to_token, req_pool_indices, batch)
    _check_index("seq_lens", seq_lens, batch)
    # The combine holds every split's (Dv,) output in one program: more than _MAX_SPLITS would spill registers.
    _check(num_splits is None or (isinstance(num_splits, int) and 1 <= num_splits <= _MAX_SPLITS),
           f"num_splits must be an int in 1..{_MAX_SPLITS}, got {num_splits!r}")
    _same_device(q, k_rows, v_rows, row_of, req_to_token, req_pool_indices, seq_lens)
    if _use_triton(backend, q, k_rows, v_rows, row_of):
        splits = num_splits if num_splits is not None else decode_splits(batch, row_of.shape[1], max_seq_len)
        return _decode_triton(q, k_rows, v_rows, row_of, req_to_token, req_pool_indices, seq_lens, scale, splits)
    return decode_attention_ref(q, k_rows, v_rows, row_of, req_to_token, req_pool_indices, seq_lens, scale)


def _check_extend(q, q_starts, q_lens) -> int:
    batch = q_lens.shape[0] if isinstance(q_lens, torch.Tensor) and q_lens.dim() == 1 else -1
    _check(batch >= 0, "q_lens must be (batch,)")
    _check_index("q_lens", q_lens, batch)
    _check_index("q_starts", q_starts, batch)
    return batch


def _max_q_len(q_lens: torch.Tensor, max_q_len: int | None) -> int:
    if max_q_len is not None:
        return int(max_q_len)
    return int(q_lens.max()) if q_lens.numel() else 0  # one sync; callers that know it pass max_q_len


def extend_prefix_attention(q, k_rows, v_rows, row_of, req_to_token, req_pool_indices, prefix_lens, q_starts, q_lens,
                            scale: float, *, max_q_len: int | None = None, backend: Backend | str = Backend.AUTO
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """An extend's new tokens over their requests' prefixes in the pool: ``q`` ``(N, Hq, D)``; request ``b`` owns
    rows ``q_starts[b] : q_starts[b] + q_lens[b]`` and reads its first ``prefix_lens[b]`` slots. Returns float32
    ``out`` ``(N, Hq, Dv)``, ``lse`` ``(N, Hq)``; a query with no present prefix key gets 0 and -inf.

    Every row of ``q`` must belong to exactly one request (the Triton path writes only those rows).
    ``max_q_len``: the largest ``q_lens`` (host int) for the Triton grid; read from the device when None.
    """
    _check(isinstance(q_lens, torch.Tensor) and q_lens.dim() == 1, "q_lens must be (batch,)")
    batch = _check_extend(q, q_starts, q_lens)
    _check_pool(q, k_rows, v_rows, row_of, req_to_token, req_pool_indices, batch)
    _check_index("prefix_lens", prefix_lens, batch)
    _same_device(q, k_rows, v_rows, row_of, req_to_token, req_pool_indices, prefix_lens, q_starts, q_lens)
    if _use_triton(backend, q, k_rows, v_rows, row_of):
        return _extend_prefix_triton(q, k_rows, v_rows, row_of, req_to_token, req_pool_indices, prefix_lens,
                                     q_starts, q_lens, scale, _max_q_len(q_lens, max_q_len))
    return extend_prefix_attention_ref(q, k_rows, v_rows, row_of, req_to_token, req_pool_indices, prefix_lens,
                                       q_starts, q_lens, scale)


def extend_causal_attention(q, k, v, q_starts, q_lens, scale: float, *, max_q_len: int | None = None,
                            backend: Backend | str = Backend.AUTO) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention among an extend's new tokens (``k`` ``(N, H, D)``, ``v`` ``(N, H, Dv)``: the forward's
    own keys and values); see :func:`extend_causal_attention_ref`. Float32 ``out`` ``(N, Hq, Dv)``, ``lse``
    ``(N, Hq)``. Every row of ``q`` must belong to exactly one request."""
    _check(isinstance(q_lens, torch.Tensor) and q_lens.dim() == 1, "q_lens must be (batch,)")
    _check_extend(q, q_starts, q_lens)
    for name, t in (("k", k), ("v", v)):
        _check(isinstance(t, torch.Tensor) and t.dim() == 3 and t.is_floating_point(),
               f"{name} must be a 3-D float tensor (tokens, kv_heads, head_dim)")
        _check(t.shape[2] == 0 or t.stride(2) == 1, f"{name} must have unit stride along head_dim")
    _check(k.shape[:2] == v.shape[:2], f"k {tuple(k.shape)} and v {tuple(v.shape)} must agree on tokens and heads")
    _check(k.dtype == v.dtype, f"k ({k.dtype}) and v ({v.dtype}) dtypes differ")
    _check_queries(q, k.shape[1], k.shape[2])
    _check(k.shape[0] == q.shape[0], f"k has {k.shape[0]} tokens, q has {q.shape[0]}")
    _same_device(q, k, v, q_starts, q_lens)
    if _use_triton(backend, q, k, v):
        return _extend_causal_triton(q, k, v, q_starts, q_lens, scale, _max_q_len(q_lens, max_q_len))
    return extend_causal_attention_ref(q, k, v, q_starts, q_lens, scale)


def extend_attention(q, k, v, k_rows, v_rows, row_of, req_to_token, req_pool_indices, prefix_lens, q_starts, q_lens,
                     scale: float, *, max_q_len: int | None = None, backend: Backend | str = Backend.AUTO
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole extend: :func:`extend_prefix_attention` (prefix through ``row_of``) merged by log-sum-exp with
    :func:`extend_causal_attention` (the new tokens' own ``k``/``v``). A query whose prefix has no present key
    (``lse = -inf``) gets exactly the causal part. Float32 ``out`` ``(N, Hq, Dv)``, ``lse`` ``(N, Hq)``."""
    if max_q_len is None and isinstance(q_lens, torch.Tensor) and q_lens.dim() == 1 and q_lens.numel():
        max_q_len = int(q_lens.max())  # read once for both launches
    prefix = extend_prefix_attention(q, k_rows, v_rows, row_of, req_to_token, req_pool_indices, prefix_lens,
                                     q_starts, q_lens, scale, max_q_len=max_q_len, backend=backend)
    new = extend_causal_attention(q, k, v, q_starts, q_lens, scale, max_q_len=max_q_len, backend=backend)
    return merge_attention(prefix[0], prefix[1], new[0], new[1])
