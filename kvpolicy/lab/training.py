"""Training data for KVzap surrogates: KVzip+ oracle targets paired with hidden states.

For each training prompt, the oracle (``kvzip_plus`` by default, full-sequence softmax) scores every context
token per (layer, kv_head); the attention-layer inputs (after the input norm) of the same tokens are
captured by a plain forward. ``positions_per_prompt`` positions are sampled per prompt (seeded).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from kvpolicy.policy import OraclePolicy


@dataclass
class SurrogateDataset:
    """Per-layer regression data. ``inputs[l]``: ``(N, hidden)``; ``targets[l]``: ``(N, kv_heads)`` log
    scores; ``prompt_index``: ``(N,)`` which prompt each row came from (for held-out splits)."""

    inputs: list[torch.Tensor]
    targets: list[torch.Tensor]
    prompt_index: torch.Tensor

    @property
    def num_layers(self) -> int:
        return len(self.inputs)

    def split_by_prompt(self, held_out: set[int]) -> tuple[SurrogateDataset, SurrogateDataset]:
        mask = torch.tensor([int(p) in held_out for p in self.prompt_index])
        take = lambda m: SurrogateDataset([x[m] for x in self.inputs], [y[m] for y in self.targets],  # noqa: E731
                                          self.prompt_index[m])
        return take(~mask), take(mask)


def collect_oracle_targets(
    model,
    prompts: Sequence[torch.Tensor],
    oracle: OraclePolicy,
    *,
    positions_per_prompt: int = 500,
    tokenizer=None,
    seed: int = 0,
    progress: bool = True,
) -> SurrogateDataset:
    """Score ``prompts`` (each ``(1, T)`` token ids) with ``oracle`` and pair targets with hidden states."""
    from kvpolicy.adapters.hf import PolicySession
    from kvpolicy.adapters.hf.capture import capture_attention_inputs

    gen = torch.Generator().manual_seed(seed)
    session = PolicySession(model, oracle, tokenizer=tokenizer)
    per_layer_x: list[list[torch.Tensor]] | None = None
    per_layer_y: list[list[torch.Tensor]] = []
    prompt_rows = []
    for index, ids in enumerate(tqdm(prompts, desc="oracle scoring", disable=not progress)):
        if ids.dim() != 2 or ids.shape[0] != 1:
            raise ValueError(f"prompt {index}: expected token ids of shape (1, T), got {tuple(ids.shape)}")
        hidden = capture_attention_inputs(model, ids)
        with session:
            scores = oracle.compute_scores(session.oracle_runner(), ids)
        tokens = ids.shape[1]
        pick = torch.randperm(tokens, generator=gen)[: min(positions_per_prompt, tokens)]
        if per_layer_x is None:
            per_layer_x = [[] for _ in hidden]
            per_layer_y = [[] for _ in hidden]
        for layer, h in enumerate(hidden):
            per_layer_x[layer].append(h[pick])
            per_layer_y[layer].append(scores[layer][0, :, pick].T.float())
        prompt_rows.append(torch.full((len(pick),), index, dtype=torch.long))
    if per_layer_x is None:
        raise ValueError("no prompts given")
    return SurrogateDataset(
        inputs=[torch.cat(xs) for xs in per_layer_x],
        targets=[torch.cat(ys) for ys in per_layer_y],
        prompt_index=torch.cat(prompt_rows),
    )
