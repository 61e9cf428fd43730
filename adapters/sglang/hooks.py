"""The SGLang hooks that install the head-row pool and per-request eviction in a scheduler process.

Registered with SGLang's ``HookRegistry`` by :func:`kvpolicy.adapters.sglang.plugin.register` when the launcher
has set the policy (``KVPOLICY_SGLANG_CONFIG``); SGLang applies them before any pool exists:

- ``KVCacheConfigurator._derive_pool_sizes`` (around): the dense token count ``N`` becomes ``N'``, the tokens
  whose head-rows and index fit the same bytes (:func:`~kvpolicy.adapters.sglang.head_rows.plan_rows`), so
  SGLang's own accounting sees the real capacity;
- ``KVCacheConfigurator._build_mha_kv_pool`` (around): a :class:`HeadRowKVCache` with ``k·N'`` slots and
  ``N'·L·H`` rows instead of the dense pool;
- ``KVCacheConfigurator._build_token_to_kv_pool_allocator`` (around): a :class:`HeadRowAllocator` over it;
- ``Scheduler.run_batch`` (around): tell the controller which requests the forward runs;
- ``Scheduler.process_batch_result`` (around): agree on the forward's outcome (one collective over the TP group
  when there are several ranks, :mod:`kvpolicy.adapters.sglang.ranks`), finish requests whose policy failed,
  with the reason, and re-open admission after the policy freed rows (SGLang otherwise waits for a request to
  leave);
- ``Scheduler.get_next_batch_to_run`` and ``Scheduler.on_idle`` (around): under tensor parallelism, agree on the
  pool's sizes again first if anything moved since the last agreement, so that every rank plans the same batch
  and the idle check reads exact sizes;
- ``TokenizerManager._create_tokenized_object`` (around, in the HTTP server process): check a request's policy
  choice (``custom_params.kv_policy``; a refusal is a ValueError, which SGLang answers with HTTP 400) and, when
  requests may choose, append its policy's namespace to its prefix-cache key (:mod:`.requests`);
- ``Scheduler.get_output_streamer_class`` (around): a streamer that adds each finished request's report
  (policy, rows freed, compression per KV head) to its ``meta_info["kvpolicy"]``.

Anything the pool cannot honour (MLA, hybrid sliding-window or Mamba models, a quantized KV cache, speculative
draft workers, overlap scheduling) raises with the reason instead of running dense.
"""

from __future__ import annotations

import logging

import torch

from kvpolicy.adapters.sglang._internals import check_sglang_version
from kvpolicy.adapters.sglang.config import SGLangPolicyConfig
from kvpolicy.adapters.sglang.head_rows import plan_rows
from kvpolicy.adapters.sglang.requests import META_KEY, with_namespace
from kvpolicy.adapters.sglang.row_pool import HeadRowAllocator, HeadRowKVCache
from kvpolicy.adapters.sglang.row_tree import HeadRowRadixCache

check_sglang_version()

import msgspec  # noqa: E402  (an SGLang dependency)

CONFIGURATOR = "sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator"
SCHEDULER = "sglang.srt.managers.scheduler.Scheduler"
TOKENIZER = "sglang.srt.managers.tokenizer_manager.TokenizerManager"

log = logging.getLogger(__name__)


