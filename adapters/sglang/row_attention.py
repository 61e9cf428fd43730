"""Attention over the head-row pool for SGLang 0.5.23 on CPU (a torch-native backend).

Each request's keys and values are gathered from its logical slots through ``row_of``; an entry the policy
freed is absent, and is masked for its KV head only (so for that head's whole GQA query group). When every
entry of a request is present, the computation is the plain causal one, so at threshold ``-inf`` the outputs
are those of SGLang's own torch-native backend.

Registered under :data:`BACKEND_NAME` (``kvpolicy_rows``); the launcher selects it off CUDA, and on CUDA its batched
Triton sibling ``kvpolicy_triton`` (:mod:`~kvpolicy.adapters.sglang.triton_attention`, same semantics), and refuses
any other backend for a server whose pool is the head-row pool.
"""

from __future__ import annotations

import torch
from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
from sglang.srt.layers.radix_attention import AttentionType
from torch.nn.functional import scaled_dot_product_attention

from kvpolicy.adapters.sglang.config import ATTENTION_BACKEND as BACKEND_NAME
from kvpolicy.adapters.sglang.row_pool import HeadRowKVCache


class HeadRowAttnBackend(TorchNativeAttnBackend):
    """``TorchNativeAttnBackend`` that reads K/V through the head-row pool, masking absent entries per head."""

    def __init__(self, model_runner) -> None:
        super().__init__(model_runner)
        if not isinstance(self.token_to_kv_pool, HeadRowKVCache):
            raise RuntimeError(f"the {BACKEND_NAME} attention backend needs the kvpolicy head-row KV pool, got "
                               f"{type(self.token_to_kv_pool).__name__}")

    def _check_layer(self, layer) -> None:
        if layer.is_cross_attention or layer.attn_type == AttentionType.ENCODER_ONLY:
            raise NotImplementedError(f"{BACKEND_NAME}: cross-attention and encoder-only layers are not supported")
        if layer.sliding_window_size is not None and layer.sliding_window_size > -1:
            raise NotImplementedError(f"{BACKEND_NAME}: sliding-window layers are not supported")
        if layer.qk_head_dim != layer.v_head_dim:
            raise NotImplementedError(f"{BACKEND_NAME}: different key and value head dims are not supported")

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True):
        return self._forward(q, k, v, layer, forward_batch, save_kv_cache, decode=False)

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True):
        return self._forward(q, k, v, layer, forward_batch, save_kv_cache, decode=True)

    def _forward(self, q, k, v, layer, forward_batch, save_kv_cache: bool, *, decode: bool):
        self._check_layer(layer)
        if save_kv_cache and k is not None and v is not None:
            self.token_to_kv_pool.set_kv_buffer(layer, forward_batch.out_cache_loc, k, v)
        heads_q, dim = layer.tp_q_head_num, layer.qk_head_dim
        queries = q.reshape(-1, heads_q, dim)
        out = queries.new_empty(queries.shape)
        seq_lens = forward_batch.seq_lens_cpu.tolist()
        if decode:
            new_lens = [1] * len(seq_lens)
        else:
            new_lens = list(forward_batch.extend_seq_lens_cpu)
        req_to_token = self.req_to_token_pool.req_to_token
        start = 0
        for i, (total, new) in enumerate(zip(seq_lens, new_lens)):
            slots = req_to_token[forward_batch.req_pool_indices[i], :total]
            keys, values, present = self.token_to_kv_pool.gather(layer.layer_id, slots)
            out[start:start + new] = attend(queries[start:start + new], keys, values, present, layer.scaling)
            start += new
        return out.reshape(-1, heads_q * layer.v_head_dim)


def attend(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, present: torch.Tensor,
           scale: float | None) -> torch.Tensor:
    """Causal attention of one request's ``M`` newest tokens over its ``T`` tokens.

    ``queries`` ``(M, Hq, D)`` are the last ``M`` of the ``T`` positions; ``keys``/``values`` ``(T, H, D)``;
    ``present`` ``(T, H)`` bool. Returns ``(M, Hq, D)``. Every query sees at least its own token (a token is
    judged only after its own forward), so no row is fully masked.
    """
    new, heads_q, _ = queries.shape
    total, heads, _ = keys.shape
    k = keys.to(queries.dtype).transpose(0, 1)[None]  # (1, H, T, D)
    v = values.to(queries.dtype).transpose(0, 1)[None]
    gqa = heads_q != heads
    if bool(present.all()):
        # Every entry present: what SGLang's torch-native backend computes. One decoding query sees every key;
        # an extend pads its queries to all T positions so that SDPA's causal mask lines up.
        if new == 1:
            out = scaled_dot_product_attention(queries.transpose(0, 1)[None], k, v, scale=scale, enable_gqa=gqa)
            return out[0].transpose(0, 1)
        padded = queries.new_zeros((total, heads_q, queries.shape[2]))
        padded[total - new:] = queries
        out = scaled_dot_product_attention(padded.transpose(0, 1)[None], k, v, is_causal=True, scale=scale,
                                           enable_gqa=gqa)
        return out[0].transpose(0, 1)[total - new:]
    key_pos = torch.arange(total, device=queries.device)
    query_pos = torch.arange(total - new, total, device=queries.device)
    causal = key_pos[None, :] <= query_pos[:, None]  # (M, T)
    per_head = present.t().repeat_interleave(heads_q // heads, dim=0)  # (Hq, T)
    mask = causal[None] & per_head[:, None, :]  # (Hq, M, T)
    out = scaled_dot_product_attention(queries.transpose(0, 1)[None], k, v, attn_mask=mask[None], scale=scale,
                                       enable_gqa=gqa)
    return out[0].transpose(0, 1)


def register() -> None:
    """Register :data:`BACKEND_NAME` with SGLang's attention-backend registry (idempotent)."""
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS, register_attention_backend

    if BACKEND_NAME not in ATTENTION_BACKENDS:
        register_attention_backend(BACKEND_NAME)(HeadRowAttnBackend)
