"""Emulated figures from the engine process to the server's ``/metrics``.

The engines schedule in one process (vLLM's EngineCore) and serve HTTP in another.
The scheduler side charges each step to the emulator and publishes the StepRecord
over a ZeroMQ PUSH socket; the HTTP side drains it into Prometheus metrics in the
default registry, which the engine's own ``/metrics`` route serves. The address
travels in ``MAIA_SERVING_STATS_ADDR``, set by the serving process before the
engine process starts.

SGLang needs no channel: with ``--enable-metrics`` its ``/metrics`` aggregates the
Prometheus files every process writes (``PROMETHEUS_MULTIPROC_DIR``), so its
scheduler applies each record to an ``EmulatedMetricSet`` itself. Imports no engine.
"""

from __future__ import annotations

import logging
import os
import pickle
import tempfile
import threading
from collections import deque
from dataclasses import dataclass

from maia_serving.emulator.session import EmulatedDevice, StepRecord
from maia_serving.emulator.units import format_bytes, format_seconds

ADDR_ENV = "MAIA_SERVING_STATS_ADDR"
logger = logging.getLogger(__name__)


def ensure_stats_addr() -> str:
    """The channel's address, created once in the serving process and inherited."""
    addr = os.environ.get(ADDR_ENV)
    if not addr:
        folder = tempfile.mkdtemp(prefix="maia-serving-")
        addr = os.environ[ADDR_ENV] = f"ipc://{folder}/stats.sock"
    return addr


@dataclass
class DeviceInfo:
    """Static facts of the emulated device, sent once ahead of the steps."""

    profile: str
    model: str
    kv_cache_dtype: str
    tensor_parallel_size: int
    pipeline_parallel_size: int
    hbm_total_bytes: float
    hbm_static_bytes: float  # runtime reserve, weights and workspace
    kv_block_bytes: float
    emulated_kv_blocks: int
    engine_kv_blocks: int
    block_size: int

    @classmethod
    def of(cls, device: EmulatedDevice, engine_kv_blocks: int) -> DeviceInfo:
        plan = device.plan
        return cls(
            profile=plan.profile,
            model=plan.model,
            kv_cache_dtype=device.kv_cache_dtype,
            tensor_parallel_size=plan.config.tensor_parallel_size,
            pipeline_parallel_size=plan.config.pipeline_parallel_size,
            hbm_total_bytes=plan.hbm_capacity_bytes,
            hbm_static_bytes=device.hbm_used_bytes(0),
            kv_block_bytes=device.kv_block_bytes,
            emulated_kv_blocks=plan.num_blocks,
            engine_kv_blocks=engine_kv_blocks,
            block_size=plan.config.block_size,
        )


class StatsPublisher:
    """Scheduler side: sends records in batches, without ever blocking a step.

    A batch leaves when a request got its first token or finished (so a client that
    has its answer finds it on /metrics), when ``max_batch`` records wait, or when the
    oldest has waited ``max_delay_s``: one send per step would cost more than the
    emulation itself.
    """

    def __init__(self, addr: str | None, max_batch: int = 64, max_delay_s: float = 0.05):
        self._socket = None
        self._pending: list[StepRecord] = []
        self._info: DeviceInfo | None = None
        self._oldest = 0.0
        self.max_batch = max_batch
        self.max_delay_s = max_delay_s
        if addr:
            import zmq

            self._zmq = zmq
            self._socket = zmq.Context.instance().socket(zmq.PUSH)
            self._socket.setsockopt(zmq.SNDHWM, 10000)
            self._socket.setsockopt(zmq.LINGER, 0)
            self._socket.connect(addr)

    def announce(self, info: DeviceInfo) -> None:
        """The device's static facts ride ahead of every batch until one is delivered."""
        self._info = info

    def send(self, record: StepRecord, now: float) -> None:
        if self._socket is None:
            return
        if not self._pending:
            self._oldest = now
        self._pending.append(record)
        urgent = record.first_token_ttfts_s or record.finished
        if urgent or len(self._pending) >= self.max_batch or now - self._oldest >= self.max_delay_s:
            self.flush()

    def flush(self) -> None:
        if self._socket is None or not self._pending:
            return
        batch = ([self._info] if self._info else []) + self._pending
        try:
            self._socket.send(pickle.dumps(batch), self._zmq.NOBLOCK)
            self._info = None
        except self._zmq.Again:
            pass  # no reader (yet): the figures are also in the engine's log
        self._pending = []


