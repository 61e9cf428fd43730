"""End-to-end check of live pruning in a real SGLang 0.5.19 engine on CPU (run as a script).

Usage: ``python tests/adapters/sglang/live_engine_check.py WORKDIR [every_third|kvzap_mlp] [CHUNK]``; prints
one JSON line ``RESULT {...}``. ``CHUNK`` sets SGLang's ``chunked_prefill_size`` (prompts split into chunks).
It is a script, not a test module, because SGLang spawns its scheduler process, which re-imports the main
module: the test policy registered at the top level of this file is then registered there too.

The reference is independent of SGLang and of the adapter: HF transformers recomputes the whole sequence
at every step with a 4D mask in which a query at position ``q`` does not see key ``k`` when the policy prunes
``k`` and ``k`` had left the protected window before ``q`` was computed (``k < q - WINDOW``, decode queries
only: the prefill attends to everything, pruning happens after it).

- ``every_third``: a test policy that prunes every position not divisible by 3 (keys/values path).
- ``kvzap_mlp``: the real ``kvzap_mlp`` policy with a random MLP surrogate saved in NVIDIA's layout. The
  reference scores each token from its own attention input (HF ``self_attn`` input, after the input norm) in
  the masked recomputation, applies the threshold per (layer, head) and the ``any`` token vote (a token goes
  when every layer and head scores it below the threshold).
"""

from __future__ import annotations

import json
import os
import re
import sys

import torch

from kvpolicy import EvictionPolicy, register_policy
from kvpolicy.registry import available_policies

WINDOW = 8
NEW_TOKENS = 20
PROMPTS = [list(range(10, 50)), list(range(100, 130)), list(range(200, 260))]
PRUNED_LOG = re.compile(r"kvpolicy: request \S+ finished: (\d+) of (\d+) tokens pruned.*?(\d+) KV slots freed")


class EveryThirdPolicy(EvictionPolicy):
    """Keeps tokens whose absolute position is a multiple of 3 (score 0), prunes the rest (score -10)."""

    supports_decoding = True

    def score(self, inputs):
        keep = (inputs.positions % 3 == 0).float()
        heads = inputs.keys.shape[1]
        return ((keep - 1.0) * 10.0)[None, None, :].expand(1, heads, -1).contiguous()


if "live_every_third" not in available_policies():
    register_policy("live_every_third", EveryThirdPolicy)

os.environ["KVPOLICY_SGLANG_LIVE"] = "1"
os.environ["SGLANG_USE_CPU_ENGINE"] = "1"
os.environ["SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE"] = "1"  # a leak raises in the scheduler


def make_model(path: str) -> None:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096)
    Qwen3ForCausalLM(config).save_pretrained(path)


def make_surrogate(path: str) -> None:
    """A random KVzap-MLP surrogate whose dimensions match :func:`make_model` (hidden 64, 2 KV heads, 2 layers)."""
    from kvpolicy.surrogate import KVzapSurrogate, SurrogateConfig, save_surrogate

    torch.manual_seed(1)
    config = SurrogateConfig(model_type="kvzap", input_dim=64, output_dim=2, n_modules=2, hidden_dim=8)
    save_surrogate(KVzapSurrogate(config), path)


class MaskedReference:
    """Teacher-forced HF recomputation with exactly the pruned tokens hidden from later decode queries.

    ``pruned_of(hidden_rows, positions)`` decides, from the captured attention inputs of newly computed rows
    (``{layer: (rows, hidden)}``), which of those positions the policy prunes.
    """

    def __init__(self, model, pruned_of):
        self.model = model
        self.pruned_of = pruned_of
        self.captured: dict[int, torch.Tensor] = {}
        for i, layer in enumerate(model.model.layers):
            layer.self_attn.register_forward_pre_hook(self._capture(i), with_kwargs=True)

    def _capture(self, layer_idx):
        def hook(module, args, kwargs):
            self.captured[layer_idx] = kwargs["hidden_states"][0].detach()
        return hook

    def run(self, prompt: list[int], generated: list[int], reprefills: tuple[int, ...] = ()
            ) -> tuple[list[float], list[bool]]:
        """Per step the reference max logit minus the logit of SGLang's token (0 = SGLang took the argmax),
        and the pruned flag of every position that was forwarded.

        ``reprefills``: lengths at which the request was prefilled again after a retraction; the step that
        forwards that many tokens recomputes all of them with full attention and judges them afresh."""
        gaps, pruned = [], []
        prompt_len = len(prompt)
        for step, token in enumerate(generated):
            ids = prompt + generated[:step]
            n = len(ids)
            if n in reprefills:
                prompt_len, pruned = n, []
            q = torch.arange(n)[:, None]
            k = torch.arange(n)[None, :]
            known = torch.zeros(n, dtype=torch.bool)
            known[:len(pruned)] = torch.tensor(pruned, dtype=torch.bool)
            visible = (k <= q) & ~(known[None, :] & (k < q - WINDOW) & (q >= prompt_len))
            mask = torch.where(visible, 0.0, float("-inf"))[None, None]
            with torch.no_grad():
                logits = self.model(torch.tensor([ids]), attention_mask=mask,
                                    position_ids=torch.arange(n)[None]).logits[0, -1]
            new = range(len(pruned), n)  # the prefill's rows, then one row per decode step
            rows = {layer: h[len(pruned):n] for layer, h in self.captured.items()}
            pruned.extend(self.pruned_of(rows, torch.tensor(list(new))))
            gaps.append(float(logits.max() - logits[token]))
        return gaps, pruned


