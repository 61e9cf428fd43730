"""TokenQueue: a ring that behaves like a list of tokens, copies only when it must, and returns memory."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpolicy.token_queue import TokenQueue

# Operations: ("append", n) | ("pop", n) | ("set_last", n); n is clipped to what is possible.
operations = st.lists(st.tuples(st.sampled_from(["append", "pop", "set_last"]), st.integers(0, 9)),
                      min_size=1, max_size=40)


def tokens(t: torch.Tensor, axis: int) -> list[float]:
    """The token values along ``axis`` (every other element of a token holds the same value)."""
    return t.movedim(axis, 0).flatten(1)[:, 0].tolist()


@settings(max_examples=60, deadline=None)
@given(operations, st.integers(0, 2))
def test_queue_matches_a_list_model(ops, axis):
    """Whatever the sequence of appends, pops and overwrites, the live tokens in order are the list model's."""
    queue, model, counter = TokenQueue(axis=axis), [], 0

    def block(n):
        nonlocal counter
        values = torch.arange(counter, counter + n, dtype=torch.float32)
        counter += n
        shape = [2, 3, 1]
        shape[axis] = n
        return values.reshape([n if i == axis else 1 for i in range(3)]).expand(shape).clone(), values.tolist()

    for op, n in ops:
        if op == "append":
            tensor, values = block(n)
            queue.append(tensor)
            model += values
        elif op == "pop":
            n = min(n, len(model))
            queue.pop(n)
            del model[:n]
        else:
            n = min(n, len(model))
            tensor, values = block(n)
            if queue.buf is not None:
                queue.set_last(tensor)
                model[len(model) - n:] = values
        assert len(queue) == len(model)
        if queue.buf is None:
            continue
        live = queue.view()
        assert live.shape[axis] == len(model)
        assert tokens(live, axis) == model
        for k in range(len(model) + 1):
            assert tokens(queue.front(k), axis) == model[:k]
        if queue.is_full():  # the storage holds exactly the live tokens, in some rotation
            assert sorted(tokens(queue.storage(), axis)) == sorted(model)


def test_steady_decoding_never_copies_and_holds_window_plus_one():
    """One token in, one out per step: after the first step the storage is neither reallocated nor larger than
    window + 1 tokens."""
    window = 8
    queue = TokenQueue(axis=2)
    queue.append(torch.randn(1, 2, 100, 4))  # a prefill
    queue.pop(100 - window)  # its judged tokens leave: the storage shrinks to the window
    assert queue.capacity == window
    queue.append(torch.randn(1, 2, 1, 4))
    storage = queue.buf.data_ptr()
    for _ in range(50):
        queue.pop(1)
        queue.append(torch.randn(1, 2, 1, 4))
        assert queue.buf.data_ptr() == storage and queue.capacity == window + 1 and queue.is_full()


def test_pop_and_overwrite_are_checked():
    queue = TokenQueue(axis=0)
    queue.append(torch.zeros(3))
    with pytest.raises(ValueError, match="pop 4 of 3"):
        queue.pop(4)
    with pytest.raises(ValueError, match="last 4 of 3"):
        queue.set_last(torch.zeros(4))
