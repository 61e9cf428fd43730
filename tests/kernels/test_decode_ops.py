"""The decoding ops of kvpolicy.kernels: attention over segments (+ a dense block) in one softmax, and the
row writes a decoding step makes, against the composed references and a list model."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpolicy import kernels
from kvpolicy.kernels import reference as ref
from kvpolicy.ragged import RaggedStore

from .conftest import INTERPRETED

needs_interpreter = pytest.mark.skipif(not INTERPRETED, reason="Triton on CPU needs TRITON_INTERPRET=1")


def layout(lengths: list[int], spare: list[int], gaps: list[int] | None = None):
    """starts/lengths for segments laid out in order with ``spare`` rows after each (and ``gaps`` before)."""
    starts, row = [], 0
    for i, (n, s) in enumerate(zip(lengths, spare)):
        row += gaps[i] if gaps else 0
        starts.append(row)
        row += n + s
    return torch.tensor(starts), torch.tensor(lengths), row


def composed(queries, key_buf, value_buf, starts, lengths, scale, block_keys, block_values):
    """The reference semantics: varlen attention over the segments, merged with the block by log-sum-exp."""
    out, lse = ref.varlen_attention_ref(queries, key_buf, value_buf, starts, lengths, scale)
    if block_keys is None:
        return out
    out_b, lse_b = ref.block_attention_lse(queries, block_keys, block_values, scale)
    return ref.merge_attention(out, lse, out_b, lse_b)[0]


CASES = [
    pytest.param([5, 5, 5], [0, 0, 0], 3, id="uniform-no-spare"),
    pytest.param([7, 7], [3, 3], 4, id="uniform-with-spare"),
    pytest.param([63, 1, 0, 17], [2, 0, 5, 1], 5, id="ragged"),
    pytest.param([0, 0], [1, 0], 2, id="empty-segments"),
    pytest.param([9], [4], 0, id="one-segment-no-block"),
    pytest.param([4, 4], [0, 0], 0, id="uniform-no-block"),
]


@pytest.mark.parametrize("with_block", [True, False], ids=["block", "segments-only"])
@pytest.mark.parametrize(("lengths", "spare", "pending"), CASES)
def test_decode_attention_equals_composed_reference(lengths, spare, pending, with_block):
    g = torch.Generator().manual_seed(len(lengths) * 31 + pending)
    starts, lens, rows = layout(lengths, spare)
    dim, group = 60, 3
    key_buf, value_buf = torch.randn(rows, dim, generator=g), torch.randn(rows, dim, generator=g)
    queries = torch.randn(len(lengths), group, dim, generator=g)
    block = (torch.randn(len(lengths), pending, dim, generator=g), torch.randn(len(lengths), pending, dim, generator=g))
    block = block if with_block else (None, None)
    got = kernels.decode_attention(queries, key_buf, value_buf, starts, lens, 0.2, *block, backend="torch")
    torch.testing.assert_close(got, composed(queries, key_buf, value_buf, starts, lens, 0.2, *block),
                               rtol=1e-5, atol=1e-6)


def test_decode_attention_segments_out_of_order_and_bf16():
    """Segments need not follow buffer order (cut one by one then); bf16 buffers are read as float32."""
    g = torch.Generator().manual_seed(3)
    starts, lens = torch.tensor([20, 0, 9]), torch.tensor([6, 8, 5])
    key_buf, value_buf = torch.randn(30, 16, generator=g).bfloat16(), torch.randn(30, 16, generator=g).bfloat16()
    queries = torch.randn(3, 2, 16, generator=g)
    block = torch.randn(3, 4, 16, generator=g).bfloat16(), torch.randn(3, 4, 16, generator=g).bfloat16()
    got = kernels.decode_attention(queries, key_buf, value_buf, starts, lens, 0.3, *block)
    want = composed(queries.float(), key_buf.float(), value_buf.float(), starts, lens, 0.3, block[0].float(),
                    block[1].float())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    starts, lens = torch.tensor([0, 10, 20]), torch.tensor([7, 7, 7])  # uniform: the batched (strided) path
    got = kernels.decode_attention(queries, key_buf, value_buf, starts, lens, 0.3, *block)
    want = composed(queries.float(), key_buf.float(), value_buf.float(), starts, lens, 0.3, block[0].float(),
                    block[1].float())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@needs_interpreter
@pytest.mark.parametrize("with_block", [True, False], ids=["block", "segments-only"])
def test_decode_attention_triton_path_matches_torch(with_block):
    """The Triton backend (varlen kernel + block merged by log-sum-exp) gives the torch backend's output."""
    g = torch.Generator().manual_seed(4)
    starts, lens, rows = layout([63, 1, 0, 17], [2, 0, 5, 1])
    key_buf, value_buf = torch.randn(rows, 60, generator=g), torch.randn(rows, 60, generator=g)
    queries = torch.randn(4, 3, 60, generator=g)
    block = (torch.randn(4, 5, 60, generator=g), torch.randn(4, 5, 60, generator=g)) if with_block else (None, None)
    got = kernels.decode_attention(queries, key_buf, value_buf, starts, lens, 0.2, *block, backend="triton")
    want = kernels.decode_attention(queries, key_buf, value_buf, starts, lens, 0.2, *block, backend="torch")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_decode_attention_rejects_bad_inputs():
    starts, lens = torch.tensor([0, 4]), torch.tensor([2, 3])
    buf, q = torch.randn(8, 4), torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match=r"queries must be \(2, M, D\)"):
        kernels.decode_attention(torch.randn(3, 3, 4), buf, buf, starts, lens, 1.0)
    with pytest.raises(ValueError, match="block_keys must be"):
        kernels.decode_attention(q, buf, buf, starts, lens, 1.0, torch.randn(2, 5, 3), torch.randn(2, 5, 4))
    with pytest.raises(ValueError, match="both block_keys and block_values"):
        kernels.decode_attention(q, buf, buf, starts, lens, 1.0, torch.randn(2, 5, 4), None)
    with pytest.raises(ValueError, match="int64"):
        kernels.decode_attention(q, buf, buf, starts.int(), lens, 1.0)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 5), min_size=1, max_size=5), st.data())
