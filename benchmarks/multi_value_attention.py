"""Where the testbed looks on multi_value, and why KVzip+ loses the task: a diagnosis, not a benchmark.

Two probes on multi_value (one key bound to four values at four depths, two distractor needles):

* value slots (default; the probe behind the earlier "multi_value in detail" notes on the testbed): for each
  value slot of the model's own greedy answer (slot 1 follows the query key, slots 2-4 the re-stated key), the
  attention mass of every (layer, head) on the context values of the asked key not given yet / given already /
  the values in the answer;
* ``--kvzip`` (docs/results.md, "KVzip+ on multi_value"): what the KVzip+ oracle (ratio 0.67, scope model,
  window 32, the testbed's ``<repeat>`` prompt) keeps, next to KVzap-MLP (threshold -0.25, window 32):

  1. the oracle recomputed independently (one eager forward, explicit ``W_o`` slices) against the policy;
  2. kept fraction per layer and per token kind (values / key of the asked key, other values, keys, ``.``,
     filler), and per head for the asked key's values;
  3. where the answer reads under the full cache (the question's attention at every value slot) and how much
     of that attention mass lands on entries each policy keeps;
  4. why the oracle ranks the values low: the repeat pass's attention at the copy position that must
     produce each value (a key bound to four values is followed by four different tokens), the copy accuracy,
     and the oracle's scores per token kind with and without the ``||W_o v|| / ||h||`` normalisation;
  5. (not with ``--fast``) exact-match accuracy on multi_value of variations: ratio, scope, score queries,
     normalisation, chunking, repeat prompt, the oracle with the asked key's values pinned (kept), the oracle
     with a *sum* over repeat queries instead of the max, KVzap-MLP ranked like the oracle (ratio 0.67, scope
     model) and KVzap-MLP with the asked key's values dropped.

    python benchmarks/multi_value_attention.py [--length 256] [-n 20]       # value slots
    python benchmarks/multi_value_attention.py --kvzip --fast               # KVzip+ probe, 3 examples, ~10 s
    python benchmarks/multi_value_attention.py --kvzip                      # 10 at 512 and 1024 + sweep, 4-8 min
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from kvpolicy.lab.testbed import MODEL_DIR, SURROGATES
from kvpolicy.lab.testbed.tasks import MULTI_VALUES, Example, generate
from kvpolicy.lab.testbed.tokenizer import VOCAB

GROUPS = ("context, not given yet", "context, given", "answer (given)")
EVAL_SEED = 1234  # kvpolicy.lab.eval.EVAL_SEED (not imported here: the slot probe needs no eval suite)
KINDS = ("mv value", "mv key", "value", "key", ".", "filler")
KVZIP = {"ratio": 0.67, "scope": "model", "window": 32}
KVZAP = {"threshold": -0.25, "window": 32}


# ------------------------------------------------------------------------------------------------------------
# Probe 1: value slots (unchanged)


def slot_attention(model, length: int, n: int, seed: int = EVAL_SEED) -> dict[int, torch.Tensor]:
    """slot (1-based) -> (layers, heads, 3) mean attention mass on GROUPS, over the examples that reach it."""
    per_slot: dict[int, list[torch.Tensor]] = {}
    for index in range(n):
        example = generate("multi_value", length, seed, index)
        ids = torch.tensor([example.prompt])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=len(example.answer),
                             do_sample=False)
        seq = out[0, : len(example.prompt) + len(example.answer) - 1]
        with torch.no_grad():
            attentions = model(seq[None], output_attentions=True).attentions   # per layer (1, H, T, T)
        key, values = example.prompt[-1], set(example.answer[:-1:2])
        start, context = len(example.prompt), example.context_len
        generated = seq[start:].tolist()
        # the positions whose next token is a value slot: the query key, then each re-stated key
        slots = [start - 1] + [start + i for i, t in enumerate(generated) if t == key][: MULTI_VALUES - 1]
        tokens = seq.tolist()
        for slot, pos in enumerate(slots, start=1):
            given = set(generated[: pos - start + 1]) & values
            group = torch.full((pos + 1,), -1)
            for j in range(pos + 1):
                if tokens[j] in values:
                    group[j] = 2 if j >= context else int(tokens[j] in given)
            mass = torch.stack([torch.stack([a[0, :, pos, : pos + 1][:, group == g].sum(-1) for g in range(3)], -1)
                                for a in attentions])                       # (layers, heads, 3)
            per_slot.setdefault(slot, []).append(mass)
    return {slot: torch.stack(masses).mean(0) for slot, masses in per_slot.items()}


def print_slots(model, length: int, n: int) -> None:
    print(f"attention mass per head: {' / '.join(GROUPS)}")
    for slot, mass in slot_attention(model, length, n).items():
        print(f"value slot {slot}:")
        for layer, heads in enumerate(mass):
            print(f"  layer {layer}: " + "  ".join("/".join(f"{x:.2f}" for x in h) for h in heads.tolist()))


# ------------------------------------------------------------------------------------------------------------
# Probe 2: KVzip+


def token_kinds(context: list[int]) -> list[str]:
    """Kind of every context token, from the tokens alone: ``mv value`` / ``mv key`` are the values and the key
    of a key bound to two or more values (multi_value's asked key); ``value`` / ``key`` the other needles."""
    keys, values = set(VOCAB.keys), set(VOCAB.values)
    bound: dict[int, int] = {}
    for prev, tok in zip(context, context[1:]):
        if prev in keys and tok in values:
            bound[prev] = bound.get(prev, 0) + 1
    kinds = []
    for i, tok in enumerate(context):
        if tok in values:
            kinds.append("mv value" if i and bound.get(context[i - 1], 0) > 1 else "value")
        elif tok in keys:
            kinds.append("mv key" if bound.get(tok, 0) > 1 else "key")
        elif tok == VOCAB.dot:
            kinds.append(".")
        elif tok == VOCAB.bos:
            kinds.append("bos")
        else:
            kinds.append("filler")
    return kinds


def _oracle_classes():
    """The probe's policy wrappers (defined lazily: they import the library)."""
    from kvpolicy.config import PolicyConfig
    from kvpolicy.policy import OraclePolicy

    class Probe(OraclePolicy[PolicyConfig]):
        """Wraps a policy: records its per-layer scores of the prefill and optionally overrides the scores of
        the tokens of some kinds (``pin``: kind -> +inf to keep them, -inf to drop them) in some layers.

        An oracle in lifecycle only, so that it sees the context ids before the prefill; selection uses the
        wrapped policy's own config."""

        config_class = PolicyConfig

        def __init__(self, base, pin: dict[str, float] | None = None, layers: tuple[int, ...] | None = None):
            super().__init__(base.config)
            self.base, self.pin, self.pin_layers = base, dict(pin or {}), layers
            self.captures = base.captures
            self.recorded: dict[int, torch.Tensor] = {}
            self._masks: dict[str, torch.Tensor] = {}

        def bind(self, model) -> None:
            self.base.bind(model)

        def compute_scores(self, runner, context_ids):
            rows = [token_kinds(row) for row in context_ids.tolist()]
            self._masks = {kind: torch.tensor([[k == kind for k in row] for row in rows]) for kind in self.pin}
            self.recorded = {}
            return self.base.compute_scores(runner, context_ids) if isinstance(self.base, OraclePolicy) else {}

        def score(self, inputs):
            scores = super().score(inputs) if isinstance(self.base, OraclePolicy) else self.base.score(inputs)
            if self.pin and (self.pin_layers is None or inputs.layer_idx in self.pin_layers):
                scores = scores.clone()
                for kind, value in self.pin.items():
                    mask = self._masks[kind].to(scores.device)[:, None, :].expand_as(scores)
                    scores[mask] = value
            self.recorded[inputs.layer_idx] = scores
            return scores

    class SumOracle(OraclePolicy):
        """KVzip+ with a sum over the repeat pass's queries instead of the max (a diagnostic variant, one chunk):
        ``s_i = max_{q in group} sum_t a[q, t, i] * ||W_o^(q) v_i|| / ||h_t||``."""

        from kvpolicy.policies.kvzip_plus import KVzipPlusConfig as config_class

        @torch.no_grad()
        def compute_scores(self, runner, context_ids):
            cfg, info = self.config, runner.info
            batch, total = context_ids.shape
            if total > cfg.chunk_size:
                raise ValueError("SumOracle scores one chunk only")
            heads, group, dim = info.num_kv_heads, info.group_size, info.head_dim
            extra = torch.tensor(cfg.repeat_prompt_ids + (cfg.prompt_suffix_ids or []), dtype=context_ids.dtype)
            pass_ids = torch.cat([extra.expand(batch, len(extra)), context_ids], dim=1)
            scores = {}

            def observe(layer, obs):
                # the runner hands queries and keys, not weights: the full causal softmax, one row at a time
                w_o = runner.out_proj(layer).double().reshape(-1, heads * group, dim)  # (hidden, Hq, D)
                n_keys, n_q = obs.keys.shape[2], obs.queries.shape[2]
                causal = torch.arange(n_keys)[None, :] <= (n_keys - n_q + torch.arange(n_q))[:, None]
                rows = []
                for b in range(batch):
                    k = obs.keys[b].float().repeat_interleave(group, dim=0)              # (Hq, S, D)
                    logits = obs.queries[b].float() @ k.transpose(-1, -2) * obs.scale     # (Hq, L, S)
                    a = logits.masked_fill(~causal, float("-inf")).softmax(-1)[:, :, :total].double()
                    v = obs.values[b, :, :total].double().repeat_interleave(group, dim=0)  # (Hq, T, D)
                    out_norm = torch.einsum("jqd,qid->qij", w_o, v).norm(dim=-1)         # (Hq, T)
                    h_norm = obs.hidden_states[b].double().norm(dim=-1)                  # (L,)
                    rows.append((a / h_norm[None, :, None]).sum(dim=1) * out_norm)      # (Hq, T)
                s = torch.stack(rows)
                scores[layer] = s.reshape(batch, heads, group, total).amax(2).float().clamp_min(1e-30).log()

            runner.prefill(context_ids)
            runner.forward(pass_ids, observe)
            runner.crop(total)
            return scores

    return Probe, SumOracle


def _testbed_oracle(**config):
    from kvpolicy.lab.testbed import testbed_oracle_config
    from kvpolicy.registry import get_policy

    return get_policy("kvzip_plus", **{**testbed_oracle_config(), **config})


def _kvzap(**config):
    from kvpolicy.registry import get_policy

    return get_policy("kvzap_mlp", surrogate=str(SURROGATES["mlp"]), **config)


def offline_keep(scores: dict[int, torch.Tensor], config, length: int) -> torch.Tensor:
    """``(layers, H, T)`` keep mask the core selector gives these prefill scores (the adapter calls the same
    selector with the same pushes, so this is what the cache held)."""
    from kvpolicy.selection import Selector

    selector = Selector(config, num_layers=len(scores))
    positions, valid = torch.arange(length)[None], torch.ones(1, length, dtype=torch.bool)
    keep = {}
    for layer in range(len(scores)):
        for decision in selector.push(layer, scores[layer][:1], positions, valid):
            mask = torch.ones(scores[decision.layer_idx].shape[1], length, dtype=torch.bool)
            mask[:, : decision.count] = decision.keep[0]
            keep[decision.layer_idx] = mask
    return torch.stack([keep[layer] for layer in range(len(scores))])


def prefill_record(model, tokenizer, probe, example: Example):
    """Run the real adapter's prefill of the example's context under ``probe``; return (scores, keep, report)."""
    from kvpolicy.adapters.hf import PolicySession

    context = torch.tensor([example.prompt[: example.context_len]])
    with PolicySession(model, probe, tokenizer=tokenizer) as session:
        cache = session.new_cache()
        with torch.no_grad():
            model(context, past_key_values=cache, use_cache=True)
        report = session.report(cache)
    scores = {layer: s.detach().float() for layer, s in probe.recorded.items()}
    keep = offline_keep(scores, probe.config, example.context_len)
    if int((~keep).sum()) != report.pruned:
        raise RuntimeError(f"offline selection pruned {int((~keep).sum())}, the adapter {report.pruned}")
    return {k: v[0] for k, v in scores.items()}, keep, report


@torch.no_grad()
def independent_kvzip_plus(model, context: list[int]) -> torch.Tensor:
    """``(layers, H, T)`` log KVzip+ scores from one eager forward over ``[context, <repeat>, context]``:
    ``max_{q in group(h)} max_t a[q, t, i] * ||W_o[:, qD:(q+1)D] v_i|| / ||h_t||``, ``t`` over the pass (the
    repeat prompt and the copy), ``h_t`` the attention input after the input norm, ``v_i`` from ``v_proj``."""
    cfg = model.config
    heads, q_heads, dim = cfg.num_key_value_heads, cfg.num_attention_heads, cfg.head_dim
    group, total = q_heads // heads, len(context)
    seq = torch.tensor([context + [VOCAB.repeat] + context])
    hidden, values, hooks = {}, {}, []
    for idx, layer in enumerate(model.model.layers):
        hooks.append(layer.self_attn.register_forward_pre_hook(
            lambda m, a, kw, idx=idx: hidden.__setitem__(idx, kw["hidden_states"][0].double()), with_kwargs=True))
        hooks.append(layer.self_attn.v_proj.register_forward_hook(
            lambda m, a, out, idx=idx: values.__setitem__(idx, out[0].double().reshape(-1, heads, dim))))
    try:
        attentions = model(seq, output_attentions=True).attentions
    finally:
        for hook in hooks:
            hook.remove()
    out = []
    for idx, layer in enumerate(model.model.layers):
        w_o = layer.self_attn.o_proj.weight.double()
        a = attentions[idx][0, :, total:, :total].double()              # (Hq, pass queries, T)
        h_norm = hidden[idx][total:].norm(dim=-1)                       # (pass queries,)
        per_q = []
        for q in range(q_heads):
            written = values[idx][:total, q // group] @ w_o[:, q * dim:(q + 1) * dim].T   # (T, hidden)
            per_q.append((a[q] / h_norm[:, None]).amax(0) * written.norm(dim=-1))
        best = torch.stack(per_q).reshape(heads, group, total).amax(1)
        out.append(best.clamp_min(1e-30).log().float())
    return torch.stack(out)


def _fmt(x: float) -> str:
    return f"{x:5.2f}" if not math.isnan(x) else "  -  "


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def kvzip_probe(model, tokenizer, lengths: list[int], n: int, accuracy: bool) -> None:
    from kvpolicy.lab.eval.suite import evaluate_policy, score_example

    Probe, SumOracle = _oracle_classes()
    t0 = time.perf_counter()
    examples = [generate("multi_value", length, EVAL_SEED, i) for length in lengths for i in range(n)]
    layers, heads = model.config.num_hidden_layers, model.config.num_key_value_heads
    print(f"multi_value, EVAL_SEED {EVAL_SEED}, lengths {lengths}, {n} examples each; "
          f"KVzip+ {KVZIP} (testbed <repeat> prompt), KVzap-MLP {KVZAP}")

    # 1. the policy's scores against an independent recomputation
    ex = examples[0]
    probe = Probe(_testbed_oracle(**KVZIP))
    scores, _, _ = prefill_record(model, tokenizer, probe, ex)
    ref = independent_kvzip_plus(model, ex.prompt[: ex.context_len])
    diff = max(float((scores[layer] - ref[layer]).abs().max()) for layer in range(layers))
    print(f"\n[1] KVzip+ log scores, policy via the adapter's oracle runner vs an independent eager recomputation "
          f"(example 0, {ex.context_len} tokens): max |difference| {diff:.2e}")

    # 2. kept sets
    runs = {"KVzip+": lambda: Probe(_testbed_oracle(**KVZIP)), "KVzap-MLP": lambda: Probe(_kvzap(**KVZAP))}
    kept = {name: [] for name in runs}
    recorded = {name: [] for name in runs}
    for ex in examples:
        kinds = token_kinds(ex.prompt[: ex.context_len])
        for name, make in runs.items():
            scores, keep, _ = prefill_record(model, tokenizer, make(), ex)
            kept[name].append((keep, kinds))
            recorded[name].append(scores)
    print("\n[2] kept fraction per layer (all entries | per token kind, mean over heads; the 32-token window is "
          "counted)\n    kinds: " + ", ".join(KINDS) + "  (mv = the asked key bound to 4 values)")
    for name in runs:
        for layer in range(layers):
            allk = _mean(float(k[layer].float().mean()) for k, _ in kept[name])
            per_kind = []
            for kind in KINDS:
                cols = [k[layer][:, [i for i, x in enumerate(kinds) if x == kind]].float().mean()
                        for k, kinds in kept[name] if kind in kinds]
                per_kind.append(_mean(float(c) for c in cols))
            print(f"  {name:<9} L{layer}: all {allk:.3f} | " + "  ".join(_fmt(x) for x in per_kind))
        mv = [[_mean(float(k[layer][h, [i for i, x in enumerate(kinds) if x == 'mv value']].float().mean())
                     for k, kinds in kept[name]) for h in range(heads)] for layer in range(layers)]
        print(f"  {name:<9} mv values kept per head: " +
              "  ".join(f"L{layer} " + "/".join(f"{x:.2f}" for x in mv[layer]) for layer in range(layers)))

    # 3. where the answer reads (full cache) and how much of it each policy keeps
    print("\n[3] full cache, the question's attention at the value slots (the asked key and each re-stated key of "
          "the greedy answer):\n    per layer: mass on the 4 mv values (mean over query heads; max head) | share "
          "of the attention on context entries that each policy keeps")
    slot_mass = torch.zeros(layers, 2)
    kept_share = {name: torch.zeros(layers) for name in runs}
    mv_kept_share = {name: torch.zeros(layers) for name in runs}
    count = 0
    correct = 0
    for e_idx, ex in enumerate(examples):
        ids = torch.tensor([ex.prompt])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=len(ex.answer), do_sample=False)
        correct += score_example(ex, out[0, len(ex.prompt):].tolist())
        seq = out[0, : len(ex.prompt) + len(ex.answer) - 1]
        with torch.no_grad():
            attentions = model(seq[None], output_attentions=True).attentions
        start, total = len(ex.prompt), ex.context_len
        key = ex.prompt[-1]
        slots = [start - 1] + [start + i for i, t in enumerate(seq[start:].tolist()) if t == key][: MULTI_VALUES - 1]
        kinds = token_kinds(ex.prompt[:total])
        mv = torch.tensor([k == "mv value" for k in kinds])
        for layer in range(layers):
            a = attentions[layer][0][:, slots, :total].float()            # (Hq, slots, T)
            per_head = a[:, :, mv].sum(-1).mean(1)                        # (Hq,)
            slot_mass[layer] += torch.stack([per_head.mean(), per_head.max()])
            for name in runs:
                keep = kept[name][e_idx][0][layer].repeat_interleave(model.config.num_attention_heads // heads, 0)
                kept_share[name][layer] += float((a * keep[:, None, :]).sum() / a.sum())
                mv_kept_share[name][layer] += float((a[:, :, mv] * keep[:, None, mv]).sum() / a[:, :, mv].sum())
        count += 1
    print(f"    (full cache answers {int(correct)} of {count})")
    for layer in range(layers):
        m = slot_mass[layer] / count
        shares = "  ".join(f"{name} {float(kept_share[name][layer]) / count:.2f} (mv values "
                           f"{float(mv_kept_share[name][layer]) / count:.2f})" for name in runs)
        print(f"  L{layer}: mv values {m[0]:.2f} (max head {m[1]:.2f}) | kept: {shares}")

    # 4. why: the repeat pass at the copies of the mv values, and the oracle's scores per kind
    print("\n[4] repeat pass [context, <repeat>, context], at the copy position whose next token is a context "
          "value (full-sequence softmax, per layer: mean over query heads):\n    attention on that value | on "
          "all values of its key; copy accuracy")
    stats = {kind: {"right": torch.zeros(layers), "group": torch.zeros(layers), "ok": 0, "n": 0}
             for kind in ("mv value", "value")}
    for ex in examples:
        ctx = ex.prompt[: ex.context_len]
        total = len(ctx)
        kinds = token_kinds(ctx)
        seq = torch.tensor([ctx + [VOCAB.repeat] + ctx])
        with torch.no_grad():
            out = model(seq, output_attentions=True)
        pred = out.logits[0].argmax(-1)
        for p, kind in enumerate(kinds):
            if kind not in stats:
                continue
            same_key = [i for i in range(1, total) if kinds[i] == kind and ctx[i - 1] == ctx[p - 1]]
            t = total + p          # query position of the copied ctx[p-1], whose next token is ctx[p]
            st = stats[kind]
            for layer in range(layers):
                a = out.attentions[layer][0, :, t].float()
                st["right"][layer] += float(a[:, p].mean())
                st["group"][layer] += float(a[:, same_key].sum(-1).mean())
            st["ok"] += int(pred[t] == ctx[p])
            st["n"] += 1
    for kind, st in stats.items():
        row = "  ".join(f"L{layer} {float(st['right'][layer]) / st['n']:.2f} | "
                        f"{float(st['group'][layer]) / st['n']:.2f}" for layer in range(layers))
        print(f"  {kind:<8} ({st['n']:3d}): {row};  copied right {st['ok']} of {st['n']}")
    plain = {}
    for ex_i, ex in enumerate(examples):
        p = Probe(_testbed_oracle(**KVZIP, normalization=False))
        plain[ex_i] = prefill_record(model, tokenizer, p, ex)[0]
    print("  oracle log scores, median per kind (all heads) per layer: KVzip+ [plain KVzip, no normalisation]; and "
          "the model-scope cut (lowest kept score, median over examples)")
    for layer in range(layers):
        row = []
        for kind in KINDS:
            vals, pvals = [], []
            for ex_i, (_, kinds) in enumerate(kept["KVzip+"]):
                idx = [i for i, k in enumerate(kinds) if k == kind]
                vals += recorded["KVzip+"][ex_i][layer][:, idx].flatten().tolist()
                pvals += plain[ex_i][layer][:, idx].flatten().tolist()
            row.append(f"{kind} {statistics.median(vals):5.2f} [{statistics.median(pvals):5.2f}]" if vals else "")
        print(f"  L{layer}: " + "  ".join(row))
    row = []
    for kind in KINDS:
        vals = []
        for ex_i, (_, kinds) in enumerate(kept["KVzap-MLP"]):
            vals += recorded["KVzap-MLP"][ex_i][1][:, [i for i, k in enumerate(kinds) if k == kind]].flatten().tolist()
        row.append(f"{kind} {statistics.median(vals):5.2f}" if vals else "")
    print("  KVzap-MLP's prediction of the same, L1: " + "  ".join(row))
    cuts = []
    for ex_i, (keep, _) in enumerate(kept["KVzip+"]):
        stacked = torch.stack([recorded["KVzip+"][ex_i][layer] for layer in range(layers)])
        cuts.append(float(stacked[:, :, :-KVZIP["window"]][keep[:, :, :-KVZIP["window"]]].min()))
    print(f"  model-scope cut at ratio {KVZIP['ratio']}: median {statistics.median(cuts):.2f} "
          f"(range {min(cuts):.2f} .. {max(cuts):.2f})")
    below = []
    for ex_i, (_, kinds) in enumerate(kept["KVzip+"]):
        s1 = recorded["KVzip+"][ex_i][1]
        fill = s1[:, [i for i, k in enumerate(kinds) if k == "filler"]]
        for i, k in enumerate(kinds):
            if k == "mv value":
                below.append(float((fill > s1[:, i:i + 1]).float().mean()))
    print(f"  layer 1: share of filler entries (same head) that the oracle scores above an mv value: mean "
          f"{_mean(below):.2f}, min {min(below):.2f}")
    print(f"  ({time.perf_counter() - t0:.0f} s so far)")
    if not accuracy:
        return

    # 5. accuracy of variations
    variants = [
        ("KVzip+ ratio 0.67 scope model (as compared)", lambda: _testbed_oracle(**KVZIP)),
        ("KVzip+ ratio 0.6 scope model", lambda: _testbed_oracle(**{**KVZIP, "ratio": 0.6})),
        ("KVzip+ ratio 0.5 scope model", lambda: _testbed_oracle(**{**KVZIP, "ratio": 0.5})),
        ("KVzip+ ratio 0.67 scope layer", lambda: _testbed_oracle(**{**KVZIP, "scope": "layer"})),
        ("KVzip+ ratio 0.67 scope head", lambda: _testbed_oracle(**{**KVZIP, "scope": "head"})),
        ("KVzip+ 0.67 model, score_queries=chunk", lambda: _testbed_oracle(**KVZIP, score_queries="chunk")),
        ("KVzip+ 0.67 model, no normalisation (KVzip)", lambda: _testbed_oracle(**KVZIP, normalization=False)),
        ("KVzip+ 0.67 model, chunk_size 128", lambda: _testbed_oracle(**KVZIP, chunk_size=128)),
        ("KVzip+ 0.67 model, no repeat prompt", lambda: _testbed_oracle(**KVZIP, repeat_prompt_ids=[])),
        ("KVzip+ 0.67 model, prompt <repeat> <repeat>",
         lambda: _testbed_oracle(**KVZIP, repeat_prompt_ids=[VOCAB.repeat, VOCAB.repeat])),
        ("KVzip+ 0.67 model, text prompt (<unk> x5)",
         lambda: _testbed_oracle(**KVZIP, repeat_prompt_ids=None, prompt_suffix_ids=None)),
        ("KVzip+ 0.67 model, mv values pinned in L1", lambda: Probe(_testbed_oracle(**KVZIP), {"mv value": math.inf},
                                                                    layers=(1,))),
        ("KVzip+ 0.67 model, sum over queries", lambda: SumOracle(SumOracle.config_class(
            **KVZIP, repeat_prompt_ids=[VOCAB.repeat], prompt_suffix_ids=[]))),
        ("KVzap-MLP -0.25 (as compared)", lambda: _kvzap(**KVZAP)),
        ("KVzap-MLP ratio 0.67 scope model", lambda: _kvzap(**KVZIP)),
        ("KVzap-MLP -0.25, mv values dropped in L1", lambda: Probe(_kvzap(**KVZAP), {"mv value": -math.inf},
                                                                   layers=(1,))),
    ]
    print(f"\n[5] exact match on multi_value (n = {n} per length, EVAL_SEED), achieved compression (per layer), "
          f"the share of the mv values' layer-1 entries kept after the prefill, and per length the medians over "
          f"examples of the layer-1 median log score of the mv values and of the filler and of the lowest kept score "
          f"outside the window (the cut)")
    for label, make in variants:
        start = time.perf_counter()
        policy = make()
        probe = policy if isinstance(policy, Probe) else Probe(policy)
        result = evaluate_policy(model, tokenizer, probe, {}, tasks=["multi_value"], lengths=lengths, n=n)
        mv_kept, medians = {}, {}
        for ex in examples:
            scores, keep, _ = prefill_record(model, tokenizer, probe, ex)
            kinds = token_kinds(ex.prompt[: ex.context_len])
            cols = [i for i, k in enumerate(kinds) if k == "mv value"]
            mv_kept.setdefault(ex.context_len, []).append(float(keep[1][:, cols].float().mean()))
            judged = keep[:, :, : -probe.config.window]
            stacked = torch.stack([scores[layer] for layer in range(layers)])[:, :, : -probe.config.window]
            cut = float(stacked[judged].min()) if bool((~judged).any()) else float("nan")
            fill = scores[1][:, [i for i, k in enumerate(kinds) if k == "filler"]]
            medians.setdefault(ex.context_len, []).append(
                (float(scores[1][:, cols].median()), float(fill.median()), cut))
        cells = "  ".join(f"{length}: {round(result.scores['multi_value'][length] * n):2d}/{n}" for length in lengths)
        kept_mv = " / ".join(f"{_mean(mv_kept[length]):.2f}" for length in lengths)
        med = " / ".join("{:.2f} {:.2f} {:.2f}".format(*(statistics.median(x[j] for x in medians[length])
                                                         for j in range(3))) for length in lengths)
        print(f"  {label:<46} {cells}  compression {result.compression:.3f} "
              f"({' / '.join(f'{c:.2f}' for c in result.per_layer_compression)})  L1 mv kept {kept_mv}  "
              f"L1 mv value, filler, cut {med}  ({time.perf_counter() - start:.0f} s)", flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("--model", default=str(MODEL_DIR))
    parser.add_argument("--kvzip", action="store_true", help="the KVzip+ probe instead of the value-slot probe")
    parser.add_argument("--fast", action="store_true",
                        help="--kvzip: 3 examples at 512 tokens, no accuracy sweep (about 10 s)")
    parser.add_argument("--no-accuracy", action="store_true", help="--kvzip: skip the accuracy sweep [5]")
    parser.add_argument("--length", type=int, default=256, help="value-slot probe: context length")
    parser.add_argument("--lengths", type=int, nargs="+", default=None,
                        help="--kvzip: context lengths (default 512 1024; 512 with --fast)")
    parser.add_argument("-n", type=int, default=None,
                        help="examples per length (default: 20 for the value slots, 10 for --kvzip, 3 with --fast)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    from transformers import AutoTokenizer, Qwen3ForCausalLM

    torch.set_num_threads(args.threads)
    model = Qwen3ForCausalLM.from_pretrained(args.model, attn_implementation="eager", local_files_only=True).eval()
    if not args.kvzip:
        print_slots(model, args.length, args.n or 20)
        return
    tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    lengths = args.lengths or ([512] if args.fast else [512, 1024])
    n = args.n or (3 if args.fast else 10)
    kvzip_probe(model, tokenizer, lengths, n, accuracy=not (args.fast or args.no_accuracy))


if __name__ == "__main__":
    main()