class PeriodicLog:
    """The engine-side log line: emulated against measured time, every ``interval_s``."""

    def __init__(self, device: EmulatedDevice, interval_s: float = 10.0):
        self.device = device
        self.interval_s = interval_s
        self._last_log_wall = None
        self._steps = self._emu = self._wall = 0.0
        self._ttfts: deque[float] = deque(maxlen=1000)
        self._tpots: deque[float] = deque(maxlen=1000)

    def observe(self, record: StepRecord, wall_now: float) -> str | None:
        """Account for a step; return the line to log when the interval is over."""
        self._steps += 1
        self._emu += record.step_s
        self._wall += record.wall_s
        self._ttfts.extend(record.first_token_ttfts_s)
        self._tpots.extend(t.tpot_s for t in record.finished if t.tpot_s is not None)
        if self._last_log_wall is None:
            self._last_log_wall = wall_now
        if wall_now - self._last_log_wall < self.interval_s:
            return None
        self._last_log_wall = wall_now
        dev = self.device
        line = (
            f"Maia emulation [{dev.profile.name}]: {int(self._steps)} steps, "
            f"emulated {format_seconds(self._emu)} vs host {format_seconds(self._wall)} "
            f"(last step {format_seconds(record.step_s)}: compute {format_seconds(record.compute_s)}, "
            f"memory {format_seconds(record.memory_s)}, communication {format_seconds(record.comm_s)}, "
            f"launch {format_seconds(record.launch_s)}; {record.bound}-bound), "
            f"emulated TTFT mean {_mean(self._ttfts)}, TPOT mean {_mean(self._tpots)}, "
            f"HBM {format_bytes(dev.hbm_used_bytes(record.kv_blocks_used))}/"
            f"{format_bytes(dev.profile.hbm_capacity_bytes)}, "
            f"KV blocks {record.kv_blocks_used}/{dev.plan.num_blocks}"
        )
        self._steps = self._emu = self._wall = 0.0
        return line


def _mean(values: deque[float]) -> str:
    return format_seconds(sum(values) / len(values)) if values else "n/a"


_STEP_BUCKETS = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
_LATENCY_BUCKETS = (1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0)


class _DrainOnScrape:
    """A collector that yields nothing but first drains the channel, so a scrape
    sees every step that finished before it."""

    def __init__(self, metrics: EmulatedMetrics):
        self.metrics = metrics

    def describe(self) -> list:
        return []

    def collect(self) -> list:
        self.metrics.drain()
        return []


