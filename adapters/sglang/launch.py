"""The ``--kv-*`` launch flags and the checks on the server arguments.

``python -m sglang.launch_server --kv-policy NAME [--kv-policy-config JSON] [--kv-granularity head|token]
[--kv-token-vote any|fraction] [--kv-min-keep-fraction F] [--kv-slot-expansion K] [--kv-policy-allow NAMES|JSON]
<sglang serve flags>`` (``--kv-policy-allow``: the policies requests may choose, :mod:`.requests`)
(through the plugin's hook on ``prepare_server_args``), and the same command line as
``python -m kvpolicy.adapters.sglang.launch ...`` or ``kvpolicy serve ...``.

SGLang's parser rejects flags it does not know, so the kvpolicy flags are taken off the command line here and
validated (policy, selection mode, captures, surrogate dimensions against a local model's ``config.json``); the
configuration reaches the scheduler processes in ``KVPOLICY_SGLANG_CONFIG``. The rest is parsed by SGLang
itself, so aliases (``--tensor-parallel-size``), abbreviations (``--page-s``) and ``--config`` YAML files count,
and what the head-row pool cannot honour is refused on the parsed arguments with exit status 2 before anything
starts (:func:`refusals`). Then the arguments the adapter needs are added (:func:`additions`): the ``kvpolicy``
radix cache, the head-row attention backend for the server's device (``kvpolicy_triton`` on CUDA, ``kvpolicy_rows``
elsewhere, unless one of the two was asked for), page size 1, no overlap scheduling, no CUDA graphs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from kvpolicy.adapters.sglang.config import (
    ATTENTION_BACKENDS,
    BACKEND_NAME,
    CONFIG_ENV,
    AdapterConfigError,
    SGLangPolicyConfig,
    attention_backend_for,
    bind_policy,
    model_info_from_hf_config,
    parse_and_build,
)
from kvpolicy.adapters.sglang.live import check_live_captures
from kvpolicy.policy import ModelInfo

EXIT_REFUSED = 2
KV_FLAGS = ("--kv-policy", "--kv-policy-config", "--kv-granularity", "--kv-token-vote", "--kv-min-keep-fraction",
            "--kv-slot-expansion", "--kv-policy-allow")


def _flag_value(argv: Sequence[str], flag: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def _parser() -> argparse.ArgumentParser:
    # allow_abbrev=False: an abbreviation such as --kv-p must not swallow SGLang's own flags.
    parser = argparse.ArgumentParser(prog="kvpolicy-sglang", add_help=False, allow_abbrev=False)
    parser.add_argument("--kv-policy", required=True)
    parser.add_argument("--kv-policy-config")
    parser.add_argument("--kv-granularity", choices=["head", "token"])
    parser.add_argument("--kv-token-vote", choices=["any", "fraction"])
    parser.add_argument("--kv-min-keep-fraction", type=float)
    parser.add_argument("--kv-slot-expansion", type=int)
    parser.add_argument("--kv-policy-allow")
    return parser


class LaunchPlan(NamedTuple):
    """``config``: validated policy flags (None for ``--kv-policy none``: plain SGLang); ``sglang_argv``: SGLang's
    own arguments; ``env``: variables for the scheduler processes."""

    config: SGLangPolicyConfig | None
    sglang_argv: list[str]
    env: dict[str, str]


def build_launch(argv: Sequence[str]) -> LaunchPlan:
    """Split and validate the ``--kv-*`` flags; raises :class:`AdapterConfigError` (nothing is started)."""
    ours, rest = _parser().parse_known_args(list(argv))
    parsed = parse_and_build(ours.kv_policy, ours.kv_policy_config, granularity=ours.kv_granularity,
                             token_vote=ours.kv_token_vote, min_keep_fraction=ours.kv_min_keep_fraction,
                             slot_expansion=ours.kv_slot_expansion, allow=ours.kv_policy_allow)
    if parsed is None:  # --kv-policy none (the parser requires the flag)
        return LaunchPlan(None, list(rest), {})
    config, policy = parsed  # built once in this process; each scheduler process builds its own
    policies = config.build_policies(default=policy)  # and every policy requests may choose, each once
    info = _local_model_info(_flag_value(rest, "--model-path"))
    for name, built in policies.items():
        check_live_captures(built, name)
        if info is not None:
            bind_policy(built, info, name)
    return LaunchPlan(config, list(rest), {CONFIG_ENV: config.model_dump_json(exclude_unset=True)})


def refusals(server_args) -> list[str]:
    """What the head-row pool cannot honour in SGLang's parsed ``ServerArgs``, one reason per problem."""
    problems = []
    if server_args.page_size not in (None, 1):
        problems.append(f"page size {server_args.page_size} (the head-row pool frees single tokens' entries: "
                        "--page-size 1)")
    problems += _parallel_refusals(server_args)
    if server_args.speculative_algorithm is not None:
        problems.append(f"speculative decoding ({server_args.speculative_algorithm})")
    if server_args.enable_hierarchical_cache:
        problems.append("the hierarchical cache (--enable-hierarchical-cache)")
    if server_args.disable_radix_cache:
        problems.append("--disable-radix-cache (the policy's cache lives in the radix tree)")
    if server_args.disaggregation_mode not in (None, "null"):
        problems.append(f"prefill/decode disaggregation ({server_args.disaggregation_mode})")
    if server_args.enable_mixed_chunk:
        problems.append("--enable-mixed-chunk (prefill and decode tokens in one forward)")
    if getattr(server_args, "enable_dp_attention", False):
        problems.append("--enable-dp-attention")
    if server_args.radix_cache_backend not in (None, BACKEND_NAME):
        problems.append(f"--radix-cache-backend {server_args.radix_cache_backend} (the policy needs {BACKEND_NAME})")
    # --attention-backend is replaced by the head-row backend for the device (torch_native, SGLang's CPU default,
    # is the same code as kvpolicy_rows over dense buffers); any other per-phase backend would read the pool
    # densely, so only the head-row backends are accepted there.
    allowed = {"attention_backend": (None, "torch_native", *ATTENTION_BACKENDS),
               "decode_attention_backend": (None, *ATTENTION_BACKENDS),
               "prefill_attention_backend": (None, *ATTENTION_BACKENDS)}
    for name, accepted in allowed.items():
        value = getattr(server_args, name, None)
        if value not in accepted:
            problems.append(f"--{name.replace('_', '-')} {value}: the head-row pool is read by the "
                            f"{' and '.join(ATTENTION_BACKENDS)} backends only")
    if server_args.kv_cache_dtype not in (None, "auto"):
        problems.append(f"--kv-cache-dtype {server_args.kv_cache_dtype} (the head-row pool stores keys and values "
                        "in the model's dtype)")
    return problems


