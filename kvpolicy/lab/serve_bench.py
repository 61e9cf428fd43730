"""Serving benchmark: the testbed suite through a real SGLang HTTP server, one server per policy.

Each :class:`PolicyRun` gets its own server (``none`` = plain ``sglang.launch_server`` without kvpolicy;
anything else = ``python -m kvpolicy.adapters.sglang.launch --kv-policy NAME``; runs are written in the lab's
spec grammar, :mod:`kvpolicy.lab.specs`, e.g. ``window:window=64``), all with the same
``--max-total-tokens`` KV pool. The suite's prompts are sent to ``/generate`` as ``input_ids`` (greedy,
``max_new_tokens`` = answer length, streamed so TTFT/TPOT are measured on the client) by a bounded thread
pool, at each requested concurrency. Where every number comes from:

* accuracy: :func:`kvpolicy.lab.eval.suite.score_example` on the returned ``output_ids`` (exact match);
* compression: the adapter exposes no metric; its scheduler logs one INFO line per finished request
  (``kvpolicy: request ID finished: F of E entries freed; policy compression C``: the (layer, KV head) entries
  of the tokens the request computed, and how many of them it freed), which is parsed from the server log and
  joined to the replies by ``meta_info.id``;
* KV slots in use, running requests: SGLang's published load snapshot ``GET /v1/loads`` (``num_used_tokens``:
  slots held by running requests, the evictable radix cache not counted; ``num_running_reqs``), polled
  every ``sample_interval`` seconds while requests are in flight;
* prefix-cache hit rate: ``sum(meta_info.cached_tokens) / sum(meta_info.prompt_tokens)``;
* throughput: generated tokens / wall time of the phase (first send to last reply).

Only the standard library is needed on the client side (plus tqdm, and matplotlib for the plots when it is
installed); the server runs under ``server_python`` (the SGLang venv).
"""

from __future__ import annotations

import csv
import http.client
import json
import math
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from kvpolicy.lab.specs import PolicySpec, SpecError, parse_specs
from kvpolicy.lab.stats import wilson_interval
from kvpolicy.registry import NO_POLICY

PRUNED_LINE = re.compile(r"kvpolicy: request (\S+) finished: (\d+) of (\d+) entries freed; "
                         r"policy compression ([0-9.]+)(?:; rank dp(\d+) tp(\d+)/(\d+) kv heads ([\d,]+); "
                         r"freed per head ([\d,]+))?")
AGREEMENT_LINE = re.compile(r"kvpolicy: rank dp(\d+) tp(\d+)/(\d+) kv heads [\d,]+ agreement: (\d+) forwards, "
                            r"(\d+) agreements, (\d+) eviction agreements, (\d+) gathers; mean [0-9.]+ ms, "
                            r"max [0-9.]+ ms, total ([0-9.]+) ms")
READY_TIMEOUT_S = 240.0


@dataclass(frozen=True)
class PolicyRun:
    """One server configuration. ``policy`` None = SGLang without kvpolicy; ``config`` is the JSON given to
    ``--kv-policy-config`` (e.g. ``{"window": 64}``, ``{"surrogate": DIR, "threshold": -4}``)."""

    label: str
    policy: str | None = None
    config: dict = field(default_factory=dict)
    granularity: str | None = None           # --kv-granularity (head | token); None = the launcher's (head)
    token_vote: str | None = None            # --kv-token-vote (any | fraction), token granularity only
    min_keep_fraction: float | None = None   # --kv-min-keep-fraction (fraction vote only)
    allow: str | None = None                 # --kv-policy-allow: the policies requests may choose (shared mode)

    def with_granularity(self, granularity: str | None, token_vote: str | None = None,
                         min_keep_fraction: float | None = None) -> "PolicyRun":
        """The same run with the eviction granularity (and, for ``token``, the vote) set; no change for
        ``none``, which has no policy. A vote implies token granularity."""
        if min_keep_fraction is not None:
            if token_vote == "any":
                raise ValueError("a min_keep_fraction needs the fraction vote, not 'any'")
            token_vote = "fraction"
        if token_vote is not None:
            if granularity == "head":
                raise ValueError("a token vote needs token granularity, not 'head'")
            granularity = "token"
        if self.policy is None or granularity is None:
            return self
        suffix = f" {granularity}"
        if granularity == "token":
            suffix += f" vote={token_vote or 'any'}" + ("" if min_keep_fraction is None else f"({min_keep_fraction})")
        return PolicyRun(self.label + suffix, self.policy, self.config, granularity, token_vote, min_keep_fraction)

    def launcher_flags(self) -> list[str]:
        flags = ["--kv-policy", self.policy, "--kv-policy-config", json.dumps(self.config)]
        if self.granularity is not None:
            flags += ["--kv-granularity", self.granularity]
        if self.token_vote is not None:
            flags += ["--kv-token-vote", self.token_vote]
        if self.min_keep_fraction is not None:
            flags += ["--kv-min-keep-fraction", str(self.min_keep_fraction)]
        if self.allow is not None:
            flags += ["--kv-policy-allow", self.allow]
        return flags


def run_from_spec(spec: PolicySpec) -> PolicyRun:
    """The server run of one parsed spec: ``none`` = SGLang without kvpolicy."""
    if spec.is_none:
        return PolicyRun(NO_POLICY)
    label = spec.name + ("" if not spec.config else " " + ",".join(f"{k}={v}" for k, v in spec.config.items()
                                                                   if k != "surrogate"))
    return PolicyRun(label, spec.name, dict(spec.config))


