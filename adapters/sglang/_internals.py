"""The one place that touches SGLang internals, behind a version check.

Everything else in the adapter imports SGLang names from here. The radix-cache subclass relies on private
members of ``RadixCache`` (``root_node``, ``evictable_leaves``, ``eviction_strategy``, ``_delete_leaf``,
``_match_prefix_helper`` splitting the last node) and on ``TreeNode.value`` being a 1:1 slot tensor; those are
not a public API, so an SGLang version that was not checked is refused with a clear message instead of
corrupting the KV pool at run time.
"""

from __future__ import annotations

from importlib import metadata

import torch

SUPPORTED_SGLANG_VERSIONS = ("0.5.19",)


class UnsupportedSGLangVersion(RuntimeError):
    pass


def installed_sglang_version() -> str | None:
    try:
        return metadata.version("sglang")
    except metadata.PackageNotFoundError:
        return None


def check_sglang_version(version: str | None = None) -> str:
    """Return the installed SGLang version, or raise :class:`UnsupportedSGLangVersion`."""
    version = installed_sglang_version() if version is None else version
    if version is None:
        raise UnsupportedSGLangVersion(
            "SGLang is not installed; the kvpolicy SGLang adapter supports sglang "
            + ", ".join(SUPPORTED_SGLANG_VERSIONS) + " (see docs/sglang.md)"
        )
    if version not in SUPPORTED_SGLANG_VERSIONS:
        raise UnsupportedSGLangVersion(
            f"sglang {version} is not supported by the kvpolicy SGLang adapter (supported: "
            f"{', '.join(SUPPORTED_SGLANG_VERSIONS)}). It subclasses SGLang's RadixCache and depends on its "
            "private members, so each version must be checked before use; see docs/sglang.md"
        )
    return version


check_sglang_version()

# Imported only after the version check passed.
from sglang.srt.mem_cache.base_prefix_cache import (  # noqa: E402
    EvictParams,
    EvictResult,
    InsertParams,
    MatchPrefixParams,
    MatchResult,
)
from sglang.srt.mem_cache.cache_init_params import CacheInitParams  # noqa: E402
from sglang.srt.mem_cache.radix_cache import RadixCache, RadixKey, TreeNode  # noqa: E402
from sglang.srt.mem_cache.registry import (  # noqa: E402
    TreeCacheBuildContext,
    get_radix_cache_factory,
    register_radix_cache_backend,
)

# SGLang's padding slot: index 0 of every KV buffer is never handed out by the allocator, and the SWA radix
# cache maps freed tree values to it. The adapter does the same for pruned tokens.
from kvpolicy.adapters.sglang.layout import DUMMY_SLOT  # noqa: E402

__all__ = [
    "DUMMY_SLOT",
    "SUPPORTED_SGLANG_VERSIONS",
    "CacheInitParams",
    "EvictParams",
    "EvictResult",
    "InsertParams",
    "MatchPrefixParams",
    "MatchResult",
    "RadixCache",
    "RadixKey",
    "TreeCacheBuildContext",
    "TreeNode",
    "UnsupportedSGLangVersion",
    "check_sglang_version",
    "get_radix_cache_factory",
    "register_radix_cache_backend",
]


# ------------------------------------------------------------------------------------------------------
# Live wiring: make a running 0.5.19 scheduler score, prune and keep RoPE positions.
#
# Two hooks, registered through SGLang's own HookRegistry from the plugin when KVPOLICY_SGLANG_LIVE=1 (the
# launcher sets it):
#   - around Scheduler.process_batch_result: after each forward and before SGLang processes its result
#     (which may finish requests or insert them into the tree), track each request's new tokens, score them,
#     prune what left the window, and make the batch's seq_lens physical again;
#   - after ForwardBatch.init_new: add each request's pruned_count to the RoPE positions.
# Supported envelope (checked, refused otherwise): non-overlap scheduling, decode and single-chunk prefill,
# policies that score from keys/values or hidden states (captured by the attention hooks below), no query
# capture, no speculative decoding.
# ------------------------------------------------------------------------------------------------------



