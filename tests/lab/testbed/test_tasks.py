import random
from collections import Counter

import pytest

from kvpolicy.lab.testbed.tasks import ANCHOR, COPY, MAX_GROUP_VALUES, MULTI_VALUES, TASKS, generate, training_sequence
from kvpolicy.lab.testbed.tokenizer import VOCAB

LENGTHS = [64, 256, 1024]


@pytest.mark.parametrize("length", LENGTHS, ids=lambda n: f"L{n}")
@pytest.mark.parametrize("task", TASKS)
def test_generation_is_deterministic(task, length):
    assert generate(task, length, 7, 3) == generate(task, length, 7, 3)
    assert generate(task, length, 7, 3).prompt != generate(task, length, 8, 3).prompt


def _bigrams_unique(tokens):
    pairs = list(zip(tokens, tokens[1:]))
    return len(pairs) == len(set(pairs))


@pytest.mark.parametrize("length", LENGTHS, ids=lambda n: f"L{n}")
@pytest.mark.parametrize("index", range(5))
def test_question_tasks_are_well_formed(length, index):
    for task in ("single_needle", "multi_key", "multi_value", "variable_tracking"):
        ex = generate(task, length, 11, index)
        context = ex.prompt[:-2]
        assert len(context) == ex.context_len == length
        assert context[0] == VOCAB.bos and ex.prompt[-2] == VOCAB.question
        assert ex.answer[-1] == VOCAB.eos
        assert _bigrams_unique(context)
        query = ex.prompt[-1]
        assert query in VOCAB.keys
        # The needles the answer depends on are really in the context, at the recorded positions.
        needles = [context[p] for p in ex.needle_positions]
        if task in ("single_needle", "multi_key"):
            assert context.count(query) == 1
            at = context.index(query)
            assert context[at + 1] == ex.answer[0]
            assert needles == [query, ex.answer[0], VOCAB.dot]
        if task == "multi_key":
            keys = [t for t in context if t in VOCAB.keys]
            assert len(set(keys)) == 4 and query in keys   # three distractor keys
        if task == "multi_value":
            assert ex.unordered and len(ex.answer) == 2 * MULTI_VALUES   # v1 k v2 k v3 k v4 <eos>
            found = [context[i + 1] for i, t in enumerate(context) if t == query]
            assert found == ex.answer[:-1:2]               # values in order of appearance
            assert ex.answer[1:-1:2] == [query] * (MULTI_VALUES - 1)
            assert len([t for t in context if t in VOCAB.keys and t != query]) == 2   # distractors
        if task == "variable_tracking":
            # Follow the chain: each hop is the token after the variable's assignment.
            current, hops = query, []
            while current in VOCAB.keys:
                at = [i for i, t in enumerate(context)
                      if t == current and i + 2 < len(context) and context[i + 2] == VOCAB.dot]
                assert len(at) == 1
                current = context[at[0] + 1]
                hops.append((at[0], current))
            assert [h for _, h in hops] == ex.answer[:-1]
            positions = [p for p, _ in hops]
            assert positions == sorted(positions, reverse=True)   # assigned before use
            assert Counter(t in VOCAB.values for t in context)[True] == 2   # plus a distractor chain


@pytest.mark.parametrize("length", LENGTHS, ids=lambda n: f"L{n}")
def test_repeat_task_copies_the_context(length):
    ex = generate("repeat", length, 3, 0)
    context = ex.prompt[:length]
    assert ex.prompt[length] == VOCAB.repeat
    anchor = ex.prompt[length + 1:]
    assert len(anchor) == ANCHOR and len(ex.answer) == COPY
    start = ex.needle_positions[0]
    assert context[start:start + ANCHOR] == anchor
    assert context[start + ANCHOR:start + ANCHOR + COPY] == ex.answer
    assert _bigrams_unique(context)


def test_unknown_task_is_rejected():
    with pytest.raises(ValueError, match="known"):
        generate("nope", 64, 0, 0)


