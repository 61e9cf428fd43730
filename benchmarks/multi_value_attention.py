"""Where the testbed looks when it answers multi_value: a diagnosis, not a benchmark.

For each value slot of the model's own greedy answer (slot 1 follows the query key, slots 2-4 follow the
re-stated key), the attention mass of every (layer, head) on three groups of tokens:

* the context values of the asked key that the answer has not given yet,
* the context values it has given already,
* the values in the answer itself (given already).

    python benchmarks/multi_value_attention.py [--model DIR] [--length 256] [-n 20]

Results and what they mean: docs/testbed.md ("multi_value in detail").
"""

from __future__ import annotations

import argparse

import torch

from kvpolicy.lab.testbed import MODEL_DIR
from kvpolicy.lab.testbed.tasks import MULTI_VALUES, generate

GROUPS = ("context, not given yet", "context, given", "answer (given)")


def slot_attention(model, length: int, n: int, seed: int = 1234) -> dict[int, torch.Tensor]:
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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(MODEL_DIR))
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("-n", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    from transformers import Qwen3ForCausalLM

    torch.set_num_threads(args.threads)
    model = Qwen3ForCausalLM.from_pretrained(args.model, attn_implementation="eager", local_files_only=True).eval()
    print(f"attention mass per head: {' / '.join(GROUPS)}")
    for slot, mass in slot_attention(model, args.length, args.n).items():
        print(f"value slot {slot}:")
        for layer, heads in enumerate(mass):
            print(f"  layer {layer}: " + "  ".join("/".join(f"{x:.2f}" for x in h) for h in heads.tolist()))


if __name__ == "__main__":
    main()
