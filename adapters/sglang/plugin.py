"""SGLang plugin (entry-point group ``sglang.srt.plugins``) and the radix-cache factory.

SGLang calls :func:`register` once per process (the server and each spawned scheduler) through
``load_plugins()``, then applies the registered hooks. Always: the hook that makes SGLang's launchers accept
``--kv-policy`` and the ``kvpolicy_rows`` / ``kvpolicy_triton`` attention-backend choices. When the launcher has
set a policy (``KVPOLICY_SGLANG_CONFIG``, JSON of :class:`SGLangPolicyConfig`, inherited by the scheduler
processes): the head-row pool hooks (:mod:`kvpolicy.adapters.sglang.hooks`), both head-row attention backends and
the ``kvpolicy`` radix-cache backend. Importing this module does not import SGLang.
"""

from __future__ import annotations

import logging

from kvpolicy.adapters.sglang.config import (
    ATTENTION_BACKENDS,
    BACKEND_NAME,
    CONFIG_ENV,
    AdapterConfigError,
    config_from_env,
)
from kvpolicy.adapters.sglang.launch import register_launch_hook

log = logging.getLogger(__name__)


def radix_cache_factory(ctx):
    """``TreeCacheBuildContext -> HeadRowRadixCache`` with its :class:`RowController`, built once per scheduler
    process; refuses setups the adapter does not handle."""
    from kvpolicy.adapters.sglang.config import bind_policy, model_info_from_hf_config
    from kvpolicy.adapters.sglang.live import RowController
    from kvpolicy.adapters.sglang.row_pool import HeadRowAllocator
    from kvpolicy.adapters.sglang.row_tree import HeadRowRadixCache

    unsupported = {
        "a hybrid sliding-window model": ctx.is_hybrid_swa,
        "a hybrid SSM/Mamba model": ctx.is_hybrid_ssm,
        "--enable-hierarchical-cache": ctx.enable_hierarchical_cache,
        "--disable-radix-cache": ctx.disable_radix_cache,
    }
    problems = [name for name, bad in unsupported.items() if bad]
    if problems:
        raise AdapterConfigError(f"the kvpolicy SGLang adapter does not support {', '.join(problems)} yet")
    config = config_from_env()
    if config is None:
        raise AdapterConfigError(f"--radix-cache-backend {BACKEND_NAME} needs a policy: start the server with "
                                 "--kv-policy (the launcher sets " + CONFIG_ENV + ")")
    allocator = ctx.params.token_to_kv_pool_allocator
    if not isinstance(allocator, HeadRowAllocator):
        raise AdapterConfigError("the kvpolicy radix cache needs the kvpolicy head-row pool (its hooks did not run: "
                                 "was the plugin loaded in the scheduler process?)")
    shard = tensor_parallel_shard(ctx, config)  # before binding: SGLang pads the KV heads of an uneven CPU split
    policies = config.build_policies()  # the default and every policy requests may choose, each built once
    info = model_info_from_hf_config(ctx.model_config.hf_config.to_dict())
    for name, built in policies.items():
        bind_policy(built, info, name)
    policy = policies[config.policy]
    kv_cache = allocator.get_kvcache()
    if shard.tp_size > 1:
        from kvpolicy.adapters.sglang.ranks import TPRowAgreement

        allocator.agreement = TPRowAgreement(ctx.params.tp_cache_group, size=shard.tp_size,
                                             num_rows=kv_cache.rows.num_rows, num_slots=kv_cache.rows.num_slots)
    controller = RowController(policies, config, kv_cache, allocator, ctx.params.req_to_token_pool.req_to_token,
                               num_layers=kv_cache.layer_num, shard=shard, replica=_data_parallel_rank())
    if ctx.tp_worker is None:
        raise AdapterConfigError(f"policy {config.policy!r} needs the model to capture its layers' inputs, but "
                                 "SGLang built the cache without a worker")
    controller.attach(ctx.tp_worker.model_runner.model)
    log.info("kvpolicy: per-%s eviction with policy %r (%s)", config.granularity.value, config.policy,
             policy.config)
    if config.allow is not None:
        log.info("kvpolicy: requests may choose %s (custom_params.kv_policy)", ", ".join(config.allow))
    return HeadRowRadixCache(ctx.params, window=policy.config.window, controller=controller)


def tensor_parallel_shard(ctx, config):
    """The KV heads this scheduler's rank holds (:class:`~kvpolicy.adapters.sglang.ranks.KVHeadShard`); raises
    :class:`AdapterConfigError` for tensor-parallel setups the adapter cannot serve."""
    from kvpolicy.adapters.sglang.config import Granularity
    from kvpolicy.adapters.sglang.ranks import KVHeadShard

    hf_config = ctx.model_config.hf_config
    total = ctx.model_config.get_total_num_kv_heads()
    original = getattr(hf_config, "original_total_num_kv_heads", total)
    if original != total:
        # SGLang on CPU pads the KV heads to a multiple of the TP size; the padding heads are not the model's, and
        # a policy (a KVzap surrogate) scores the model's heads only.
        raise AdapterConfigError(f"{original} KV heads over {ctx.tp_size} tensor-parallel ranks: SGLang pads them to "
                                 f"{total} on this device; use a TP size that divides the KV heads")
    if ctx.tp_size > 1 and config.granularity is Granularity.TOKEN:
        raise AdapterConfigError("--kv-granularity token with tensor parallelism: the token vote needs every KV "
                                 "head's decision, and each rank holds only its own heads")
    try:
        return KVHeadShard.of(ctx.tp_rank, ctx.tp_size, total)
    except ValueError as exc:
        raise AdapterConfigError(str(exc)) from exc


def _data_parallel_rank() -> int:
    """This scheduler's DP replica (0 without data parallelism), for the log lines."""
    from sglang.srt.runtime_context import get_parallel

    try:
        rank = get_parallel().dp_rank
    except (AttributeError, RuntimeError, KeyError):
        return 0
    return int(rank or 0)


def register() -> None:
    """Entry point of ``sglang.srt.plugins`` (idempotent; see the module docstring)."""
    from kvpolicy.adapters.sglang._internals import check_sglang_version

    check_sglang_version()
    from sglang.srt.arg_groups.choices import ATTENTION_BACKEND_CHOICES, add_attention_backend_choices

    register_launch_hook()
    missing = [name for name in ATTENTION_BACKENDS if name not in ATTENTION_BACKEND_CHOICES]
    if missing:
        add_attention_backend_choices(missing)
    config = config_from_env()
    if config is None:
        return
    from sglang.srt.mem_cache.registry import get_radix_cache_factory, register_radix_cache_backend

    from kvpolicy.adapters.sglang import row_attention, triton_attention
    from kvpolicy.adapters.sglang.hooks import PoolHooks

    if get_radix_cache_factory(BACKEND_NAME) is None:
        PoolHooks(config).register()
        row_attention.register()
        triton_attention.register()
        register_radix_cache_backend(BACKEND_NAME, radix_cache_factory)
        log.info("kvpolicy: registered the head-row pool, the %s attention backends and the %r radix cache",
                 " and ".join(ATTENTION_BACKENDS), BACKEND_NAME)