@pytest.mark.parametrize("length", [64, 512])
def test_training_sequences_supervise_knowable_tokens(length):
    rng = random.Random(0)
    supervised_sequences = 0
    for _ in range(40):
        seq = training_sequence(rng, length)
        assert len(seq.tokens) <= length and len(seq.targets) == len(seq.tokens)
        supervised = [t for t, allowed in enumerate(seq.targets) if allowed]
        supervised_sequences += bool(supervised)
        for t in supervised:
            if seq.tokens[1] == VOCAB.shift:        # auxiliary: say the previous token
                assert seq.targets[t] == (seq.tokens[t - 1],)
            else:                                   # the next token, or the set of values still to give
                assert t + 1 < len(seq.tokens) and seq.tokens[t + 1] in seq.targets[t]
    # A question sequence whose needle budget rounds to zero has nothing to supervise; that is rare.
    assert supervised_sequences >= 36


def test_multi_value_slots_forbid_exactly_the_values_given_already():
    rng = random.Random(1)
    checked = 0
    for _ in range(60):
        seq = training_sequence(rng, 512, repeat_prob=0.0, shift_prob=0.0)
        assert seq.forbid is not None and len(seq.forbid) == len(seq.tokens)
        for t, kind in enumerate(seq.kinds):
            if kind != "set":
                assert seq.forbid[t] == ()
                continue
            # the answer so far: values after the last "<q> key" before t
            q = max(i for i in range(t) if seq.tokens[i] == VOCAB.question)
            given = {tok for tok in seq.tokens[q + 2:t + 1] if tok in VOCAB.values}
            assert set(seq.forbid[t]) == given and not given & set(seq.targets[t])
            checked += bool(given)
    assert checked > 20


def test_group_mix_sets_the_kinds_of_needle_groups():
    """groups=(0, 1, 0), mv_min=4: every question group is a 4-value multi_value group, except where a dense
    context's needle budget has room for a single needle only."""
    rng = random.Random(2)
    sizes = []
    for _ in range(30):
        seq = training_sequence(rng, 512, repeat_prob=0.0, shift_prob=0.0, groups=(0.0, 1.0, 0.0), mv_min=4)
        assert "hop" not in seq.kinds
        # the slots of a group: "set" slots between a "<q> key" and its <eos>
        run = 0
        for kind in seq.kinds:
            if kind == "set":
                run += 1
            elif kind == "eos":
                sizes.append(run)
                run = 0
    assert sizes and set(sizes) <= {0, 4} and sizes.count(4) > 0.8 * len(sizes)


def test_groups_of_more_values_than_the_evaluated_four():
    """mv_min=4, mv_max=6: groups bind 4 to 6 values, every size occurs, and each value slot allows exactly the
    values of its group not given yet (up to six at the first slot)."""
    rng = random.Random(3)
    sizes, widest = [], 0
    for _ in range(40):
        seq = training_sequence(rng, 1024, repeat_prob=0.0, shift_prob=0.0, groups=(0.0, 1.0, 0.0), mv_min=4,
                                mv_max=6)
        run, context = 0, seq.tokens.index(VOCAB.question)
        for t, kind in enumerate(seq.kinds):
            if kind == "set":
                q = max(i for i in range(t) if seq.tokens[i] == VOCAB.question)
                key = seq.tokens[q + 1]
                group = {seq.tokens[i + 1] for i in range(context) if seq.tokens[i] == key}
                given = {tok for tok in seq.tokens[q + 2:t + 1] if tok in VOCAB.values}
                assert set(seq.targets[t]) == group - given
                widest = max(widest, len(seq.targets[t]))
                run += 1
            elif kind == "eos":
                sizes.append(run)
                run = 0
    assert {4, 5, 6} <= set(sizes) <= {0, 4, 5, 6} and widest == 6


@pytest.mark.parametrize("bad", [dict(groups=(0.5, 0.5, 0.5)), dict(groups=(1.2, -0.2, 0.0)),
                                 dict(groups=(0.5, 0.5)), dict(mv_min=0), dict(mv_min=MULTI_VALUES + 1),
                                 dict(mv_max=MULTI_VALUES - 1), dict(mv_max=MAX_GROUP_VALUES + 1), dict(mv_max=5.0),
                                 dict(mv_min=6, mv_max=5)])
def test_bad_group_mix_is_refused(bad):
    with pytest.raises(ValueError, match="groups|mv_min|mv_max"):
        training_sequence(random.Random(0), 256, **bad)
