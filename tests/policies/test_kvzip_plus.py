"""kvzip_plus oracle on a tiny real Qwen3, against a brute-force restatement of the formula.

The runner here is test-local (eager attention, hooks; it hands over no log-sum-exp, so the policy runs its
own pass 1); the production runner lives in the HF adapter. The brute force runs ONE forward over the whole
``[context, prompt, suffix, chunk]`` sequence without a cache and evaluates
``max_g max_t a[g,t,i] * ||W_o^(g) v_i|| / ||h_t||`` with explicit slices of ``o_proj.weight``.
The materialised reference (:func:`materialised_scores`) evaluates the same formula on the very tensors a runner
handed to the policy, with the whole attention matrix in float64: the two-pass scoring must equal it to 1e-5.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from pydantic import ValidationError

import kvpolicy
from kvpolicy.adapters.hf import PolicySession
from kvpolicy.adapters.hf._compat import crop_to
from kvpolicy.policies.kvzip_plus import KVzipPlusConfig, KVzipPlusPolicy
from kvpolicy.policy import AttentionObservation, LayerInputs, ModelInfo, OracleRunner

transformers = pytest.importorskip("transformers")

REPEAT, SUFFIX, CONTINUE = [5, 6, 7], [8], [9, 10]
IDS = {"repeat_prompt_ids": REPEAT, "prompt_suffix_ids": SUFFIX, "continue_prompt_ids": CONTINUE}


@pytest.fixture(scope="module")
def model():
    cfg = transformers.Qwen3Config(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=512, initializer_range=0.1,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    return transformers.Qwen3ForCausalLM(cfg).eval()


def info_of(model) -> ModelInfo:
    c = model.config
    return ModelInfo(c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads,
                     c.head_dim, "qwen3")


class Capture:
    """Hooks on every ``self_attn``: its input hidden states, its post-RoPE queries (recomputed from the input
    the way Qwen3 computes them) and its (eager) attention weights."""

    def __init__(self, model):
        self.hidden, self.queries, self.weights, self.handles = {}, {}, {}, []
        for idx, layer in enumerate(model.model.layers):
            self.handles.append(layer.self_attn.register_forward_pre_hook(self._pre(idx), with_kwargs=True))
            self.handles.append(layer.self_attn.register_forward_hook(self._post(idx)))

    def _pre(self, idx):
        def hook(module, args, kwargs):
            from transformers.models.qwen3.modeling_qwen3 import apply_rotary_pos_emb

            hidden = kwargs["hidden_states"].detach()
            self.hidden[idx] = hidden
            q = module.q_norm(module.q_proj(hidden).view(*hidden.shape[:-1], -1, module.head_dim)).transpose(1, 2)
            cos, sin = kwargs["position_embeddings"]
            self.queries[idx] = apply_rotary_pos_emb(q, q, cos, sin)[0].detach()
        return hook

    def _post(self, idx):
        def hook(module, args, output):
            self.weights[idx] = output[1].detach().float()
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def eager_runner(model, encode=None, log: list | None = None) -> OracleRunner:
    state = {}

    def run(ids, observe):
        if log is not None:
            log.append(ids.clone())
        cap = Capture(model)
        try:
            with torch.no_grad():
                model(input_ids=ids, past_key_values=state["cache"], use_cache=True)
        finally:
            cap.remove()
        if observe is not None:
            for idx in range(model.config.num_hidden_layers):
                layer = state["cache"].layers[idx]
                scale = model.model.layers[idx].self_attn.scaling
                observe(idx, AttentionObservation(cap.queries[idx], layer.keys, layer.values, cap.hidden[idx], scale))

    def prefill(ids):
        state["cache"] = transformers.DynamicCache(config=model.config)
        run(ids, None)

    return OracleRunner(
        info=info_of(model), prefill=prefill, forward=run, crop=lambda n: crop_to(state["cache"], n),
        out_proj=lambda idx: model.model.layers[idx].self_attn.o_proj.weight, encode=encode,
    )


def brute_force(model, context, pass_ids, start, end, *, normalization=True, chunk_queries_only=False):
    """Scores ``(B, H, end-start)`` (not log) of context tokens ``start:end`` from one uncached forward."""
    full = torch.cat([context, pass_ids], dim=1)
    cap = Capture(model)
    cache = transformers.DynamicCache(config=model.config)
    try:
        with torch.no_grad():
            model(input_ids=full, past_key_values=cache, use_cache=True)
    finally:
        cap.remove()
    c = model.config
    group, dim = c.num_attention_heads // c.num_key_value_heads, c.head_dim
    total, n = context.shape[1], full.shape[1]
    first_t = n - (end - start) if chunk_queries_only else total
    out = {}
    for layer in range(c.num_hidden_layers):
        a = cap.weights[layer].double()  # (B, Hq, n, n)
        v = cache.layers[layer].values.double()  # (B, H, n, D)
        hid = cap.hidden[layer].double()  # (B, n, hidden)
        w_o = model.model.layers[layer].self_attn.o_proj.weight.double()
        res = torch.zeros(full.shape[0], c.num_key_value_heads, end - start, dtype=torch.float64)
        for b in range(full.shape[0]):
            for h in range(c.num_key_value_heads):
                for g in range(group):
                    q = h * group + g
                    w_q = w_o[:, q * dim:(q + 1) * dim]
                    for i in range(start, end):
                        weight = w_q @ v[b, h, i] if normalization else None
                        for t in range(first_t, n):
                            s = a[b, q, t, i]
                            if normalization:
                                s = s * weight.norm() / hid[b, t].norm()
                            res[b, h, i - start] = max(res[b, h, i - start], s)
        out[layer] = res
    return out


def test_single_chunk_matches_brute_force(model):
    context = torch.randint(11, 64, (1, 12), generator=torch.Generator().manual_seed(1))
    policy = kvpolicy.get_policy("kvzip_plus", **IDS)
    scores = policy.compute_scores(eager_runner(model), context)
    expected = brute_force(model, context, torch.cat([torch.tensor([REPEAT + SUFFIX]), context], dim=1), 0, 12)
    for layer in range(2):
        assert scores[layer].shape == (1, 2, 12) and scores[layer].dtype == torch.float32
        torch.testing.assert_close(scores[layer].double(), expected[layer].log(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("normalization", [True, False], ids=["kvzip+", "kvzip"])
@pytest.mark.parametrize("score_queries", ["pass", "chunk"])
def test_variants_match_brute_force(model, normalization, score_queries):
    context = torch.randint(11, 64, (2, 9), generator=torch.Generator().manual_seed(2))
    policy = kvpolicy.get_policy("kvzip_plus", normalization=normalization, score_queries=score_queries, **IDS)
    scores = policy.compute_scores(eager_runner(model), context)
    pass_ids = torch.cat([torch.tensor([REPEAT + SUFFIX]).expand(2, -1), context], dim=1)
    expected = brute_force(model, context, pass_ids, 0, 9, normalization=normalization,
                           chunk_queries_only=score_queries == "chunk")
    for layer in range(2):
        torch.testing.assert_close(scores[layer].double(), expected[layer].log(), atol=1e-4, rtol=0)
    if not normalization:
        assert all((s <= 1e-6).all() for s in scores.values())  # logs of attention weights


def test_chunks_use_continue_prompt_and_tail_and_match_brute_force(model):
    context = torch.randint(11, 64, (1, 17), generator=torch.Generator().manual_seed(3))
    log: list[torch.Tensor] = []
    policy = kvpolicy.get_policy("kvzip_plus", chunk_size=7, continue_tail_tokens=3, **IDS)
    scores = policy.compute_scores(eager_runner(model, log=log), context)
    ctx = context[0].tolist()
    assert [ids[0].tolist() for ids in log] == [
        ctx,  # prefill
        REPEAT + SUFFIX + ctx[0:7],
        CONTINUE + ctx[4:7] + SUFFIX + ctx[7:14],
        CONTINUE + ctx[11:14] + SUFFIX + ctx[14:17],
    ]
    for layer in range(2):
        assert torch.isfinite(scores[layer]).all() and scores[layer].shape == (1, 2, 17)
    for pass_ids, (start, end) in zip(log[1:], [(0, 7), (7, 14), (14, 17)]):
        expected = brute_force(model, context, pass_ids, start, end)
        for layer in range(2):
            torch.testing.assert_close(scores[layer][..., start:end].double(), expected[layer].log(),
                                       atol=1e-4, rtol=0)


def test_batch_rows_are_independent(model):
    context = torch.randint(11, 64, (2, 10), generator=torch.Generator().manual_seed(4))
    policy = kvpolicy.get_policy("kvzip_plus", chunk_size=4, **IDS)
    both = policy.compute_scores(eager_runner(model), context)
    for row in range(2):
        alone = policy.compute_scores(eager_runner(model), context[row:row + 1])
        for layer in range(2):
            torch.testing.assert_close(both[layer][row:row + 1], alone[layer], atol=1e-5, rtol=1e-5)


def test_text_prompts_go_through_the_encoder(model):
    seen = []

    def encode(text):
        seen.append(text)
        return [11 + (ord(ch) % 40) for ch in text[:4]]

    context = torch.randint(11, 64, (1, 9), generator=torch.Generator().manual_seed(5))
    scores = kvpolicy.get_policy("kvzip_plus", chunk_size=5).compute_scores(eager_runner(model, encode), context)
    assert seen == ["\n\nRepeat the previous context exactly.", "\n",
                    "\n\nRepeat the part of the previous context exactly, starting with"]
    assert all(torch.isfinite(s).all() for s in scores.values())


def test_no_encoder_and_no_ids_is_a_clear_error(model):
    context = torch.randint(11, 64, (1, 5))
    with pytest.raises(ValueError, match="repeat_prompt_ids"):
        kvpolicy.get_policy("kvzip_plus").compute_scores(eager_runner(model), context)
    # ids for the prompt and an empty suffix text need no tokenizer at all
    policy = kvpolicy.get_policy("kvzip_plus", repeat_prompt_ids=[4], prompt_suffix="")
    assert torch.isfinite(policy.compute_scores(eager_runner(model), context)[0]).all()


def test_prepare_then_score_lifecycle(model):
    context = torch.randint(11, 64, (1, 8))
    policy = kvpolicy.get_policy("kvzip_plus", **IDS)
    inputs = LayerInputs(layer_idx=1, keys=torch.zeros(1, 2, 8, 16), values=torch.zeros(1, 2, 8, 16),
                         positions=torch.arange(8))
    with pytest.raises(RuntimeError, match="prepare"):
        policy.score(inputs)
    policy.prepare(eager_runner(model), context)
    assert policy.score(inputs).shape == (1, 2, 8)
    assert not KVzipPlusPolicy.supports_decoding


def test_config():
    cfg = KVzipPlusConfig()
    assert cfg.ratio == 0.5 and cfg.normalization and cfg.chunk_size == 2048 and cfg.continue_tail_tokens == 8
    for bad, field in [({"chunk_size": 0}, "chunk_size"), ({"threshold": math.nan}, "threshold"),
                       ({"window": -1}, "window"), ({"ratio": 1.0}, "ratio"),
                       ({"score_queries": "all"}, "score_queries"), ({"repeat_prompt_ids": "x"}, "repeat_prompt_ids")]:
        with pytest.raises(ValidationError) as err:
            KVzipPlusConfig(**bad)
        assert field in str(err.value)


# -- two-pass scoring == the materialised formula ---------------------------------------------------------
def recording(runner: OracleRunner, *, drop_lse: bool = False) -> tuple[OracleRunner, list[dict]]:
    """Wrap ``runner.forward`` so every observed pass is kept (``{layer: obs}`` per pass, tensors cloned);
    ``drop_lse`` hides the runner's log-sum-exp so the policy computes pass 1 itself."""
    passes: list[dict] = []

    def forward(ids, observe):
        seen: dict = {}
        passes.append(seen)

        def keep(layer, obs):
            obs = dataclasses.replace(obs, queries=obs.queries.clone(), keys=obs.keys.clone(),
                                      values=obs.values.clone(), hidden_states=obs.hidden_states.clone(),
                                      lse=None if drop_lse or obs.lse is None else obs.lse.clone())
            seen[layer] = obs
            observe(layer, obs)

        runner.forward(ids, keep)

    return dataclasses.replace(runner, forward=forward), passes