def parse_policy_runs(texts: Sequence[str]) -> list[PolicyRun]:
    """Specs in the lab's grammar (:mod:`kvpolicy.lab.specs`: ``none``, ``NAME``, ``NAME:key=value,...``, ``|``
    sweeps a value) -> one :class:`PolicyRun` (one server) per configuration."""
    return [run_from_spec(spec) for spec in parse_specs(texts)]


def parse_policy_run(text: str) -> PolicyRun:
    """One spec without sweeps -> its :class:`PolicyRun` (:class:`SpecError` for a sweep)."""
    runs = parse_policy_runs([text])
    if len(runs) != 1:
        raise SpecError(f"policy spec {text!r} sweeps {len(runs)} configurations; one was expected here "
                        "(parse_policy_runs expands sweeps)")
    return runs[0]


def check_runs(runs: Sequence[PolicyRun], model: str | Path) -> list[str]:
    """What the kvpolicy launcher would refuse in ``runs`` (unknown names, configs, oracles, ratio or budget
    selection, query captures, surrogates that do not load or do not fit ``model``), one message per problem,
    found by the launcher's own checks before any server starts (SGLang is not imported)."""
    from kvpolicy.adapters.sglang.config import AdapterConfigError
    from kvpolicy.adapters.sglang.launch import build_launch

    problems = []
    for run in runs:
        if run.policy is None:
            continue
        try:
            build_launch([*run.launcher_flags(), "--model-path", str(model)])
        except AdapterConfigError as exc:
            message = f"{run.label}: {exc}"
            if message not in problems:
                problems.append(message)
    return problems


# ----------------------------------------------------------------------------------------------------
# Server


def free_port(low: int = 15000, high: int = 21999, attempts: int = 64) -> int:
    """A free TCP port for a server's HTTP listener, outside the kernel's ephemeral range (32768+ on Linux) and below
    the range SGLang draws its own ports from (22000-29999). The server binds it only after its engine started, and
    meanwhile tensor-parallel ranks open gloo sockets on ephemeral ports: a port from ``bind(0)`` was handed to one of
    them and the server then failed with "address already in use"."""
    for port in random.sample(range(low, high + 1), attempts):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as sock:  # that whole range busy: any port
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class RankRecord:
    """One scheduler rank's log line for one finished request: the entries of the rank's KV heads (``heads``, global
    ids) that the request computed, how many it freed (``freed_per_head`` in the order of ``heads``) and the policy's
    fraction; ``replica``: the DP replica, ``tp_rank`` of ``tp_size``."""

    rid: str
    freed: int
    entries: int
    compression: float
    replica: int = 0
    tp_rank: int = 0
    tp_size: int = 1
    heads: tuple[int, ...] = ()
    freed_per_head: tuple[int, ...] = ()


def parse_rank_records(text: str) -> list[RankRecord]:
    """Every ``kvpolicy: request RID finished: ...`` line of a server log (one per rank that served it)."""
    records = []
    for m in PRUNED_LINE.finditer(text):
        record = RankRecord(m.group(1), int(m.group(2)), int(m.group(3)), float(m.group(4)))
        if m.group(5) is not None:
            record = RankRecord(record.rid, record.freed, record.entries, record.compression, int(m.group(5)),
                                int(m.group(6)), int(m.group(7)), tuple(int(h) for h in m.group(8).split(",")),
                                tuple(int(f) for f in m.group(9).split(",")))
        records.append(record)
    return records


def merge_ranks(records: Sequence[RankRecord]) -> dict[str, tuple[int, int, float]]:
    """``{rid: (freed, entries, compression)}`` over the ranks that served each request: freed and entries summed
    over distinct KV-head sets (ranks that replicate a head count it once), the compression weighted by entries."""
    seen: dict[str, dict[tuple, RankRecord]] = {}
    for record in records:
        seen.setdefault(record.rid, {})[(record.replica, record.heads or (record.tp_rank,))] = record
    merged = {}
    for rid, parts in seen.items():
        freed = sum(r.freed for r in parts.values())
        entries = sum(r.entries for r in parts.values())
        if len(parts) == 1:
            compression = next(iter(parts.values())).compression
        else:
            compression = sum(r.compression * r.entries for r in parts.values()) / max(1, entries)
        merged[rid] = (freed, entries, compression)
    return merged


