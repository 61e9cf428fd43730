"""The ``kvpolicy_triton`` attention backend: the head-row pool read by the kernels of
:mod:`~kvpolicy.adapters.sglang.row_kernels` (SGLang 0.5.23; the launcher picks it when the server runs on CUDA).

- Decode: one query per request over its ``seq_lens`` slots through ``row_of`` (split over the tokens, then
  combined; no host sync). Absent entries are never loaded.
- Extend: the new tokens over their request's prefix through ``row_of``, merged by log-sum-exp with causal
  attention among the new tokens, read from the forward's own ``k``/``v`` (or from the pool when the layer passes
  none). A head whose prefix is all absent gets exactly the causal part.

The semantics are those of ``kvpolicy_rows`` (:mod:`~kvpolicy.adapters.sglang.row_attention`, which this subclasses
for its checks and its K/V writes): same masking, same results up to float summation order. With tensors off CUDA
the kernel dispatcher falls back to the torch references, so the backend also runs on CPU (slowly; the launcher
keeps ``kvpolicy_rows`` there), which is how the tests compare the two backends.

CUDA graphs stay off (the launcher adds ``--disable-cuda-graph``); the reason is given in
:func:`kvpolicy.adapters.sglang.launch.additions`.
"""

from __future__ import annotations

import torch

from kvpolicy.adapters.sglang import row_kernels
from kvpolicy.adapters.sglang.config import TRITON_ATTENTION_BACKEND as BACKEND_NAME
from kvpolicy.adapters.sglang.row_attention import HeadRowAttnBackend
from kvpolicy.kernels.dispatch import Backend


class HeadRowTritonAttnBackend(HeadRowAttnBackend):
    """``kvpolicy_rows`` with the per-request torch loop replaced by batched kernels over ``row_of``.

    ``kernel_backend``: ``"auto"`` (Triton on CUDA tensors, the torch references otherwise), ``"torch"`` or
    ``"triton"`` (see :mod:`~kvpolicy.adapters.sglang.row_kernels`).
    """

    def __init__(self, model_runner, kernel_backend: Backend | str = Backend.AUTO) -> None:
        super().__init__(model_runner)
        self.kernel_backend = Backend(kernel_backend)

    def _forward(self, q, k, v, layer, forward_batch, save_kv_cache: bool, *, decode: bool):
        self._check_layer(layer)
        if save_kv_cache and k is not None and v is not None:
            self.token_to_kv_pool.set_kv_buffer(layer, forward_batch.out_cache_loc, k, v)
        cache = self.token_to_kv_pool
        pool = cache.rows
        layer_index = layer.layer_id - cache.start_layer
        row_of = pool.row_of[layer_index]  # (S+1, H) view: the kernels read one layer
        heads_q, dim = layer.tp_q_head_num, layer.qk_head_dim
        scale = layer.scaling if layer.scaling is not None else dim ** -0.5
        queries = q.reshape(-1, heads_q, dim)
        req_to_token = self.req_to_token_pool.req_to_token
        if decode:
            longest = forward_batch.seq_lens_cpu
            out, _ = row_kernels.decode_attention(
                queries, pool.k_rows, pool.v_rows, row_of, req_to_token, forward_batch.req_pool_indices,
                forward_batch.seq_lens, scale,
                max_seq_len=int(longest.max()) if longest is not None and longest.numel() else None,
                backend=self.kernel_backend)
        else:
            new_k, new_v = self._new_keys(k, v, layer_index, forward_batch)
            new_lens = forward_batch.extend_seq_lens_cpu
            out, _ = row_kernels.extend_attention(
                queries, new_k, new_v, pool.k_rows, pool.v_rows, row_of, req_to_token, forward_batch.req_pool_indices,
                forward_batch.extend_prefix_lens, forward_batch.extend_start_loc, forward_batch.extend_seq_lens, scale,
                max_q_len=max(new_lens) if new_lens else None, backend=self.kernel_backend)
        return out.to(q.dtype).reshape(-1, heads_q * layer.v_head_dim)

    def _new_keys(self, k, v, layer_index: int, forward_batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The extend's new keys and values ``(N, H, D)`` in the pool's dtype (what ``kvpolicy_rows`` reads back
        from the pool); from the pool itself when the layer passed none (they were written earlier)."""
        rows = self.token_to_kv_pool.rows
        if k is None or v is None:
            new_k, new_v, _ = rows.gather(layer_index, forward_batch.out_cache_loc)
            return new_k, new_v
        heads = rows.num_kv_heads
        return (k.reshape(-1, heads, rows.k_head_dim).to(rows.dtype),
                v.reshape(-1, heads, rows.v_head_dim).to(rows.dtype))


def register() -> None:
    """Register :data:`BACKEND_NAME` with SGLang's attention-backend registry (idempotent)."""
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS, register_attention_backend

    if BACKEND_NAME not in ATTENTION_BACKENDS:
        register_attention_backend(BACKEND_NAME)(HeadRowTritonAttnBackend)