def test_append_spare_matches_a_list_model(lengths, data):
    """append_spare appends exactly where the mask says (segments keep their order and their other rows)."""
    segments = len(lengths)
    starts, lens, rows = layout(lengths, [1] * segments)  # one spare row each: the op's contract
    keys = torch.arange(rows * 2, dtype=torch.float32).reshape(rows, 2)
    values = keys + 1000
    mask = torch.tensor(data.draw(st.lists(st.booleans(), min_size=segments, max_size=segments)))
    model = [keys[s:s + n, 0].tolist() for s, n in zip(starts.tolist(), lengths)]
    model_values = [values[s:s + n, 0].tolist() for s, n in zip(starts.tolist(), lengths)]
    new = (-1.0 - torch.arange(segments, dtype=torch.float32))[:, None].repeat(1, 2)
    kernels.append_spare(keys, values, starts, lens, new, new + 2000, mask)
    for s, keep in enumerate(mask.tolist()):
        if keep:
            model[s].append(-1.0 - s)
            model_values[s].append(1999.0 - s)
    assert lens.tolist() == [len(m) for m in model]
    for s, start in enumerate(starts.tolist()):
        assert keys[start:start + len(model[s]), 0].tolist() == model[s]
        assert values[start:start + len(model[s]), 0].tolist() == model_values[s]


def test_write_rows_writes_only_its_rows():
    keys, values = torch.zeros(6, 2), torch.zeros(6, 2)
    kernels.write_rows(keys, values, torch.tensor([4, 1]), torch.tensor([[1.0, 1.0], [2.0, 2.0]]),
                       torch.tensor([[3.0, 3.0], [4.0, 4.0]]))
    assert keys[:, 0].tolist() == [0, 2, 0, 0, 1, 0] and values[:, 0].tolist() == [0, 4, 0, 0, 3, 0]


def test_append_rows_copies_within_the_buffer():
    starts, lens = torch.tensor([0, 4]), torch.tensor([2, 1])
    keys = torch.arange(8, dtype=torch.float32)[:, None].repeat(1, 3)
    values = keys + 100
    kernels.append_rows(keys, values, starts, lens, torch.tensor([0, 4]), torch.tensor([True, False]))
    assert lens.tolist() == [3, 1]
    assert keys[2].tolist() == [0.0, 0.0, 0.0] and values[2].tolist() == [100.0] * 3
    kernels.append_rows(keys, values, starts, lens, torch.tensor([1, 4]))
    assert lens.tolist() == [4, 2] and keys[3, 0] == 1 and keys[5, 0] == 4


def test_prefix_round_trip_keeps_every_segment():
    """add_prefix puts rows in front of every segment; remove_prefix gives them back and restores the store."""
    g = torch.Generator().manual_seed(6)
    store = RaggedStore.empty(3, 5, torch.float32, "cpu")
    store.extend(torch.randn(1, 3, 12, 5, generator=g), torch.randn(1, 3, 12, 5, generator=g),
                 torch.rand(1, 3, 12, generator=g) < 0.5)
    before = [tuple(t.clone() for t in store.segment(s)) for s in range(3)]
    lengths, capacities = store.lengths.clone(), store.capacities.clone()
    prefix_k, prefix_v = torch.randn(3, 2, 5, generator=g), torch.randn(3, 2, 5, generator=g)
    store.add_prefix(prefix_k, prefix_v, 3)
    assert store.lengths.tolist() == (lengths + 3).tolist()
    for s in range(3):
        k, v = store.segment(s)
        assert torch.equal(k[:2], prefix_k[s]) and torch.equal(v[:2], prefix_v[s])
        assert torch.equal(k[3:], before[s][0]) and torch.equal(v[3:], before[s][1])
    store.write_offset(2, torch.ones(3, 5), torch.ones(3, 5))
    keys, values = store.remove_prefix(3, [2, 0])
    assert torch.equal(keys[:, 0], torch.ones(3, 5)) and torch.equal(keys[:, 1], prefix_k[:, 0])
    assert store.lengths.tolist() == lengths.tolist() and store.capacities.tolist() == capacities.tolist()
    for s in range(3):
        assert all(torch.equal(a, b) for a, b in zip(store.segment(s), before[s]))