def cpu_thread_binding(ranks: int) -> str:
    """``SGLANG_CPU_OMP_THREADS_BIND`` for ``ranks`` scheduler processes on this machine: one core each, round
    robin (SGLang on CPU refuses more ranks than NUMA nodes without it)."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    return "|".join(str(cores[i % len(cores)]) for i in range(ranks))


class Server:
    """A real SGLang server on 127.0.0.1, started in its own session; a context manager that stops it
    with SIGTERM (SIGKILL to the group after ``stop_timeout``). ``exit_code`` is set after the stop.

    ``tp_size`` / ``dp_size``: tensor- and data-parallel ranks (``--tp-size`` / ``--dp-size``); on CPU each
    scheduler process gets a core (:func:`cpu_thread_binding`) unless ``SGLANG_CPU_OMP_THREADS_BIND`` is set."""

    def __init__(self, model: str | Path, run: PolicyRun, log_path: str | Path, *, max_total_tokens: int = 4096,
                 python: str | None = None, extra_args: Sequence[str] = (), strict_leak_check: bool = True,
                 port: int | None = None, stop_timeout: float = 60.0, tp_size: int = 1, dp_size: int = 1) -> None:
        self.model, self.run, self.log_path = str(model), run, Path(log_path)
        self.max_total_tokens = max_total_tokens
        if tp_size < 1 or dp_size < 1:
            raise ValueError(f"tp_size and dp_size must be >= 1, got {tp_size} and {dp_size}")
        self.tp_size, self.dp_size = tp_size, dp_size
        self.python = python or sys.executable
        self.extra_args = list(extra_args)
        self.strict_leak_check = strict_leak_check
        self.port = port or free_port()
        self.stop_timeout = stop_timeout
        self.proc: subprocess.Popen | None = None
        self.exit_code: int | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        if self.run.policy is None:
            # The same (non-overlap) scheduler the kvpolicy launcher enforces, so that a comparison measures
            # the policy and not the scheduler.
            head = ["-m", "sglang.launch_server", "--disable-overlap-schedule"]
        else:
            head = ["-m", "kvpolicy.adapters.sglang.launch", *self.run.launcher_flags()]
        return [self.python, *head, "--model-path", self.model, "--device", "cpu",
                "--attention-backend", "torch_native", "--host", "127.0.0.1", "--port", str(self.port),
                "--mem-fraction-static", "0.05", "--max-total-tokens", str(self.max_total_tokens),
                "--skip-tokenizer-init", "--disable-cuda-graph", "--log-level", "info", *self.parallel_args(),
                *self.extra_args]

    def parallel_args(self) -> list[str]:
        args = []
        if self.tp_size > 1:
            args += ["--tp-size", str(self.tp_size)]
        if self.dp_size > 1:
            args += ["--dp-size", str(self.dp_size)]
        return args

    def start(self, ready_timeout: float = READY_TIMEOUT_S) -> "Server":
        """Launch the server and wait until it answers (:meth:`launch`, then :meth:`wait_ready`)."""
        return self.launch().wait_ready(ready_timeout)

    def launch(self) -> "Server":
        """Start the server process and return at once (several servers can load side by side)."""
        env = {**os.environ, "SGLANG_USE_CPU_ENGINE": "1"}
        if self.tp_size * self.dp_size > 1 and "SGLANG_CPU_OMP_THREADS_BIND" not in env:
            env["SGLANG_CPU_OMP_THREADS_BIND"] = cpu_thread_binding(self.tp_size * self.dp_size)
        if self.strict_leak_check:
            # SGLang's scheduler checks at every idle moment that available + evictable == pool size and
            # raises "pool memory leak detected" otherwise.
            env["SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE"] = "1"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
        return self

    def wait_ready(self, ready_timeout: float = READY_TIMEOUT_S) -> "Server":
        """Wait for ``/health_generate``; raises (and stops the server) when it exits or takes too long."""
        deadline = time.monotonic() + ready_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"server not ready in {ready_timeout:.0f}s:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health_generate", timeout=30) as response:
                    if response.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, http.client.HTTPException):
                time.sleep(1.0)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=self.stop_timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.exit_code = self.proc.returncode
        return self.exit_code

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_text()[-chars:]

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- HTTP helpers ---------------------------------------------------------------------------------

    def get_json(self, path: str, timeout: float = 10.0) -> dict:
        with urllib.request.urlopen(self.url + path, timeout=timeout) as response:
            return json.loads(response.read())

    def load(self) -> dict:
        """The (first) scheduler's last published load snapshot: ``num_used_tokens``, ``num_running_reqs``,
        ``max_total_num_tokens``, ``timestamp`` ... (``GET /v1/loads``). SGLang republishes it after every
        prefill, every few decode steps and on every idle pass, so it can lag a busy scheduler by a few steps."""
        return self.loads()[0]

    def loads(self) -> list[dict]:
        """Every DP replica's snapshot (see :meth:`load`), in ``dp_rank`` order; one under tensor parallelism."""
        return sorted(self.get_json("/v1/loads")["loads"], key=lambda load: load.get("dp_rank") or 0)

    def flush_cache(self, timeout: float = 30.0) -> None:
        """Empty the radix cache. SGLang refuses (HTTP 400) while a request is still in a batch, which a request
        whose reply was just read can be for a scheduler step, so a refusal is retried until ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            request = urllib.request.Request(self.url + "/flush_cache", data=b"", method="POST")
            try:
                with urllib.request.urlopen(request, timeout=30):
                    return
            except urllib.error.HTTPError as exc:
                if exc.code != 400 or time.monotonic() > deadline:
                    raise
            time.sleep(0.1)

    def post_json(self, path: str, body: dict, timeout: float = 30.0) -> bytes:
        """POST ``body`` as JSON to ``path``; returns the raw reply (raises HTTPError on 4xx/5xx)."""
        request = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.read()

    def generate(self, input_ids: Sequence[int], max_new_tokens: int, timeout: float = 120.0) -> dict:
        """Non-streaming greedy ``/generate``; returns SGLang's JSON reply (raises HTTPError on 4xx/5xx)."""
        body = {"input_ids": list(input_ids), "sampling_params": {"max_new_tokens": max_new_tokens,
                                                                   "temperature": 0}}
        return json.loads(self.post_json("/generate", body, timeout=timeout))

    def pruning_log(self) -> dict[str, tuple[int, int, float]]:
        """``{request id: (entries freed, entries, policy compression)}`` from the adapter's log lines, summed over
        the tensor-parallel ranks that served each request (:func:`merge_ranks`)."""
        return merge_ranks(self.rank_records())

    def rank_records(self) -> list[RankRecord]:
        """The adapter's per-rank log lines (one per request and rank)."""
        return parse_rank_records(self.log_text())

    def agreement_log(self) -> dict[tuple[int, int], tuple[int, int, float]]:
        """``{(replica, tp rank): (forwards, collectives, total ms)}``: the last TP-agreement summary each rank
        logged (the ranks log it when they go idle; nothing without tensor parallelism)."""
        latest = {}
        for m in AGREEMENT_LINE.finditer(self.log_text()):
            latest[(int(m.group(1)), int(m.group(2)))] = (
                int(m.group(4)), int(m.group(5)) + int(m.group(6)) + int(m.group(7)), float(m.group(8)))
        return latest


