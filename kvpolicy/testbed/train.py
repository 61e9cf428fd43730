"""Train the testbed model: ``python -m kvpolicy.testbed.train --out DIR --seed 0``.

Recipe (see docs/testbed.md): dense supervision of every answer token of many questions per context
(multi-query associative recall) and of whole copied segments (repeat task), a length curriculum that
moves on once the running accuracy of answers and copies passes a bar (or a step cap is hit), a high
learning rate with warm-up, and a final phase mixing 256 to 2048 tokens. Deterministic for a given seed on CPU
(data from seeded generators, phase changes decided by step counts and training accuracy).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from kvpolicy.testbed.tasks import training_sequence
from kvpolicy.testbed.tokenizer import VOCAB, save_tokenizer

QK_NORM_INIT = 1.0
QK_GAIN_LR = 10.0
MAX_TARGETS = 4   # most allowed tokens at one position (multi_value sets)


@dataclass(frozen=True)
class Phase:
    length: int      # training sequence length in tokens
    batch: int       # sequences per step
    min_steps: int
    max_steps: int
    bar: float       # move on when the running accuracy of answers and of copies passes this (after min_steps)
    # (divisor, weight) pairs: each step draws length / divisor tokens, batch * divisor sequences (the same
    # tokens per step); empty = every step at ``length``
    mix: tuple[tuple[int, int], ...] = ()

    def step_shape(self, rng: random.Random) -> tuple[int, int]:
        """(sequence length, batch) of the next step."""
        if not self.mix:
            return self.length, self.batch
        div = rng.choices([d for d, _ in self.mix], weights=[w for _, w in self.mix])[0]
        return self.length // div, self.batch * div


CURRICULUM = (
    Phase(length=48, batch=64, min_steps=250, max_steps=600, bar=0.9),
    Phase(length=256, batch=12, min_steps=100, max_steps=1500, bar=0.9),
    Phase(length=1024, batch=3, min_steps=100, max_steps=400, bar=0.9),
    # the last phase keeps every trained length (256 to 2048) in the mix, 2048 twice as often
    Phase(length=2048, batch=2, min_steps=3000, max_steps=3000, bar=1.01, mix=((8, 1), (4, 1), (2, 1), (1, 2))),
)
ANSWER_KINDS = ("value", "set", "hop", "restate")


def collate(seqs, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to ``length``: ids (B, length) and targets (B, length, MAX_TARGETS), -1 = none."""
    ids = torch.full((len(seqs), length), VOCAB.pad, dtype=torch.long)
    targets = torch.full((len(seqs), length, MAX_TARGETS), -1, dtype=torch.long)
    for b, seq in enumerate(seqs):
        n = min(length, len(seq.tokens))
        ids[b, :n] = torch.tensor(seq.tokens[:n])
        for t in range(n):
            allowed = seq.targets[t]
            if allowed:
                targets[b, t, : len(allowed)] = torch.tensor(allowed[:MAX_TARGETS])
    return ids, targets


