"""The suite's scoring and plumbing, with a scripted generate function (no model needed)."""

import pytest
import torch

from kvpolicy.lab.eval import run_suite, score_example
from kvpolicy.lab.testbed.tasks import generate, restated_values
from kvpolicy.lab.testbed.tokenizer import VOCAB, build_tokenizer


def test_exact_match_scoring():
    ex = generate("single_needle", 64, 0, 0)
    assert score_example(ex, ex.answer) == 1.0
    assert score_example(ex, ex.answer + [VOCAB.pad]) == 1.0
    assert score_example(ex, [ex.answer[0], VOCAB.dot]) == 1.0            # stopping is not scored ...
    assert score_example(ex, [ex.answer[0], VOCAB.dot], strict=True) == 0.0   # ... unless strict
    assert score_example(ex, ex.answer, strict=True) == 1.0
    assert score_example(ex, [VOCAB.dot, ex.answer[0]]) == 0.0
    assert score_example(ex, []) == 0.0


def test_multi_value_is_scored_as_a_set():
    ex = generate("multi_value", 128, 0, 0)
    key, values = ex.prompt[-1], ex.answer[:-1:2]
    assert ex.answer == restated_values(key, values) + [VOCAB.eos]

    def said(vals, end=(VOCAB.eos,)):
        return restated_values(key, list(vals)) + list(end)

    assert score_example(ex, said(reversed(values)), strict=True) == 1.0       # any order
    assert score_example(ex, said(values[:-1] + values[:1])) == 0.0           # a value twice, one missing
    assert score_example(ex, said(values, [VOCAB.dot])) == 1.0
    assert score_example(ex, said(values, [VOCAB.dot]), strict=True) == 0.0
    assert score_example(ex, said(values[:2])) == 0.0
    wrong_key = [values[0], VOCAB.dot] + said(values)[2:]                     # the re-stated key is exact
    assert score_example(ex, wrong_key) == 0.0
    assert score_example(ex, values + [key] * 3) == 0.0                       # values first, keys after: no


class Oracle:
    """A generate_fn that answers from the examples it was built for; with ``wrong`` it never does."""

    def __init__(self, wrong=False):
        self.wrong = wrong
        self.calls = []

    def __call__(self, input_ids, attention_mask, max_new_tokens):
        self.calls.append((input_ids.shape, attention_mask.sum(1).tolist(), max_new_tokens))
        rows = []
        for prompt in input_ids.tolist():
            answer = self.lookup[tuple(prompt)]
            row = [VOCAB.dot] * len(answer) if self.wrong else answer
            rows.append(row + [VOCAB.pad] * (max_new_tokens - len(answer)))
        return torch.cat([input_ids, torch.tensor(rows)], dim=1)


@pytest.mark.parametrize("wrong", [False, True], ids=["right", "wrong"])
def test_run_suite_scores_per_task_and_length(wrong):
    from kvpolicy.lab.testbed.tasks import TASKS, generate_set

    oracle = Oracle(wrong)
    oracle.lookup = {tuple(e.prompt): e.answer for t in TASKS for n in (64, 96) for e in generate_set(t, n, 5, 3)}
    result = run_suite(None, build_tokenizer(), oracle, TASKS, [64, 96], 3, seed=5, batch_size=2)
    expected = 0.0 if wrong else 1.0
    assert result.scores == {t: {64: expected, 96: expected} for t in TASKS}
    assert result.average == expected
    assert all(max_new >= 2 for _, _, max_new in oracle.calls)
    assert "single_needle" in result.table()


def test_unknown_task_is_rejected():
    with pytest.raises(ValueError, match="known"):
        run_suite(None, build_tokenizer(), lambda *a: None, ["nope"], [64], 1)
