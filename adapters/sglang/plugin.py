"""SGLang plugin (entry-point group ``sglang.srt.plugins``) and the radix-cache factory.

SGLang calls :func:`register` once per process (the server and each spawned scheduler) through
``load_plugins()``, then applies the registered hooks. Always: the hook that makes SGLang's launchers accept
``--kv-policy`` and the ``kvpolicy_rows`` attention-backend choice. When the launcher has set a policy
(``KVPOLICY_SGLANG_CONFIG``, JSON of :class:`SGLangPolicyConfig`, inherited by the scheduler processes): the
head-row pool hooks (:mod:`kvpolicy.adapters.sglang.hooks`), the ``kvpolicy_rows`` attention backend and the
``kvpolicy`` radix-cache backend. Importing this module does not import SGLang.
"""

from __future__ import annotations

import logging

from kvpolicy.adapters.sglang.config import (
    ATTENTION_BACKEND,
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
        "tensor parallelism": ctx.tp_size != 1,
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
    policy = config.build_policy()
    bind_policy(policy, model_info_from_hf_config(ctx.model_config.hf_config.to_dict()), config.policy)
    kv_cache = allocator.get_kvcache()
    controller = RowController(policy, config, kv_cache, allocator, ctx.params.req_to_token_pool.req_to_token,
                               num_layers=kv_cache.layer_num)
    if ctx.tp_worker is None:
        raise AdapterConfigError(f"policy {config.policy!r} needs the model to capture its layers' inputs, but "
                                 "SGLang built the cache without a worker")
    controller.attach(ctx.tp_worker.model_runner.model)
    log.info("kvpolicy: per-%s eviction with policy %r (%s)", config.granularity.value, config.policy,
             policy.config)
    return HeadRowRadixCache(ctx.params, window=policy.config.window, controller=controller)


def register() -> None:
    """Entry point of ``sglang.srt.plugins`` (idempotent; see the module docstring)."""
    from kvpolicy.adapters.sglang._internals import check_sglang_version

    check_sglang_version()
    from sglang.srt.arg_groups.choices import ATTENTION_BACKEND_CHOICES, add_attention_backend_choices

    register_launch_hook()
    if ATTENTION_BACKEND not in ATTENTION_BACKEND_CHOICES:
        add_attention_backend_choices([ATTENTION_BACKEND])
    config = config_from_env()
    if config is None:
        return
    from sglang.srt.mem_cache.registry import get_radix_cache_factory, register_radix_cache_backend

    from kvpolicy.adapters.sglang import row_attention
    from kvpolicy.adapters.sglang.hooks import PoolHooks

    if get_radix_cache_factory(BACKEND_NAME) is None:
        PoolHooks(config).register()
        row_attention.register()
        register_radix_cache_backend(BACKEND_NAME, radix_cache_factory)
        log.info("kvpolicy: registered the head-row pool, the %r attention backend and the %r radix cache",
                 ATTENTION_BACKEND, BACKEND_NAME)