class PoolHooks:
    """The configurator and scheduler hooks for one policy configuration."""

    def __init__(self, config: SGLangPolicyConfig) -> None:
        self.config = config
        self.choices = config.request_policies()

    # -- KV cache configurator ---------------------------------------------------------------------------
    @staticmethod
    def _dims(configurator) -> tuple[int, int, int, int, int]:
        from sglang.srt.mem_cache import kv_cache_configurator as kvc

        parallel = kvc.get_parallel()
        heads = configurator.model_config.get_num_kv_heads(parallel.attn_tp_size, parallel.attn_dcp_size)
        layers = configurator.layer_info.num_effective_layers
        head_dim = configurator.model_config.head_dim
        v_head_dim = configurator.model_config.v_head_dim or head_dim
        element = torch.empty((), dtype=configurator.kv_cache_dtype).element_size()
        return layers, heads, head_dim, v_head_dim, element

    @staticmethod
    def _refuse_unsupported(configurator) -> None:
        problems = {
            "an MLA model": configurator.use_mla_backend,
            "a hybrid sliding-window model": configurator.is_hybrid_swa,
            "a hybrid Mamba/linear-attention model": configurator.mambaish_config is not None,
            "speculative decoding (draft worker)": configurator.is_draft_worker,
        }
        found = [name for name, bad in problems.items() if bad]
        if found:
            raise RuntimeError(f"the kvpolicy head-row pool does not support {', '.join(found)}")

    def derive_pool_sizes(self, original, configurator, *args, **kwargs):
        sizes = original(configurator, *args, **kwargs)
        self._refuse_unsupported(configurator)
        layers, heads, head_dim, v_head_dim, element = self._dims(configurator)
        plan = plan_rows(sizes.max_total_num_tokens, num_layers=layers, num_kv_heads=heads, k_head_dim=head_dim,
                         v_head_dim=v_head_dim, element_size=element, slot_expansion=self.config.slot_expansion)
        log.info("kvpolicy: head-row pool: %d dense tokens of KV memory hold %d tokens' rows (%d rows of %d "
                 "layers x %d KV heads) and %d slots (expansion %d); %.1f MiB", sizes.max_total_num_tokens,
                 plan.tokens, plan.rows, layers, heads, plan.slots, self.config.slot_expansion, plan.bytes / 2**20)
        return msgspec.structs.replace(sizes, max_total_num_tokens=plan.tokens)

    def build_mha_kv_pool(self, original, configurator, *, max_total_num_tokens: int, mha_pool_class,
                          quant_method=None):
        if quant_method is not None:
            raise RuntimeError("the kvpolicy head-row pool does not support a quantized KV cache")
        layers, heads, head_dim, v_head_dim, _ = self._dims(configurator)
        return HeadRowKVCache(
            slots=max_total_num_tokens * self.config.slot_expansion, rows=max_total_num_tokens * layers * heads,
            dtype=configurator.kv_cache_dtype, head_num=heads, head_dim=head_dim, v_head_dim=v_head_dim,
            layer_num=layers, device=configurator.device, start_layer=configurator.layer_info.start_layer,
            end_layer=configurator.layer_info.end_layer,
        )

    def build_allocator(self, original, configurator, **kwargs):
        pool = kwargs["token_to_kv_pool"]
        if not isinstance(pool, HeadRowKVCache):
            return original(configurator, **kwargs)
        if kwargs.get("token_to_kv_pool_allocator") is not None:
            raise RuntimeError("the kvpolicy head-row pool cannot share another worker's allocator")
        return HeadRowAllocator(pool, device=configurator.device, need_sort=False)

    # -- scheduler ---------------------------------------------------------------------------------------
    @staticmethod
    def _tree(holder) -> HeadRowRadixCache | None:
        """The head-row radix cache of a batch or a scheduler (None for any other cache)."""
        tree = getattr(holder, "tree_cache", None)
        return tree if isinstance(tree, HeadRowRadixCache) else None

    def run_batch(self, original, scheduler, batch, *args, **kwargs):
        tree = self._tree(batch)
        if tree is not None and tree.controller is not None:
            if scheduler.enable_overlap:
                raise RuntimeError("kvpolicy eviction needs --disable-overlap-schedule")
            tree.controller.begin_batch(batch.reqs)
        return original(scheduler, batch, *args, **kwargs)

    def process_batch_result(self, original, scheduler, batch, result, *args, **kwargs):
        tree = self._tree(batch)
        if tree is not None:
            outcome = tree.after_forward()  # the same on every TP rank
            if outcome.freed:
                # SGLang re-opens admission only when a request leaves; pruning frees rows while requests run.
                scheduler.running_batch.batch_is_full = False
            if outcome.failures:
                from sglang.srt.managers.schedule_batch import FINISH_ABORT

                for req in batch.reqs:
                    if req.rid in outcome.failures:
                        req.to_finish = FINISH_ABORT(f"kvpolicy: {outcome.failures[req.rid]}", status_code=500)
        return original(scheduler, batch, result, *args, **kwargs)

    def get_next_batch_to_run(self, original, scheduler, *args, **kwargs):
        tree = self._tree(scheduler)
        if tree is not None:
            tree.refresh()
        return original(scheduler, *args, **kwargs)

    def on_idle(self, original, scheduler, *args, **kwargs):
        tree = self._tree(scheduler)
        if tree is not None:
            tree.refresh()  # the idle check must read exact sizes
            stats = getattr(tree.agreement, "stats", None)
            if stats is not None and stats.collectives > stats.logged and scheduler.is_fully_idle():
                stats.logged = stats.collectives
                label = tree.controller.rank_label if tree.controller is not None else "?"
                log.info("kvpolicy: rank %s agreement: %s", label, stats.summary())
        return original(scheduler, *args, **kwargs)

    # -- a policy per request: the HTTP server's check and namespace, the reports in meta_info ----------------
    def create_tokenized_object(self, original, manager, obj, *args, **kwargs):
        """Refuse a request whose policy choice the server does not allow (``RequestPolicyError``, a ValueError:
        SGLang answers HTTP 400 with the reason) and put its policy's namespace into its prefix-cache key."""
        tokenized = original(manager, obj, *args, **kwargs)
        sampling = getattr(tokenized, "sampling_params", None)
        if sampling is None or not hasattr(tokenized, "extra_key"):  # embeddings: no KV cache policy applies
            return tokenized
        choice = self.choices.resolve(getattr(sampling, "custom_params", None))
        if self.choices.per_request:
            tokenized.extra_key = with_namespace(tokenized.extra_key, choice.namespace)
        return tokenized

    @staticmethod
    def output_streamer_class(original, scheduler, *args, **kwargs):
        """SGLang's output streamer, extended to put each finished request's report into ``meta_info``."""
        return reporting_streamer(original(scheduler, *args, **kwargs))

    def register(self) -> None:
        from sglang.srt.plugins.hook_registry import HookRegistry, HookType

        for target, hook in ((f"{TOKENIZER}._create_tokenized_object", self.create_tokenized_object),
                             (f"{SCHEDULER}.get_output_streamer_class", self.output_streamer_class),
                             (f"{CONFIGURATOR}._derive_pool_sizes", self.derive_pool_sizes),
                             (f"{CONFIGURATOR}._build_mha_kv_pool", self.build_mha_kv_pool),
                             (f"{CONFIGURATOR}._build_token_to_kv_pool_allocator", self.build_allocator),
                             (f"{SCHEDULER}.run_batch", self.run_batch),
                             (f"{SCHEDULER}.process_batch_result", self.process_batch_result),
                             (f"{SCHEDULER}.get_next_batch_to_run", self.get_next_batch_to_run),
                             (f"{SCHEDULER}.on_idle", self.on_idle)):
            HookRegistry.register(target, hook, HookType.AROUND)


_streamers: dict[type, type] = {}


def reporting_streamer(base: type) -> type:
    """A subclass of SGLang's output streamer class ``base`` that adds ``meta_info["kvpolicy"]``: ``[report]`` in a
    finished request's last output (:meth:`RowController.on_release` wrote it just before), ``[]`` before that (SGLang
    extends a request's customized info output by output, so the final meta_info holds the one report)."""
    if base in _streamers:
        return _streamers[base]

    class ReportingStreamer(base):
        __slots__ = ()
        has_additional_customized_info = True

        def build_additional_customized_info(self, reqs):
            info = super().build_additional_customized_info(reqs)
            controller = getattr(self.tree_cache, "controller", None)
            reports = []
            for req in reqs:
                report = controller.take_report(req.rid) if controller is not None and req.finished() else None
                reports.append([report] if report is not None else [])
            info[META_KEY] = reports
            return info

        def is_request_level_customized_info_key(self, key: str) -> bool:
            return key == META_KEY or super().is_request_level_customized_info_key(key)

    ReportingStreamer.__name__ = ReportingStreamer.__qualname__ = f"KVPolicy{base.__name__}"
    _streamers[base] = ReportingStreamer
    return ReportingStreamer
