"""The ``--kv-*`` launch flags: ``python -m sglang.launch_server --kv-policy NAME [--kv-policy-config JSON]
[--kv-token-vote any|fraction] [--kv-min-keep-fraction F] <sglang serve flags>`` (through the plugin's hook on
``prepare_server_args``), and the same command line as ``python -m kvpolicy.adapters.sglang.launch ...`` or
``kvpolicy serve ...``.

SGLang's ``ServerArgs`` rejects flags it does not know, so the kvpolicy flags are taken off the command line
here, validated (policy, selection mode, captures, surrogate dimensions against a local model's
``config.json``), and turned into ``--radix-cache-backend kvpolicy`` plus the ``KVPOLICY_SGLANG_CONFIG`` and
``KVPOLICY_SGLANG_LIVE`` environment variables that scheduler processes read; then ``sglang.launch_server``
runs in this process. Arguments the live pruning needs (``--disable-overlap-schedule``; for hidden-state
policies off CPU ``--disable-cuda-graph``) are added and reported on stderr; combinations it cannot handle are
refused with exit status 2 before anything starts. ``--kv-experimental-live`` (the old opt-in) is accepted
and changes nothing.
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
    AdapterConfigError,
    SGLangPolicyConfig,
    bind_policy,
    model_info_from_hf_config,
    parse_policy_flags,
)
from kvpolicy.adapters.sglang.live import check_live_captures
from kvpolicy.adapters.sglang.plugin import BACKEND_NAME, CONFIG_ENV, LIVE_ENV
from kvpolicy.policy import HIDDEN_STATES, ModelInfo

EXIT_REFUSED = 2


def _flag_value(argv: Sequence[str], flag: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvpolicy-sglang", add_help=False)
    parser.add_argument("--kv-policy", required=True)
    parser.add_argument("--kv-policy-config")
    parser.add_argument("--kv-token-vote", choices=["any", "fraction"])
    parser.add_argument("--kv-min-keep-fraction", type=float)
    # Live pruning is the default since the hidden-state capture landed; the old opt-in flag is accepted.
    parser.add_argument("--kv-experimental-live", action="store_true", help=argparse.SUPPRESS)
    return parser


class LaunchPlan(NamedTuple):
    """``config``: validated policy flags; ``sglang_argv``: SGLang's own arguments with what the adapter needs
    added; ``env``: variables for the scheduler processes; ``notes``: the arguments added, and why."""

    config: SGLangPolicyConfig
    sglang_argv: list[str]
    env: dict[str, str]
    notes: tuple[str, ...] = ()


def build_launch(argv: Sequence[str]) -> LaunchPlan:
    """Split and validate a launcher command line; raises :class:`AdapterConfigError` for invalid or
    unsupported combinations (nothing is started)."""
    ours, rest = _parser().parse_known_args(list(argv))
    config = parse_policy_flags(ours.kv_policy, ours.kv_policy_config, token_vote=ours.kv_token_vote,
                                min_keep_fraction=ours.kv_min_keep_fraction)
    assert config is not None  # --kv-policy is required by the parser
    policy = config.build_policy()

    backend = _flag_value(rest, "--radix-cache-backend")
    if backend is not None and backend != BACKEND_NAME:
        raise AdapterConfigError(f"--kv-policy needs --radix-cache-backend {BACKEND_NAME}, got {backend!r}")
    if "--disable-radix-cache" in rest:
        raise AdapterConfigError("--kv-policy frees slots through the radix cache; drop --disable-radix-cache")
    page_size = _flag_value(rest, "--page-size")
    if page_size is not None and page_size != "1":
        raise AdapterConfigError(f"--kv-policy needs --page-size 1 (pruning frees single tokens), got {page_size}")
    if _flag_value(rest, "--speculative-algorithm") is not None:
        raise AdapterConfigError("--kv-policy does not support speculative decoding yet")
    if "--enable-hierarchical-cache" in rest:
        raise AdapterConfigError("--kv-policy does not support --enable-hierarchical-cache yet")
    for flag in ("--tp-size", "--tp", "--pp-size", "--dp-size", "--dp"):
        value = _flag_value(rest, flag)
        if value is not None and value != "1":
            raise AdapterConfigError(f"--kv-policy supports a single GPU/CPU worker only ({flag} {value})")
    check_live_captures(policy, config.policy)
    info = _local_model_info(_flag_value(rest, "--model-path"))
    if info is not None:
        bind_policy(policy, info, config.policy)
    if "--enable-mixed-chunk" in rest:
        raise AdapterConfigError("--kv-policy does not support --enable-mixed-chunk (prefill and decode tokens in "
                                 "one forward); drop it")

    sglang_argv = list(rest)
    notes: list[str] = []
    if backend is None:
        sglang_argv += ["--radix-cache-backend", BACKEND_NAME]
    if "--disable-overlap-schedule" not in rest:
        # The overlap scheduler prepares batch N+1 before batch N's result is processed, i.e. before the
        # tokens of batch N are pruned: its seq_lens would still count them.
        sglang_argv.append("--disable-overlap-schedule")
        notes.append("added --disable-overlap-schedule (pruning happens between forward passes)")
    if HIDDEN_STATES in policy.captures and _flag_value(rest, "--device") != "cpu" \
            and "--disable-cuda-graph" not in rest:
        sglang_argv.append("--disable-cuda-graph")
        notes.append(f"added --disable-cuda-graph (policy {config.policy!r} reads hidden states with forward "
                     "hooks, which CUDA graph replay would skip)")
    env = {CONFIG_ENV: config.model_dump_json(exclude_unset=True), LIVE_ENV: "1"}
    return LaunchPlan(config, sglang_argv, env, tuple(notes))


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


KV_FLAGS = ("--kv-policy", "--kv-policy-config", "--kv-token-vote", "--kv-min-keep-fraction",
            "--kv-experimental-live")


def has_kv_flags(argv: Sequence[str]) -> bool:
    return any(arg.split("=", 1)[0] in KV_FLAGS for arg in argv)


def apply_launch_flags(argv: Sequence[str]) -> list[str]:
    """Turn a command line with ``--kv-*`` flags into SGLang's own arguments, set the scheduler environment
    and report what was added; a command line without them is returned unchanged.

    Used by this launcher and by the plugin's hook on SGLang's ``prepare_server_args``, which is what makes
    ``python -m sglang.launch_server --kv-policy NAME ...`` and ``sglang serve --kv-policy NAME ...`` work.
    An invalid or unsupported combination prints ``kvpolicy: refused: <reason>`` and exits with status 2
    before anything starts.
    """
    if not has_kv_flags(argv):
        return list(argv)
    try:
        plan = build_launch(argv)
    except AdapterConfigError as exc:
        print(f"kvpolicy: refused: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_REFUSED) from None
    for note in plan.notes:
        print(f"kvpolicy: {note}", file=sys.stderr)
    print(f"kvpolicy: serving with policy {plan.config.policy!r}, pruned KV slots are freed "
          f"(sglang {' '.join(plan.sglang_argv)})", file=sys.stderr)
    os.environ.update(plan.env)
    return plan.sglang_argv


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m kvpolicy.adapters.sglang.launch`` / ``kvpolicy serve``: ``--kv-policy`` is required here."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if _flag_value(argv, "--kv-policy") is None:
        print("kvpolicy: refused: --kv-policy NAME is required (use sglang.launch_server for a plain server)",
              file=sys.stderr)
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
