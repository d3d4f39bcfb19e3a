"""Measure the host as a device profile (``maia-serving calibrate-host``).

The host's peak is what it reaches: matmul FLOP/s per dtype and the bandwidth of
a large copy, measured with torch, so the efficiency factors are 1.0; prefill attention
gets its own, the serving host attention's measured rate against the matmul's. Capacity
is the machine's physical memory.

A serving engine on the host spends time of its own around each step (scheduling, input
preparation, sampling, output processing) that torch's rates do not see; on a small model it is
most of the step. ``fit_engine_time`` fits it from the live engine's steps (the adapter times them:
``maia_serving.vllm.step_timing``) as a fixed time, a time per running sequence and one per scheduled
token: the profile's ``step_overhead`` figures. It is fitted on ``ENGINE_WORKLOADS``, whose shapes
``benchmarks/host_fidelity.py`` does not check, each shape at its fastest of ``ENGINE_ROUNDS`` rounds.

The server's front end (HTTP, tokenization, the hand-off to the engine, the reply) is what a client's TTFT holds
beyond the engine's: ``measure_front_end`` times lone requests against a running server's own emulated TTFT, and
``fit_front_end`` makes them the profile's ``request_overhead`` figures (``FrontEnd``), which ``simulate --front-end
host`` charges to replay a run served on this host.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from maia_serving.emulator.hardware import FrontEnd


def _best_of(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def measure_matmul_flops(dtype_name: str, n: int = 1024, repeats: int = 5) -> float:
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    return 2 * n**3 / _best_of(lambda: torch.mm(a, b), repeats)


def measure_copy_bandwidth(nbytes: int = 256 * 2**20, repeats: int = 5) -> float:
    """Bytes read plus bytes written per second for one large tensor copy."""
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8).fill_(1)
    dst = torch.empty_like(src)
    return 2 * nbytes / _best_of(lambda: dst.copy_(src), repeats)


def measure_op_overhead_s(repeats: int = 2000) -> float:
    """Dispatch cost of one tiny torch op: the host's counterpart of a kernel launch."""
    import torch

    x = torch.zeros(8)
    return _best_of(lambda: [x.add_(1) for _ in range(repeats)], 3) / repeats