def _live_cache(batch):
    from kvpolicy.adapters.sglang.cache import KVPolicyRadixCache

    cache = getattr(batch, "tree_cache", None)
    return cache if isinstance(cache, KVPolicyRadixCache) and cache.live is not None else None


def _around_process_batch_result(original, scheduler, batch, result, *args, **kwargs):
    cache = _live_cache(batch)
    if cache is not None and batch.reqs and (batch.forward_mode.is_decode() or batch.forward_mode.is_extend()):
        if scheduler.enable_overlap:
            raise RuntimeError("kvpolicy live pruning needs --disable-overlap-schedule")
        if not batch.spec_algorithm.is_none():
            raise RuntimeError("kvpolicy live pruning does not support speculative decoding")
        if batch.forward_mode.is_extend() and getattr(batch, "decoding_reqs", None):
            raise RuntimeError("kvpolicy live pruning does not support mixed chunks (--enable-mixed-chunk)")
        shrink = cache.live.after_forward(batch.reqs, is_prefill=batch.forward_mode.is_extend())
        if any(shrink):
            delta = torch.tensor(shrink, dtype=torch.int64)
            batch.seq_lens = batch.seq_lens - delta.to(batch.seq_lens.device, batch.seq_lens.dtype)
            if getattr(batch, "seq_lens_cpu", None) is not None:
                batch.seq_lens_cpu = batch.seq_lens_cpu - delta.to(batch.seq_lens_cpu.dtype)
            if getattr(batch, "orig_seq_lens", None) is not None:
                batch.orig_seq_lens = batch.orig_seq_lens - delta.to(batch.orig_seq_lens.device,
                                                                     batch.orig_seq_lens.dtype)
            if getattr(batch, "seq_lens_sum", None) is not None:
                batch.seq_lens_sum = int(batch.seq_lens_sum) - int(delta.sum())
    return original(scheduler, batch, result, *args, **kwargs)


def _after_forward_batch_init(result, cls, batch, *args, **kwargs):
    cache = _live_cache(batch)
    if cache is None or result.positions is None:
        return result
    offsets = [cache.live.position_offset(req) for req in batch.reqs]
    if not any(offsets):
        return result
    if result.forward_mode.is_decode():
        add = torch.tensor(offsets, dtype=result.positions.dtype, device=result.positions.device)
    else:
        raise RuntimeError("kvpolicy live pruning: an extend pass over a pruned request (a chunked "
                           "prefill continuation) is not supported yet; retraction is (the request restarts at "
                           "offset 0)")
    result.positions = result.positions + add
    return result


def _around_prepare_server_args(original, argv, *args, **kwargs):
    """SGLang's CLI (``python -m sglang.launch_server``, ``sglang serve``) parses its arguments after loading
    plugins: take the ``--kv-*`` flags off, validate them and add what the adapter needs, before
    ``ServerArgs`` (which rejects unknown flags) sees the command line."""
    import os

    from kvpolicy.adapters.sglang.launch import apply_launch_flags
    from kvpolicy.adapters.sglang.plugin import LIVE_ENV

    sglang_argv = apply_launch_flags(list(argv))
    if os.environ.get(LIVE_ENV) == "1" and not _live_hooks_registered:
        # Plugins were loaded before the flags set LIVE_ENV: register the scheduler hooks in this process too
        # (scheduler processes are spawned and load the plugin again with the variable set).
        from sglang.srt.plugins.hook_registry import HookRegistry

        register_live_hooks()
        HookRegistry.apply_hooks()
    return original(sglang_argv, *args, **kwargs)


_launch_hook_registered = False