def set_loss(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Negative log-probability of the allowed set at each supervised position.

    logits (B, T, V); targets (B, T, S) with -1 padding. Returns (mean loss, per-position correct (N,) bool,
    supervised mask (B, T)). A position is correct when its argmax is in the allowed set.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    valid = targets >= 0
    picked = logp.gather(-1, targets.clamp(min=0)).masked_fill(~valid, float("-inf"))
    set_logp = picked.logsumexp(-1)                     # (B, T)
    supervised = valid.any(-1)
    loss = -set_logp[supervised].mean()
    argmax = logits.argmax(-1, keepdim=True)            # (B, T, 1)
    correct = ((targets == argmax) & valid).any(-1)[supervised]
    return loss, correct, supervised


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(out: Path, seed: int, curriculum=CURRICULUM, peak_lr: float = 3e-3, warmup: int = 100,
          threads: int = 2, log_every: int = 25, checkpoint_every: int = 50, **arch) -> dict:
    from tqdm import tqdm
    from transformers import Qwen3ForCausalLM

    from kvpolicy.testbed.model import make_config

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = random.Random(f"kvpolicy-testbed/train/{seed}")
    model = Qwen3ForCausalLM._from_config(make_config(**arch), attn_implementation="sdpa")
    # Qwen3 RMS-normalises q and k per head, so with unit norm gains an attention logit is at most
    # sqrt(head_dim) ~ 5.7: too flat to single out one token among thousands, and the gains grow slowly.
    # Their learning rate is QK_GAIN_LR times the base rate so retrieval heads can become sharp early
    # (starting them large instead, e.g. 2.0, slowed the first phase down in a probe).
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                param.fill_(QK_NORM_INIT)
    model.train()
    qk_gain = ("q_norm.weight", "k_norm.weight")
    params = list(model.named_parameters())
    groups = [
        {"params": [p for n, p in params if p.dim() >= 2], "weight_decay": 0.01, "lr_scale": 1.0},
        {"params": [p for n, p in params if p.dim() < 2 and not n.endswith(qk_gain)], "weight_decay": 0.0,
         "lr_scale": 1.0},
        # The q/k norm gains set how sharp attention can be; let them grow fast (see QK_NORM_INIT).
        {"params": [p for n, p in params if n.endswith(qk_gain)], "weight_decay": 0.0, "lr_scale": QK_GAIN_LR},
    ]
    opt = torch.optim.AdamW(groups, lr=peak_lr, betas=(0.9, 0.98), eps=1e-8)
    total_cap = sum(p.max_steps for p in curriculum)
    out.mkdir(parents=True, exist_ok=True)
    history, step, start = [], 0, time.perf_counter()
    per_kind: dict[str, list[bool]] = {}
    phases: list[dict] = []
    bar = tqdm(total=total_cap, desc="train", unit="step", dynamic_ncols=True)
    for phase_idx, phase in enumerate(curriculum):
        recent: list[tuple[int, int, int, int]] = []   # per step: answers right/all, copies right/all
        for phase_step in range(phase.max_steps):
            lr = lr_at(step, total_cap, peak_lr, warmup)
            for group in opt.param_groups:
                group["lr"] = lr * group["lr_scale"]
            length, batch = phase.step_shape(rng)
            seqs = [training_sequence(rng, length) for _ in range(batch)]
            ids, targets = collate(seqs, length)
            logits = model(input_ids=ids).logits
            loss, correct, _ = set_loss(logits, targets)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            kinds = [k for seq in seqs for k in seq.kinds[:length] if k]
            tally = [0, 0, 0, 0]
            for kind, ok in zip(kinds, correct.tolist()):
                per_kind.setdefault(kind, []).append(ok)
                if kind in ANSWER_KINDS:
                    tally[0] += ok
                    tally[1] += 1
                elif kind == "copy":
                    tally[2] += ok
                    tally[3] += 1
            recent = (recent + [tuple(tally)])[-30:]
            answer_acc = sum(r[0] for r in recent) / max(1, sum(r[1] for r in recent))
            copy_acc = sum(r[2] for r in recent) / max(1, sum(r[3] for r in recent))
            bar.update(1)
            bar.set_postfix(len=length, loss=f"{loss.item():.3f}", answers=f"{answer_acc:.3f}",
                            copy=f"{copy_acc:.3f}", lr=f"{lr:.1e}")
            if step % log_every == 0:
                kind_acc = {k: round(sum(v) / len(v), 3) for k, v in sorted(per_kind.items())}
                per_kind.clear()
                history.append(dict(step=step, phase=phase_idx, length=phase.length, loss=round(loss.item(), 4),
                                    answer_acc=round(answer_acc, 4), copy_acc=round(copy_acc, 4),
                                    seconds=round(time.perf_counter() - start, 1), by_kind=kind_acc))
                bar.write(f"step {step} len {phase.length} loss {loss.item():.3f} {kind_acc}")
            if step % checkpoint_every == 0:
                save(model, out)   # the latest weights are always on disk
            if (phase_step + 1 >= phase.min_steps and len(recent) == 30
                    and min(answer_acc, copy_acc) >= phase.bar):
                break
        bar.write(f"phase {phase_idx} (length {phase.length}) done at step {step}: answers {answer_acc:.3f} "
                  f"copy {copy_acc:.3f}, "
                  f"{time.perf_counter() - start:.0f}s")
        phases.append(dict(phase=phase_idx, length=phase.length, end_step=step, answer_acc=round(answer_acc, 4),
                           copy_acc=round(copy_acc, 4), seconds=round(time.perf_counter() - start, 1)))
        save(model, out)
    bar.close()
    info = dict(seed=seed, steps=step, seconds=round(time.perf_counter() - start, 1),
                curriculum=[asdict(p) for p in curriculum], peak_lr=peak_lr, warmup=warmup, threads=threads,
                torch=torch.__version__, phases=phases, history=history)
    (out / "training_log.json").write_text(json.dumps(info, indent=1))
    return info


def save(model, out: Path) -> None:
    model.save_pretrained(str(out), safe_serialization=True)
    save_tokenizer(out)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for model, config and tokenizer")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every phase's step counts (probes)")
    parser.add_argument("--phases", type=int, default=None, help="run only the first N phases (probes)")
    parser.add_argument("--layers", type=int, default=None, help="override the number of layers (probes)")
    args = parser.parse_args(argv)
    curriculum = tuple(replace(p, min_steps=max(1, int(p.min_steps * args.scale)),
                               max_steps=max(1, int(p.max_steps * args.scale))) for p in CURRICULUM)[:args.phases]
    arch = {} if args.layers is None else {"num_hidden_layers": args.layers}
    info = train(args.out, args.seed, curriculum, peak_lr=args.lr, threads=args.threads, **arch)
    print(f"trained {info['steps']} steps in {info['seconds']:.0f}s -> {args.out}")


if __name__ == "__main__":
    main()