def server_device(server_args) -> str:
    """The device the server will run on: ``--device`` without an index, or SGLang's own choice when unset."""
    device = server_args.device
    if device is None:
        from sglang.srt.utils.common import get_device

        device = get_device()
    return device.split(":")[0]


def _parallel_refusals(server_args) -> list[str]:
    """Tensor and data parallelism are served (docs/scaling.md); what they cannot be combined with."""
    problems = []
    pp = getattr(server_args, "pp_size", 1) or 1
    if pp > 1:
        problems.append(f"pipeline parallelism (pp_size = {pp}): the head-row pool and its agreement cover one "
                        "tensor-parallel group holding every layer")
    for name in ("attn_cp_size", "dcp_size"):
        value = getattr(server_args, name, 1) or 1
        if value > 1:
            problems.append(f"context parallelism ({name} = {value}): it splits a request's KV over ranks by token, "
                            "the head-row pool splits it by KV head")
    tp = getattr(server_args, "tp_size", 1) or 1
    if tp == 1:
        return problems
    from kvpolicy.adapters.sglang.config import Granularity, config_from_env

    config = config_from_env()
    if config is not None and config.granularity is Granularity.TOKEN:
        problems.append(f"--kv-granularity token with tensor parallelism (tp_size = {tp}): the token vote needs every "
                        "KV head's decision, and each rank holds only its own heads")
    try:
        info = _local_model_info(server_args.model_path)
    except AdapterConfigError:
        info = None  # the policy checks already said what is wrong with the model directory
    if info is not None:
        heads = info.num_kv_heads
        if heads % tp and (tp % heads or (server_args.device or "").startswith("cpu")):
            problems.append(f"tensor parallelism (tp_size = {tp}) over {heads} KV heads: the heads must divide over "
                            "the ranks (SGLang pads them on CPU, and a padding head is not the model's)")
    return problems