def every_third_pruned(rows, positions):
    return (positions % 3 != 0).tolist()


def kvzap_pruned(surrogate, threshold):
    def pruned_of(rows, positions):
        with torch.no_grad():
            scores = torch.stack([surrogate(layer, h.float()) for layer, h in sorted(rows.items())])  # (L, T, H)
        return (scores < threshold).all(dim=2).all(dim=0).tolist()  # token vote "any": pruned if all entries are
    return pruned_of


def pick_threshold(model, surrogate, quantile: float = 0.4) -> float:
    """A threshold that prunes about ``quantile`` of the prompt tokens under the ``any`` vote, placed in the
    middle of a gap between two tokens' scores (so fp32 differences between engines cannot flip a decision)."""
    reference = MaskedReference(model, lambda rows, positions: [False] * len(positions))
    best = []
    for prompt in PROMPTS:
        reference.run(prompt, [0])
        with torch.no_grad():
            scores = torch.stack([surrogate(layer, h.float()) for layer, h in sorted(reference.captured.items())])
        best.append(scores.amax(dim=(0, 2)))
    values = torch.sort(torch.cat(best)).values
    i = int(quantile * len(values))
    gaps = values[i:i + 10].diff()
    j = i + int(gaps.argmax())
    return float((values[j] + values[j + 1]) / 2)


def main(workdir: str, mode: str, chunk: int | None = None) -> None:
    import time

    import sglang as sgl
    from transformers import AutoModelForCausalLM

    model_path = os.path.join(workdir, "tiny-qwen3")
    make_model(model_path)
    reference_model = AutoModelForCausalLM.from_pretrained(model_path, attn_implementation="eager").eval()
    if mode == "every_third":
        policy = {"policy": "live_every_third", "policy_config": {"threshold": -1.0, "window": WINDOW}}
        pruned_of = every_third_pruned
    elif mode == "kvzap_mlp":
        from kvpolicy.surrogate import load_surrogate

        surrogate_path = os.path.join(workdir, "kvzap-mlp")
        make_surrogate(surrogate_path)
        surrogate = load_surrogate(surrogate_path).eval()
        threshold = pick_threshold(reference_model, surrogate)
        policy = {"policy": "kvzap_mlp",
                  "policy_config": {"surrogate": surrogate_path, "threshold": threshold, "window": WINDOW}}
        pruned_of = kvzap_pruned(surrogate, threshold)
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    os.environ["KVPOLICY_SGLANG_CONFIG"] = json.dumps(policy)  # read by the spawned scheduler

    engine = sgl.Engine(model_path=model_path, device="cpu", attention_backend="torch_native",
                        radix_cache_backend="kvpolicy", skip_tokenizer_init=True, mem_fraction_static=0.05,
                        disable_cuda_graph=True, disable_overlap_schedule=True, log_level="info",
                        max_total_tokens=4096, **({"chunked_prefill_size": chunk} if chunk else {}))
    sampling = {"max_new_tokens": NEW_TOKENS, "temperature": 0}
    first = engine.generate(input_ids=PROMPTS, sampling_params=sampling)
    time.sleep(2)  # idle: the scheduler's pool invariant check runs (strict: raises on a leak)
    # Second round: the tree now holds the first round's compressed prompts (tombstones).
    second = engine.generate(input_ids=PROMPTS, sampling_params=sampling)
    rids = [o["meta_info"]["id"] for o in first + second]
    first, second = [o["output_ids"] for o in first], [o["output_ids"] for o in second]
    time.sleep(2)
    alive = engine.generate(input_ids=[[1, 2, 3]], sampling_params={"max_new_tokens": 2, "temperature": 0})
    engine.shutdown()

    reference = MaskedReference(reference_model, pruned_of)
    result = {"policy": policy, "pruned_gaps": [], "full_gaps": [], "expected_pruned": [],
              "alive": len(alive[0]["output_ids"]) == 2, "rids": rids, "outputs": first + second}
    unpruned = MaskedReference(reference_model, lambda rows, positions: [False] * len(positions))
    for outputs in (first, second):
        for prompt, generated in zip(PROMPTS, outputs):
            gaps, pruned = reference.run(prompt, generated)
            result["pruned_gaps"].append(gaps)
            result["full_gaps"].append(unpruned.run(prompt, generated)[0])
            forwarded = len(prompt) + len(generated) - 1  # the last generated token is never forwarded
            result["expected_pruned"].append([sum(pruned[:forwarded - WINDOW]), forwarded])
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "every_third",
         int(sys.argv[3]) if len(sys.argv) > 3 else None)