def measure_attention_flops(
    tokens: int = 1024, heads: int = 8, kv_heads: int = 2, head_dim: int = 64, repeats: int = 3
) -> float:
    """FLOP/s of one causal prefill through the host attention that serves (``maia_serving.ops``: the
    native kernel where built), counted as the cost model counts attention: ``2 * heads * (2 * head_dim)``
    per attended (query, key) pair. It is no matmul, so the matmul peak overstates it several times."""
    import torch

    from maia_serving import ops

    block = 16
    blocks = -(-tokens // block)
    gen = torch.Generator().manual_seed(0)
    query = torch.randn(tokens, heads, head_dim, generator=gen).to(torch.bfloat16)
    kv = torch.randn(tokens, kv_heads, head_dim, generator=gen).to(torch.bfloat16)
    key_cache = torch.zeros(blocks, block, kv_heads, head_dim, dtype=torch.bfloat16)
    value_cache = torch.zeros_like(key_cache)
    ops.reshape_and_cache(kv, kv, key_cache, value_cache, torch.arange(tokens))
    batch = ops.PagedBatch(torch.arange(blocks)[None], torch.tensor([tokens]), torch.tensor([0, tokens]), tokens)
    seconds = _best_of(lambda: ops.paged_attention(query, key_cache, value_cache, batch, head_dim**-0.5), repeats)
    pairs = tokens * (tokens + 1) // 2
    return 2 * heads * (2 * head_dim) * pairs / seconds


def physical_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _fig(value: float, unit: str, source: str) -> dict[str, Any]:
    return {"value": value, "unit": unit, "source": source}


def host_profile_dict(heads: tuple[int, int, int] = (8, 2, 64), where: str = "") -> dict[str, Any]:
    """The host as a profile data file, every figure measured here and now; prefill attention with ``heads``
    (query heads, KV heads, head size): the host attention's rate depends on them (4 heads of 32 run at two
    thirds of 8 heads of 64's rate here), so `calibrate-host --engine-model` passes the model's, and measures
    inside the engine's process (``where`` says so in the sources)."""
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    measured = f"measured by maia-serving calibrate-host on {platform.node()}{where}, {when}"
    bf16 = measure_matmul_flops("bf16") / 1e12  # also what the host attention's rate is a share of
    link = {
        "topology": "pcie",
        "chips": _fig(1, "count", "a single host"),
        "bandwidth": _fig(copy_gbs := measure_copy_bandwidth() / 1e9, "GB/s", measured),
        "latency": _fig(1, "us", "shared memory between processes on one host"),
    }
    return {
        "name": "host",
        "description": f"this host ({platform.processor() or platform.machine()}, {os.cpu_count()} CPUs)",
        "hbm_capacity": _fig(physical_memory_bytes() / 1e9, "GB", "os.sysconf physical pages"),
        "hbm_bandwidth": _fig(copy_gbs, "GB/s", measured + " (torch copy, read + write)"),
        "sram": _fig(0, "MB", "caches not modelled for the host"),
        "peak_compute": {
            "fp32": _fig(measure_matmul_flops("fp32") / 1e12, "TFLOP/s", measured + " (torch.mm 1024^3)"),
            "bf16": _fig(bf16, "TFLOP/s", measured + " (torch.mm 1024^3)"),
        },
        "compute_efficiency": _fig(1.0, "ratio", "the measured rate is already achieved"),
        # Prefill attention at the serving host attention's own rate: priced at the matmul peak, one
        # prefill of 1,024 tokens was predicted at a ninth of its measured time (benchmarks/host_fidelity.py).
        "attention_compute_efficiency": _fig(
            min(1.0, measure_attention_flops(1024, *heads) / (bf16 * 1e12)),
            "ratio",
            measured + f" (maia_serving.ops prefill attention, 1,024 "
            f"tokens, {heads[0]} heads and {heads[1]} KV heads of {heads[2]}, "
            "against the bf16 matmul)",
        ),
        "memory_efficiency": _fig(1.0, "ratio", "the measured rate is already achieved"),
        "runtime_reserve": _fig(0, "GiB", "none"),
        "kernel_launch": _fig(measure_op_overhead_s() * 1e6, "us", measured + " (a tiny torch op)"),
        "scale_up": link,
        "host_link": link,
    }


def write_profile(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def calibrate_host(path: Path) -> dict[str, Any]:
    """Measure the host and write its profile to ``path``."""
    data = host_profile_dict()
    write_profile(path, data)
    return data


# (prompts, prompt tokens, output tokens): decode of 2 to 48 sequences and prefills of 192 to 2,304
# tokens, none of them a shape benchmarks/host_fidelity.py checks the fit on.
ENGINE_WORKLOADS = ((2, 96, 32), (16, 96, 32), (48, 48, 24), (3, 384, 8))
# Rounds of them: on a shared host one round in a few ran 10-50% slow (2026-12-04), the fastest one seldom.
ENGINE_ROUNDS = 5
# A slowest round this much over the fastest at the median shape: the host moved while it was timed.
QUIET_SPREAD = 0.15


@dataclass(frozen=True)
class ShapeTiming:
    """One step shape's measured and emulated times over the steps of that shape.

    ``measured_s`` is the median of the shape's steps in the fastest round: a shared host's neighbours only
    ever slow a round down, so the fastest round is the host as its profile describes it (unloaded, as the
    micro-benchmarks' best of repeats). ``all_steps_s`` is the median over every round, ``slowest_round_s``
    the slowest round's median, which says how far the host moved during the run.
    """

    kind: str  # "prefill" or "decode"
    seqs: int
    tokens: int
    steps: int
    measured_s: float
    predicted_s: float
    all_steps_s: float
    slowest_round_s: float


def shape_timings(steps: list[dict], min_steps: int = 3) -> list[ShapeTiming]:
    """Steps (``maia_serving.vllm.step_timing`` rows) grouped by shape, each shape seen at least ``min_steps``
    times: a tail step seen once says little about its shape."""
    groups: dict[tuple[int, int], list[dict]] = {}
    for step in steps:
        groups.setdefault((step["seqs"], step["tokens"]), []).append(step)
    timings = []
    for (seqs, tokens), group in sorted(groups.items(), key=lambda kv: (kv[0][1] > kv[0][0], kv[0])):
        if len(group) < min_steps:
            continue
        rounds: dict[int, list[float]] = {}
        for step in group:
            rounds.setdefault(step["round"], []).append(step["measured_s"])
        medians = [statistics.median(times) for times in rounds.values()]
        timings.append(
            ShapeTiming(
                "decode" if tokens == seqs else "prefill",
                seqs,
                tokens,
                len(group),
                min(medians),
                statistics.median(s["predicted_s"] for s in group),
                statistics.median(s["measured_s"] for s in group),
                max(medians),
            )
        )
    return timings


def round_spread(shapes: list[ShapeTiming]) -> float:
    """How much slower the slowest round ran than the fastest, at the median shape: the host's drift."""
    return statistics.median(s.slowest_round_s / s.measured_s - 1 for s in shapes)


@dataclass(frozen=True)
class EngineTime:
    """The engine's host time per step: ``fixed_s + per_seq_s * seqs + per_token_s * tokens``."""

    fixed_s: float
    per_seq_s: float
    per_token_s: float

    def of(self, seqs: int, tokens: int) -> float:
        return self.fixed_s + self.per_seq_s * seqs + self.per_token_s * tokens


def _solve(rows: list[list[float]], rhs: list[float]) -> list[float] | None:
    """Least squares of ``rows @ x = rhs`` through its normal equations (Gauss-Jordan); None if singular."""
    n = len(rows[0])
    a = [
        [sum(r[i] * r[j] for r in rows) for j in range(n)] + [sum(r[i] * y for r, y in zip(rows, rhs))]
        for i in range(n)
    ]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(a[r][col]))
        if abs(a[pivot][col]) < 1e-12 * max(1.0, abs(a[col][col])):
            return None
        a[col], a[pivot] = a[pivot], a[col]
        for r in range(n):
            if r != col:
                f = a[r][col] / a[col][col]
                a[r] = [x - f * y for x, y in zip(a[r], a[col])]
    return [a[i][n] / a[i][i] for i in range(n)]


def fit_engine_time(shapes: list[ShapeTiming]) -> EngineTime:
    """The non-negative ``EngineTime`` that, added to each shape's emulated time, best matches its measured time
    in relative terms (least squares on ``error / measured``, so a 1 ms decode counts as much as a 50 ms
    prefill): every subset of the three terms is fitted and the best one with no negative term kept."""
    if not shapes:
        raise ValueError("no step shapes to fit the engine's time on")
    features = [(1.0, float(s.seqs), float(s.tokens)) for s in shapes]
    best, best_loss = EngineTime(0.0, 0.0, 0.0), float("inf")
    for mask in range(1, 8):
        used = [i for i in range(3) if mask >> i & 1]
        rows = [[f[i] / s.measured_s for i in used] for f, s in zip(features, shapes)]
        rhs = [(s.measured_s - s.predicted_s) / s.measured_s for s in shapes]
        x = _solve(rows, rhs)
        if x is None or min(x) < 0:
            continue
        coef = [0.0, 0.0, 0.0]
        for i, v in zip(used, x):
            coef[i] = v
        loss = sum(
            (sum(c * fi for c, fi in zip(coef, f)) + s.predicted_s - s.measured_s) ** 2 / s.measured_s**2
            for f, s in zip(features, shapes)
        )
        if loss < best_loss:
            best, best_loss = EngineTime(*coef), loss
    return best


def with_engine_time(data: dict[str, Any], engine: EngineTime, source: str) -> dict[str, Any]:
    """The host profile's data with the engine's time per step as its ``step_overhead`` figures."""
    return {
        **data,
        "step_overhead": _fig(engine.fixed_s * 1e3, "ms", source),
        "step_overhead_per_seq": _fig(engine.per_seq_s * 1e6, "us", source + ", per running sequence"),
        "step_overhead_per_token": _fig(engine.per_token_s * 1e6, "us", source + ", per scheduled token"),
    }


# The serving front end (``FrontEnd``): lone streamed requests of these prompt lengths, one output token each,
# timed by the client to the first event against the engine's own emulated TTFT; the median of
# ``FRONT_END_ROUNDS`` per length. Its work per streamed token and per step:
# the server process's CPU time over four requests of ``FRONT_END_TOKENS`` output tokens at once against one.
FRONT_END_PROMPTS = (16, 384)
FRONT_END_ROUNDS = 5
FRONT_END_TOKENS = 48
_TTFT = "maia:emulated_time_to_first_token_seconds"


@dataclass(frozen=True)
class FrontEndSample:
    """One lone request: its prompt, the client's time from send to the first streamed token, and the engine's
    emulated TTFT (queue and prefill on the device, which the paced server waits out); the rest is the front
    end's."""

    input_len: int
    client_s: float
    device_s: float

    @property
    def front_end_s(self) -> float:
        return self.client_s - self.device_s


@dataclass(frozen=True)
class FrontEndTiming:
    """What ``measure_front_end`` found: the lone requests, and the server's CPU time per streamed token and per
    step (None where its /metrics has no process CPU counter)."""

    samples: tuple[FrontEndSample, ...]
    per_output_token_s: float | None
    per_step_s: float | None = None


def _scrape(url: str) -> dict[str, float]:
    """The server's emulated TTFT histogram (sum, count over every engine) and its process CPU seconds."""
    import urllib.request

    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        base = name.partition("{")[0]
        if base in (f"{_TTFT}_sum", f"{_TTFT}_count", "process_cpu_seconds_total"):
            out[base] = out.get(base, 0.0) + float(value)
    return out


class StreamTimes(NamedTuple):
    """One streamed completion as its client timed it, in seconds after the send: its first and last token."""

    first_s: float
    last_s: float


def stream_completion(
    url: str, model: str, prompt: list[int], max_tokens: int, timeout_s: float, **extra: Any
) -> StreamTimes:
    """One streamed completion from the OpenAI-compatible server at ``url``, exactly ``max_tokens`` long, read to
    its end by a plain HTTP client (as ``vllm bench serve``'s aiohttp is; the OpenAI SDK adds ~10 ms of its own a
    request on a small host), timing each event as a load generator times TTFT and TPOT; ``extra`` joins the
    body."""
    import json
    import urllib.request

    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
        **extra,
    }
    request = urllib.request.Request(
        f"{url}/v1/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    first = last = None
    start = time.monotonic()
    with urllib.request.urlopen(request, timeout=timeout_s) as resp:
        for line in resp:  # one event a token (its text may be "" until a character completes)
            if line.startswith(b"data:") and not line.startswith(b"data: [DONE]"):
                last = time.monotonic() - start
                first = last if first is None else first
    if first is None or last is None:
        raise RuntimeError(f"{url} streamed no token back")
    return StreamTimes(first, last)


def _counted(url: str, before: dict[str, float], requests: int, timeout_s: float) -> dict[str, float]:
    """/metrics once the engine has counted ``requests`` more first tokens than ``before``."""
    deadline = time.monotonic() + timeout_s
    while (after := _scrape(url)).get(f"{_TTFT}_count", 0.0) < before.get(f"{_TTFT}_count", 0.0) + requests:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url}/metrics never counted the request: is it a --device maia server?")
        time.sleep(0.02)
    return after


