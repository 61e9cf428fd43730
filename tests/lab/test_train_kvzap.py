"""Surrogate training end to end on a tiny random Qwen3: oracle targets → linear + MLP → checkpoints that the
kvzap policies load and bind."""

from __future__ import annotations

import math

import torch

import kvpolicy
from kvpolicy.adapters.hf import model_info
from kvpolicy.lab.train_kvzap import train_kvzap
from tests.adapters.conftest import VOCAB, tiny_model


def test_train_kvzap_end_to_end(tmp_path):
    model = tiny_model("qwen3")
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(1, VOCAB, (1, 48), generator=gen) for _ in range(6)]
    oracle = {"repeat_prompt_ids": [1, 2], "continue_prompt_ids": [1], "prompt_suffix_ids": [], "chunk_size": 32}
    reports = train_kvzap(model, prompts, tmp_path, oracle_config=oracle, positions=40, held_out_fraction=0.34,
                          mlp_kwargs={"epochs": 3, "batch_size": 64}, progress=False)
    assert [r.kind for r in reports] == ["linear", "mlp"]
    for report in reports:
        assert len(report.r2) == 2 and all(math.isfinite(v) for v in report.r2 + report.pearson_r2)
        assert report.train_rows == 4 * 40 and report.held_out_rows == 2 * 40
        policy = kvpolicy.get_policy(f"kvzap_{report.kind}", surrogate=report.path, threshold=-4.0)
        policy.bind(model_info(model))  # dimensions match the model it was trained on
        assert (tmp_path / f"kvzap-{report.kind}" / "fit_report.json").is_file()
