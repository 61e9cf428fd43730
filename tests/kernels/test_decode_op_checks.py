"""The per-step kernel ops (``kvpolicy.kernels.dispatch``) test their inputs in one expression first and name the
problem with the detailed checks only when it is false: every bad input still raises the detailed checks' error."""

from __future__ import annotations

import pytest
import torch

from kvpolicy import kernels
from kvpolicy.kernels import dispatch

# append_spare takes append's arguments; decode_attention takes varlen_attention's.
from .test_dispatch import _append_args as _spare
from .test_dispatch import _attention_args as _decode
from .test_dispatch import i64


def _rows(**override):
    args = dict(key_buf=torch.zeros(8, 4), value_buf=torch.zeros(8, 4), starts=i64(0, 4), lengths=i64(1, 2),
                source_rows=i64(0, 4), append_mask=torch.tensor([True, False]))
    return {**args, **override}


def _write(**override):
    args = dict(key_buf=torch.zeros(8, 4), value_buf=torch.zeros(8, 4), rows=i64(3, 7), new_keys=torch.ones(2, 4),
                new_values=torch.ones(2, 4))
    return {**args, **override}


def _checks_of(op, args):
    """The detailed checks of ``op`` called on ``args`` (what names the problem)."""
    if op is kernels.append_spare:
        return lambda: dispatch._check_append_spare(**args)
    if op is kernels.append_rows:
        return lambda: dispatch._check_append_rows(**args)
    if op is kernels.write_rows:
        return lambda: dispatch._check_write_rows(**args)
    rest = {k: v for k, v in args.items() if k != "scale"}
    return lambda: dispatch._check_decode_attention(**{"block_keys": None, "block_values": None, **rest})


CASES = [
    (kernels.append_spare, _spare()),
    (kernels.append_spare, _spare(append_mask=None)),
    (kernels.append_spare, _spare(starts=i64(0, 4)[None])),
    (kernels.append_spare, _spare(starts=torch.tensor([0, 4], dtype=torch.int32))),
    (kernels.append_spare, _spare(lengths=i64(1, 2, 3))),
    (kernels.append_spare, _spare(lengths=torch.ones(2))),
    (kernels.append_spare, _spare(key_buf=torch.zeros(32))),
    (kernels.append_spare, _spare(value_buf=torch.zeros(9, 4))),
    (kernels.append_spare, _spare(new_keys=torch.ones(3, 4))),
    (kernels.append_spare, _spare(new_values=torch.ones(2, 5))),
    (kernels.append_spare, _spare(new_keys=torch.ones(2, 4).half())),
    (kernels.append_spare, _spare(new_values=torch.ones(2, 4, dtype=torch.float64))),
    (kernels.append_spare, _spare(append_mask=torch.ones(2))),
    (kernels.append_spare, _spare(append_mask=torch.ones(3, dtype=torch.bool))),
    (kernels.append_rows, _rows()),
    (kernels.append_rows, _rows(append_mask=None)),
    (kernels.append_rows, _rows(starts=i64(0, 4, 6))),
    (kernels.append_rows, _rows(lengths=torch.tensor([1, 2], dtype=torch.int32))),
    (kernels.append_rows, _rows(value_buf=torch.zeros(8))),
    (kernels.append_rows, _rows(source_rows=i64(0))),
    (kernels.append_rows, _rows(source_rows=torch.tensor([0, 4], dtype=torch.int32))),
    (kernels.append_rows, _rows(append_mask=torch.tensor([1, 0]))),
    (kernels.write_rows, _write()),
    (kernels.write_rows, _write(rows=i64(3, 7)[None])),
    (kernels.write_rows, _write(rows=torch.tensor([3, 7], dtype=torch.int32))),
    (kernels.write_rows, _write(new_keys=torch.ones(3, 4))),
    (kernels.write_rows, _write(new_values=torch.ones(2, 3))),
    (kernels.write_rows, _write(new_keys=torch.ones(2, 4).double())),
    (kernels.decode_attention, _decode()),
    (kernels.decode_attention, _decode(queries=torch.randn(3, 3, 4))),
    (kernels.decode_attention, _decode(queries=torch.randn(2, 4))),
    (kernels.decode_attention, _decode(queries=torch.randn(2, 3, 5))),
    (kernels.decode_attention, _decode(queries=torch.ones(2, 3, 4, dtype=torch.int64))),
    (kernels.decode_attention, _decode(key_buf=torch.ones(8, 4, dtype=torch.int64))),
    (kernels.decode_attention, _decode(value_buf=torch.randn(7, 4))),
    (kernels.decode_attention, _decode(key_buf=torch.randn(8, 4, 1))),
    (kernels.decode_attention, _decode(starts=i64(0, 4).float())),
    (kernels.decode_attention, _decode(lengths=i64(1))),
]


@pytest.mark.parametrize(("op", "args"), CASES)
def test_an_op_raises_exactly_what_its_detailed_checks_raise(op, args):
    checks = _checks_of(op, args)
    try:
        checks()
    except ValueError as expected:
        with pytest.raises(ValueError) as got:
            op(**args)
        assert str(got.value) == str(expected)
    else:
        op(**args)  # valid: runs
