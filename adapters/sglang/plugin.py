"""SGLang plugin hook (entry-point group ``sglang.srt.plugins``) and the radix-cache factory.

SGLang calls :func:`register` once per process (server and each spawned scheduler) through
``load_plugins()``. It registers the radix-cache backend ``kvpolicy``, selected with
``--radix-cache-backend kvpolicy``. The policy configuration travels to scheduler processes in the
``KVPOLICY_SGLANG_CONFIG`` environment variable (JSON of :class:`SGLangPolicyConfig`), set by the launcher.
Importing this module does not import SGLang.
"""

from __future__ import annotations

import json
import logging
import os

from kvpolicy.adapters.sglang.config import AdapterConfigError, SGLangPolicyConfig

BACKEND_NAME = "kvpolicy"
CONFIG_ENV = "KVPOLICY_SGLANG_CONFIG"
LIVE_ENV = "KVPOLICY_SGLANG_LIVE"  # "1": scheduler (and attention) hooks that really prune (the launcher sets it)

log = logging.getLogger(__name__)


def config_from_env(environ: dict[str, str] | None = None) -> SGLangPolicyConfig:
    raw = (os.environ if environ is None else environ).get(CONFIG_ENV)
    if not raw:
        raise AdapterConfigError(
            f"--radix-cache-backend {BACKEND_NAME} needs a policy: set {CONFIG_ENV} (the kvpolicy launcher does)"
        )
    try:
        return SGLangPolicyConfig(**json.loads(raw))
    except (ValueError, TypeError) as exc:
        raise AdapterConfigError(f"{CONFIG_ENV} is not a valid kvpolicy SGLang config: {exc}") from exc


def radix_cache_factory(ctx):
    """``TreeCacheBuildContext -> KVPolicyRadixCache``; refuses cache setups the adapter does not handle."""
    from kvpolicy.adapters.sglang.cache import KVPolicyRadixCache

    unsupported = {
        "a hybrid sliding-window model": ctx.is_hybrid_swa,
        "a hybrid SSM/Mamba model": ctx.is_hybrid_ssm,
        "--enable-hierarchical-cache": ctx.enable_hierarchical_cache,
        "--disable-radix-cache": ctx.disable_radix_cache,
        "tensor/pipeline parallelism": ctx.tp_size != 1,
    }
    problems = [name for name, bad in unsupported.items() if bad]
    if problems:
        raise AdapterConfigError(f"the kvpolicy radix cache does not support {', '.join(problems)} yet")
    config = config_from_env()
    policy = config.build_policy()
    if os.environ.get(LIVE_ENV) == "1":
        from kvpolicy.adapters.sglang.live import check_live_captures

        check_live_captures(policy, config.policy)
    if ctx.model_config is not None:
        from kvpolicy.adapters.sglang.config import bind_policy, model_info_from_hf_config

        bind_policy(policy, model_info_from_hf_config(ctx.model_config.hf_config.to_dict()), config.policy)
    cache = KVPolicyRadixCache(ctx.params, window=policy.config.window)
    if os.environ.get(LIVE_ENV) == "1":
        from kvpolicy.adapters.sglang.live import LiveController

        kv_pool = ctx.params.token_to_kv_pool_allocator.get_kvcache()
        cache.live = LiveController(cache, policy, config, kv_pool, num_layers=kv_pool.layer_num)
        if cache.live.captures_hidden_states:
            if ctx.tp_worker is None:
                raise AdapterConfigError(f"policy {config.policy!r} needs the model object to capture hidden "
                                         "states, but SGLang built the cache without a worker")
            cache.live.attach(ctx.tp_worker.model_runner.model)
        log.info("kvpolicy: live pruning with policy %r (%s)", config.policy, policy.config)
    return cache


def register() -> None:
    """Entry point of ``sglang.srt.plugins``: register the ``kvpolicy`` radix-cache backend and the hook that
    makes SGLang's launchers accept ``--kv-policy`` (idempotent); in live mode also the scheduler hooks."""
    from kvpolicy.adapters.sglang._internals import (
        get_radix_cache_factory,
        register_launch_hook,
        register_radix_cache_backend,
    )

    register_launch_hook()
    if get_radix_cache_factory(BACKEND_NAME) is None:
        register_radix_cache_backend(BACKEND_NAME, radix_cache_factory)
        log.info("kvpolicy: registered radix-cache backend %r", BACKEND_NAME)
    if os.environ.get(LIVE_ENV) == "1":
        from kvpolicy.adapters.sglang._internals import register_live_hooks

        register_live_hooks()
