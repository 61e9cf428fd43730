"""The shipped testbed model: loads offline, is a standard Qwen3, and retrieves at full cache.

Floors are the held-out accuracies measured for docs/testbed.md minus a margin (small samples are noisy).
"""

import pytest
import torch

from kvpolicy.lab.testbed import MODEL_DIR, load
from kvpolicy.lab.testbed.train import CURRICULUM

pytestmark = pytest.mark.skipif(not (MODEL_DIR / "model.safetensors").is_file(), reason="no shipped model")

TEST_SEED = 777   # neither the training streams nor the suite's EVAL_SEED

# Held-out full-cache accuracy measured with the suite (EVAL_SEED, n=50; docs/testbed.md): at 256 tokens
# single 1.0, multi_key 1.0, variable_tracking 1.0, repeat 1.0, multi_value .98; at 1024 1.0 for every task; at
# 2048 1.0 for every task. With this file's seed: at 256 (n=16), 1024 (n=8) and 2048 (n=8, multi_value and
# repeat) 1.0 for every task; multi_value: first value 8 of 8, recall 1.0. Floors leave a margin for the small
# samples.
FLOOR_256 = {"single_needle": 0.85, "multi_key": 0.85, "variable_tracking": 0.85, "repeat": 0.8,
             "multi_value": 0.8}
FLOOR_1024 = {"single_needle": 0.85, "multi_key": 0.85, "variable_tracking": 0.85, "repeat": 0.85,
              "multi_value": 0.75}
FAR_TASKS = ("multi_value", "repeat")   # the two that missed 0.95 at 2048 tokens before the base change


@pytest.fixture(scope="module")
def testbed():
    torch.set_num_threads(2)
    return load()


def test_loads_offline_as_standard_qwen3(testbed, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tokenizer = testbed
    cfg = model.config
    assert cfg.model_type == "qwen3" and type(model).__name__ == "Qwen3ForCausalLM"
    assert cfg.num_attention_heads == 8 and cfg.num_key_value_heads == 4
    # the RoPE base the recipe ends with (its second tail raises it): the weights were trained to rotate so
    recipe_base = [p.rope_theta for p in CURRICULUM if p.rope_theta is not None][-1]
    assert cfg.rope_parameters["rope_theta"] == recipe_base
    auto = AutoModelForCausalLM.from_pretrained(str(MODEL_DIR), local_files_only=True)
    assert type(auto).__name__ == "Qwen3ForCausalLM"
    tok = AutoTokenizer.from_pretrained(str(MODEL_DIR), local_files_only=True)
    assert tok("k1 v2")["input_ids"] == tokenizer("k1 v2")["input_ids"]
    assert (MODEL_DIR / "model.safetensors").stat().st_size < 8 * 2**20


def test_generate_answers_a_single_needle(testbed):
    from kvpolicy.lab.testbed.tasks import generate

    model, tokenizer = testbed
    hits = 0
    for index in range(4):
        example = generate("single_needle", 128, TEST_SEED, index)
        ids = torch.tensor([example.prompt])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False)
        hits += out[0, ids.shape[1]].item() == example.answer[0]   # the value (stopping is not scored)
    assert hits >= 3


@pytest.mark.parametrize("task", sorted(FLOOR_256))
def test_full_cache_accuracy_at_256(testbed, task):
    from kvpolicy.lab.eval import run_suite

    model, tokenizer = testbed
    result = run_suite(model, tokenizer, None, [task], [256], 16, seed=TEST_SEED, batch_size=16)
    assert result.scores[task][256] >= FLOOR_256[task]


def test_multi_value_gives_the_first_value_and_part_of_the_rest(testbed):
    """Measured: first value right in 8 of these 8 examples, all 32 of their values among the value slots (the
    models before: 31 and 32; the 2-KV-head models: 94% and 87.5%). Floors below that, with the sample's margin."""
    from kvpolicy.lab.testbed.tasks import generate

    model, _ = testbed
    first, found = 0, 0
    for index in range(8):
        example = generate("multi_value", 256, TEST_SEED, index)
        ids = torch.tensor([example.prompt])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=len(example.answer),
                             do_sample=False)[0, ids.shape[1]:].tolist()
        values = set(example.answer[:-1:2])
        slots = out[0:len(example.answer) - 1:2]
        first += slots[0] in values
        found += len(values & set(slots))
    assert first >= 7 and found / (8 * 4) >= 0.8


@pytest.mark.slow
@pytest.mark.parametrize("task", sorted(FLOOR_1024))
def test_full_cache_accuracy_at_1024(testbed, task):
    from kvpolicy.lab.eval import run_suite

    model, tokenizer = testbed
    result = run_suite(model, tokenizer, None, [task], [1024], 8, seed=TEST_SEED, batch_size=8)
    assert result.scores[task][1024] >= FLOOR_1024[task]


@pytest.mark.slow
@pytest.mark.parametrize("task", FAR_TASKS)
def test_full_cache_accuracy_at_2048(testbed, task):
    """The longest trained length, where retrieving from the first few hundred tokens needs the RoPE base the
    recipe's second tail raises (docs/testbed.md, "A larger RoPE base in the second tail")."""
    from kvpolicy.lab.eval import run_suite

    model, tokenizer = testbed
    result = run_suite(model, tokenizer, None, [task], [2048], 8, seed=TEST_SEED, batch_size=8)
    assert result.scores[task][2048] >= 0.75


def test_evaluate_policy_full_cache_and_window(testbed):
    """A window wider than the context changes nothing; a narrow one prunes and reports it."""
    from kvpolicy.lab.eval import evaluate_policy

    model, tokenizer = testbed
    tasks, lengths = ["single_needle", "variable_tracking"], [128]
    full = evaluate_policy(model, tokenizer, None, {}, tasks, lengths, 6, seed=TEST_SEED)
    wide = evaluate_policy(model, tokenizer, "window", {"window": 4096}, tasks, lengths, 6, seed=TEST_SEED)
    narrow = evaluate_policy(model, tokenizer, "window", {"window": 16}, tasks, lengths, 6, seed=TEST_SEED)
    assert wide.scores == full.scores and wide.compression == 0.0
    assert full.kv_bytes == full.full_kv_bytes > 0
    assert narrow.compression > 0.5 and narrow.kv_bytes < narrow.full_kv_bytes
    assert narrow.average <= full.average
    assert narrow.prefill_seconds > 0 and narrow.decode_seconds > 0


def test_shipped_weights_come_from_the_current_recipe():
    """training_log.json beside the weights records the curriculum of the run that made them: it must be the
    one in train.py, so that running the script regenerates the shipped model."""
    import json

    from kvpolicy.lab.testbed.train import CURRICULUM, logged_phase, phase_record

    log = json.loads((MODEL_DIR / "training_log.json").read_text())
    # fields added to Phase after the run are at their defaults in CURRICULUM (what the run did)
    assert [logged_phase(p) for p in log["curriculum"]] == [phase_record(p) for p in CURRICULUM]
    assert log["steps"] == sum(p.max_steps for p in CURRICULUM)   # every phase ran to its cap
