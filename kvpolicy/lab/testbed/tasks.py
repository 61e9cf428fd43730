"""Seeded, deterministic task generators of the testbed (RULER-style retrieval + the KVzip repeat task).

Every example is a haystack of filler words with *needles* inserted at random depths, then a question.
Needles are ``key value .`` (a key bound to a value) or ``key key' .`` (a variable assigned from another
variable). A question is ``<q> key``; the answer ends with ``<eos>``:

* ``single_needle``      one needle, ask its key -> ``value``
* ``multi_key``          four needles with distinct keys (three distractors), ask one -> ``value``
* ``multi_value``        one key bound to four values at four depths (plus two distractor needles)
                         -> the four values; scored as a set, like RULER's multi-value
* ``variable_tracking``  a chain ``kA v .`` … ``kB kA .`` … ``kC kB .`` (each assignment after the one it
                         uses) plus a distractor chain; ask the last variable -> ``kB kA v`` (the hops)
* ``repeat``             the context, ``<repeat>``, then an 8-token anchor copied from a random depth of the
                         context -> the next 16 context tokens (KVzip's "repeat the part starting with …")

Filler is sampled so that no bigram occurs twice in a context: copying is then well posed for a model that
matches on the previous token. Lengths are context lengths in tokens (``<bos>`` and the needles included,
the question excluded). The same (task, length, seed, index) always gives the same example.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from kvpolicy.lab.testbed.tokenizer import VOCAB

TASKS = ("single_needle", "multi_key", "multi_value", "variable_tracking", "repeat")
ANCHOR, COPY = 8, 16          # repeat task: anchor tokens given, tokens to reproduce
MULTI_VALUES = 4              # values per key in multi_value
MAX_GROUP_VALUES = 8          # most values a training multi_value group may bind (Phase.mv_max)
CHAIN_HOPS = 3                # assignments in a variable-tracking chain (value + 2 hops)
# shares of the needle groups of a training context: (single key-value, multi_value, variable chain)
GROUP_MIX = (0.45, 0.30, 0.25)
# shares of the training sequences that are the repeat task and the auxiliary shift task (the rest: questions)
REPEAT_PROB = 0.3
SHIFT_PROB = 0.1


@dataclass(frozen=True)
class Example:
    """One prompt and its expected continuation (token ids).

    ``prompt`` starts with ``<bos>``; ``answer`` is what a correct model generates greedily and ends with
    ``<eos>`` except for ``repeat`` (fixed-length copy). ``unordered`` marks answers scored as a set.
    ``needle_positions`` are the prompt indices of the needle tokens the answer depends on.
    """

    task: str
    prompt: list[int]
    answer: list[int]
    context_len: int
    unordered: bool = False
    needle_positions: tuple[int, ...] = field(default=())


def example_rng(task: str, length: int, seed: int, index: int) -> random.Random:
    # str seeds are hashed with SHA-512 by random.Random: stable across processes and platforms.
    return random.Random(f"kvpolicy-testbed/{task}/{length}/{seed}/{index}")


class _Haystack:
    """Builds a context of exactly ``length`` tokens: filler with needles at random depths."""

    def __init__(self, rng: random.Random, length: int) -> None:
        self.rng = rng
        self.length = length
        self.needles: list[list[int]] = []
        self.chains: list[list[int]] = []   # indices into needles that must appear in this order

    def add(self, tokens: list[int]) -> int:
        self.needles.append(tokens)
        return len(self.needles) - 1

    def build(self) -> tuple[list[int], list[int]]:
        """Return (tokens, start index of each needle)."""
        rng = self.rng
        n_needle_tokens = sum(len(n) for n in self.needles)
        n_filler = self.length - 1 - n_needle_tokens
        if n_filler < len(self.needles):
            raise ValueError(f"context length {self.length} too short for {len(self.needles)} needles")
        # Needle i goes after filler word slots[i]; distinct slots keep needles apart.
        slots = sorted(rng.sample(range(n_filler), len(self.needles)))
        order = list(range(len(self.needles)))
        rng.shuffle(order)
        for chain in self.chains:   # dependency order: the chain's needles take its slots in sorted order
            taken = sorted(order.index(n) for n in chain)
            for pos, needle in zip(taken, chain):
                order[pos] = needle
        at_slot = dict(zip(slots, order))
        tokens, starts = [VOCAB.bos], [0] * len(self.needles)
        seen: set[tuple[int, int]] = set()
        filler = VOCAB.filler
        for i in range(n_filler):
            prev = tokens[-1]
            word = rng.choice(filler)
            for _ in range(20):
                if (prev, word) not in seen:
                    break
                word = rng.choice(filler)
            seen.add((prev, word))
            tokens.append(word)
            needle = at_slot.get(i)
            if needle is not None:
                starts[needle] = len(tokens)
                for tok in self.needles[needle]:
                    seen.add((tokens[-1], tok))
                    tokens.append(tok)
        assert len(tokens) == self.length
        return tokens, starts


def _room(used: set[int], keys: int, values: int) -> bool:
    """Whether ``keys`` keys and ``values`` values not in ``used`` are left (a long dense context can use up
    the 128 values; checked just before the picks, so it changes nothing in a stream that never ran out)."""
    return (sum(t not in used for t in VOCAB.keys) >= keys
            and sum(t not in used for t in VOCAB.values) >= values)


def _pick(rng: random.Random, pool: list[int], k: int, used: set[int]) -> list[int]:
    out = rng.sample([t for t in pool if t not in used], k)
    used.update(out)
    return out


def generate(task: str, length: int, seed: int, index: int) -> Example:
    """The ``index``-th example of ``task`` at context ``length`` for ``seed`` (deterministic)."""
    rng = example_rng(task, length, seed, index)
    hay = _Haystack(rng, length)
    used: set[int] = set()
    dot = VOCAB.dot
    unordered = False
    if task == "single_needle":
        (key,), (value,) = _pick(rng, VOCAB.keys, 1, used), _pick(rng, VOCAB.values, 1, used)
        target = [hay.add([key, value, dot])]
        query, answer = key, [value]
    elif task == "multi_key":
        keys, values = _pick(rng, VOCAB.keys, 4, used), _pick(rng, VOCAB.values, 4, used)
        ids = [hay.add([k, v, dot]) for k, v in zip(keys, values)]
        j = rng.randrange(4)
        target, query, answer = [ids[j]], keys[j], [values[j]]
    elif task == "multi_value":
        keys, values = _pick(rng, VOCAB.keys, 3, used), _pick(rng, VOCAB.values, MULTI_VALUES + 2, used)
        target = [hay.add([keys[0], v, dot]) for v in values[:MULTI_VALUES]]
        for k, v in zip(keys[1:], values[MULTI_VALUES:]):
            hay.add([k, v, dot])
        query, unordered = keys[0], True
        answer = None   # the values with the key re-stated between them, known after build()
    elif task == "variable_tracking":
        chains = []
        for _ in range(2):
            keys, (value,) = _pick(rng, VOCAB.keys, CHAIN_HOPS, used), _pick(rng, VOCAB.values, 1, used)
            chain = [hay.add([keys[0], value, dot])]
            chain += [hay.add([keys[i], keys[i - 1], dot]) for i in range(1, CHAIN_HOPS)]
            hay.chains.append(chain)
            chains.append((keys, value, chain))
        keys, value, target = chains[0]
        query, answer = keys[-1], [*reversed(keys[:-1]), value]
    elif task == "repeat":
        keys, values = _pick(rng, VOCAB.keys, 4, used), _pick(rng, VOCAB.values, 4, used)
        for k, v in zip(keys, values):
            hay.add([k, v, dot])
        context, _ = hay.build()
        start = rng.randrange(1, length - ANCHOR - COPY + 1)
        prompt = context + [VOCAB.repeat] + context[start:start + ANCHOR]
        answer = context[start + ANCHOR:start + ANCHOR + COPY]
        span = tuple(range(start, start + ANCHOR + COPY))
        return Example(task, prompt, answer, length, False, span)
    else:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    context, starts = hay.build()
    if answer is None:
        answer = restated_values(query, [hay.needles[n][1] for n in sorted(target, key=starts.__getitem__)])
    positions = tuple(p for n in target for p in range(starts[n], starts[n] + 3))
    return Example(task, context + [VOCAB.question, query], [*answer, VOCAB.eos], length, unordered, positions)


def restated_values(key: int, values: list[int]) -> list[int]:
    """The multi-value answer protocol: ``v1 key v2 key v3 …`` (the key re-stated before every further value).

    Re-stating the key makes each further value a lookup by the token just emitted, the way the model answers
    every other task; which value comes next is free (scored as a set), but none may repeat.
    """
    out: list[int] = []
    for i, v in enumerate(values):
        out += [v] if i == 0 else [key, v]
    return out


def generate_set(task: str, length: int, seed: int, n: int) -> list[Example]:
    return [generate(task, length, seed, i) for i in range(n)]


# ----------------------------------------------------------------------------------------------------
# Training sequences: dense supervision (many queries per context, the whole copied segment).


@dataclass
class TrainSequence:
    """``tokens`` and, per position t, the set of allowed next tokens ``targets[t]`` (empty = no loss)."""

    tokens: list[int]
    targets: list[tuple[int, ...]]
    kinds: list[str] | None = None   # per supervised position: copy / value / set / hop / eos (diagnostics)
    # per position, tokens that must not come next: at a multi_value slot, the values already given
    # (an optional unlikelihood loss uses them; None = none anywhere)
    forbid: list[tuple[int, ...]] | None = None


def check_mix(groups: tuple[float, float, float], mv_min: int, repeat_prob: float,
              shift_prob: float = SHIFT_PROB, mv_max: int = MULTI_VALUES) -> None:
    """Refuse a bad mix of training data: needle-group shares that are not three non-negative shares summing to
    1, a bad ``mv_min`` / ``mv_max``, or a repeat share that is not a probability leaving room for the shift
    share."""
    if len(groups) != 3 or min(groups) < 0 or abs(sum(groups) - 1) > 1e-9:
        raise ValueError(f"groups must be three shares (single, multi_value, chain) summing to 1, got {groups}")
    if isinstance(mv_max, bool) or not isinstance(mv_max, int) or not MULTI_VALUES <= mv_max <= MAX_GROUP_VALUES:
        raise ValueError(f"mv_max must be a whole number in {MULTI_VALUES}..{MAX_GROUP_VALUES} (a training group binds "
                         f"at least as many values as the evaluated {MULTI_VALUES}), got {mv_max!r}")
    if not 1 <= mv_min <= mv_max:
        raise ValueError(f"mv_min must be in 1..{mv_max} (mv_max), got {mv_min}")
    if not 0 <= repeat_prob <= 1 - shift_prob:   # also refuses NaN
        raise ValueError(f"repeat_prob must be in [0, {1 - shift_prob:g}] (1 - the shift share {shift_prob:g}), "
                         f"got {repeat_prob!r}")


def training_sequence(rng: random.Random, length: int, repeat_prob: float = REPEAT_PROB,
                      shift_prob: float = SHIFT_PROB, sparse_prob: float = 0.4,
                      groups: tuple[float, float, float] = GROUP_MIX, mv_min: int = 2,
                      mv_max: int = MULTI_VALUES) -> TrainSequence:
    """One training sequence of about ``length`` tokens.

    Either a context followed by a block of questions, one per needle group (multi-query associative recall,
    every answer token supervised), or a context, ``<repeat>`` and a copy from a random depth (every copied
    token supervised except the first, which the model cannot know). From 256 tokens on, contexts are as long
    as the evaluation contexts of that length minus a short block of questions or copy (at most 96 / 128
    tokens). Needles take 5-40% of a dense context; a sparse context (``sparse_prob``) holds 1-6 needle
    groups, like the evaluation sets. ``groups`` are the shares of single, multi_value and chain needle
    groups; a multi_value group binds ``mv_min`` to ``mv_max`` values to its key.
    """
    check_mix(groups, mv_min, repeat_prob, shift_prob, mv_max)
    draw = rng.random()
    if draw < shift_prob:
        # Auxiliary: "<bos> <shift> x1 x2 …", the target at x_t is x_{t-1}. Solving it needs exactly a
        # previous-token head, the first half of an induction circuit; without it a probe had no such head
        # after 250 steps and retrieval sat at "some value from the context".
        pool = VOCAB.filler + VOCAB.keys + VOCAB.values
        tokens = [VOCAB.bos, VOCAB.shift] + [rng.choice(pool) for _ in range(length - 2)]
        targets = [()] * 2 + [(tokens[t - 1],) for t in range(2, length)]
        return TrainSequence(tokens, targets, [""] * 2 + ["shift"] * (length - 2))
    if draw < shift_prob + repeat_prob:
        copy_len = min(length // 2, 128)
        ctx_len = max(16, length - 1 - copy_len)
        hay = _Haystack(rng, ctx_len)
        used: set[int] = set()
        for _ in range(max(1, ctx_len // 48) if rng.random() >= sparse_prob else rng.randint(1, 4)):
            k, v = _pick(rng, VOCAB.keys, 1, used) + _pick(rng, VOCAB.values, 1, used)
            hay.add([k, v, VOCAB.dot])
        context, _ = hay.build()
        # Copy from a random depth: always from the start lets the model copy by position (offset from
        # <repeat>) instead of by content, which a probe did (72% copy accuracy, no retrieval).
        start = rng.randrange(1, ctx_len - 4)
        copy = context[start:start + copy_len]
        tokens = context + [VOCAB.repeat] + copy
        targets: list[tuple[int, ...]] = [()] * len(tokens)
        first = len(context) + 1          # index of copy[0], which the model cannot know
        for i in range(first, len(tokens) - 1):
            targets[i] = (tokens[i + 1],)
        return TrainSequence(tokens, targets, ["copy" if t else "" for t in targets])

    ctx_len = max(24, length - min(96, int(length * 0.4)))
    hay = _Haystack(rng, ctx_len)
    used = set()
    dot = VOCAB.dot
    if rng.random() < sparse_prob:
        budget, max_groups = ctx_len // 2, rng.randint(1, 6)
    else:
        budget, max_groups = int((ctx_len - 1) * rng.uniform(0.05, 0.4)), 10 ** 6
    asked: list[tuple[int, list[int], bool]] = []   # (query key, answer, unordered)
    n_needle_tokens = 0
    while n_needle_tokens + 3 <= budget and len(used) < 200 and len(asked) < max_groups:
        kind = rng.random()
        if kind < groups[0] or budget - n_needle_tokens < 12:
            if not _room(used, keys=1, values=1):
                break
            (k,), (v,) = _pick(rng, VOCAB.keys, 1, used), _pick(rng, VOCAB.values, 1, used)
            hay.add([k, v, dot])
            asked.append((k, [v], False))
            n_needle_tokens += 3
        elif kind < groups[0] + groups[1]:
            n = rng.randint(mv_min, mv_max)
            if not _room(used, keys=1, values=n):
                break
            (k,), vs = _pick(rng, VOCAB.keys, 1, used), _pick(rng, VOCAB.values, n, used)
            for v in vs:
                hay.add([k, v, dot])
            asked.append((k, vs, True))
            n_needle_tokens += 3 * n
        else:
            hops = rng.randint(2, CHAIN_HOPS)
            if not _room(used, keys=hops, values=1):
                break
            ks, (v,) = _pick(rng, VOCAB.keys, hops, used), _pick(rng, VOCAB.values, 1, used)
            chain = [hay.add([ks[0], v, dot])] + [hay.add([ks[i], ks[i - 1], dot]) for i in range(1, hops)]
            hay.chains.append(chain)
            asked.append((ks[-1], [*reversed(ks[:-1]), v], False))
            n_needle_tokens += 3 * hops
    context, _ = hay.build()
    rng.shuffle(asked)
    tokens = list(context)
    targets = [()] * len(tokens)
    kinds = [""] * len(tokens)
    forbid: list[tuple[int, ...]] = [()] * len(tokens)
    for key, answer, unordered in asked:
        # multi_value answers re-state the key (restated_values); any value not given yet fills a value slot
        said = restated_values(key, answer) if unordered else answer
        if len(tokens) + len(said) + 3 > length:
            break
        tokens += [VOCAB.question, key]
        targets += [(), ()]
        kinds += ["", ""]
        forbid += [(), ()]
        remaining = list(answer)
        for tok in said:
            if not unordered:
                targets[-1], kinds[-1] = (tok,), ("value" if len(answer) == 1 else "hop")
            elif tok == key:
                targets[-1], kinds[-1] = (key,), "restate"
            else:
                targets[-1], kinds[-1] = tuple(remaining), "set"
                forbid[-1] = tuple(v for v in answer if v not in remaining)   # given already
                remaining.remove(tok)
            tokens.append(tok)
            targets.append(())
            kinds.append("")
            forbid.append(())
        targets[-1] = (VOCAB.eos,)
        kinds[-1] = "eos"
        tokens.append(VOCAB.eos)
        targets.append(())
        kinds.append("")
        forbid.append(())
    return TrainSequence(tokens, targets, kinds, forbid)