# ----------------------------------------------------------------------------------------------------
# Client


@dataclass
class Reply:
    """One streamed request. Times in seconds (``time.perf_counter``); ``error`` set when it failed."""

    index: int
    output_ids: list[int] = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    sent: float = 0.0
    first_token: float | None = None
    done: float | None = None
    error: str | None = None

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.sent

    @property
    def tpot(self) -> float | None:
        n = len(self.output_ids)
        if self.first_token is None or self.done is None or n < 2:
            return None
        return (self.done - self.first_token) / (n - 1)


def stream_generate(url: str, input_ids: Sequence[int], max_new_tokens: int, index: int = 0,
                    timeout: float = 120.0, disconnect_after: int | None = None, ignore_eos: bool = False,
                    custom_params: dict | None = None) -> Reply:
    """Greedy streaming ``/generate`` (server-sent events, ``data: {...}`` lines, ``[DONE]`` at the end).

    ``disconnect_after``: close the connection after that many streamed tokens (a client going away);
    ``ignore_eos``: generate exactly ``max_new_tokens`` (load tests); ``custom_params``: SGLang's per-request
    custom parameters (e.g. ``{"kv_policy": "window"}``: the request's own policy on a shared server)."""
    host, port = url.removeprefix("http://").split(":")
    sampling = {"max_new_tokens": max_new_tokens, "temperature": 0}
    if ignore_eos:
        sampling["ignore_eos"] = True
    if custom_params is not None:
        sampling["custom_params"] = custom_params
    body = json.dumps({"input_ids": list(input_ids), "stream": True, "sampling_params": sampling})
    reply = Reply(index, sent=time.perf_counter())
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request("POST", "/generate", body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            reply.error = f"HTTP {response.status}: {response.read()[:500]!r}"
            return reply
        for raw in response:
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                reply.error = str(chunk["error"])[:500]
                break
            ids = chunk.get("output_ids") or []
            if ids and reply.first_token is None:
                reply.first_token = time.perf_counter()
            reply.output_ids = list(ids)   # SGLang streams the cumulative output
            reply.meta = chunk.get("meta_info", {})
            if disconnect_after is not None and len(reply.output_ids) >= disconnect_after:
                reply.error = "disconnected by client"
                break
        reply.done = time.perf_counter()
    except (OSError, http.client.HTTPException, json.JSONDecodeError) as exc:
        reply.error = f"{type(exc).__name__}: {exc}"
    finally:
        conn.close()
    return reply


class LoadSampler:
    """Polls ``GET /v1/loads`` in a thread; keeps ``(num_used_tokens, num_running_reqs)`` samples summed over the
    DP replicas (``samples``) and per replica (``replicas[dp_rank]``). Each replica's snapshot is its own latest,
    so a sum mixes snapshots of slightly different moments."""

    def __init__(self, server: Server, interval: float = 0.25) -> None:
        self.server, self.interval = server, interval
        self.samples: list[tuple[int, int]] = []
        self.replicas: dict[int, list[tuple[int, int]]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                loads = self.server.loads()
                per = [(int(load.get("dp_rank") or 0), int(load["num_used_tokens"]), int(load["num_running_reqs"]))
                       for load in loads]
                for replica, used, running in per:
                    self.replicas.setdefault(replica, []).append((used, running))
                self.samples.append((sum(u for _, u, _ in per), sum(r for _, _, r in per)))
            except (OSError, KeyError, ValueError, http.client.HTTPException):
                pass
            self._stop.wait(self.interval)

    def __enter__(self) -> "LoadSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=15)


def run_requests(server: Server, prompts: Sequence[Sequence[int]], max_new: Sequence[int], concurrency: int, *,
                 timeout: float = 120.0, deadline_s: float = 1800.0, progress: bool = False,
                 desc: str = "requests", ignore_eos: bool = False,
                 custom_params: Sequence[dict | None] | None = None) -> list[Reply]:
    """Send every prompt (bounded pool of ``concurrency`` threads, in list order); requests not started before
    ``deadline_s`` are skipped (``error='skipped: deadline'``). ``custom_params``: one per prompt, or None."""
    stop_at = time.monotonic() + deadline_s
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(prompts), desc=desc, unit="req", dynamic_ncols=True)

    def one(i: int) -> Reply:
        if time.monotonic() > stop_at:
            reply = Reply(i, error="skipped: deadline")
        else:
            reply = stream_generate(server.url, prompts[i], max_new[i], i, timeout, ignore_eos=ignore_eos,
                                    custom_params=None if custom_params is None else custom_params[i])
        if bar is not None:
            bar.update(1)
        return reply

    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        replies = list(pool.map(one, range(len(prompts))))
    if bar is not None:
        bar.close()
    return replies


# ----------------------------------------------------------------------------------------------------
# Benchmark


@dataclass
class BenchRow:
    """One (policy, concurrency) measurement. Times in ms, throughput in generated tokens/s; ``compression``
    = entries freed / entries (rows the requests freed), ``policy_compression`` = mean per-request
    (layer, head) fraction the policy asked for; None where not measured (e.g. no kvpolicy)."""

    policy: str
    concurrency: int
    requests: int
    answered: int
    accuracy: float
    accuracy_ci95: str  # Wilson 95% interval of the accuracy over the requests, "[low, high]"
    compression: float | None
    policy_compression: float | None
    kv_used_mean: float | None  # None: a policy's rows on a shared server (the server's KV is in its total row)
    kv_used_peak: int | None
    kv_pool: int
    max_running: int | None
    throughput_tok_s: float
    wall_s: float
    ttft_p50_ms: float | None
    ttft_p90_ms: float | None
    ttft_p99_ms: float | None
    tpot_p50_ms: float | None
    tpot_p90_ms: float | None
    tpot_p99_ms: float | None
    prefix_hit_rate: float
    errors: int
    tp_size: int = 1
    dp_size: int = 1
    agreement_ms: float | None = None  # TP: agreement time per forward in the phase, mean over ranks (waits incl.)
    server: str = "own"  # "own": one server for this policy; "shared": one server, a policy per request
    served_as_asked: int | None = None  # replies whose meta_info report names the policy asked for (None: no report)


@dataclass
class RankRow:
    """One scheduler rank in one (policy, concurrency) measurement: the requests it logged, the entries of its KV
    heads and how many it freed; its replica's KV use and running requests (``/v1/loads``); its TP agreements in the
    phase (forwards, collectives, mean ms per collective and agreement ms per forward, the wait for the slowest rank
    included; None without tensor parallelism)."""

    policy: str
    concurrency: int
    replica: int
    tp_rank: int
    kv_heads: str
    requests: int
    entries: int
    freed: int
    compression: float | None
    kv_used_peak: int
    max_running: int
    forwards: int | None
    agreements: int | None
    agreement_ms: float | None
    agreement_ms_per_forward: float | None


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in [0, 100]); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def suite_examples(tasks: Sequence[str], lengths: Sequence[int], n: int, seed: int | None = None):
    from kvpolicy.lab.eval.suite import EVAL_SEED
    from kvpolicy.lab.testbed.tasks import generate

    seed = EVAL_SEED if seed is None else seed
    return [generate(task, length, seed, i) for task in tasks for length in lengths for i in range(n)]