class EmulatedMetricSet:
    """The ``maia:*`` Prometheus metrics, and how a DeviceInfo or a StepRecord moves them.

    Gauges say how to merge across processes (``multiprocess_mode``), so the set also
    works where the engine serves metrics from several processes (SGLang's
    ``PROMETHEUS_MULTIPROC_DIR``); outside multiprocess mode that argument is ignored.
    """

    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.info: DeviceInfo | None = None
        self.steps = Histogram("maia:emulated_step_seconds", "Emulated time of one engine step",
                               buckets=_STEP_BUCKETS)
        self.host_steps = Counter("maia:host_step_seconds", "Measured host time of the charged steps")
        self.overhead = Counter("maia:emulator_overhead_seconds",
                                "Host time spent charging steps to the emulator")
        self.busy = Counter("maia:emulated_busy_seconds", "Emulated device time, summed over steps")
        self.parts = Counter("maia:emulated_time_by_part_seconds",
                             "Emulated step time by part (compute, memory, communication, launch)", ["part"])
        self.tokens = Counter("maia:emulated_tokens", "Tokens the emulated device processed")
        self.ttft = Histogram("maia:emulated_time_to_first_token_seconds", "Emulated TTFT",
                              buckets=_LATENCY_BUCKETS)
        self.tpot = Histogram("maia:emulated_time_per_output_token_seconds", "Emulated TPOT",
                              buckets=_LATENCY_BUCKETS)
        self.e2e = Histogram("maia:emulated_e2e_request_latency_seconds",
                             "Emulated end-to-end request latency", buckets=_LATENCY_BUCKETS)
        self.hbm_used = Gauge("maia:hbm_used_bytes", "Emulated HBM in use on one chip",
                              multiprocess_mode="mostrecent")
        self.hbm_total = Gauge("maia:hbm_total_bytes", "Emulated HBM capacity of one chip",
                               multiprocess_mode="mostrecent")
        self.kv_used = Gauge("maia:kv_cache_blocks_used", "KV cache blocks in use", multiprocess_mode="mostrecent")
        self.kv_total = Gauge("maia:kv_cache_blocks", "KV cache blocks", ["holder"], multiprocess_mode="mostrecent")
        self.kv_tokens = Gauge("maia:kv_cache_tokens", "KV cache capacity in tokens (blocks x block size)",
                               ["holder"], multiprocess_mode="mostrecent")
        self.device = Gauge("maia:device_info", "The emulated device",
                            ["profile", "model", "kv_cache_dtype", "tensor_parallel_size"],
                            multiprocess_mode="mostrecent")

    def apply(self, item: DeviceInfo | StepRecord) -> None:
        if isinstance(item, DeviceInfo):
            self._apply_info(item)
        else:
            self._apply_step(item)

    def _apply_info(self, info: DeviceInfo) -> None:
        self.info = info
        self.hbm_total.set(info.hbm_total_bytes)
        self.hbm_used.set(info.hbm_static_bytes)
        self.kv_total.labels("emulated").set(info.emulated_kv_blocks)
        self.kv_total.labels("engine").set(info.engine_kv_blocks)
        self.kv_tokens.labels("emulated").set(info.emulated_kv_blocks * info.block_size)
        self.kv_tokens.labels("engine").set(info.engine_kv_blocks * info.block_size)
        self.device.labels(info.profile, info.model, info.kv_cache_dtype,
                           str(info.tensor_parallel_size)).set(1)

    def _apply_step(self, rec: StepRecord) -> None:
        self.steps.observe(rec.step_s)
        self.host_steps.inc(rec.wall_s)
        self.overhead.inc(rec.overhead_s)
        self.busy.inc(rec.step_s)
        self.parts.labels("compute").inc(rec.compute_s)
        self.parts.labels("memory").inc(rec.memory_s)
        self.parts.labels("communication").inc(rec.comm_s)
        self.parts.labels("launch").inc(rec.launch_s)
        self.tokens.inc(rec.num_tokens)
        for ttft in rec.first_token_ttfts_s:
            self.ttft.observe(ttft)
        for timing in rec.finished:
            if timing.tpot_s is not None:
                self.tpot.observe(timing.tpot_s)
            if timing.e2e_s is not None:
                self.e2e.observe(timing.e2e_s)
        self.kv_used.set(rec.kv_blocks_used)
        if self.info is not None:
            self.hbm_used.set(self.info.hbm_static_bytes + rec.kv_blocks_used * self.info.kv_block_bytes)


class EmulatedMetrics:
    """Serving side of the channel: drains the engine's records into an EmulatedMetricSet
    in the default registry, which the engine's own ``/metrics`` route serves (vLLM)."""

    def __init__(self, addr: str):
        import zmq
        from prometheus_client import REGISTRY

        self._zmq = zmq
        self._lock = threading.Lock()  # drained from the engine loop and from scrapes
        self._socket = zmq.Context.instance().socket(zmq.PULL)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.bind(addr)
        REGISTRY.register(_DrainOnScrape(self))  # before the metrics: collected first
        self.metrics = EmulatedMetricSet()

    def drain(self) -> int:
        """Apply every record waiting on the channel; returns how many."""
        count = 0
        with self._lock:
            while True:
                try:
                    batch = pickle.loads(self._socket.recv(self._zmq.NOBLOCK))
                except self._zmq.Again:
                    return count
                count += len(batch)
                for item in batch:
                    self.metrics.apply(item)

