"""Random request sequences against the slot-accounting and tombstone-validity invariants (real SGLang)."""

from __future__ import annotations

import random
from array import array

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.adapters.sglang.conftest import Harness, sglang_or_skip

sglang_or_skip()

from kvpolicy.adapters.sglang._internals import DUMMY_SLOT, EvictParams, RadixKey  # noqa: E402

BASES = [list(range(10, 40)), list(range(10, 25)) + list(range(60, 75)), list(range(80, 110))]

start_op = st.tuples(st.just("start"), st.integers(0, len(BASES) - 1), st.integers(1, 30),
                     st.lists(st.integers(1, 5), max_size=4), st.sampled_from([True, True, True, False]))
prune_op = st.tuples(st.just("prune"), st.integers(0, 7), st.integers(0, 2**16))
decode_op = st.tuples(st.just("decode"), st.integers(0, 7), st.integers(1, 9))
finish_op = st.tuples(st.just("finish"), st.integers(0, 7))
evict_op = st.tuples(st.just("evict"), st.integers(1, 40))
# starts and prunes weighted up so that shared, pruned prefixes are common
ops = st.lists(st.one_of(start_op, start_op, prune_op, prune_op, decode_op, finish_op, evict_op), max_size=40)


def check_match_validity(h: Harness) -> None:
    """Whatever a compressed match serves has its last `window` tokens intact."""
    for base in BASES:
        match = h.cache.match_compressed(RadixKey(array("q", base)))
        tail = match.slots[max(0, match.length - h.cache.window):match.length]
        assert not bool((tail == DUMMY_SLOT).any())
        assert match.slots.shape[0] == match.length


def run(h: Harness, program, seen: dict[str, int] | None = None) -> None:
    def note(what: str) -> None:
        event(what) if seen is None else seen.update({what: seen.get(what, 0) + 1})

    for op in program:
        running = list(h.running.values())
        kind = op[0]
        if kind == "start":
            _, base, length, suffix, tracked = op
            req = h.start(BASES[base][:length] + suffix, track=tracked)
            if req is not None and tracked and h.cache.layout(req).pruned_count:
                note("served a compressed prefix")
        elif kind == "prune" and running:
            req = running[op[1] % len(running)]
            layout = h.cache.layout(req)
            if layout is None:  # a stock request: nothing prunes it
                continue
            judged = layout.logical_len - h.cache.window  # only tokens that left the protected window
            candidates = torch.nonzero(layout.present[:max(judged, 0)], as_tuple=False).flatten()
            if candidates.numel():
                gen = torch.Generator().manual_seed(op[2])
                keep = torch.rand(candidates.numel(), generator=gen) < 0.5
                free_before = h.allocator.available_size()
                result = h.cache.prune(req, candidates, keep)
                assert h.allocator.available_size() == free_before + result.freed
                assert h.cache.layout(req).physical_len == layout.physical_len
                if result.tombstoned:
                    note("tombstoned a tree-held token")
                if result.dropped_shared:
                    note("dropped a shared token without freeing it")
        elif kind == "decode" and running:
            h.decode(running[op[1] % len(running)], op[2])
        elif kind == "finish" and running:
            h.finish(running[op[1] % len(running)])
        elif kind == "evict":
            free_before = h.allocator.available_size()
            result = h.cache.evict(EvictParams(num_tokens=op[1]))
            assert h.allocator.available_size() == free_before + result.num_tokens_evicted
            if result.num_tokens_evicted:
                note("evicted slots")
        h.audit()
        for req in h.running.values():
            if h.cache.layout(req) is None:
                continue
            positions = h.cache.layout(req).kept_positions()
            assert bool((positions[1:] > positions[:-1]).all())
        check_match_validity(h)
    for req in list(h.running.values()):
        h.finish(req)
    h.audit()
    h.cache.evict(EvictParams(num_tokens=h.capacity))
    h.audit()
    assert h.allocator.available_size() == h.capacity  # nothing leaked once everything is released


@pytest.mark.parametrize("compressed", [True, False], ids=["compressed-match", "stock-match"])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(program=ops, window=st.sampled_from([0, 2, 5]))
def test_random_request_sequences_keep_invariants(compressed, program, window):
    run(Harness(window=window, use_compressed_match=compressed), program)


def random_program(rng: random.Random, length: int):
    program = []
    for _ in range(length):
        kind = rng.choices(["start", "prune", "decode", "finish", "evict"], weights=[3, 4, 3, 2, 1])[0]
        if kind == "start":
            program.append(("start", rng.randrange(len(BASES)), rng.randint(8, 30),
                            [rng.randint(1, 5) for _ in range(rng.randint(0, 3))], rng.random() < 0.8))
        elif kind == "prune":
            program.append(("prune", rng.randrange(8), rng.randrange(2**16)))
        elif kind == "decode":
            program.append(("decode", rng.randrange(8), rng.randint(1, 9)))
        elif kind == "finish":
            program.append(("finish", rng.randrange(8)))
        else:
            program.append(("evict", rng.randint(1, 40)))
    return program


def test_long_seeded_programs_reach_the_interesting_cases():
    """Long programs (hypothesis shrinks well but rarely builds long sharing chains in 40 examples)."""
    seen: dict[str, int] = {}
    for seed in range(8):
        rng = random.Random(seed)
        run(Harness(window=rng.choice([0, 2, 5]), use_compressed_match=seed % 4 != 3),
            random_program(rng, 150), seen)
    for what in ("served a compressed prefix", "tombstoned a tree-held token", "evicted slots"):
        assert seen.get(what, 0) > 0, f"the programs never {what}: {seen}"