def _streams(url: str, model: str, prompts: list[list[int]], max_tokens: int, timeout_s: float) -> None:
    """``prompts`` streamed at once, one thread each, every one read to its end."""
    import threading

    errors: list[BaseException] = []

    def one(prompt: list[int]) -> None:
        try:
            stream_completion(url, model, prompt, max_tokens, timeout_s)
        except BaseException as exc:  # re-raised below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(p,)) for p in prompts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout_s)
    if errors:
        raise errors[0]


def measure_front_end(
    url: str,
    model: str,
    rounds: int = FRONT_END_ROUNDS,
    tokens: int = FRONT_END_TOKENS,
    timeout_s: float = 60.0,
    settle_s: float = 0.3,
) -> FrontEndTiming:
    """Lone requests to the `vllm serve --device maia` (or SGLang) server at ``url``, one after another, each timed
    by this client and by the server's emulated TTFT (read back from /metrics once it has counted it); and the
    server process's CPU time over batches sent at once, two scrapes each (``settle_s`` after the last token, so
    the server's own bookkeeping lands): one and four requests of one token, one and four of ``tokens``, in each of
    ``rounds``. Four long less one long is three requests' own work and 3 x ``tokens`` tokens' (their steps are
    shared); four short less one short, three requests' work and 3 tokens': the difference is the work per token
    alone, without a request's or a step's."""
    samples = []
    has_cpu = "process_cpu_seconds_total" in _scrape(url)
    cpu: dict[tuple[int, int], float] = {}

    def cpu_of(prompts: list[list[int]], max_tokens: int) -> None:
        before = _scrape(url)
        _streams(url, model, prompts, max_tokens, timeout_s)
        time.sleep(settle_s)
        after = _scrape(url)
        key = (len(prompts), max_tokens)
        cpu[key] = (
            cpu.get(key, 0.0)
            + after.get("process_cpu_seconds_total", 0.0)
            - before.get("process_cpu_seconds_total", 0.0)
        )

    for round_ in range(rounds):
        for length in FRONT_END_PROMPTS:
            prompt = [100 + (7 * j + 13 * round_ + length) % 1000 for j in range(length)]  # no prefix-cache hits
            before = _scrape(url)
            client_s = stream_completion(url, model, prompt, 1, timeout_s).first_s
            after = _counted(url, before, 1, timeout_s)
            samples.append(FrontEndSample(length, client_s, after[f"{_TTFT}_sum"] - before[f"{_TTFT}_sum"]))
        if has_cpu:
            prompts = [[200 + (11 * j + 5 * k + round_) % 1000 for j in range(FRONT_END_PROMPTS[0])] for k in range(4)]
            for count in (1, 4):
                for length in (1, tokens):
                    cpu_of(prompts[:count], length)
    if not has_cpu:
        return FrontEndTiming(tuple(samples), None)
    long_, short = cpu[4, tokens] - cpu[1, tokens], cpu[4, 1] - cpu[1, 1]
    per_token = max(0.0, (long_ - short) / (3 * (tokens - 1) * rounds))
    # One long less one short: (tokens - 1) more steps, each with one token.
    per_step = max(0.0, (cpu[1, tokens] - cpu[1, 1]) / ((tokens - 1) * rounds) - per_token)
    return FrontEndTiming(tuple(samples), per_token, per_step)