def measure(server: Server, examples, concurrency: int, *, progress: bool = False, timeout: float = 120.0,
            deadline_s: float = 1800.0, sample_interval: float = 0.1, max_new_tokens: int | None = None) -> BenchRow:
    """Send ``examples`` at ``concurrency``. Each request generates its answer's length, or exactly
    ``max_new_tokens`` (EOS ignored; memory and concurrency experiments, where requests must stay resident);
    the accuracy then scores the first tokens (non-strict match). Per-rank numbers: :func:`measure_ranks`."""
    return measure_ranks(server, examples, concurrency, progress=progress, timeout=timeout, deadline_s=deadline_s,
                         sample_interval=sample_interval, max_new_tokens=max_new_tokens)[0]


def rank_rows(server: Server, label: str, concurrency: int, records: Sequence[RankRecord],
              sampler: LoadSampler, agreements_before: dict, agreements_after: dict) -> list[RankRow]:
    """One :class:`RankRow` per (replica, TP rank) that logged requests of this phase (``records``)."""
    by_rank: dict[tuple[int, int], list[RankRecord]] = {}
    for record in records:
        by_rank.setdefault((record.replica, record.tp_rank), []).append(record)
    rows = []
    for (replica, tp_rank), mine in sorted(by_rank.items()):
        entries, freed = sum(r.entries for r in mine), sum(r.freed for r in mine)
        samples = sampler.replicas.get(replica, [])
        forwards = count = ms = per_forward = None
        if (replica, tp_rank) in agreements_after:
            forwards0, count0, total0 = agreements_before.get((replica, tp_rank), (0, 0, 0.0))
            forwards1, count1, total1 = agreements_after[(replica, tp_rank)]
            forwards, count = forwards1 - forwards0, count1 - count0
            ms = (total1 - total0) / count if count > 0 else None
            per_forward = (total1 - total0) / forwards if forwards > 0 else None
        rows.append(RankRow(label, concurrency, replica, tp_rank, ",".join(map(str, mine[0].heads)), len(mine),
                            entries, freed, freed / entries if entries else None,
                            max((u for u, _ in samples), default=0), max((r for _, r in samples), default=0),
                            forwards, count, ms, per_forward))
    return rows


def measure_ranks(server: Server, examples, concurrency: int, *, progress: bool = False, timeout: float = 120.0,
                  deadline_s: float = 1800.0, sample_interval: float = 0.1,
                  max_new_tokens: int | None = None) -> tuple[BenchRow, list[RankRow]]:
    """:func:`measure`, plus one :class:`RankRow` per scheduler rank (DP replica x TP rank) for policy servers.
    The :class:`BenchRow` sums the ranks (compression over every rank's entries, KV use over the replicas)."""
    phase = _run_phase(server, examples, [None] * len(examples), concurrency, progress=progress, timeout=timeout,
                       deadline_s=deadline_s, sample_interval=sample_interval, max_new_tokens=max_new_tokens,
                       desc=f"{server.run.label} c={concurrency}")
    policy_server = server.run.policy is not None
    ranks = rank_rows(server, server.run.label, concurrency, [r for r in phase.records if r.rid in phase.ids],
                      phase.sampler, phase.agreements_before, phase.agreements_after) if policy_server else []
    row = _bench_row(server, server.run.label, concurrency, examples, phase.replies, phase, logged=policy_server,
                     expected=server.run.policy if policy_server else None, agreement_ms=_agreement_ms(ranks))
    return row, ranks


