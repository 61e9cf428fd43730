"""Hidden-state capture of the live controller: batch rows -> requests, chunks, and its refusals.

The forward batch is a stand-in with the fields the hook reads (``forward_mode``, ``rids``,
``extend_seq_lens_cpu``, ``out_cache_loc``); the end-to-end path is covered by ``test_live_engine.py``.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tests.adapters.sglang.conftest import sglang_or_skip

sglang_or_skip()

from kvpolicy import EvictionPolicy  # noqa: E402
from kvpolicy.adapters.sglang.config import AdapterConfigError, SGLangPolicyConfig  # noqa: E402
from kvpolicy.adapters.sglang.live import LiveController  # noqa: E402
from kvpolicy.policy import HIDDEN_STATES, QUERIES  # noqa: E402

HIDDEN, HEADS, LAYERS = 6, 2, 2


class _FirstFeature(EvictionPolicy):
    """Score of a token = its hidden state's first feature + layer index (so rows are traceable)."""

    captures = frozenset({HIDDEN_STATES})
    supports_decoding = True

    def score(self, inputs):
        assert inputs.keys.shape[2] == inputs.hidden_states.shape[1] == inputs.positions.shape[0]
        value = inputs.hidden_states[..., 0] + inputs.layer_idx  # (1, T)
        return value[:, None, :].expand(-1, inputs.keys.shape[1], -1).float()


class _Queries(EvictionPolicy):
    captures = frozenset({QUERIES})

    def score(self, inputs):
        raise AssertionError("never called")


class _Mode:
    def __init__(self, name):
        self.name = name

    def is_decode(self):
        return self.name == "decode"

    def is_extend(self):
        return self.name == "extend"


def _controller(policy_class=_FirstFeature):
    pool = SimpleNamespace(get_key_buffer=lambda layer: torch.zeros(64, HEADS, 4),
                           get_value_buffer=lambda layer: torch.zeros(64, HEADS, 4))
    config = SGLangPolicyConfig(policy="test_first_feature")
    return LiveController(cache=None, policy=policy_class.from_kwargs(threshold=0.0), config=config,
                          kv_pool=pool, num_layers=LAYERS)


def _forward(live, mode, rows, positions):
    """Run the hook of every layer over a batch whose rows are ``rows`` = [(rid, n)], hidden[:, 0] = position."""
    n = sum(count for _, count in rows)
    hidden = torch.zeros(n, HIDDEN)
    hidden[:, 0] = torch.tensor(positions, dtype=torch.float32)
    batch = SimpleNamespace(forward_mode=_Mode(mode), rids=[rid for rid, _ in rows],
                            extend_seq_lens_cpu=[count for _, count in rows], out_cache_loc=torch.arange(1, n + 1))
    for layer in range(LAYERS):
        live.on_layer(layer, hidden, torch.tensor(positions), batch)


def test_batched_extend_and_decode_rows_go_to_their_requests():
    live = _controller()
    # request a: 3 new tokens at positions 5..7 (a reused prefix of 5), request b: 2 tokens at 0..1
    _forward(live, "extend", [("a", 3), ("b", 2)], [5, 6, 7, 0, 1])
    _forward(live, "decode", [("a", 1), ("b", 1)], [8, 2])
    a = live._take_pending("a", 5, 9)
    b = live._take_pending("b", 0, 3)
    for layer in range(LAYERS):
        assert a[layer].tolist() == [[5 + layer, 6 + layer, 7 + layer, 8 + layer]] * HEADS
        assert b[layer].tolist() == [[0 + layer, 1 + layer, 2 + layer]] * HEADS
    assert live.pending == {}


def test_earlier_prefill_chunks_wait_for_the_last_one_and_gaps_are_refused():
    live = _controller()
    _forward(live, "extend", [("a", 4)], [0, 1, 2, 3])  # first chunk
    _forward(live, "extend", [("a", 2)], [4, 5])  # last chunk
    scores = live._take_pending("a", 2, 6)  # the scorer starts after the chunk the tree already holds
    assert scores[0].tolist() == [[2, 3, 4, 5]] * HEADS
    with pytest.raises(RuntimeError, match="no hidden-state scores for positions"):
        live._take_pending("a", 6, 7)  # a forward the hooks did not see (e.g. CUDA graph replay)
    _forward(live, "extend", [("b", 2)], [0, 1])
    with pytest.raises(RuntimeError, match="captured positions jump"):
        _forward(live, "extend", [("b", 2)], [5, 6])


def test_idle_and_padded_batches():
    live = _controller()
    batch = SimpleNamespace(forward_mode=_Mode("idle"), rids=["a"], extend_seq_lens_cpu=None, out_cache_loc=None)
    live.on_layer(0, torch.zeros(0, HIDDEN), torch.zeros(0), batch)  # nothing to score
    assert live.pending == {}
    batch = SimpleNamespace(forward_mode=_Mode("decode"), rids=["a", "b"], extend_seq_lens_cpu=None,
                            out_cache_loc=torch.arange(1, 5))
    with pytest.raises(RuntimeError, match="padding is not supported"):
        live.on_layer(0, torch.zeros(4, HIDDEN), torch.arange(4), batch)  # 4 rows for 2 decode tokens


def test_query_capturing_policies_are_refused():
    with pytest.raises(AdapterConfigError, match="needs queries, which the SGLang adapter cannot capture"):
        _controller(_Queries)
