"""The evaluation suite: held-out task sets, exact-match scoring, timing and KV accounting.

Training draws its data from ``random.Random("kvpolicy-testbed/train/<seed>")`` streams; evaluation sets
come from :func:`kvpolicy.lab.testbed.tasks.generate` with ``EVAL_SEED`` (and the tests use other seeds), so no
evaluation example is a training sequence.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch

from kvpolicy.lab.testbed.tasks import TASKS, Example, generate_set
from kvpolicy.lab.testbed.tokenizer import VOCAB

EVAL_SEED = 1234
DEFAULT_LENGTHS = (256, 512, 1024, 2048, 4096)

GenerateFn = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]
"""``generate_fn(input_ids (B, T), attention_mask (B, T), max_new_tokens) -> generated ids (B, <= new)``.

It may return the prompt followed by the new tokens (as ``model.generate`` does) or the new tokens only;
the suite strips a leading copy of the prompt.
"""


def score_example(example: Example, generated: Sequence[int], strict: bool = False) -> float:
    """Exact match (1.0 or 0.0) of the greedy continuation against ``example.answer``.

    The answer's content tokens must be the first generated tokens, exactly (RULER scores whether the
    answer appears in the output; we demand it first and complete). The closing ``<eos>`` is only required
    when ``strict``: the testbed does not always stop cleanly (it may repeat the last answer token), and
    stopping is not what KV policies are compared on. ``unordered`` answers (multi_value: ``v1 key v2 key
    …``) match when the value slots hold the expected values as a multiset, in any order, and every other
    slot (the re-stated key) matches exactly.
    """
    expected = list(example.answer)
    if not strict and expected and expected[-1] == VOCAB.eos:
        expected = expected[:-1]
    got = list(generated[:len(expected)])
    if len(got) < len(expected):
        return 0.0
    if example.unordered:
        value_slots = [i for i, t in enumerate(expected) if t in _VALUE_IDS]
        other_slots = [i for i in range(len(expected)) if i not in value_slots]
        return float(Counter(got[i] for i in value_slots) == Counter(expected[i] for i in value_slots)
                     and all(got[i] == expected[i] for i in other_slots))
    return float(got == expected)


_VALUE_IDS = frozenset(VOCAB.values)


def greedy_generate_fn(model) -> GenerateFn:
    """Plain full-cache greedy decoding with ``model.generate``."""

    def generate_fn(input_ids, attention_mask, max_new_tokens):
        return model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                              do_sample=False, num_beams=1)

    return generate_fn


def _batches(examples: list[Example], batch_size: int) -> Iterable[list[Example]]:
    for i in range(0, len(examples), batch_size):
        yield examples[i:i + batch_size]


def _left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    return ids, mask


@dataclass
class SuiteResult:
    """Scores per task and context length (fraction exact-match), plus wall times.

    ``scores[task][length]`` in [0, 1]; ``n`` examples per cell. Times are totals in seconds over the suite:
    ``prefill_seconds`` / ``decode_seconds`` are filled when the generate function is timed per forward
    (see :func:`evaluate_policy`), otherwise only ``generate_seconds`` is.
    """

    scores: dict[str, dict[int, float]] = field(default_factory=dict)
    n: int = 0
    generate_seconds: float = 0.0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    decode_steps: int = 0

    def task_score(self, task: str) -> float:
        cells = self.scores[task]
        return sum(cells.values()) / len(cells)

    @property
    def average(self) -> float:
        tasks = list(self.scores)
        return sum(self.task_score(t) for t in tasks) / len(tasks) if tasks else 0.0

    def table(self) -> str:
        lengths = sorted({length for cells in self.scores.values() for length in cells})
        head = f"{'task':<18}" + "".join(f"{length:>8}" for length in lengths) + f"{'mean':>8}"
        rows = [head]
        for task, cells in self.scores.items():
            rows.append(f"{task:<18}" + "".join(f"{cells.get(length, float('nan')):>8.3f}" for length in lengths)
                        + f"{self.task_score(task):>8.3f}")
        rows.append(f"{'average':<18}" + " " * 8 * len(lengths) + f"{self.average:>8.3f}")
        return "\n".join(rows)


def run_suite(model, tokenizer, generate_fn: GenerateFn | None = None, tasks: Sequence[str] = TASKS,
              lengths: Sequence[int] = DEFAULT_LENGTHS, n_per_task: int = 20, *, seed: int = EVAL_SEED,
              batch_size: int = 8, on_batch: Callable[[list[Example], torch.Tensor], None] | None = None,
              progress: bool = False, strict: bool = False,
              on_batch_start: Callable[[list[Example]], None] | None = None) -> SuiteResult:
    """Generate ``n_per_task`` held-out examples per (task, length) and score greedy answers exactly.

    ``generate_fn`` defaults to full-cache greedy decoding. Prompts of one batch are left-padded with the
    tokenizer's pad id (all prompts of one task and length have the same length, so batches of one cell
    need no padding). ``on_batch(examples, new_tokens)`` is called after each batch (used for KV accounting).
    ``strict`` also requires the closing ``<eos>`` (see :func:`score_example`).
    """
    for task in tasks:
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    generate_fn = generate_fn or greedy_generate_fn(model)
    pad_id = tokenizer.pad_token_id
    result = SuiteResult(n=n_per_task)
    cells = [(task, length) for task in tasks for length in lengths]
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(cells) * n_per_task, desc="eval", unit="ex", dynamic_ncols=True)
    for task, length in cells:
        examples = generate_set(task, length, seed, n_per_task)
        correct = 0.0
        for batch in _batches(examples, batch_size):
            ids, mask = _left_pad([e.prompt for e in batch], pad_id)
            if on_batch_start is not None:
                on_batch_start(batch)
            new = max(len(e.answer) for e in batch)
            start = time.perf_counter()
            with torch.no_grad():
                out = generate_fn(ids, mask, new)
            result.generate_seconds += time.perf_counter() - start
            if out.shape[1] >= ids.shape[1] and torch.equal(out[:, :ids.shape[1]], ids):
                out = out[:, ids.shape[1]:]
            for example, row in zip(batch, out.tolist()):
                correct += score_example(example, row, strict)
            if on_batch is not None:
                on_batch(batch, out)
            if bar is not None:
                bar.update(len(batch))
        result.scores.setdefault(task, {})[length] = correct / len(examples)
    if bar is not None:
        bar.close()
    return result


class _ForwardTimer:
    """Times every forward of ``model``: the first of each call (no cache yet) is the prefill.

    With ``question_after_prefill`` the question's forward is counted as decode time.
    """

    def __init__(self, model) -> None:
        self.model = model
        self.prefill = self.decode = 0.0
        self.decode_steps = 0
        self._start = 0.0
        self._first = True
        self._hooks = []

    def __enter__(self):
        self._hooks = [self.model.register_forward_pre_hook(self._pre),
                       self.model.register_forward_hook(self._post)]
        return self

    def __exit__(self, *exc):
        for hook in self._hooks:
            hook.remove()

    def new_call(self) -> None:
        self._first = True

    def continuing(self) -> None:
        """The next forwards of this call feed a question / decode: count them as decode."""
        self._first = False

    def _pre(self, module, args):
        self._start = time.perf_counter()

    def _post(self, module, args, output):
        elapsed = time.perf_counter() - self._start
        if self._first:
            self.prefill += elapsed
            self._first = False
        else:
            self.decode += elapsed
            self.decode_steps += 1


@dataclass
class EvalResult:
    """One policy over the suite.

    ``compression``: pruned / all KV entries after generation, over every batch (0 for the full cache);
    ``kv_bytes``: bytes the cache held at the end of generation, summed over all examples;
    ``full_kv_bytes``: the same for an unpruned dense cache; times in seconds, totals over the suite.
    """

    policy: str | None
    policy_config: dict
    suite: SuiteResult
    compression: float
    kv_bytes: int
    full_kv_bytes: int
    per_layer_compression: tuple[float, ...] = ()

    @property
    def scores(self) -> dict[str, dict[int, float]]:
        return self.suite.scores

    @property
    def average(self) -> float:
        return self.suite.average

    @property
    def prefill_seconds(self) -> float:
        return self.suite.prefill_seconds

    @property
    def decode_seconds(self) -> float:
        return self.suite.decode_seconds

    def summary(self) -> str:
        name = self.policy or "full cache"
        return (f"{name} {self.policy_config or ''}\n{self.suite.table()}\n"
                f"compression {self.compression:.3f}  KV {self.kv_bytes / 2**20:.2f} MiB of "
                f"{self.full_kv_bytes / 2**20:.2f} MiB  prefill {self.suite.prefill_seconds:.2f}s  "
                f"decode {self.suite.decode_seconds:.2f}s ({self.suite.decode_steps} steps)")


def _dense_kv_bytes(model, tokens: int) -> int:
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    elt = next(model.parameters()).element_size()
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * tokens * elt


def evaluate_policy(model, tokenizer, policy: str | None = None, policy_config: dict | None = None,
                    tasks: Sequence[str] = TASKS, lengths: Sequence[int] = DEFAULT_LENGTHS, n: int = 20, *,
                    seed: int = EVAL_SEED, batch_size: int = 8, layout: str = "ragged",
                    progress: bool = False, strict: bool = False, question_after_prefill: bool = True) -> EvalResult:
    """Run the suite with ``policy`` (a registry name, configured by ``policy_config``; None = full cache).

    The policy is attached with ``kvpolicy.adapters.hf.apply`` for the whole suite; every example batch
    starts from a fresh policy cache. With ``question_after_prefill`` (default) the context is prefilled and
    pruned first and the question (``<q> key``, or ``<repeat>`` + anchor) is fed afterwards, through the
    pruned cache, as in KVzip's query-agnostic setting. Otherwise the whole prompt is one prefill, and since
    prefill attention sees the full KV, a one-token answer is then computed before anything is pruned
    (window=64 keeps single_needle at 100 % that way). Oracle policies (KVzip+) score each prompt unpadded, so they need
    batches of equal-length prompts, which every (task, length) cell is.
    """
    policy_config = dict(policy_config or {})
    model.eval()
    entries = pruned = 0
    layer_entries: list[int] = []
    layer_pruned: list[int] = []
    kv_bytes = full_bytes = 0
    timer = _ForwardTimer(model)

    def plain_generate(ids, mask, new):
        timer.new_call()
        return model.generate(ids, attention_mask=mask, max_new_tokens=new,
                              do_sample=False, num_beams=1, pad_token_id=tokenizer.pad_token_id)

    if policy is None:
        def account(batch, out):
            nonlocal kv_bytes, full_bytes
            for example in batch:
                tokens = len(example.prompt) + out.shape[1] - 1   # the last token is never written
                kv_bytes += _dense_kv_bytes(model, tokens)
            full_bytes = kv_bytes

        with timer:
            suite = run_suite(model, tokenizer, plain_generate, tasks, lengths, n, seed=seed,
                              batch_size=batch_size, on_batch=account, progress=progress, strict=strict)
    else:
        from kvpolicy.adapters.hf import apply

        context_len = 0

        def batch_start(batch):
            nonlocal context_len
            context_len = batch[0].context_len
            if any(e.context_len != context_len or len(e.prompt) != len(batch[0].prompt) for e in batch):
                raise ValueError("question_after_prefill needs batches of equal-length prompts")

        with apply(model, policy, tokenizer=tokenizer, layout=layout, **policy_config) as session:
            def split_generate(ids, mask, new):
                cache = session.new_cache()
                timer.new_call()
                model(ids[:, :context_len], attention_mask=mask[:, :context_len], past_key_values=cache,
                      use_cache=True)
                timer.continuing()
                return model.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=new,
                                      do_sample=False, num_beams=1, pad_token_id=tokenizer.pad_token_id)

            def account(batch, out):
                nonlocal entries, pruned, kv_bytes, full_bytes, layer_entries, layer_pruned
                report = session.report()
                entries += report.entries
                pruned += report.pruned
                if not layer_entries:
                    layer_entries = [0] * len(report.layers)
                    layer_pruned = [0] * len(report.layers)
                for i, stats in enumerate(report.layers):
                    layer_entries[i] += stats.entries
                    layer_pruned[i] += stats.pruned
                kv_bytes += session.kv_bytes()
                full_bytes += session.full_kv_bytes()

            with timer:
                suite = run_suite(model, tokenizer, split_generate if question_after_prefill else plain_generate,
                                  tasks, lengths, n, seed=seed, batch_size=batch_size, on_batch=account,
                                  progress=progress, strict=strict, on_batch_start=batch_start)
    suite.prefill_seconds, suite.decode_seconds, suite.decode_steps = timer.prefill, timer.decode, timer.decode_steps
    per_layer = tuple(p / e if e else 0.0 for p, e in zip(layer_pruned, layer_entries))
    return EvalResult(policy, policy_config, suite, pruned / entries if entries else 0.0, kv_bytes, full_bytes,
                      per_layer)
