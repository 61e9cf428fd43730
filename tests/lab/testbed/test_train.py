"""The training script's pieces: set loss and its weights, batching, the mixed-length phase, determinism."""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, replace

import pytest
import torch

from kvpolicy.lab.testbed.tasks import training_sequence
from kvpolicy.lab.testbed.train import (
    CURRICULUM,
    TAIL2_ROPE_THETA,
    Phase,
    collate,
    forbid_tensor,
    lr_at,
    phase_lr,
    resume_point,
    scaled_curriculum,
    set_loss,
    tail_overrides,
    train,
    unlikelihood,
)


def test_set_loss_is_the_log_probability_of_the_allowed_set():
    logits = torch.log(torch.tensor([[[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]]]))          # (B=1, T=2, V=3)
    targets = torch.tensor([[[1, 2, -1, -1], [0, -1, -1, -1]]])                   # {1, 2} then {0}
    loss, correct, supervised = set_loss(logits, targets)
    assert loss.item() == pytest.approx((-math.log(0.3 + 0.2) - math.log(0.1)) / 2, rel=1e-5)
    assert correct.tolist() == [False, False] and supervised.all()
    # argmax inside the allowed set counts as correct; unsupervised positions are left out
    _, correct, supervised = set_loss(logits, torch.tensor([[[0, 2, -1, -1], [-1, -1, -1, -1]]]))
    assert correct.tolist() == [True] and supervised.tolist() == [[True, False]]


def test_unlikelihood_penalises_the_values_given_already():
    logits = torch.log(torch.tensor([[[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]]]))
    forbid = torch.tensor([[[0, 2, -1, -1], [-1, -1, -1, -1]]])                    # {0, 2} at t=0 only
    assert unlikelihood(logits, forbid).item() == pytest.approx(-math.log(1 - 0.7), rel=1e-5)
    assert unlikelihood(logits, torch.full_like(forbid, -1)).item() == 0.0
    # certain repeats stay finite
    sure = torch.tensor([[[30.0, -30.0, -30.0]]])
    assert math.isfinite(unlikelihood(sure, torch.tensor([[[0, -1, -1, -1]]])).item())


def test_forbid_tensor_matches_the_sequences():
    rng = random.Random(4)
    seqs = [training_sequence(rng, 256, repeat_prob=0.0, shift_prob=0.0) for _ in range(8)]
    forbid = forbid_tensor(seqs, 256)
    for b, seq in enumerate(seqs):
        for t, banned in enumerate(seq.forbid):
            assert set(forbid[b, t][forbid[b, t] >= 0].tolist()) == set(banned)
    assert (forbid >= 0).any()


def test_the_tail_has_its_own_constant_rate_and_the_schedule_ignores_it():
    tails = [p for p in CURRICULUM if p.lr is not None]
    assert tails and CURRICULUM[-1].lr is not None and all(p.lr < 3e-3 for p in tails)
    # the cosine spans the scheduled phases only: it ends at 10 % of the peak at their last step
    scheduled = sum(p.max_steps for p in CURRICULUM if p.lr is None)
    assert lr_at(scheduled - 1, scheduled, 3e-3, 100) == pytest.approx(3e-4, rel=1e-3)


def test_collate_pads_and_keeps_every_allowed_target():
    rng = random.Random(3)
    seqs = [training_sequence(rng, 64) for _ in range(6)]
    ids, targets = collate(seqs, 64)
    assert ids.shape == (6, 64) and targets.shape[:2] == (6, 64)
    for b, seq in enumerate(seqs):
        assert ids[b, :len(seq.tokens)].tolist() == seq.tokens
        for t, allowed in enumerate(seq.targets):
            assert set(targets[b, t][targets[b, t] >= 0].tolist()) == set(allowed)


def test_target_width_grows_only_for_sets_of_more_than_four():
    """Groups of up to four values keep the four-wide target tensor (the loss of those batches is unchanged bit
    for bit); a six-value group widens it to six and no allowed value is dropped."""
    rng = random.Random(4)
    four = [training_sequence(rng, 512, repeat_prob=0.0, groups=(0.0, 1.0, 0.0), mv_min=4) for _ in range(4)]
    assert collate(four, 512)[1].shape[-1] == 4
    six = [training_sequence(rng, 512, repeat_prob=0.0, shift_prob=0.0, groups=(0.0, 1.0, 0.0), mv_min=6, mv_max=6)
           for _ in range(4)]
    _, targets = collate(six, 512)
    assert targets.shape[-1] == 6
    for b, seq in enumerate(six):
        for t, allowed in enumerate(seq.targets):
            assert sorted(targets[b, t][targets[b, t] >= 0].tolist()) == sorted(allowed)
    logits = torch.randn(1, 1, 40)
    allowed = torch.full((1, 1, 6), -1)
    allowed[0, 0] = torch.arange(6)
    loss, _, _ = set_loss(logits, allowed)
    assert torch.allclose(loss, -torch.log_softmax(logits[0, 0], -1)[:6].logsumexp(-1))


