"""What a simulation reports: the figures of ``vllm bench serve``, KV use over time, a Chrome trace.

Throughput is over the run's span, from the first arrival to the last token, as the bench
counts it. Goodput counts the requests that meet every SLO given (a request of one output
token has no TPOT and meets a TPOT SLO, as in vLLM). Percentiles interpolate linearly
between samples (numpy's default, which the bench uses).
"""

from __future__ import annotations

import bisect
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from maia_serving.emulator.device.clock import RequestTiming
from maia_serving.emulator.sim.simulate import Simulation

KV_SAMPLES = 20  # points of KV use over time in a report; the trace and the plot have every step


@dataclass(frozen=True)
class Latency:
    """Mean and percentiles of one latency, in milliseconds."""

    mean: float
    p50: float
    p90: float
    p99: float

    @classmethod
    def of(cls, values_s: list[float]) -> Latency | None:
        if not values_s:
            return None
        ms = np.asarray(values_s) * 1e3
        p50, p90, p99 = np.percentile(ms, [50, 90, 99])
        return cls(float(ms.mean()), float(p50), float(p90), float(p99))


@dataclass(frozen=True)
class SLO:
    """Service-level objectives for goodput, in milliseconds; None: not required."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None

    @property
    def given(self) -> bool:
        return self.ttft_ms is not None or self.tpot_ms is not None


@dataclass(frozen=True)
class SimReport:
    """One device's row: the serving figures of a simulated run."""

    device: str
    fits: bool
    error: str | None
    num_requests: int
    duration_s: float
    num_steps: int
    request_throughput_req_s: float
    output_throughput_tok_s: float
    total_throughput_tok_s: float
    goodput_req_s: float | None  # None when no SLO is given
    ttft_ms: Latency
    tpot_ms: Latency | None  # None when every request has a single output token
    e2e_ms: Latency
    num_preemptions: int
    prefix_cache_hit_rate: float | None  # None with prefix caching off
    kv_cache_blocks: int
    kv_cache_tokens: int
    kv_bytes_per_token: float  # one chip's, at the KV format's stored size (block scales included)
    kv_peak_usage: float  # fraction of the KV blocks, at the busiest step
    kv_mean_usage: float  # time-weighted over the run's span, idle time at zero
    kv_usage_over_time: tuple[tuple[float, float], ...]  # (time_s, fraction) at KV_SAMPLES even times
    eplb_initial_steps: int | None = None  # steps at EPLB's initial expert map, before it rearranges (None: no EPLB)
    # of each TTFT, the serving front end's share (HTTP, tokenization, the hand-off; simulate.py): the rest is the
    # device's, queueing and prefill
    ttft_front_end_ms: Latency | None = None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["kv_usage_over_time"] = [list(point) for point in self.kv_usage_over_time]
        return out


def refused(device: str, error: str) -> dict[str, Any]:
    """The row of a device that could not run: the same keys as SimReport.to_dict, figures null."""
    return {**{f.name: None for f in fields(SimReport)}, "device": device, "fits": False, "error": error}


def kv_usage_at(sim: Simulation, times_s: list[float]) -> list[float]:
    """Fraction of the KV blocks held at each time: by the step running then, 0 while idle."""
    steps = sim.steps
    out = []
    for t in times_s:
        index = bisect.bisect_right(steps.start_s, t) - 1
        busy = index >= 0 and t < steps.start_s[index] + steps.step_s[index]
        out.append(steps.kv_blocks_used[index] / sim.kv_cache_blocks if busy else 0.0)
    return out


def held_s(sim: Simulation) -> list[float]:
    """How long each step's KV use holds: until the step ends or the next one starts, whichever is first
    (pipelined steps overlap, and the next step's count already includes what this one holds)."""
    steps = sim.steps
    nexts = [*steps.start_s[1:], float("inf")]
    return [min(dur, nxt - start) for start, dur, nxt in zip(steps.start_s, steps.step_s, nexts)]


def served_s(value: float | None, what: str, timing: RequestTiming) -> float:
    """``value``, the ``what`` of ``timing``: set for every request of a finished simulation, which serves each
    to its last token; ValueError where it is not."""
    if value is None:
        raise ValueError(f"the request arriving at {timing.arrival_s} s has no {what}: it was never served")
    return value


def _latency(values_s: list[float], what: str) -> Latency:
    """``Latency.of`` a finished simulation's requests, of which there is at least one."""
    latency = Latency.of(values_s)
    if latency is None:
        raise ValueError(f"no {what}: the simulation served no request")
    return latency


def meets(ttft_s: float, tpot_s: float | None, slo: SLO) -> bool:
    if slo.ttft_ms is not None and ttft_s * 1e3 > slo.ttft_ms:
        return False
    return slo.tpot_ms is None or tpot_s is None or tpot_s * 1e3 <= slo.tpot_ms