def register_launch_hook() -> None:
    """Make SGLang's own launchers accept ``--kv-policy`` (hook on ``prepare_server_args``; idempotent)."""
    global _launch_hook_registered
    if _launch_hook_registered:
        return
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register("sglang.srt.server_args.prepare_server_args", _around_prepare_server_args,
                          HookType.AROUND)
    _launch_hook_registered = True


_live_hooks_registered = False


def register_live_hooks() -> None:
    """Register the two hooks with SGLang's HookRegistry (call from a ``sglang.srt.plugins`` plugin)."""
    global _live_hooks_registered
    if _live_hooks_registered:
        return
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register("sglang.srt.managers.scheduler.Scheduler.process_batch_result",
                          _around_process_batch_result, HookType.AROUND)
    HookRegistry.register("sglang.srt.model_executor.forward_batch_info.ForwardBatch.init_new",
                          _after_forward_batch_init, HookType.AFTER)
    _live_hooks_registered = True


# ------------------------------------------------------------------------------------------------------
# Hidden-state capture (policies with captures={"hidden_states"}, e.g. KVzap).
#
# SGLang does not pass hidden states to RadixAttention. In 0.5.19's decoder layers (Qwen3, Llama, ...) the
# layer communicator applies ``input_layernorm`` *before* calling ``self_attn(positions=, hidden_states=,
# forward_batch=)``, so what ``self_attn`` receives is the normed attention input KVzap is defined on. A
# forward hook on each attention module (the parent of a ``RadixAttention`` named ``attn``) sees those
# keyword arguments *and* runs after the layer's keys/values were written to the pool, so the policy gets
# full ``LayerInputs``. The hook must not run under CUDA-graph replay (the launcher disables graphs).
# ------------------------------------------------------------------------------------------------------


def attention_modules(model) -> dict[int, "torch.nn.Module"]:
    """``{layer_id: self_attn module}``: every module whose ``attn`` child is a ``RadixAttention``."""
    from sglang.srt.layers.radix_attention import RadixAttention

    found: dict[int, torch.nn.Module] = {}
    for module in model.modules():
        attn = getattr(module, "attn", None)
        if isinstance(attn, RadixAttention):
            if attn.layer_id in found:
                raise RuntimeError(f"two attention modules claim layer {attn.layer_id}")
            found[attn.layer_id] = module
    return found


def install_hidden_state_hooks(model, on_layer) -> list:
    """Register a forward hook on each attention module of ``model``; returns the hook handles.

    ``on_layer(layer_id, hidden_states (N, hidden), positions (N,), forward_batch)`` is called after the
    layer's attention ran (its new keys/values are in the pool at ``forward_batch.out_cache_loc``); ``N`` is
    the number of new tokens of the whole batch, request after request (``forward_batch.rids`` order).
    """
    modules = attention_modules(model)
    if not modules:
        raise RuntimeError(f"{type(model).__name__}: no attention module with a RadixAttention 'attn' child; "
                           "the kvpolicy hidden-state capture does not know this model's layout")

    def make_hook(layer_id: int):
        def hook(module, args, kwargs, output):
            if args:
                raise RuntimeError(f"kvpolicy: layer {layer_id}'s attention was called with positional arguments; "
                                   "the hidden-state capture expects SGLang 0.5.19's keyword call")
            on_layer(layer_id, kwargs["hidden_states"], kwargs["positions"], kwargs["forward_batch"])
        return hook

    return [module.register_forward_hook(make_hook(layer_id), with_kwargs=True)
            for layer_id, module in sorted(modules.items())]


def batch_rows(forward_batch) -> list[tuple[str, int]] | None:
    """``[(rid, new_tokens)]`` in row order for an extend or decode batch; None for other modes (idle...)."""
    mode = forward_batch.forward_mode
    rids = forward_batch.rids
    if rids is None:  # a forward without scheduler requests (e.g. a dummy run): nothing to score
        return None
    if mode.is_decode():
        return [(rid, 1) for rid in rids]
    if mode.is_extend():
        return list(zip(rids, forward_batch.extend_seq_lens_cpu))
    return None