def fit_front_end(timing: FrontEndTiming) -> FrontEnd:
    """The front end's work per request, a fixed time and one per prompt token through the median lone request of
    each prompt length (not the fastest, as for the engine's steps: a request's way through the event loop varies
    with what else it is doing, and a client meets its typical time), less its first token's way back (the work
    per step and per streamed token); none below zero."""
    per_token, per_step = timing.per_output_token_s or 0.0, timing.per_step_s or 0.0
    by_length: dict[int, list[float]] = {}
    for s in timing.samples:
        by_length.setdefault(s.input_len, []).append(s.front_end_s - per_token - per_step)
    if len(by_length) < 2:
        raise ValueError("the front end needs lone requests of at least two prompt lengths")
    xs = sorted(by_length)
    ys = [statistics.median(by_length[n]) for n in xs]
    slope = max(0.0, statistics.linear_regression(xs, ys).slope)
    return FrontEnd(max(0.0, statistics.fmean(ys) - slope * statistics.fmean(xs)), slope, per_token, per_step)


def with_front_end(data: dict[str, Any], front_end: FrontEnd, source: str) -> dict[str, Any]:
    """The host profile's data with the front end's figures."""
    return {
        **data,
        "request_overhead": _fig(front_end.fixed_s * 1e3, "ms", source),
        "request_overhead_per_input_token": _fig(
            front_end.per_input_token_s * 1e6, "us", source + ", per prompt token"
        ),
        "step_output_time": _fig(
            front_end.per_step_s * 1e6,
            "us",
            "the server process's CPU time per engine step (one request of "
            f"{FRONT_END_TOKENS} output tokens against one of one token, less its tokens' own), measured by "
            "calibrate-host --server",
        ),
        "token_output_time": _fig(
            front_end.per_output_token_s * 1e6,
            "us",
            "the server process's CPU time per streamed token (process_cpu_seconds_total over four requests of "
            f"{FRONT_END_TOKENS} output tokens at once against one), measured by calibrate-host --server",
        ),
    }