def summarize(sim: Simulation, slo: SLO = SLO()) -> SimReport:
    """The figures of a finished simulation."""
    timings, steps = sim.timings, sim.steps
    start_s = min(t.arrival_s for t in timings)
    duration_s = max(served_s(t.last_token_s, "last token", t) for t in timings) - start_s
    output_tokens = sum(t.num_output_tokens for t in timings)
    input_tokens = sum(r.input_len for r in sim.requests)
    ttfts_s = [served_s(t.ttft_s, "first token", t) for t in timings]
    good = sum(meets(ttft_s, t.tpot_s, slo) for ttft_s, t in zip(ttfts_s, timings))
    busy_block_s = sum(b * s for b, s in zip(steps.kv_blocks_used, held_s(sim)))
    sample_times = [start_s + duration_s * i / (KV_SAMPLES - 1) for i in range(KV_SAMPLES)]
    hit_rate = (
        sim.prefix_cache_hit_tokens / sim.prefix_cache_queried_tokens if sim.prefix_cache_queried_tokens else None
    )
    return SimReport(
        device=sim.device,
        fits=True,
        error=None,
        num_requests=len(timings),
        duration_s=duration_s,
        num_steps=len(steps.step_s),
        request_throughput_req_s=len(timings) / duration_s,
        output_throughput_tok_s=output_tokens / duration_s,
        total_throughput_tok_s=(input_tokens + output_tokens) / duration_s,
        goodput_req_s=good / duration_s if slo.given else None,
        ttft_ms=_latency(ttfts_s, "TTFT"),
        tpot_ms=Latency.of([t.tpot_s for t in timings if t.tpot_s is not None]),
        e2e_ms=_latency([served_s(t.e2e_s, "last token", t) for t in timings], "end-to-end latency"),
        num_preemptions=sim.num_preemptions,
        prefix_cache_hit_rate=hit_rate,
        kv_cache_blocks=sim.kv_cache_blocks,
        kv_cache_tokens=sim.kv_cache_tokens,
        kv_bytes_per_token=sim.kv_bytes_per_token,
        kv_peak_usage=max(steps.kv_blocks_used) / sim.kv_cache_blocks,
        kv_mean_usage=busy_block_s / duration_s / sim.kv_cache_blocks if duration_s else 0.0,
        kv_usage_over_time=tuple(zip(sample_times, kv_usage_at(sim, sample_times))),
        eplb_initial_steps=sim.eplb_initial_steps,
        ttft_front_end_ms=Latency.of([t.front_end_s for t in timings]),
    )


def kv_series(sim: Simulation) -> tuple[list[float], list[int]]:
    """KV blocks used from each step's start, back to 0 where the device goes idle: a step function."""
    steps = sim.steps
    times: list[float] = []
    blocks: list[int] = []
    ends = [*steps.start_s[1:], None]
    for start, dur, used, next_start in zip(steps.start_s, steps.step_s, steps.kv_blocks_used, ends):
        times.append(start)
        blocks.append(used)
        if next_start is None or next_start > start + dur:
            times.append(start + dur)
            blocks.append(0)
    return times, blocks


def chrome_trace(sims: list[Simulation]) -> dict[str, Any]:
    """A Chrome / Perfetto trace (chrome://tracing, ui.perfetto.dev): one process per device with its
    steps, counters of KV blocks and of requests scheduled and waiting (at each change), and each
    request's span with its time to first token nested inside. Microseconds of emulated time."""
    events: list[dict[str, Any]] = []
    for pid, sim in enumerate(sims):
        events.append({"ph": "M", "name": "process_name", "pid": pid, "args": {"name": sim.device}})
        steps = sim.steps
        for start, dur, tokens, seqs in zip(steps.start_s, steps.step_s, steps.num_tokens, steps.num_seqs):
            events.append(
                {
                    "ph": "X",
                    "pid": pid,
                    "tid": 0,
                    "name": "decode" if tokens == seqs else "prefill",
                    "ts": start * 1e6,
                    "dur": dur * 1e6,
                    "args": {"tokens": tokens, "seqs": seqs},
                }
            )
        last = None
        for start, seqs, waiting in zip(steps.start_s, steps.num_seqs, steps.num_waiting):
            if (seqs, waiting) != last:
                events.append(
                    {
                        "ph": "C",
                        "pid": pid,
                        "name": "requests",
                        "ts": start * 1e6,
                        "args": {"scheduled": seqs, "waiting": waiting},
                    }
                )
                last = (seqs, waiting)
        last_blocks = None
        for t, blocks in zip(*kv_series(sim)):
            if blocks != last_blocks:
                events.append(
                    {"ph": "C", "pid": pid, "name": "KV blocks used", "ts": t * 1e6, "args": {"blocks": blocks}}
                )
                last_blocks = blocks
        for rid, (request, timing) in enumerate(zip(sim.requests, sim.timings)):
            first_s = served_s(timing.first_token_s, "first token", timing)
            last_s = served_s(timing.last_token_s, "last token", timing)
            common = {"pid": pid, "tid": 1, "cat": "request", "id": rid}
            args = {"input_len": request.input_len, "output_len": request.output_len}
            events += [
                {**common, "ph": "b", "name": "request", "ts": timing.arrival_s * 1e6, "args": args},
                {**common, "ph": "b", "name": "ttft", "ts": timing.arrival_s * 1e6},
                {**common, "ph": "e", "name": "ttft", "ts": first_s * 1e6},
                {**common, "ph": "e", "name": "request", "ts": last_s * 1e6},
            ]
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def write_chrome_trace(path: Path, sims: list[Simulation]) -> None:
    Path(path).write_text(json.dumps(chrome_trace(sims)), encoding="utf-8")


def write_plot(path: Path, sims: list[Simulation]) -> None:
    """KV use and waiting requests over time, one line per device (needs matplotlib: the bench extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("plots need matplotlib: pip install 'maia-serving[bench]'") from None
    fig, (kv, queue) = plt.subplots(2, 1, sharex=True, figsize=(9, 6))
    for sim in sims:
        times, blocks = kv_series(sim)
        kv.step(times, [100 * b / sim.kv_cache_blocks for b in blocks], where="post", label=sim.device)
        queue.step(sim.steps.start_s, sim.steps.num_waiting, where="post", label=sim.device)
    kv.set_ylabel("KV blocks used (%)")
    queue.set_ylabel("requests waiting")
    queue.set_xlabel("emulated time (s)")
    kv.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