def test_dense_long_contexts_do_not_run_out_of_values():
    """A dense 2048-token context with many multi-value groups used to exhaust the 128 values (a crash)."""
    rng = random.Random(0)
    for _ in range(60):
        seq = training_sequence(rng, 2048, repeat_prob=0.0, shift_prob=0.0, sparse_prob=0.0)
        assert len(seq.tokens) <= 2048


def test_mixed_phase_keeps_tokens_per_step():
    phase = Phase(length=2048, batch=2, min_steps=1, max_steps=1, bar=1.0, mix=((8, 1), (4, 1), (2, 1), (1, 2)))
    rng = random.Random(0)
    shapes = [phase.step_shape(rng) for _ in range(600)]
    assert set(shapes) == {(256, 16), (512, 8), (1024, 4), (2048, 2)}
    assert 0.3 < shapes.count((2048, 2)) / len(shapes) < 0.5   # weight 2 of 5
    assert Phase(256, 12, 1, 1, 1.0).step_shape(rng) == (256, 12)


@pytest.mark.slow
def test_training_is_deterministic_for_a_seed(tmp_path):
    """Same seed, same weights (the claim that the script regenerates the shipped model)."""
    curriculum = (Phase(length=48, batch=4, min_steps=3, max_steps=3, bar=1.01),
                  Phase(length=96, batch=2, min_steps=2, max_steps=2, bar=1.01, mix=((2, 1), (1, 1))))
    for name in ("a", "b"):
        info = train(tmp_path / name, seed=5, curriculum=curriculum, threads=1, log_every=1)
        assert info["steps"] == 5
    from safetensors.torch import load_file

    a, b = (load_file(str(tmp_path / n / "model.safetensors")) for n in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log = json.loads((tmp_path / "a" / "training_log.json").read_text())
    assert [p["end_step"] for p in log["phases"]] == [3, 5]
    # a low-LR tail (fresh optimizer, unlikelihood on) changes no step before it
    tail = Phase(length=96, batch=2, min_steps=2, max_steps=2, bar=1.01, lr=1e-4, unlikely=1.0)
    info = train(tmp_path / "t", seed=5, curriculum=curriculum + (tail,), threads=1, log_every=1)
    assert info["history"][:5] == [{**h, "seconds": h2["seconds"]} for h, h2 in zip(log["history"], info["history"])]
    assert info["steps"] == 7 and [h["lr"] for h in info["history"][5:]] == [1e-4, 1e-4]
    train(tmp_path / "c", seed=6, curriculum=curriculum, threads=1)
    c = load_file(str(tmp_path / "c" / "model.safetensors"))
    assert not all(torch.equal(a[k], c[k]) for k in a)   # another seed, another run


def test_a_phase_forward_precision_is_applied_recorded_and_checked(tmp_path):
    """A bfloat16 phase runs its forward under CPU autocast: other weights than float32 from the same seed,
    the same weights again for that seed, float32 weights either way, and the choice is in the log."""
    from safetensors.torch import load_file

    weights = {}
    for name, precision in (("bf", "bfloat16"), ("bf2", "bfloat16"), ("fp", "float32")):
        curriculum = (Phase(length=48, batch=4, min_steps=2, max_steps=2, bar=1.01, precision=precision),)
        train(tmp_path / name, seed=5, curriculum=curriculum, threads=1)
        log = json.loads((tmp_path / name / "training_log.json").read_text())
        assert log["curriculum"][0]["precision"] == precision
        weights[name] = load_file(str(tmp_path / name / "model.safetensors"))
        assert all(t.dtype == torch.float32 for t in weights[name].values())
    assert all(torch.equal(weights["bf"][k], weights["bf2"][k]) for k in weights["bf"])
    assert not all(torch.equal(weights["bf"][k], weights["fp"][k]) for k in weights["bf"])
    with pytest.raises(ValueError, match="Phase.precision must be one of float32, bfloat16, got 'float16'"):
        Phase(length=48, batch=4, min_steps=2, max_steps=2, bar=1.01, precision="float16")
    # the schedule: float32 while the circuits form (48, 256, 1024 tokens), bfloat16 from the mixed phase on
    assert [p.precision for p in CURRICULUM] == ["float32"] * 3 + ["bfloat16"] * 3


def test_a_phase_rope_base_is_set_at_its_start_saved_and_replayed_on_resume(tmp_path):
    """A phase with ``rope_theta`` trains from its start at that RoPE base: the phases before it at the model's,
    the saved config carries the new base (a loaded model rotates as it was trained), the log records it, and a
    run resumed at that phase from weights saved before the change applies it too (the straight run bit for
    bit)."""
    from safetensors.torch import load_file
    from transformers import Qwen3ForCausalLM

    head = (Phase(length=48, batch=4, min_steps=2, max_steps=2, bar=1.01),)
    tail = Phase(length=48, batch=4, min_steps=2, max_steps=2, bar=1.01, lr=1e-3, rope_theta=1e5)
    train(tmp_path / "straight", seed=5, curriculum=head + (tail,), threads=1)
    train(tmp_path / "same_base", seed=5, curriculum=head + (replace(tail, rope_theta=None),), threads=1)
    train(tmp_path / "head", seed=5, curriculum=head, threads=1)
    log = json.loads((tmp_path / "head" / "training_log.json").read_text())
    train(tmp_path / "resumed", seed=5, curriculum=head + (tail,), threads=1, init=tmp_path / "head",
          resume=resume_point(log, head + (tail,), 1))

    def base(name):
        return json.loads((tmp_path / name / "config.json").read_text())["rope_parameters"]["rope_theta"]

    assert base("head") == base("same_base") == 1e4 and base("straight") == base("resumed") == 1e5
    loaded = Qwen3ForCausalLM.from_pretrained(str(tmp_path / "straight"), dtype=torch.float32)
    dim = loaded.config.head_dim
    expected = 1.0 / 1e5 ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)
    assert torch.allclose(loaded.model.rotary_emb.inv_freq, expected)
    logged = json.loads((tmp_path / "straight" / "training_log.json").read_text())["curriculum"]
    assert [p["rope_theta"] for p in logged] == [None, 1e5]
    a, b, c = (load_file(str(tmp_path / n / "model.safetensors")) for n in ("straight", "resumed", "same_base"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)   # the base changed what the tail learned


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 1.0, -1e4, True, "1e5"])
def test_a_phase_refuses_a_rope_base_that_is_not_a_finite_number_above_one(bad):
    with pytest.raises(ValueError, match="Phase.rope_theta must be a finite RoPE base > 1 or None"):
        Phase(length=48, batch=4, min_steps=2, max_steps=2, bar=1.01, rope_theta=bad)