def materialised_scores(model, cfg: KVzipPlusConfig, passes: list[dict], total: int) -> dict[int, torch.Tensor]:
    """The KVzip(+) formula as it was computed before the two-pass kernels: each pass's whole softmax
    attention matrix ``(B, Hq, L, S)`` (float64 here), ``* ||W_o^(q) v_i|| / ||h_t||`` from explicit slices of
    ``o_proj.weight``, max over queries and the GQA group, floored at 1e-30, log."""
    c = model.config
    group, dim = c.num_attention_heads // c.num_key_value_heads, c.head_dim
    out: dict[int, torch.Tensor] = {}
    for k, seen in enumerate(passes):
        start, end = k * cfg.chunk_size, min((k + 1) * cfg.chunk_size, total)
        for layer, obs in seen.items():
            q, keys, values = obs.queries.double(), obs.keys.double(), obs.values.double()
            batch, q_heads, new, _ = q.shape
            span = keys.shape[2]
            logits = q @ keys.repeat_interleave(group, dim=1).transpose(-1, -2) * obs.scale  # (B, Hq, L, S)
            causal = torch.arange(span)[None, :] <= (span - new + torch.arange(new))[:, None]
            attn = torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)
            first = 0 if cfg.score_queries == "pass" else new - (end - start)
            attn = attn[:, :, first:, start:end]  # (B, Hq, Lq, c)
            if cfg.normalization:
                w_o = model.model.layers[layer].self_attn.o_proj.weight.double()
                per_head = torch.stack([values[:, qh // group, start:end] @ w_o[:, qh * dim:(qh + 1) * dim].T
                                        for qh in range(q_heads)], dim=1)  # (B, Hq, c, hidden)
                h_norm = obs.hidden_states[:, first:].double().norm(dim=-1)  # (B, Lq)
                attn = attn / h_norm[:, None, :, None] * per_head.norm(dim=-1)[:, :, None, :]
            best = attn.amax(dim=2).reshape(batch, c.num_key_value_heads, group, -1).amax(dim=2)
            out.setdefault(layer, torch.zeros(batch, c.num_key_value_heads, total, dtype=torch.float64))
            out[layer][..., start:end] = best
    return {layer: s.clamp_min(1e-30).log() for layer, s in out.items()}


def assert_relative(ours: dict[int, torch.Tensor], ref: dict[int, torch.Tensor], rel: float = 1e-5) -> None:
    """``|exp(ours) / exp(ref) - 1| <= rel`` entrywise (log scores; floored entries must agree too)."""
    assert sorted(ours) == sorted(ref)
    for layer in ref:
        assert ours[layer].shape == ref[layer].shape and ours[layer].dtype == torch.float32
        ratio_err = ((ours[layer].double() - ref[layer]).exp() - 1).abs().max().item()
        assert ratio_err <= rel, f"layer {layer}: max relative error {ratio_err:.2e} > {rel:.0e}"


@pytest.mark.parametrize("runner_kind", ["adapter", "adapter-no-lse", "eager"])
@pytest.mark.parametrize("normalization", [True, False], ids=["kvzip+", "kvzip"])
@pytest.mark.parametrize("score_queries", ["pass", "chunk"])
def test_two_pass_scores_equal_materialised_attention(model, runner_kind, normalization, score_queries):
    """Three chunks (the last one short), batch 2; the runner's own lse (adapter), the policy's pass 1
    (adapter-no-lse, eager). Equal to the materialised formula on the same tensors within 1e-5 relative."""
    context = torch.randint(11, 64, (2, 151), generator=torch.Generator().manual_seed(6))
    policy = kvpolicy.get_policy("kvzip_plus", chunk_size=64, normalization=normalization,
                                 score_queries=score_queries, **IDS)
    if runner_kind == "eager":
        runner, passes = recording(eager_runner(model))
        scores = policy.compute_scores(runner, context)
    else:
        with PolicySession(model, policy) as session:
            runner, passes = recording(session.oracle_runner(), drop_lse=runner_kind == "adapter-no-lse")
            scores = policy.compute_scores(runner, context)
        assert (passes[0][0].lse is None) == (runner_kind == "adapter-no-lse")
    assert len(passes) == 3
    assert_relative(scores, materialised_scores(model, policy.config, passes, context.shape[1]))


def test_adapter_runner_hands_over_queries_keys_and_lse(model):
    """The adapter's observation: post-RoPE queries, the whole cache's keys/values, and the lse of each query
    over its causal keys (what pass 2 divides by)."""
    context = torch.randint(11, 64, (1, 20), generator=torch.Generator().manual_seed(7))
    policy = kvpolicy.get_policy("kvzip_plus", **IDS)
    with PolicySession(model, policy) as session:
        runner, passes = recording(session.oracle_runner())
        policy.compute_scores(runner, context)
    eager, eager_passes = recording(eager_runner(model))
    eager.prefill(context)
    eager.forward(torch.cat([torch.tensor([REPEAT + SUFFIX]), context], dim=1), lambda layer, obs: None)
    for layer, obs in passes[0].items():
        ref = eager_passes[0][layer]
        new, span = obs.queries.shape[2], obs.keys.shape[2]
        assert (new, span) == (len(REPEAT + SUFFIX) + 20, 2 * 20 + len(REPEAT + SUFFIX))
        torch.testing.assert_close(obs.queries, ref.queries, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(obs.keys, ref.keys, atol=1e-5, rtol=1e-5)
        logits = obs.queries.double() @ obs.keys.double().repeat_interleave(2, dim=1).transpose(-1, -2) * obs.scale
        causal = torch.arange(span)[None, :] <= (span - new + torch.arange(new))[:, None]
        lse = logits.masked_fill(~causal, float("-inf")).logsumexp(dim=-1)
        torch.testing.assert_close(obs.lse.double(), lse, atol=1e-5, rtol=0)


def test_benchmark_dry_run(tmp_path):
    """``benchmarks/kvzip_scoring.py --dry-run`` (CI runs it through benchmarks/gpu_check.sh) finishes and
    reports a ratio per context length."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "kvzip_scoring.py"
    out = tmp_path / "result.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, str(script), "--dry-run", "--no-kvpress", "--json", str(out)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT")]
    assert len(lines) == 2 and all("kvpolicy KVzip+ prefill+score / plain prefill ratio" in x for x in lines)
    results = json.loads(out.read_text())["results"]
    assert [r["tokens"] for r in results] == [64, 160]
    for r in results:
        assert r["kvpolicy KVzip+"]["time"] > 0 and r["plain prefill"]["ratio_time"] == 1.0
