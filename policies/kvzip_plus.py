"""KVzip / KVzip+ oracle (KVzip: arXiv 2505.23416; KVzip+: the KVzap paper, arXiv 2601.07891).

The model is asked to repeat the context; a context token that the reconstruction attends to strongly is
worth keeping. :meth:`KVzipPlusPolicy.compute_scores`:

1. ``runner.prefill(context)`` (``T`` tokens);
2. the context is cut into chunks of ``chunk_size`` tokens. For chunk ``k`` the runner continues the cache
   with ``prompt_k + suffix + chunk_k`` where ``prompt_0`` is the repeat prompt ("Repeat the previous context
   exactly.") and later prompts are the continue prompt ("Repeat the part of the previous context exactly,
   starting with") followed by the last ``continue_tail_tokens`` tokens of the previous chunk;
3. each layer's attention ``a[q, t, i]`` (query head ``q``, pass query ``t``, softmax over *all*
   keys in the cache: context and pass tokens) gives, for context token ``i`` of chunk ``k`` and KV head ``h``:

   - KVzip+ (``normalization=True``): ``s = max_{q in group(h)} max_t a[q, t, i] * ||W_o^(q) v_i|| / ||h_t||``
     where ``W_o^(q) = o_proj.weight[:, q*D:(q+1)*D]``, ``v_i`` the value of token ``i`` and ``h_t`` the
     attention-layer input (after the input norm) at query ``t``;
   - KVzip (``normalization=False``): ``s = max_q max_t a[q, t, i]``;

   ``t`` ranges over every query of the pass (prompt, tail, suffix and the chunk's copy) when
   ``score_queries="pass"`` (as KVzip's and kvpress's code do), or over the chunk's copy only with
   ``"chunk"``. A token is scored by the pass of its own chunk;
4. ``runner.crop(T)`` after each chunk, so every pass sees just the context before it.

Scores are ``log(max(s, 1e-30))`` float32 ``(B, H, T)``: the floor keeps a token nobody attends to finite
(about -69) instead of ``-inf``.

Computed in log space in two flash-style passes, never holding an attention matrix (memory
O(queries x chunk) per layer): the runner hands each layer's post-RoPE queries and keys and, from its own fused
attention, every query's log-sum-exp ``lse_t`` (pass 1; :func:`kvpolicy.kernels.attention_lse` when a runner
does not); pass 2 (:func:`kvpolicy.kernels.max_attention`) takes, per context key, ``max_t (q_t . k_i * scale
- lse_t - log ||h_t||)`` in chunks of keys (a Triton kernel on CUDA). ``log ||W_o^(q) v_i||`` is added per
query head, then the max over the GQA group. ``log a = q.k * scale - lse`` exactly, so this is the formula
above; it only avoids materialising ``a``.

Prompt tokens: each of the three parts is taken from its ``*_ids`` field when given, else encoded from its
text with ``runner.encode`` (an empty text needs no tokenizer). Models without a text tokenizer (the testbed,
whose vocabulary has a ``<repeat>`` token) pass ids. Default selection: ``ratio=0.5``.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import Field

from kvpolicy import kernels
from kvpolicy.config import PolicyConfig
from kvpolicy.policy import AttentionObservation, OraclePolicy, OracleRunner

SCORE_FLOOR = 1e-30
REPEAT_PROMPT = "\n\nRepeat the previous context exactly."
CONTINUE_PROMPT = "\n\nRepeat the part of the previous context exactly, starting with"


class KVzipPlusConfig(PolicyConfig):
    default_selection: ClassVar[dict[str, Any]] = {"ratio": 0.5}

    normalization: bool = True  # KVzip+ (True) or plain KVzip attention (False)
    chunk_size: int = Field(default=2048, ge=1)
    continue_tail_tokens: int = Field(default=8, ge=0)
    score_queries: Literal["pass", "chunk"] = "pass"
    repeat_prompt: str = REPEAT_PROMPT
    continue_prompt: str = CONTINUE_PROMPT
    # Between the prompt (and tail) and the chunk's copy; a model with a chat template would put the end of
    # the user turn and the assistant header here.
    prompt_suffix: str = "\n"
    repeat_prompt_ids: list[int] | None = None
    continue_prompt_ids: list[int] | None = None
    prompt_suffix_ids: list[int] | None = None


class KVzipPlusPolicy(OraclePolicy[KVzipPlusConfig]):
    config_class = KVzipPlusConfig

    def _prompt_part(self, runner: OracleRunner, field: str) -> list[int]:
        ids = getattr(self.config, f"{field}_ids")
        if ids is not None:
            return list(ids)
        text = getattr(self.config, field)
        if text == "":
            return []
        if runner.encode is None:
            raise ValueError(
                f"kvzip_plus must tokenize its {field} text {text!r}, but the runner has no encoder (the adapter "
                f"was given no tokenizer): pass a tokenizer to the adapter or set {field}_ids to token ids"
            )
        return list(runner.encode(text))

    @torch.no_grad()
    def compute_scores(self, runner: OracleRunner, context_ids: torch.Tensor) -> dict[int, torch.Tensor]:
        if context_ids.dim() != 2 or context_ids.shape[1] == 0:
            raise ValueError(f"context_ids must be (batch, tokens) with tokens >= 1, got {tuple(context_ids.shape)}")
        cfg = self.config
        info = runner.info
        repeat_ids = self._prompt_part(runner, "repeat_prompt")
        suffix_ids = self._prompt_part(runner, "prompt_suffix")
        total = context_ids.shape[1]
        continue_ids = self._prompt_part(runner, "continue_prompt") if total > cfg.chunk_size else []
        batch, device = context_ids.shape[0], context_ids.device
        scores = {layer: torch.full((batch, info.num_kv_heads, total), float("-inf"), device=device)
                  for layer in range(info.num_layers)}
        gram: dict[int, torch.Tensor] = {}  # layer -> (Hq, D, D) W_o^(q)T W_o^(q), for ||W_o^(q) v||

        def ids_tensor(ids: list[int]) -> torch.Tensor:
            return torch.tensor(ids, dtype=context_ids.dtype, device=device).expand(batch, len(ids))

        runner.prefill(context_ids)
        for start in range(0, total, cfg.chunk_size):
            end = min(start + cfg.chunk_size, total)
            chunk = context_ids[:, start:end]
            if start == 0:
                prompt = ids_tensor(repeat_ids)
            else:
                tail = context_ids[:, max(start - cfg.chunk_size, start - cfg.continue_tail_tokens):start]
                prompt = torch.cat([ids_tensor(continue_ids), tail], dim=1)
            pass_ids = torch.cat([prompt, ids_tensor(suffix_ids), chunk], dim=1)
            first_query = 0 if cfg.score_queries == "pass" else pass_ids.shape[1] - chunk.shape[1]

            def observe(layer_idx: int, obs: AttentionObservation, start=start, end=end,
                        first_query=first_query) -> None:
                scores[layer_idx][:, :, start:end] = self._pass_scores(runner, layer_idx, obs, first_query, start,
                                                                       end, gram).to(device)

            runner.forward(pass_ids, observe)
            runner.crop(total)
        floor = torch.tensor(SCORE_FLOOR, dtype=torch.float32).log().item()
        return {layer: s.clamp_min(floor) for layer, s in scores.items()}

    def _pass_scores(self, runner: OracleRunner, layer_idx: int, obs: AttentionObservation, first_query: int,
                     start: int, end: int, gram: dict[int, torch.Tensor]) -> torch.Tensor:
        """``(B, H, end - start)`` log scores of context tokens ``start:end`` from one layer of one pass.

        Pass 1 (the runner's ``obs.lse``, or :func:`kvpolicy.kernels.attention_lse`) gives each query's
        log-sum-exp; pass 2 (:func:`kvpolicy.kernels.max_attention`) the max over queries of
        ``log a[q, t, i] - log ||h_t||`` per key, in chunks, so no (queries, keys) matrix is ever held.
        """
        cfg, info = self.config, runner.info
        heads, group, dim = info.num_kv_heads, info.group_size, info.head_dim
        queries = obs.queries[:, :, first_query:]
        query_start = obs.keys.shape[2] - obs.queries.shape[2] + first_query
        if obs.lse is not None:
            lse = obs.lse[:, :, first_query:]
        else:
            lse = kernels.attention_lse(queries, obs.keys, obs.scale, query_start=query_start)
        bias = None
        if cfg.normalization:  # dividing by ||h_t|| inside the max over t: a per-query log bias
            bias = -obs.hidden_states[:, first_query:].float().norm(dim=-1).log()  # (B, Lq)
        best = kernels.max_attention(queries, obs.keys, lse, obs.scale, query_start=query_start, key_start=start,
                                     key_end=end, query_bias=bias)  # (B, Hq, c): log max_t a[q,t,i] / ||h_t||
        if cfg.normalization:
            if layer_idx not in gram:
                w_o = runner.out_proj(layer_idx).to(best.device, torch.float64)  # (hidden, Hq * D)
                if w_o.dim() != 2 or w_o.shape[1] != heads * group * dim:
                    raise ValueError(f"kvzip_plus: out_proj({layer_idx}) has shape {tuple(w_o.shape)}, "
                                     f"expected (hidden, {heads * group * dim}) = (hidden, Hq * D)")
                per_head = w_o.reshape(w_o.shape[0], heads * group, dim)  # (hidden, Hq, D)
                gram[layer_idx] = torch.einsum("jqd,jqe->qde", per_head, per_head)
            # ||W_o^(q) v||^2 = v^T (W_o^(q)T W_o^(q)) v: a (D, D) Gram per query head instead of a
            # (B, Hq, c, hidden) product; float64 so the quadratic form loses nothing to cancellation.
            values = obs.values[:, :, start:end].to(best.device, torch.float64).repeat_interleave(group, dim=1)
            out_sq = torch.einsum("bqid,qde,bqie->bqi", values, gram[layer_idx], values)  # (B, Hq, c)
            best = best + (0.5 * out_sq.clamp_min(0.0).log()).float()  # + log ||W_o^(q) v_i||
        return best.reshape(best.shape[0], heads, group, -1).amax(dim=2)