def _agreement_ms(ranks: Sequence[RankRow]) -> float | None:
    """TP agreement ms per forward over the ranks, weighted by their forwards (None without agreements)."""
    timed = [r for r in ranks if r.forwards and r.agreement_ms_per_forward is not None]
    if not timed:
        return None
    return sum(r.forwards * r.agreement_ms_per_forward for r in timed) / sum(r.forwards for r in timed)


@dataclass
class _Phase:
    """What one timed phase of requests left: the replies (in request order), its wall time, the server's load
    samples, its log records and its TP agreement summaries before and after."""

    replies: list[Reply]
    wall: float
    sampler: LoadSampler
    records: list[RankRecord]
    agreements_before: dict
    agreements_after: dict

    @property
    def ids(self) -> set:
        return {r.meta.get("id") for r in self.replies if r.error is None}


def _run_phase(server: Server, examples, custom_params: Sequence[dict | None], concurrency: int, *, progress: bool,
               timeout: float, deadline_s: float, sample_interval: float, max_new_tokens: int | None,
               desc: str) -> _Phase:
    prompts = [e.prompt for e in examples]
    max_new = [len(e.answer) if max_new_tokens is None else max_new_tokens for e in examples]
    agreements_before = server.agreement_log()
    with LoadSampler(server, sample_interval) as sampler:
        start = time.perf_counter()
        replies = run_requests(server, prompts, max_new, concurrency, timeout=timeout, deadline_s=deadline_s,
                               progress=progress, desc=desc, ignore_eos=max_new_tokens is not None,
                               custom_params=custom_params)
        wall = time.perf_counter() - start
    time.sleep(1.0)   # let the scheduler write the last requests' log lines
    return _Phase(replies, wall, sampler, server.rank_records(), agreements_before, server.agreement_log())


def served_policy(reply: Reply) -> str | None:
    """The policy named by a reply's ``meta_info["kvpolicy"]`` report (None without a report)."""
    reports = reply.meta.get("kvpolicy") or []
    return reports[0].get("policy") if reports else None


def _bench_row(server: Server, label: str, concurrency: int, examples, replies: Sequence[Reply], phase: _Phase, *,
               logged: bool, expected: str | None, agreement_ms: float | None = None, kv: bool = True,
               mode: str = "own") -> BenchRow:
    """One :class:`BenchRow` over ``replies`` (``examples[i]`` is the example of ``replies[i]``); throughput over the
    phase's wall time. ``logged``: compression from the adapter's log lines; ``expected``: the policy every reply's
    meta_info report must name (a reply served otherwise counts as an error); ``kv``: the server's KV samples
    belong to this row."""
    from kvpolicy.lab.eval.suite import score_example

    served_ok = [r for r in replies if r.error is None]
    if expected is not None:
        for reply in served_ok:
            served = served_policy(reply)
            if served is not None and served != expected:
                reply.error = f"served with policy {served!r}, asked for {expected!r}"
    ok = [r for r in replies if r.error is None]
    accuracy = (sum(score_example(e, r.output_ids) for r, e in zip(replies, examples) if r.error is None)
                / len(replies) if replies else 0.0)
    pruned_log = merge_ranks(phase.records)
    matched = [pruned_log[r.meta.get("id")] for r in ok if r.meta.get("id") in pruned_log]
    compression = policy_compression = None
    if logged and matched:
        compression = sum(p for p, _, _ in matched) / max(1, sum(t for _, t, _ in matched))
        policy_compression = statistics.fmean(c for _, _, c in matched)
    reported = [r for r in ok if served_policy(r) is not None]
    used = [u for u, _ in phase.sampler.samples]
    ttft = [r.ttft * 1e3 for r in ok if r.ttft is not None]
    tpot = [r.tpot * 1e3 for r in ok if r.tpot is not None]
    prompt_tokens = sum(int(r.meta.get("prompt_tokens", 0)) for r in ok)
    cached = sum(int(r.meta.get("cached_tokens", 0)) for r in ok)
    low, high = wilson_interval(accuracy * len(replies), len(replies))
    wall = phase.wall
    return BenchRow(
        policy=label, concurrency=concurrency, requests=len(replies), answered=len(ok),
        accuracy=accuracy, accuracy_ci95=f"[{low:.3f}, {high:.3f}]", compression=compression,
        policy_compression=policy_compression,
        kv_used_mean=(statistics.fmean(used) if used else 0.0) if kv else None,
        kv_used_peak=max(used, default=0) if kv else None,
        kv_pool=server.max_total_tokens * server.dp_size,
        max_running=max((r for _, r in phase.sampler.samples), default=0) if kv else None,
        throughput_tok_s=sum(len(r.output_ids) for r in ok) / wall if wall > 0 else 0.0, wall_s=wall,
        ttft_p50_ms=percentile(ttft, 50), ttft_p90_ms=percentile(ttft, 90), ttft_p99_ms=percentile(ttft, 99),
        tpot_p50_ms=percentile(tpot, 50), tpot_p90_ms=percentile(tpot, 90), tpot_p99_ms=percentile(tpot, 99),
        prefix_hit_rate=cached / prompt_tokens if prompt_tokens else 0.0,
        errors=len(replies) - len(ok), tp_size=server.tp_size, dp_size=server.dp_size,
        agreement_ms=agreement_ms, server=mode, served_as_asked=len(reported) if reported else None)


# ----------------------------------------------------------------------------------------------------
# Shared mode: one server, a policy per request

SHARED_LABEL = "all (shared server)"


