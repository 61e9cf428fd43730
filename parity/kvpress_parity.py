"""Parity of kvpolicy's KVzip(+) scores and KVzap keep-masks with kvpress 0.5.5, the public reference.

Both sides run on the same tiny random ``Qwen3ForCausalLM`` (built in code from one seed, float32) and the
same token ids. kvpress needs ``transformers<5.3``, so this module runs in its own environment
(``.venv-kvpress``, see ``requirements/kvpress-parity.txt`` and ``docs/parity.md``).

Nothing here is imported by the package or by the main test suite; ``tests/parity`` skips without kvpress.

What is compared (every intended difference is listed in ``docs/parity.md``):

- KVzip / KVzip+: our ``kvzip_plus`` oracle's ``compute_scores`` (log scores) against the per-token scores
  ``KVzipPress`` accumulates before it turns them into a mask (raw scores). When the context is a single
  chunk both sides compute the same quantity and must agree to float32 tolerance. With several chunks
  kvpress restricts each chunk's softmax to (sinks, that chunk, the repeat tokens); a kvpress variant whose
  softmax covers the whole sequence (:class:`_FullSoftmaxKVzip`) must then agree with ours again. Our repeat
  passes must be token-identical to kvpress's. KVzip+ ratio selection: kvpress's masks against ours with the
  settings that mean the same (``scope="model"``, 4 sinks, no window).
- KVzap: ``DMSPress(KVzapPress)`` (kvpress masks pruned keys with a fake key) against our threshold
  selection in the ``masked`` layout, prefill then teacher-forced decoding, same surrogate checkpoint on disk.
  Keep-masks must be identical; next-token logits of kvpress, our masked layout and our ragged layout
  (entries really removed) must agree to tolerance.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import string
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

# Importing kvpress wraps every attention function registered so far (for its fake keys). kvpolicy registers
# its own only when a session attaches, i.e. after this import, so ours is never wrapped.
from kvpress import DMSPress, KVzapPress, KVzipPress
from kvpress.presses.kvzap_press import KVzapConfig, KVzapModel
from transformers import DynamicCache, PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

import kvpolicy
from kvpolicy.adapters.hf import PolicyLayer, PolicySession
from kvpolicy.adapters.hf.capture import hook_attention_inputs
from kvpolicy.policies.kvzip_plus import SCORE_FLOOR
from kvpolicy.policy import LayerInputs


def adapter_mask_sizes_ok() -> bool:
    """transformers < 5.3 calls a cache layer's ``get_mask_sizes`` with the ``cache_position`` tensor, 5.3+
    with the query length (an int); our ``PolicyLayer`` must take both (it does since the fix found by this
    check). False means the HF adapter cannot run a forward under this transformers."""
    try:
        sizes = PolicyLayer("masked").get_mask_sizes(torch.arange(3))
    except Exception:  # noqa: BLE001 - any failure means the adapter does not handle this transformers
        return False
    return all(isinstance(v, int) for v in sizes) and tuple(sizes) == (3, 0)


SEED = 1234
# Every printable ASCII character is one token, so any prompt text tokenizes without a download.
CHARACTERS = ("\n", " ", *string.ascii_letters, *string.digits, *string.punctuation)
UNK = "<unk>"


# ------------------------------------------------------------------------------------------------------
# Tiny model and tokenizer, built in code
# ------------------------------------------------------------------------------------------------------
def build_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level tokenizer (97 tokens: ``<unk>`` and printable ASCII incl. newline), no chat template.

    kvpress's KVzip tokenizes its repeat prompt with the model's tokenizer, so one is needed; newlines must
    survive tokenization because the prompt starts with two of them.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {UNK: 0, **{ch: i + 1 for i, ch in enumerate(CHARACTERS)}}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token=UNK, clean_up_tokenization_spaces=False)


def model_config(layers: int = 2) -> Qwen3Config:
    # initializer_range 0.1 (HF default 0.02) so that attention is far from uniform and scores spread out.
    return Qwen3Config(
        vocab_size=len(CHARACTERS) + 1, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=8192,
        initializer_range=0.1, attn_implementation="sdpa",
    )


@dataclass
class Fixture:
    """The shared inputs of one parity run: a directory kvpress can load the tokenizer from, and a factory
    of identical fresh models (each side gets its own copy so no state leaks from one to the other)."""

    workdir: Path
    tokenizer: PreTrainedTokenizerFast
    config: Qwen3Config
    seed: int = SEED

    def model(self) -> Qwen3ForCausalLM:
        torch.manual_seed(self.seed)
        model = Qwen3ForCausalLM(self.config).eval()
        # kvpress's KVzip loads the tokenizer from here; its KVzap derives the surrogate's name from it.
        model.config.name_or_path = str(self.workdir)
        return model

    def token_ids(self, tokens: int, seed: int) -> torch.Tensor:
        """``(1, tokens)`` random ids, never ``<unk>``."""
        gen = torch.Generator().manual_seed(seed)
        return torch.randint(1, self.config.vocab_size, (1, tokens), generator=gen)


def make_fixture(workdir: str | Path, layers: int = 2, seed: int = SEED) -> Fixture:
    workdir = Path(workdir)
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(workdir)
    config = model_config(layers)
    config.save_pretrained(workdir)
    return Fixture(workdir, tokenizer, config, seed)


# ------------------------------------------------------------------------------------------------------
# Comparison records
# ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ScoreDiff:
    """One layer's scores, ours (log) against kvpress's (raw).

    ``max_abs_log``: max ``|ours - log(ref)|`` over entries finite on both sides; ``max_rel``: max
    ``|exp(ours) - ref| / ref`` over ``ref > 0``; ``zero_mismatch``: entries where exactly one side says
    "nobody attends to it" (ours: at the ``log(1e-30)`` floor, kvpress: ``0``).
    """

    layer: int
    entries: int
    max_abs_log: float
    max_rel: float
    zero_mismatch: int

    def ok(self, tol: float) -> bool:
        return self.zero_mismatch == 0 and self.max_abs_log <= tol and self.max_rel <= tol


def compare_scores(ours: dict[int, torch.Tensor], ref: dict[int, torch.Tensor]) -> list[ScoreDiff]:
    """``ours[l]``: ``(B, H, T)`` log scores; ``ref[l]``: ``(B, H, T)`` raw scores."""
    if sorted(ours) != sorted(ref):
        raise ValueError(f"layers differ: ours {sorted(ours)}, kvpress {sorted(ref)}")
    out = []
    for layer in sorted(ref):
        mine, theirs = ours[layer].double(), ref[layer].double()
        if mine.shape != theirs.shape:
            raise ValueError(f"layer {layer}: shape {tuple(mine.shape)} (ours) vs {tuple(theirs.shape)} (kvpress)")
        zero_ours, zero_ref = mine <= math.log(SCORE_FLOOR) + 1e-6, theirs <= 0
        both = ~zero_ours & ~zero_ref
        abs_log = (mine[both] - theirs[both].log()).abs()
        rel = (mine[both].exp() - theirs[both]).abs() / theirs[both]
        out.append(ScoreDiff(
            layer=layer,
            entries=int(theirs.numel()),
            max_abs_log=float(abs_log.max()) if abs_log.numel() else 0.0,
            max_rel=float(rel.max()) if rel.numel() else 0.0,
            zero_mismatch=int((zero_ours ^ zero_ref).sum()),
        ))
    return out


@dataclass(frozen=True)
class Timing:
    """Wall time of one side, seconds: median and minimum over ``repeats`` runs after one warm-up."""

    median: float
    best: float
    repeats: int


def time_call(fn: Callable[[], object], repeats: int) -> Timing:
    fn()  # warm-up: first-call allocations and lazy imports are not what we compare
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return Timing(statistics.median(samples), min(samples), repeats)


# ------------------------------------------------------------------------------------------------------
# KVzip / KVzip+: kvpress side
# ------------------------------------------------------------------------------------------------------
class _FullSoftmaxKVzip(KVzipPress):
    """kvpress's KVzip with one setting changed: each repeat query's softmax runs over the whole sequence
    (all context tokens + the repeat tokens so far) instead of (sinks, current chunk, repeat tokens).

    The result is sliced back to the columns kvpress keeps, so the rest of its scoring (normalization,
    max over queries and group) runs unchanged. Used to show that the softmax domain is the only difference
    between kvpress's chunked scores and ours.
    """

    def _compute_cross_attention(self, module, hidden_states, keys, kwargs):
        from kvpress.utils import get_prerope_query_states
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        batch, new, _ = hidden_states.shape
        kv_heads = module.config.num_key_value_heads
        group = module.config.num_attention_heads // kv_heads
        cos, sin = kwargs["position_embeddings"]
        queries = get_prerope_query_states(module, hidden_states)  # (B, Hq, L, D), before RoPE
        queries, _ = apply_rotary_pos_emb(queries, queries, cos, sin)
        queries = queries.view(batch, kv_heads, group, new, module.head_dim)
        total = keys.shape[2]
        logits = torch.einsum("bhgld,bhsd->bhgls", queries, keys) / math.sqrt(module.head_dim)
        query_pos = total - new + torch.arange(new)
        causal = torch.arange(total)[None, :] <= query_pos[:, None]
        weights = torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)
        sink = min(self.n_sink, self.start_idx)
        columns = torch.cat([torch.arange(sink), torch.arange(self.start_idx, self.end_idx),
                             torch.arange(total - new, total)])
        return weights[..., columns]


@dataclass
class KVzipRun:
    scores: dict[int, torch.Tensor]  # layer -> (B, H, T) raw scores
    repeat_ids: list[torch.Tensor]  # the repeat-pass input of each chunk, as kvpress built it
    chunk_ids: list[torch.Tensor]  # the context chunk each repeat pass reconstructs


def kvpress_kvzip(model, context_ids: torch.Tensor, *, plus: bool, chunk_size: int,
                  full_softmax: bool = False) -> KVzipRun:
    """Run kvpress's KVzip(+) on ``context_ids (1, T)`` and return its per-token scores before selection.

    kvpress only scores when it compresses, so a ratio > 0 is set; the scores are read just before its
    final step overwrites the sinks' scores and turns them into masked indices.
    """
    cls = _FullSoftmaxKVzip if full_softmax else KVzipPress
    press = cls(compression_ratio=0.5, kvzip_plus_normalization=plus, chunk_size=chunk_size)
    captured: dict = {}
    prepare, compress_post = press.prepare, press.compress_post

    def record_prepare(model_, tokenizer_, *args, **kwargs):
        pairs = prepare(model_, tokenizer_, *args, **kwargs)
        captured["pairs"] = [(a.clone(), r.clone()) for a, r in pairs]
        return pairs

    def record_scores(model_):
        captured["scores"] = press.score_val.detach().clone()
        return compress_post(model_)

    press.prepare, press.compress_post = record_prepare, record_scores
    with torch.no_grad(), press(model):
        model(input_ids=context_ids, past_key_values=DynamicCache(config=model.config))
    scores = captured["scores"]  # (layers, B, H, T)
    return KVzipRun(
        scores={layer: scores[layer].float() for layer in range(scores.shape[0])},
        repeat_ids=[r for _, r in captured["pairs"]],
        chunk_ids=[a for a, _ in captured["pairs"]],
    )


# ------------------------------------------------------------------------------------------------------
# KVzip / KVzip+: our side
# ------------------------------------------------------------------------------------------------------
def our_kvzip_policy(*, plus: bool, chunk_size: int, **overrides):
    return kvpolicy.get_policy("kvzip_plus", normalization=plus, chunk_size=chunk_size, **overrides)


def our_kvzip_scores(model, tokenizer, context_ids: torch.Tensor, policy,
                     passes: list[torch.Tensor] | None = None) -> dict[int, torch.Tensor]:
    """Our oracle's ``compute_scores`` (layer -> ``(B, H, T)`` float32 log scores).

    ``passes``: when given, the input ids of every repeat pass are appended to it."""
    with PolicySession(model, policy, tokenizer=tokenizer) as session:
        runner = session.oracle_runner()
        if passes is not None:
            forward = runner.forward

            def recording_forward(input_ids, observe):
                passes.append(input_ids.clone())
                return forward(input_ids, observe)

            runner = dataclasses.replace(runner, forward=recording_forward)
        return policy.compute_scores(runner, context_ids)


# ------------------------------------------------------------------------------------------------------
# KVzap: surrogate checkpoint shared by both sides
# ------------------------------------------------------------------------------------------------------
def random_surrogate_tensors(kind: str, hidden: int, kv_heads: int, layers: int, hidden_dim: int | None,
                             seed: int) -> dict[str, torch.Tensor]:
    """Weights in NVIDIA's KVzap layout, with a bias per layer that spreads the layers' score ranges."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(layers):
        if kind == "linear":
            tensors[f"layers.{layer}.weight"] = torch.randn(kv_heads, hidden, generator=gen) / math.sqrt(hidden)
            tensors[f"layers.{layer}.bias"] = torch.randn(kv_heads, generator=gen) * 0.5 - 2.0
        else:
            tensors[f"layers.{layer}.0.weight"] = torch.randn(hidden_dim, hidden, generator=gen) / math.sqrt(hidden)
            tensors[f"layers.{layer}.0.bias"] = torch.randn(hidden_dim, generator=gen) * 0.1
            tensors[f"layers.{layer}.2.weight"] = (torch.randn(kv_heads, hidden_dim, generator=gen)
                                                   / math.sqrt(hidden_dim))
            tensors[f"layers.{layer}.2.bias"] = torch.randn(kv_heads, generator=gen) * 0.5 - 2.0
    return tensors