def test_only_the_second_tail_raises_the_rope_base():
    assert [p.rope_theta for p in CURRICULUM] == [None] * 5 + [TAIL2_ROPE_THETA]


@pytest.mark.slow
def test_resuming_a_tail_from_saved_weights_equals_the_straight_run(tmp_path):
    """The weights saved at the end of a phase, the run's log and a replay of its data stream are all a
    phase with its own optimizer needs: resuming there gives the straight run bit for bit."""
    from safetensors.torch import load_file

    head = (Phase(length=48, batch=4, min_steps=3, max_steps=3, bar=1.01),
            Phase(length=96, batch=2, min_steps=2, max_steps=2, bar=1.01, mix=((2, 1), (1, 1))))
    tail = Phase(length=96, batch=2, min_steps=3, max_steps=3, bar=1.01, mix=((2, 1), (1, 1)), lr=1e-4,
                 groups=(0.2, 0.6, 0.2), mv_min=3)
    straight = train(tmp_path / "straight", seed=3, curriculum=head + (tail,), threads=1, log_every=1)
    train(tmp_path / "head", seed=3, curriculum=head, threads=1, log_every=1)
    log = json.loads((tmp_path / "head" / "training_log.json").read_text())
    resumed = train(tmp_path / "resumed", seed=3, curriculum=head + (tail,), threads=1, log_every=1,
                    init=tmp_path / "head", resume=resume_point(log, head + (tail,), 2))
    a, b = (load_file(str(tmp_path / n / "model.safetensors")) for n in ("straight", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    strip = [{k: v for k, v in h.items() if k != "seconds"} for h in straight["history"]]
    assert strip == [{k: v for k, v in h.items() if k != "seconds"} for h in resumed["history"]]
    assert [p["end_step"] for p in resumed["phases"]] == [3, 5, 8] and resumed["resumed"]["step"] == 5
    with pytest.raises(ValueError, match=r"keep: step\(s\) \[5\]"):   # step 5 ran before the resumed phase
        train(tmp_path / "x", seed=3, curriculum=head + (tail,), init=tmp_path / "head", keep=(5,),
              resume=resume_point(log, head + (tail,), 2))
    with pytest.raises(ValueError, match="seed"):   # another seed's stream is not the logged run's
        train(tmp_path / "x", seed=4, curriculum=head + (tail,), init=tmp_path / "head",
              resume=resume_point(log, head + (tail,), 2))
    # the replayed stream matters: a fresh stream (the probe path, --from-phase without --resume) differs
    fresh = train(tmp_path / "fresh", seed=3, curriculum=(tail,), threads=1, init=tmp_path / "head")
    c = load_file(str(tmp_path / "fresh" / "model.safetensors"))
    assert fresh["steps"] == 3 and not all(torch.equal(a[k], c[k]) for k in a)


def test_kept_weights_are_those_of_the_shorter_run(tmp_path):
    """``keep`` copies the weights at a step: at a constant rate that is the run stopped there."""
    from safetensors.torch import load_file

    def tail(steps):
        return (Phase(length=48, batch=4, min_steps=steps, max_steps=steps, bar=1.01, lr=1e-3),)

    train(tmp_path / "long", seed=5, curriculum=tail(3), threads=1, keep=(2,))
    train(tmp_path / "short", seed=5, curriculum=tail(2), threads=1)
    kept, short, last = (load_file(str(tmp_path / d / "model.safetensors"))
                         for d in ("long/step-2", "short", "long"))
    assert all(torch.equal(kept[k], short[k]) for k in short)
    assert not all(torch.equal(kept[k], last[k]) for k in last)   # step 3 moved on
    assert sorted(p.name for p in (tmp_path / "long").iterdir() if p.is_dir()) == ["step-2"]
    with pytest.raises(ValueError, match=r"keep: step\(s\) \[0, 4\] are not run here"):
        train(tmp_path / "x", seed=5, curriculum=tail(3), threads=1, keep=(0, 2, 4))


def test_an_averaging_phase_ends_with_the_mean_of_its_weights(tmp_path):
    """``Phase.average_every``: the phase's result is the mean of its starting weights and of the weights after
    every ``average_every`` of its steps (the kept snapshots), and the next phase starts from that mean."""
    from safetensors.torch import load_file

    head = (Phase(length=48, batch=4, min_steps=2, max_steps=2, bar=1.01),)
    swa = Phase(length=48, batch=4, min_steps=5, max_steps=5, bar=1.01, lr=1e-3, average_every=2)
    train(tmp_path / "head", seed=6, curriculum=head, threads=1)
    info = train(tmp_path / "swa", seed=6, curriculum=(swa,), threads=1, init=tmp_path / "head", keep=(2, 4, 5))
    points = [load_file(str(tmp_path / d / "model.safetensors"))
              for d in ("head", "swa/step-2", "swa/step-4")]
    got = load_file(str(tmp_path / "swa" / "model.safetensors"))
    last = load_file(str(tmp_path / "swa" / "step-5" / "model.safetensors"))
    for k in got:
        mean = (sum(p[k].double() for p in points) / 3).float()
        assert torch.equal(got[k], mean), k
    assert not all(torch.equal(got[k], last[k]) for k in got)
    assert info["phases"][0]["averaged"] == 3
    with pytest.raises(ValueError, match="average_every"):
        replace(swa, average_every=-1)
    with pytest.raises(ValueError, match="average_every"):
        replace(swa, average_every=1.5)


def test_resume_point_refuses_what_it_cannot_reproduce():
    head = (Phase(length=48, batch=4, min_steps=3, max_steps=3, bar=1.01),)
    tail = Phase(length=48, batch=4, min_steps=2, max_steps=2, bar=1.01, lr=1e-4)
    log = dict(curriculum=[json.loads(json.dumps(asdict(head[0])))], history=[],
               phases=[dict(phase=0, end_step=3, seconds=1.0)])
    point = resume_point(log, head + (tail,), 1)
    assert point["step"] == 3 and point["sched_step"] == 3 and point["done"] == [(head[0], 3)]
    with pytest.raises(ValueError, match="own optimizer"):
        resume_point(log, head + (Phase(48, 4, 2, 2, 1.01),), 1)   # the scheduled AdamW state is not saved
    with pytest.raises(ValueError, match="batch is 8"):
        resume_point(log, (replace(head[0], batch=8), tail), 1)
    with pytest.raises(ValueError, match="from_phase"):
        resume_point(log, head + (tail,), 0)
    older = dict(log, curriculum=[{k: v for k, v in log["curriculum"][0].items() if k != "mv_min"}])
    assert resume_point(older, head + (tail,), 1)["step"] == 3   # a field the log predates, at its default
    with pytest.raises(ValueError, match="mv_min"):
        resume_point(older, (replace(head[0], mv_min=3), tail), 1)


def test_a_phase_rate_is_constant_or_annealed_to_lr_end():
    flat = Phase(48, 4, 5, 5, 1.01, lr=1e-4)
    assert [phase_lr(flat, i) for i in range(5)] == [1e-4] * 5
    annealed = Phase(48, 4, 5, 5, 1.01, lr=1e-4, lr_end=1e-5)
    rates = [phase_lr(annealed, i) for i in range(5)]
    assert rates[0] == pytest.approx(1e-4) and rates[-1] == pytest.approx(1e-5)
    assert rates[2] == pytest.approx(5.5e-5) and all(a > b for a, b in zip(rates, rates[1:]))
    for bad in (dict(lr_end=1e-5), dict(lr=1e-4, lr_end=2e-4), dict(lr=1e-4, lr_end=float("nan")),
                dict(lr=float("nan")), dict(lr=0.0)):
        with pytest.raises(ValueError, match="Phase.lr"):
            Phase(48, 4, 5, 5, 1.01, **bad)


def test_a_phase_sets_the_repeat_share_of_its_sequences():
    def copy_share(phase, draws=300):
        rng = random.Random(5)
        seqs = [seq for _ in range(draws) for seq in phase.draw(rng)[1]]
        return sum("copy" in seq.kinds for seq in seqs) / len(seqs)

    assert copy_share(Phase(64, 1, 1, 1, 1.0, repeat_prob=0.0)) == 0.0
    assert 0.2 < copy_share(Phase(64, 1, 1, 1, 1.0)) < 0.4                    # the default, 0.3
    assert 0.8 < copy_share(Phase(64, 1, 1, 1, 1.0, repeat_prob=0.9)) <= 0.9  # 0.1 are shift sequences
    for bad in (-0.1, 0.95, float("nan")):
        with pytest.raises(ValueError, match="repeat_prob"):
            Phase(64, 1, 1, 1, 1.0, repeat_prob=bad)
    assert tail_overrides('{"repeat_prob": 0.4}') == {"repeat_prob": 0.4}


def test_tail_overrides_from_the_command_line_are_validated():
    assert tail_overrides(None) == {}
    assert tail_overrides('{"lr_end": 0, "groups": [0.05, 0.75, 0.2]}') == {"lr_end": 0, "groups": (0.05, 0.75, 0.2)}
    for bad, message in (('{"lr_end": 1}', "lr_end"), ('{"lr_ned": 0}', "unknown Phase field"),
                         ('[1]', "JSON object"), ("lr_end=0", "not JSON"), ('{"groups": [0.5, 0.6, 0.2]}', "groups"),
                         ('{"mv_min": 5}', "mv_min"), ('{"mv_max": 9}', "mv_max"), ('{"lr": null}', "own rate")):
        with pytest.raises(ValueError, match=message):
            tail_overrides(bad)


def test_tail_step_counts_from_the_command_line_override_the_scaled_ones():
    # --tail '{"max_steps": ...}' once failed with "replace() got multiple values for keyword argument"
    tail = tail_overrides('{"min_steps": 2000, "max_steps": 2000}')
    for scale in (1.0, 0.5):
        phases = scaled_curriculum(CURRICULUM, scale, tail)
        scheduled = [p for p in phases if p.lr is None]
        assert [(p.min_steps, p.max_steps) for p in phases if p.lr is not None] == [(2000, 2000)] * sum(
            p.lr is not None for p in CURRICULUM)
        assert [(p.min_steps, p.max_steps) for p in scheduled] == [
            (max(1, int(p.min_steps * scale)), max(1, int(p.max_steps * scale))) for p in CURRICULUM if p.lr is None]
    assert scaled_curriculum(CURRICULUM, 1.0, {}) == CURRICULUM
