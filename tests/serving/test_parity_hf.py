"""Per-head eviction served by SGLang equals the HF adapter's per-head eviction on the same model.

Two models: the shipped testbed (a trained Qwen3) with its KVzap-MLP surrogate, and a tiny random Llama with a
random surrogate. The server runs in float32 (``--dtype float32``, as the HF reference does), first with plain
batching, then with chunked prefill (chunks of 48 tokens, so every prompt is split). For each prompt the greedy
tokens a real SGLang server returns equal ``model.generate`` under ``kvpolicy.apply``, and the number of
(layer, head, position) entries the server freed equals the HF session's pruned count (the server logs it per
request); requests run one at a time from an empty prefix cache, so each computes every token it attends to.
Then all prompts again at concurrency 4 (batched prefill and decode): the same tokens and counts, for the prompts
that share no prefix (a cached entry another running request reads is kept, by design; docs/sglang.md).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from tests.serving.conftest import sglang_or_skip

sglang_or_skip()

import torch  # noqa: E402

import kvpolicy  # noqa: E402
from kvpolicy.lab.serve_bench import PolicyRun, Server, run_requests  # noqa: E402
from kvpolicy.lab.testbed import MODEL_DIR, SURROGATES  # noqa: E402
from kvpolicy.lab.testbed.tasks import generate  # noqa: E402

SEED = 91  # not the evaluation seed
TASKS = ("single_needle", "multi_key", "variable_tracking", "multi_value", "repeat")


def _testbed(tmp_path: Path):
    examples = [generate(task, length, SEED, i) for task in TASKS for length in (256, 512) for i in range(2)]
    prompts = [e.prompt for e in examples]
    max_new = [len(e.answer) for e in examples]
    # The testbed's prompts share their first tokens (BOS and the task's opening): batched, a request reuses
    # them from the tree and a cached entry another running request reads is not freed, so only the one-at-a-time
    # runs are compared entry for entry.
    return MODEL_DIR, {"surrogate": str(SURROGATES["mlp"]), "threshold": -2.0, "window": 32}, prompts, max_new, False


def _random_llama(tmp_path: Path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from kvpolicy.surrogate import KVzapSurrogate, SurrogateConfig, save_surrogate

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
                         bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    model_dir = tmp_path / "llama"
    LlamaForCausalLM(config).to(torch.float32).save_pretrained(model_dir)
    surrogate = KVzapSurrogate(SurrogateConfig(model_type="kvzap", input_dim=64, output_dim=2, n_modules=2,
                                               hidden_dim=8))
    save_surrogate(surrogate, tmp_path / "llama-kvzap")
    gen = torch.Generator().manual_seed(1)
    # Distinct first tokens: no prompt shares a prefix with another, so batching reuses no cached entries.
    prompts = [[3 + i] + torch.randint(3, 256, (n - 1,), generator=gen).tolist()
               for i, n in enumerate((40, 64, 97, 130, 180, 255))]
    # A threshold at the median of the surrogate's scores prunes about half of the judged entries.
    with torch.no_grad():
        hidden = torch.randn(512, 64, generator=gen)
        threshold = float(torch.cat([surrogate(layer, hidden).flatten() for layer in range(2)]).median())
    return model_dir, {"surrogate": str(tmp_path / "llama-kvzap"), "threshold": threshold, "window": 8}, \
        prompts, [12] * len(prompts), True


def _hf_reference(model_dir, config, prompts, max_new):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    outputs, pruned = [], []
    for prompt, new in zip(prompts, max_new):
        ids = torch.tensor([prompt])
        with kvpolicy.apply(model, "kvzap_mlp", **config) as session, torch.no_grad():
            out = model.generate(ids, max_new_tokens=new, do_sample=False, pad_token_id=0, eos_token_id=None)
            report = session.report()
        outputs.append(out[0, ids.shape[1]:].tolist())
        pruned.append((report.pruned, report.entries))
    return outputs, pruned


@pytest.mark.slow
@pytest.mark.parametrize("model", [_testbed, _random_llama], ids=["testbed-qwen3", "random-llama"])
def test_served_per_head_eviction_equals_the_hf_adapter(tmp_path, model):
    model_dir, config, prompts, max_new, compare_batched = model(tmp_path)
    hf_outputs, hf_pruned = _hf_reference(model_dir, config, prompts, max_new)
    assert sum(p for p, _ in hf_pruned) > 0.3 * sum(e for _, e in hf_pruned)  # the threshold really prunes

    run = PolicyRun("kvzap_mlp", "kvzap_mlp", config)
    for chunk in (None, 48):
        extra = ["--dtype", "float32"] + ([] if chunk is None else ["--chunked-prefill-size", str(chunk)])
        server = Server(model_dir, run, tmp_path / f"server-{chunk}.log", max_total_tokens=4096,
                        python=sys.executable, extra_args=extra)
        with server:
            served, logged = [], []
            for prompt, new in zip(prompts, max_new):
                server.post_json("/flush_cache", {})
                reply = run_requests(server, [prompt], [new], 1, timeout=120, ignore_eos=True)[0]
                assert reply.error is None, reply.error
                served.append(reply.output_ids)
                time.sleep(0.2)
                logged.append(server.pruning_log()[reply.meta["id"]])
            server.post_json("/flush_cache", {})
            batched = run_requests(server, prompts, max_new, 4, timeout=120, ignore_eos=True)
            time.sleep(0.5)
            batched_logged = [server.pruning_log()[r.meta["id"]] for r in batched]
        assert server.exit_code == 0, server.log_tail()
        assert served == hf_outputs, f"chunk={chunk}"
        if compare_batched:
            assert [r.output_ids for r in batched] == hf_outputs, f"chunk={chunk}, batched"
            assert [(f, e) for f, e, _ in batched_logged] == hf_pruned, f"chunk={chunk}, batched"
        for (freed, entries, compression), (pruned, hf_entries) in zip(logged, hf_pruned):
            assert (freed, entries) == (pruned, hf_entries), f"chunk={chunk}"
            assert abs(compression * entries - pruned) < 1.0