def additions(server_args) -> list[str]:
    """The SGLang arguments the adapter needs on top of the user's."""
    device = server_device(server_args)
    # An explicit head-row backend is kept (e.g. kvpolicy_rows on CUDA, to compare the two); anything else,
    # unset included, becomes the one for the device.
    asked = getattr(server_args, "attention_backend", None)
    backend = asked if asked in ATTENTION_BACKENDS else attention_backend_for(device)
    added = ["--radix-cache-backend", BACKEND_NAME, "--attention-backend", backend, "--page-size", "1"]
    if not server_args.disable_overlap_schedule:
        # The overlap scheduler prepares batch N+1 before batch N's result is processed.
        added.append("--disable-overlap-schedule")
    if device != "cpu" and not server_args.disable_cuda_graph:
        # CUDA graphs stay off. The pool alone would allow them: row_of and the row buffers are allocated once
        # (static addresses), and kvpolicy_triton's decode reads lengths and rows on the device. The policy would
        # not survive a replay: the per-layer hooks that capture a layer's input, score it and free entries run
        # host code (the drop masks and the free-stack top are read on the host), and a replay skips all of it.
        # Key/value-scoring policies could run inside the graph if their scores went into a static buffer that is
        # read after the replay; hidden-state policies (KVzap) would need their captured scores written the same
        # way. Neither is built, and nothing of it has been tried on a GPU.
        added.append("--disable-cuda-graph")
    return added


def _local_model_info(model_path: str | None) -> ModelInfo | None:
    """The model's dimensions from ``MODEL_PATH/config.json`` when it is a local directory, else None (a hub
    name: the scheduler process checks the policy against the loaded model instead)."""
    if model_path is None:
        return None
    config_file = Path(model_path) / "config.json"
    if not config_file.is_file():
        return None
    try:
        hf_config = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise AdapterConfigError(f"cannot read {config_file}: {exc}") from exc
    return model_info_from_hf_config(hf_config)


def has_kv_flags(argv: Sequence[str]) -> bool:
    return any(arg.split("=", 1)[0] in KV_FLAGS for arg in argv)


def _refuse(reason: str):
    print(f"kvpolicy: refused: {reason}", file=sys.stderr)
    raise SystemExit(EXIT_REFUSED)


def apply_launch_flags(argv: Sequence[str]) -> list[str]:
    """Take the ``--kv-*`` flags off ``argv``, validate them and set the scheduler environment; returns SGLang's
    own arguments. Without ``--kv-*`` flags ``argv`` comes back unchanged. Exits with status 2 on a refusal."""
    if not has_kv_flags(argv):
        return list(argv)
    try:
        plan = build_launch(argv)
    except AdapterConfigError as exc:
        _refuse(str(exc))
    os.environ.update(plan.env)
    if plan.config is None:  # --kv-policy none: no configuration reaches the schedulers, not even an older one
        os.environ.pop(CONFIG_ENV, None)
    return plan.sglang_argv


def prepare_with_policy(original, argv: Sequence[str]):
    """``prepare_server_args`` under a policy: parse the user's arguments, refuse what the pool cannot honour,
    then parse again with :func:`additions`. Without a policy, SGLang's own parse alone."""
    sglang_argv = apply_launch_flags(list(argv))
    if not os.environ.get(CONFIG_ENV):
        return original(sglang_argv)
    parsed = original(sglang_argv)
    problems = refusals(parsed)
    if problems:
        _refuse("--kv-policy does not support " + "; ".join(problems))
    added = additions(parsed)
    config = SGLangPolicyConfig.model_validate_json(os.environ[CONFIG_ENV])
    print(f"kvpolicy: serving with policy {config.policy!r}, per-{config.granularity.value} eviction on the "
          f"head-row pool (added: {' '.join(added)})", file=sys.stderr)
    return original(sglang_argv + added)


def _around_prepare_server_args(original, argv, *args, **kwargs):
    return prepare_with_policy(lambda a: original(a, *args, **kwargs), argv)


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


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m kvpolicy.adapters.sglang.launch`` / ``kvpolicy serve``: ``--kv-policy`` is required here
    (``--kv-policy none`` starts plain SGLang). A refused configuration exits with status 2 and its reason, no
    traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if _flag_value(argv, "--kv-policy") is None:
        print("kvpolicy: refused: --kv-policy NAME is required (--kv-policy none, or sglang.launch_server, for a "
              "plain server)", file=sys.stderr)
        return EXIT_REFUSED
    try:
        sglang_argv = apply_launch_flags(argv)
    except SystemExit as exc:
        return int(exc.code)
    import runpy

    sys.argv = ["sglang.launch_server", *sglang_argv]
    runpy.run_module("sglang.launch_server", run_name="__main__", alter_sys=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