def shared_server_run(runs: Sequence[PolicyRun]) -> tuple[PolicyRun, list[dict]]:
    """The one server of a shared run and each run's ``custom_params``.

    The server's ``--kv-policy`` is the first run with a policy; ``--kv-policy-allow`` lists every run's policy
    (``none`` included) with its server-side config, and opens to requests exactly the per-request values the runs
    use (``one_of``). Runs of the same policy may differ only in the per-request fields (threshold, window, sinks):
    the server builds one scorer per policy. Raises ``ValueError`` otherwise."""
    from kvpolicy.adapters.sglang.requests import CUSTOM_CONFIG, CUSTOM_POLICY, PER_REQUEST_FIELDS

    named = [r for r in runs if r.policy is not None]
    if not named:
        raise ValueError("--shared needs at least one policy other than none (the server's default)")
    if len({r.label for r in runs}) != len(runs):
        raise ValueError("--shared runs each configuration once; two runs have the same label")
    server_configs: dict[str, dict] = {}
    values: dict[str, dict[str, set]] = {}
    params = []
    for run in runs:
        if run.policy is None:
            params.append({CUSTOM_POLICY: NO_POLICY})
            continue
        fixed = {k: v for k, v in run.config.items() if k not in PER_REQUEST_FIELDS}
        known = server_configs.setdefault(run.policy, fixed)
        if known != fixed:
            differ = sorted(k for k in set(known) | set(fixed) if known.get(k) != fixed.get(k))
            raise ValueError(f"--shared: the runs of {run.policy} differ in {', '.join(differ)}; one server builds one "
                             f"scorer per policy, so only {', '.join(PER_REQUEST_FIELDS)} may differ between them")
        override = {k: v for k, v in run.config.items() if k in PER_REQUEST_FIELDS}
        for key, value in override.items():
            values.setdefault(run.policy, {}).setdefault(key, set()).add(value)
        params.append({CUSTOM_POLICY: run.policy, CUSTOM_CONFIG: override} if override else {CUSTOM_POLICY: run.policy})
    default = named[0]
    allow = {}
    for name, fixed in server_configs.items():
        entry: dict = {}
        if name != default.policy and fixed:
            entry["config"] = fixed
        limits = {k: {"one_of": sorted(v)} for k, v in values.get(name, {}).items()}
        if limits:
            entry["limits"] = limits
        allow[name] = entry
    if any(r.policy is None for r in runs):
        allow[NO_POLICY] = {}
    server = PolicyRun("shared", default.policy, server_configs[default.policy], default.granularity,
                       default.token_vote, default.min_keep_fraction, allow=json.dumps(allow))
    return server, params


def measure_shared(server: Server, runs: Sequence[PolicyRun], params: Sequence[dict], examples, concurrency: int, *,
                   progress: bool = False, timeout: float = 120.0, deadline_s: float = 1800.0,
                   sample_interval: float = 0.1, max_new_tokens: int | None = None) -> tuple[list[BenchRow],
                                                                                            list[RankRow]]:
    """Every example once per run, on one server, in a fixed interleaved order (example 0 under every run, then
    example 1, ...), each request naming its run's policy. One :class:`BenchRow` per run (its requests; throughput
    over the shared phase's wall time; the server's KV use only in the total) and one for the server in total
    (:data:`SHARED_LABEL`), plus the total's per-rank rows."""
    order = [(i, j) for i in range(len(examples)) for j in range(len(runs))]
    phase = _run_phase(server, [examples[i] for i, _ in order], [params[j] for _, j in order], concurrency,
                       progress=progress, timeout=timeout, deadline_s=deadline_s, sample_interval=sample_interval,
                       max_new_tokens=max_new_tokens, desc=f"shared c={concurrency}")
    rows = []
    for j, run in enumerate(runs):
        mine = [k for k, (_, jj) in enumerate(order) if jj == j]
        rows.append(_bench_row(server, run.label, concurrency, [examples[order[k][0]] for k in mine],
                               [phase.replies[k] for k in mine], phase, logged=True,
                               expected=run.policy or NO_POLICY, kv=False, mode="shared"))
    ranks = rank_rows(server, SHARED_LABEL, concurrency, [r for r in phase.records if r.rid in phase.ids],
                      phase.sampler, phase.agreements_before, phase.agreements_after)
    rows.append(_bench_row(server, SHARED_LABEL, concurrency, [examples[i] for i, _ in order], phase.replies, phase,
                           logged=True, expected=None, agreement_ms=_agreement_ms(ranks), mode="shared"))
    return rows, ranks