def write_nvidia_checkpoint(directory: Path, tensors: dict[str, torch.Tensor], *, hidden: int, kv_heads: int,
                            layers: int, hidden_dim: int | None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` exactly as NVIDIA's KVzap checkpoints are laid out."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    config = {"model_type": "kvzap", "architectures": ["KVzapModel"], "input_dim": hidden,
              "output_dim": kv_heads, "n_modules": layers, "hidden_dim": hidden_dim, "dtype": "float32"}
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / "model.safetensors"),
              metadata={"format": "pt"})
    return directory


def load_kvpress_surrogate(directory: Path) -> KVzapModel:
    """kvpress's own loader (``from_pretrained`` of its ``KVzapModel`` class) on a local directory."""
    return KVzapModel.from_pretrained(str(directory)).eval()


# ------------------------------------------------------------------------------------------------------
# KVzap: both sides
# ------------------------------------------------------------------------------------------------------
@dataclass
class KVzapRun:
    alive: dict[int, torch.Tensor]  # layer -> (B, H, N) bool, N = prefill + decoded tokens
    logits: torch.Tensor  # (B, vocab) next-token logits after the last step
    scores: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (B, H, N) surrogate scores
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (B, N, hidden) attention inputs
    kv_bytes: int | None = None
    compression: dict[int, float] = field(default_factory=dict)  # layer -> pruned / all entries, as reported


def _capture_attention_inputs(model, store: dict[int, list[torch.Tensor]]) -> list:
    """Pre-hooks that record each layer's attention input (after the input norm)."""
    return hook_attention_inputs(model, lambda idx, hidden, _: store.setdefault(idx, []).append(hidden.detach()))


def kvpress_kvzap(model, prefill_ids: torch.Tensor, decode_ids: torch.Tensor, surrogate: KVzapModel, *,
                  kind: str, threshold: float, window: int, record: bool = True) -> KVzapRun:
    """``DMSPress(KVzapPress)`` over a prefill then one teacher-forced step per column of ``decode_ids``.

    ``record``: also capture every layer's attention inputs and the surrogate's scores of all tokens
    (off for timing)."""
    scorer = KVzapPress(model_type=kind)
    # kvpress names the surrogate after the model and downloads it; hand it ours under that name instead.
    scorer.kvzap_model_name = f"nvidia/KVzap-{kind}-{model.config.name_or_path.split('/')[-1]}"
    scorer.kvzap_model = surrogate
    press = DMSPress(press=scorer, threshold=threshold, sliding_window_size=window, decoding=True)
    hidden: dict[int, list[torch.Tensor]] = {}
    hooks = _capture_attention_inputs(model, hidden) if record else []
    cache = DynamicCache(config=model.config)
    try:
        with torch.no_grad(), press(model):
            out = model(input_ids=prefill_ids, past_key_values=cache)
            for step in range(decode_ids.shape[1]):
                out = model(input_ids=decode_ids[:, step:step + 1], past_key_values=cache)
    finally:
        for hook in hooks:
            hook.remove()
    alive, scores, inputs = {}, {}, {}
    for idx, layer in enumerate(model.model.layers):
        keys = cache.layers[idx].keys
        mask = torch.ones(keys.shape[:3], dtype=torch.bool)
        masked = getattr(layer.self_attn, "masked_key_indices", None)
        if masked is not None:
            mask[masked[0], masked[1], masked[2]] = False
        alive[idx] = mask
        if record:
            inputs[idx] = torch.cat(hidden[idx], dim=1)
            with torch.no_grad():  # what KVzapPress.score computes, for every token
                scores[idx] = surrogate.layers[idx](inputs[idx]).transpose(1, 2).float()
    return KVzapRun(alive, out.logits[:, -1].float(), scores, inputs, kv_bytes=_dense_bytes(cache),
                    compression=dict(press.compression_ratios))


def _dense_bytes(cache: DynamicCache) -> int:
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


def our_kvzap(model, prefill_ids: torch.Tensor, decode_ids: torch.Tensor, surrogate_dir: Path, *, kind: str,
              threshold: float, window: int, layout: str = "masked", policy=None) -> KVzapRun:
    """Our ``kvzap_<kind>`` policy over the same steps. ``alive`` is read from the masked layout's cache.
    ``policy``: an already built policy (timing: kvpress's surrogate is loaded once too)."""
    if policy is None:
        policy = kvpolicy.get_policy(f"kvzap_{kind}", surrogate=str(surrogate_dir), threshold=threshold,
                                     window=window)
    with PolicySession(model, policy, layout=layout) as session, torch.no_grad():
        cache = session.new_cache()
        out = model(input_ids=prefill_ids, past_key_values=cache)
        for step in range(decode_ids.shape[1]):
            out = model(input_ids=decode_ids[:, step:step + 1], past_key_values=cache)
    alive = {idx: layer.alive.clone() for idx, layer in enumerate(cache.layers)} if layout == "masked" else {}
    report = session.report(cache)
    return KVzapRun(alive, out.logits[:, -1].float(), kv_bytes=cache.kv_bytes(),
                    compression={s.layer_idx: s.compression for s in report.layers})


@dataclass(frozen=True)
class MaskDiff:
    """One layer's keep-masks: ``disagree`` entries differ; ``margin`` is the smallest
    ``|score - threshold|`` over judged entries (how close a decision came to flipping)."""

    layer: int
    entries: int
    disagree: int
    pruned_ours: int
    pruned_ref: int
    margin: float


def compare_masks(ours: KVzapRun, ref: KVzapRun, *, threshold: float, window: int) -> list[MaskDiff]:
    out = []
    for layer in sorted(ref.alive):
        mine, theirs = ours.alive[layer], ref.alive[layer]
        if mine.shape != theirs.shape:
            raise ValueError(f"layer {layer}: mask shape {tuple(mine.shape)} (ours) vs {tuple(theirs.shape)}")
        judged = max(0, theirs.shape[-1] - window)
        gap = (ref.scores[layer][..., :judged] - threshold).abs() if layer in ref.scores else torch.empty(0)
        out.append(MaskDiff(
            layer=layer,
            entries=int(theirs.numel()),
            disagree=int((mine != theirs).sum()),
            pruned_ours=int((~mine).sum()),
            pruned_ref=int((~theirs).sum()),
            margin=float(gap.min()) if gap.numel() and math.isfinite(threshold) else math.inf,
        ))
    return out


def default_workdir() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="kvpolicy-parity-")


# ------------------------------------------------------------------------------------------------------
# The comparisons (shared by parity/check_kvpress.py and tests/parity)
# ------------------------------------------------------------------------------------------------------
# float32 end to end; differences come from summation order only (measured ~1e-6, see docs/parity.md).
SCORE_TOL = 1e-4
LOGITS_TOL = 1e-4


class PassMismatch(AssertionError):
    """Our repeat passes are not token-identical to kvpress's (prompt text, suffix, tail or chunking differ)."""


def _check_same_passes(ours: list[torch.Tensor], ref: KVzipRun) -> None:
    mine = [p[0].tolist() for p in ours]
    theirs = [r[0].tolist() for r in ref.repeat_ids]
    if mine != theirs:
        raise PassMismatch(f"repeat passes differ: ours {len(mine)} passes of lengths {[len(p) for p in mine]}, "
                           f"kvpress {len(theirs)} of {[len(p) for p in theirs]}; first pass ours {mine[0][:48]}, "
                           f"kvpress {theirs[0][:48]}")


def kvzip_single_chunk(fx: Fixture, context_ids: torch.Tensor, *, plus: bool) -> list[ScoreDiff]:
    """One chunk (chunk size >= context): kvpress and ours compute the same quantity.

    Our policy runs with its default prompts and the fixture's tokenizer; its repeat pass must be
    token-identical to kvpress's (raises :class:`PassMismatch` otherwise) before scores are compared."""
    chunk_size = max(2048, context_ids.shape[1])
    ref = kvpress_kvzip(fx.model(), context_ids, plus=plus, chunk_size=chunk_size)
    passes: list[torch.Tensor] = []
    ours = our_kvzip_scores(fx.model(), fx.tokenizer, context_ids,
                            our_kvzip_policy(plus=plus, chunk_size=chunk_size), passes)
    _check_same_passes(passes, ref)
    return compare_scores(ours, ref.scores)


def kvzip_multi_chunk(fx: Fixture, context_ids: torch.Tensor, *, chunk_size: int
                      ) -> tuple[list[ScoreDiff], list[ScoreDiff]]:
    """KVzip+ over several chunks: (ours vs kvpress as shipped, ours vs kvpress with full-sequence softmax).
    The passes (continue prompt, 8-token tail, suffix, chunk) must be token-identical first."""
    ref = kvpress_kvzip(fx.model(), context_ids, plus=True, chunk_size=chunk_size)
    aligned = kvpress_kvzip(fx.model(), context_ids, plus=True, chunk_size=chunk_size, full_softmax=True)
    passes: list[torch.Tensor] = []
    ours = our_kvzip_scores(fx.model(), fx.tokenizer, context_ids,
                            our_kvzip_policy(plus=True, chunk_size=chunk_size), passes)
    _check_same_passes(passes, ref)
    return compare_scores(ours, ref.scores), compare_scores(ours, aligned.scores)


@dataclass(frozen=True)
class KVzapCase:
    kind: str  # "linear" | "mlp"
    prefill: int
    decode: int
    window: int
    quantile: float = 0.5  # threshold = this quantile of all surrogate scores (so both outcomes occur)
    threshold: float | None = None  # fixed threshold instead of the quantile
    hidden_dim: int = 8  # MLP width (hidden / 8, as in the published checkpoints)

    def describe(self) -> str:
        return f"prefill {self.prefill} + {self.decode} decoded, window {self.window}"


KVZAP_CASES = (
    KVzapCase("mlp", prefill=96, decode=8, window=16),
    KVzapCase("linear", prefill=96, decode=8, window=16),
    KVzapCase("mlp", prefill=10, decode=14, window=16),  # every judgement happens while decoding
    KVzapCase("linear", prefill=40, decode=4, window=0),  # no protected window: judged on arrival
    KVzapCase("mlp", prefill=40, decode=4, window=8, threshold=math.inf),  # prune all but the window
)


@dataclass(frozen=True)
class KVzapResult:
    threshold: float
    masks: list[MaskDiff]
    score_diff: float  # max |ours - kvpress| surrogate score over all tokens and layers
    logits_masked: float  # max |logits| difference, ours (masked layout) vs kvpress
    logits_ragged: float  # ours (ragged layout, pruned entries removed) vs kvpress (fake keys)
    bytes_ref: int
    bytes_ragged: int
    compression_ref: dict[int, float]  # DMSPress.compression_ratios (masked / all entries per layer)
    compression_ours: dict[int, float]  # our session.report(), ragged layout

    @property
    def compression_diff(self) -> float:
        return max(abs(self.compression_ours[l] - self.compression_ref[l]) for l in self.compression_ref)

    @property
    def ok(self) -> bool:
        return (all(d.disagree == 0 for d in self.masks) and self.score_diff <= SCORE_TOL
                and self.logits_masked <= LOGITS_TOL and self.logits_ragged <= LOGITS_TOL
                and self.compression_diff <= 1e-12)


def write_surrogate(directory: Path, fx: Fixture, kind: str, hidden_dim: int = 8, seed: int = 7) -> Path:
    cfg = fx.config
    width = hidden_dim if kind == "mlp" else None
    tensors = random_surrogate_tensors(kind, cfg.hidden_size, cfg.num_key_value_heads, cfg.num_hidden_layers,
                                       width, seed)
    return write_nvidia_checkpoint(directory / f"{kind}-{seed}", tensors, hidden=cfg.hidden_size,
                                   kv_heads=cfg.num_key_value_heads, layers=cfg.num_hidden_layers,
                                   hidden_dim=width)


def _our_surrogate_scores(policy, hidden: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """Our policy's ``score`` on given attention inputs ``(B, N, hidden)`` per layer -> ``(B, H, N)``."""
    out = {}
    for layer, h in hidden.items():
        batch, tokens, _ = h.shape
        heads = policy.surrogate.config.output_dim
        dummy = h.new_zeros((batch, heads, tokens, 1))  # the surrogate reads hidden states only
        out[layer] = policy.score(LayerInputs(layer_idx=layer, keys=dummy, values=dummy,
                                              positions=torch.arange(tokens), hidden_states=h))
    return out


def kvzap_case(fx: Fixture, surrogate_root: Path, case: KVzapCase) -> KVzapResult:
    directory = write_surrogate(surrogate_root, fx, case.kind, case.hidden_dim)
    surrogate = load_kvpress_surrogate(directory)
    prefill = fx.token_ids(case.prefill, seed=11)
    decode = fx.token_ids(max(case.decode, 1), seed=12)[:, : case.decode]
    threshold = case.threshold
    if threshold is None:  # a first pass without pruning gives the score distribution
        probe = kvpress_kvzap(fx.model(), prefill, decode, surrogate, kind=case.kind, threshold=-math.inf,
                              window=case.window)
        threshold = float(torch.cat([s.flatten() for s in probe.scores.values()]).quantile(case.quantile))
    ref = kvpress_kvzap(fx.model(), prefill, decode, surrogate, kind=case.kind, threshold=threshold,
                        window=case.window)
    masked = our_kvzap(fx.model(), prefill, decode, directory, kind=case.kind, threshold=threshold,
                       window=case.window, layout="masked")
    ragged = our_kvzap(fx.model(), prefill, decode, directory, kind=case.kind, threshold=threshold,
                       window=case.window, layout="ragged")
    ours_scores = _our_surrogate_scores(
        kvpolicy.get_policy(f"kvzap_{case.kind}", surrogate=str(directory), threshold=threshold, window=case.window),
        ref.hidden)
    score_diff = max(float((ours_scores[l] - ref.scores[l]).abs().max()) for l in ref.scores)
    return KVzapResult(
        threshold=threshold,
        masks=compare_masks(masked, ref, threshold=threshold, window=case.window),
        score_diff=score_diff,
        logits_masked=float((masked.logits - ref.logits).abs().max()),
        logits_ragged=float((ragged.logits - ref.logits).abs().max()),
        bytes_ref=ref.kv_bytes,
        bytes_ragged=ragged.kv_bytes,
        compression_ref=ref.compression,
        compression_ours=ragged.compression,
    )


@dataclass(frozen=True)
class TimingPair:
    """One measurement, both sides on the same input and thread count."""

    what: str
    ours: Timing
    ref: Timing

    @property
    def ratio(self) -> float:
        """Ours / kvpress, medians (below 1: ours is faster)."""
        return self.ours.median / self.ref.median


def time_kvzip(fx: Fixture, context_ids: torch.Tensor, repeats: int = 5) -> list[TimingPair]:
    """KVzip+ on one context, one chunk.

    1. Scoring: kvpress's press around the prefill (prefill, repeat pass, scores; its final top-k over the
       scores is included and negligible) vs our ``compute_scores`` (the runner's prefill, repeat pass, scores).
    2. End to end, ratio 0.5: the same kvpress run vs our prefill under a session (``compute_scores`` plus a
       second prefill that prunes into the ragged cache; kvpress reuses its prefill cache and only masks).
    """
    chunk_size = max(2048, context_ids.shape[1])
    ref_model, our_model = fx.model(), fx.model()
    policy = our_kvzip_policy(plus=True, chunk_size=chunk_size)
    ref = time_call(lambda: kvpress_kvzip(ref_model, context_ids, plus=True, chunk_size=chunk_size), repeats)
    ours = time_call(lambda: our_kvzip_scores(our_model, fx.tokenizer, context_ids, policy), repeats)

    def end_to_end() -> None:
        with PolicySession(our_model, policy, tokenizer=fx.tokenizer) as session, torch.no_grad():
            our_model(input_ids=context_ids, past_key_values=session.new_cache())

    return [TimingPair("KVzip+ scoring", ours, ref),
            TimingPair("KVzip+ prefill with pruning (ours: ragged)", time_call(end_to_end, repeats), ref)]


def time_kvzap(fx: Fixture, surrogate_root: Path, context_ids: torch.Tensor, repeats: int = 5,
               window: int = 128) -> list[TimingPair]:
    """KVzap-MLP on one context.

    1. Scoring alone: kvpress's ``KVzapPress.score`` vs our policy's ``score`` on the same attention inputs,
       all layers.
    2. Prefill with threshold pruning: ``DMSPress`` (sdpa attention, keys masked afterwards) vs ours in the
       ragged layout (pruned entries removed) and in the masked layout.
    """
    directory = write_surrogate(surrogate_root, fx, "mlp")
    surrogate = load_kvpress_surrogate(directory)
    none = context_ids[:, :0]
    ref_model, our_model = fx.model(), fx.model()
    probe = kvpress_kvzap(fx.model(), context_ids, none, surrogate, kind="mlp", threshold=-math.inf, window=window)
    scorer = KVzapPress(model_type="mlp")
    scorer.kvzap_model = surrogate
    policy = kvpolicy.get_policy("kvzap_mlp", surrogate=str(directory), threshold=-2.0, window=window)
    dummy = context_ids.new_zeros(())
    modules = list(ref_model.model.layers)

    def ref_scores() -> None:
        with torch.no_grad():
            for idx, h in probe.hidden.items():
                scorer.score(modules[idx].self_attn, h, dummy, dummy, None, {})

    pairs = [TimingPair("KVzap-MLP scoring alone", time_call(lambda: _our_surrogate_scores(policy, probe.hidden),
                                                             repeats * 10), time_call(ref_scores, repeats * 10))]
    ref = time_call(lambda: kvpress_kvzap(ref_model, context_ids, none, surrogate, kind="mlp", threshold=-2.0,
                                          window=window, record=False), repeats)
    for layout in ("ragged", "masked"):
        ours = time_call(lambda layout=layout: our_kvzap(our_model, context_ids, none, directory, kind="mlp",
                                                         threshold=-2.0, window=window, layout=layout,
                                                         policy=policy), repeats)
        pairs.append(TimingPair(f"KVzap-MLP prefill with pruning (ours: {layout})", ours, ref))
    return pairs


def time_plain_prefill(fx: Fixture, context_ids: torch.Tensor, repeats: int = 5) -> Timing:
    """The model's own prefill (sdpa, DynamicCache, no policy): the floor both sides add to."""
    model = fx.model()

    def run() -> None:
        with torch.no_grad():
            model(input_ids=context_ids, past_key_values=DynamicCache(config=model.config))

    return time_call(run, repeats)


def judge_once_rule(scores: torch.Tensor, threshold: float, window: int) -> torch.Tensor:
    """Reference keep-mask of the rule both sides claim: the newest ``window`` tokens are kept (pending), every
    older one was judged once when it left the window and is pruned iff ``score < threshold``.

    ``scores``: ``(B, H, N)`` scores of all N tokens in arrival order. Because a judged token is never
    judged again, the rule only depends on the final length N, not on how tokens were split into steps.
    """
    judged = max(0, scores.shape[-1] - window)
    keep = torch.ones_like(scores, dtype=torch.bool)
    keep[..., :judged] = ~(scores[..., :judged] < threshold)
    return keep


def kvpress_saved_checkpoint_loads(fx: Fixture, directory: Path, seed: int = 3) -> bool:
    """Save a random ``KVzapModel`` (linear and MLP) with kvpress's ``save_pretrained``; our policy must load it
    and score like kvpress's module. Returns True on success, raises AssertionError with details otherwise."""
    cfg = fx.config
    gen = torch.Generator().manual_seed(seed)
    for kind, width in (("linear", None), ("mlp", 8)):
        torch.manual_seed(seed)
        model = KVzapModel(KVzapConfig(input_dim=cfg.hidden_size, output_dim=cfg.num_key_value_heads,
                                       n_modules=cfg.num_hidden_layers, hidden_dim=width)).eval()
        target = directory / f"saved-by-kvpress-{kind}"
        model.save_pretrained(str(target))
        policy = kvpolicy.get_policy(f"kvzap_{kind}", surrogate=str(target), threshold=0.0)
        hidden = {layer: torch.randn(1, 9, cfg.hidden_size, generator=gen) for layer in range(cfg.num_hidden_layers)}
        ours = _our_surrogate_scores(policy, hidden)
        for layer, h in hidden.items():
            with torch.no_grad():
                ref = model.layers[layer](h).transpose(1, 2)
            diff = float((ours[layer] - ref).abs().max())
            assert diff <= SCORE_TOL, f"{kind} layer {layer}: max |diff| {diff:.2e}"
    return True


@dataclass(frozen=True)
class SelectionDiff:
    """KVzip(+) keep-masks after the prefill: kvpress's global ratio selection vs ours with the settings that
    mean the same thing. ``boundary_gap``: score gap (ours, log) between the last kept and the first pruned
    candidate; a gap above the score tolerance means no near-tie could flip a decision."""

    entries: int
    disagree: int
    pruned_ours: int
    pruned_ref: int
    boundary_gap: float


def kvzip_selection(fx: Fixture, context_ids: torch.Tensor, *, ratio: float = 0.5, sinks: int = 4) -> SelectionDiff:
    """kvpress: ``KVzipPress(compression_ratio, layerwise=False, n_sink=4)`` ranks all (layer, head, token)
    scores together, protects the first 4 tokens, no recent window, and masks pruned keys. Ours:
    ``kvzip_plus`` with ``ratio``, ``scope="model"``, ``sinks=4``, ``window=0``, masked layout."""
    model = fx.model()
    press = KVzipPress(compression_ratio=ratio, kvzip_plus_normalization=True, n_sink=sinks,
                       chunk_size=max(2048, context_ids.shape[1]))
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), press(model):
        model(input_ids=context_ids, past_key_values=cache)
    ref = {}
    for idx, layer in enumerate(model.model.layers):
        mask = torch.ones(cache.layers[idx].keys.shape[:3], dtype=torch.bool)
        batch_idx, head_idx, token_idx = layer.self_attn.masked_key_indices
        mask[batch_idx, head_idx, token_idx] = False
        ref[idx] = mask
    policy = kvpolicy.get_policy("kvzip_plus", ratio=ratio, scope="model", sinks=sinks, window=0,
                                 chunk_size=max(2048, context_ids.shape[1]))
    ours_model = fx.model()
    with PolicySession(ours_model, policy, tokenizer=fx.tokenizer, layout="masked") as session, torch.no_grad():
        ours_cache = session.new_cache()
        ours_model(input_ids=context_ids, past_key_values=ours_cache)
        scores = policy.compute_scores(session.oracle_runner(), context_ids)
    ours = {idx: layer.alive.clone() for idx, layer in enumerate(ours_cache.layers)}
    flat_scores = torch.cat([scores[l][..., sinks:].flatten() for l in sorted(scores)])
    flat_kept = torch.cat([ours[l][..., sinks:].flatten() for l in sorted(ours)])
    gap = float(flat_scores[flat_kept].min() - flat_scores[~flat_kept].max()) if (~flat_kept).any() else math.inf
    return SelectionDiff(
        entries=sum(int(m.numel()) for m in ref.values()),
        disagree=sum(int((ours[l] != ref[l]).sum()) for l in ref),
        pruned_ours=sum(int((~m).sum()) for m in ours.values()),
        pruned_ref=sum(int((~m).sum()) for m in ref.values()),
        boundary_gap=gap,
    )