def run_shared_bench(model: str | Path, runs: Sequence[PolicyRun], examples, concurrencies: Sequence[int],
                     out: str | Path, *, max_total_tokens: int = 4096, server_python: str | None = None,
                     progress: bool = True, timeout: float = 120.0, deadline_s: float = 1800.0,
                     max_new_tokens: int | None = None, tp_size: int = 1, dp_size: int = 1) -> list[BenchRow]:
    """The shared serving experiment: one server (:func:`shared_server_run`), every concurrency (radix cache flushed
    before each) through :func:`measure_shared`; writes the same files as :func:`run_bench`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    server_run, params = shared_server_run(runs)
    server = Server(model, server_run, out / "server-shared.log", max_total_tokens=max_total_tokens,
                    python=server_python, tp_size=tp_size, dp_size=dp_size)
    rows, ranks, failures = _serve(server, "shared server", concurrencies, lambda concurrency: measure_shared(
        server, runs, params, examples, concurrency, progress=progress, timeout=timeout, deadline_s=deadline_s,
        max_new_tokens=max_new_tokens))
    write_outputs(rows, out, failures, ranks=ranks if tp_size * dp_size > 1 else ())
    return rows


def _serve(server: Server, label: str, concurrencies: Sequence[int], measure_at) -> tuple[list[BenchRow],
                                                                                       list[RankRow], list[str]]:
    """Start ``server``, run ``measure_at(concurrency) -> (rows, rank rows)`` for each concurrency (radix cache
    flushed before each), stop it; returns the rows, rank rows and failures (a server that does not start, exits
    non-zero after SIGTERM or reports a pool memory leak), each failure prefixed with ``label``."""
    rows: list[BenchRow] = []
    ranks: list[RankRow] = []
    try:
        server.start()
    except (RuntimeError, TimeoutError) as exc:
        return rows, ranks, [f"{label}: server did not start ({str(exc).splitlines()[0]})"]
    failures = []
    try:
        for concurrency in concurrencies:
            server.flush_cache()
            phase_rows, phase_ranks = measure_at(concurrency)
            rows += phase_rows
            ranks += phase_ranks
    finally:
        code = server.stop()
    if code != 0:
        failures.append(f"{label}: server exit status {code} after SIGTERM (see {server.log_path.name})")
    if "memory leak" in server.log_text():
        failures.append(f"{label}: SGLang's idle check reported a pool memory leak")
    return rows, ranks, failures


def run_bench(model: str | Path, runs: Sequence[PolicyRun], examples, concurrencies: Sequence[int], out: str | Path,
              *, max_total_tokens: int = 4096, server_python: str | None = None, progress: bool = True,
              timeout: float = 120.0, deadline_s: float = 1800.0,
              max_new_tokens: int | None = None, tp_size: int = 1, dp_size: int = 1) -> list[BenchRow]:
    """For each run: start a server, run every concurrency (radix cache flushed before each), stop it.

    Writes ``results.csv``, ``results.md``, the plots (when matplotlib is installed) and each server's log
    to ``out``; with several scheduler ranks (``tp_size`` x ``dp_size``) also ``results_ranks.csv`` and a per-rank
    table in ``results.md`` (every replica and TP rank one by one; the main table sums them). A server that fails to
    start is reported in ``results.md`` and skipped. ``max_total_tokens`` is per DP replica."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[BenchRow] = []
    ranks: list[RankRow] = []
    failures: list[str] = []
    for run in runs:
        slug = re.sub(r"[^A-Za-z0-9_.=-]+", "_", run.label)
        server = Server(model, run, out / f"server-{slug}.log", max_total_tokens=max_total_tokens,
                        python=server_python, tp_size=tp_size, dp_size=dp_size)

        def measure_at(concurrency: int, server: Server = server) -> tuple[list[BenchRow], list[RankRow]]:
            row, per_rank = measure_ranks(server, examples, concurrency, progress=progress, timeout=timeout,
                                          deadline_s=deadline_s, max_new_tokens=max_new_tokens)
            return [row], per_rank

        run_rows, run_ranks, run_failures = _serve(server, run.label, concurrencies, measure_at)
        rows += run_rows
        ranks += run_ranks
        failures += run_failures
    write_outputs(rows, out, failures, ranks=ranks if tp_size * dp_size > 1 else ())
    return rows


COLUMNS = [f for f in BenchRow.__dataclass_fields__]
RANK_COLUMNS = [f for f in RankRow.__dataclass_fields__]


def _fmt(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def to_markdown(rows: Sequence, columns: Sequence[str] = COLUMNS) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(getattr(r, c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_outputs(rows: Sequence[BenchRow], out: Path, failures: Sequence[str] = (),
                  ranks: Sequence[RankRow] = ()) -> dict[str, Path]:
    paths = {"csv": out / "results.csv", "md": out / "results.md"}
    with open(paths["csv"], "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow(asdict(row))
    text = ["# kvpolicy bench-serve", "", to_markdown(rows), ""]
    if ranks:
        paths["ranks_csv"] = out / "results_ranks.csv"
        with open(paths["ranks_csv"], "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=RANK_COLUMNS)
            writer.writeheader()
            for rank in ranks:
                writer.writerow(asdict(rank))
        text += ["## Per rank (DP replica x TP rank; the table above sums them)", "", to_markdown(ranks, RANK_COLUMNS),
                 ""]
    text += [f"- {f}" for f in failures]
    paths["md"].write_text("\n".join(text) + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench-serve: matplotlib not installed, no plots", file=sys.stderr)
        return paths
    policies = list(dict.fromkeys(r.policy for r in rows))
    fig, ax = plt.subplots(figsize=(6, 4))
    for policy in policies:
        sub = sorted((r for r in rows if r.policy == policy), key=lambda r: r.concurrency)
        ax.plot([r.concurrency for r in sub], [r.throughput_tok_s for r in sub], marker="o", label=policy)
    ax.set(xlabel="concurrency (client threads)", ylabel="generated tokens/s", title="throughput vs concurrency")
    ax.set_xscale("log", base=2)
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths["throughput"] = out / "throughput_vs_concurrency.png"
    fig.savefig(paths["throughput"], dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    for policy in policies:
        sub = [r for r in rows if r.policy == policy]
        ax.scatter([r.compression or 0.0 for r in sub], [r.accuracy for r in sub], label=policy)
    ax.set(xlabel="achieved compression ((layer, head) entries freed / entries)", ylabel="exact-match accuracy",
           title="accuracy vs compression")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths["accuracy"] = out / "accuracy_vs_compression.png"
    fig.savefig(paths["accuracy"], dpi=120)
    plt.close(fig)
    return paths
