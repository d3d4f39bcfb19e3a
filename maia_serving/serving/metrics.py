"""The ``maia:*`` Prometheus metrics and the engine's periodic emulation log line.

Engine-free: vLLM's API server fills an ``EmulatedMetricSet`` from the records its
engine process sends (``maia_serving.vllm.channel``); SGLang's scheduler fills one
itself, in the Prometheus multiprocess folder its ``/metrics`` aggregates.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

from maia_serving.emulator.device.session import EmulatedDevice, StepRecord
from maia_serving.formats.units import format_bytes, format_seconds

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry


@dataclass
class DeviceInfo:
    """Static facts of the emulated device, on /metrics from the moment the server serves."""

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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> DeviceInfo:
        """The inverse of to_dict, checking every field's type (data from another process)."""
        # `from __future__ import annotations`: every field's type is its annotation's text.
        return cls(**{f.name: _typed(data, f.name, str(f.type)) for f in fields(cls)})


_TYPES = {"str": (str,), "int": (int,), "float": (int, float)}


def _typed(data: Mapping[str, object], name: str, type_name: str) -> Any:
    """``data[name]``, checked to be of ``type_name`` at run time (so Any to the checker)."""
    value = data[name]
    if isinstance(value, bool) or not isinstance(value, _TYPES[type_name]):
        raise TypeError(f"{name} must be {type_name}, got {type(value).__name__}")
    return value


class PeriodicLog:
    """The engine-side log line: emulated against measured time, every ``interval_s``."""

    def __init__(self, device: EmulatedDevice, interval_s: float = 10.0):
        self.device = device
        self.interval_s = interval_s
        self._last_log_wall: float | None = None
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
            f"Maia emulation [{dev.profile.name}]: {dev.plan.model}, {int(self._steps)} steps, "
            f"emulated {format_seconds(self._emu)} vs host {format_seconds(self._wall)} "
            f"(last step {format_seconds(record.step_s)}: compute {format_seconds(record.compute_s)}, "
            f"memory {format_seconds(record.memory_s)}, communication {format_seconds(record.comm_s)}"
            f"{f' ({record.num_collectives} collectives)' if record.num_collectives else ''}, "
            f"launch {format_seconds(record.launch_s)}; {record.bound}-bound), "
            f"emulated TTFT mean {_mean(self._ttfts)}, TPOT mean {_mean(self._tpots)}, "
            f"HBM {format_bytes(dev.hbm_used_bytes(record.kv_blocks_used))}/"
            f"{format_bytes(dev.profile.hbm_capacity_bytes)}, "
            f"KV blocks {record.kv_blocks_used}/{dev.plan.num_blocks} used, {record.kv_blocks_cached} cached"
        )
        self._steps = self._emu = self._wall = 0.0
        return line


def _mean(values: deque[float]) -> str:
    return format_seconds(sum(values) / len(values)) if values else "n/a"


_STEP_BUCKETS = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
_LATENCY_BUCKETS = (1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0)


class EmulatedMetricSet:
    """The ``maia:*`` Prometheus metrics, and how a DeviceInfo or a StepRecord moves them.

    Gauges say how to merge across processes (``multiprocess_mode``), so the set also
    works where the engine serves metrics from several processes (SGLang's
    ``PROMETHEUS_MULTIPROC_DIR``); outside multiprocess mode that argument is ignored.
    ``registry`` defaults to prometheus_client's global one, which the engines serve.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        from prometheus_client import REGISTRY, Counter, Gauge, Histogram

        self.registry = REGISTRY if registry is None else registry
        reg = self.registry
        self.info: DeviceInfo | None = None
        self.steps = Histogram(
            "maia:emulated_step_seconds", "Emulated time of one engine step", buckets=_STEP_BUCKETS, registry=reg
        )
        self.host_steps = Counter("maia:host_step_seconds", "Measured host time of the charged steps", registry=reg)
        self.overhead = Counter(
            "maia:emulator_overhead_seconds", "Host time spent charging steps to the emulator", registry=reg
        )
        self.busy = Counter("maia:emulated_busy_seconds", "Emulated device time, summed over steps", registry=reg)
        self.clock = Gauge(
            "maia:emulated_clock_seconds",
            "Emulated time at the end of the last step, idle time included (the clock follows "
            "the host while no request is open)",
            multiprocess_mode="mostrecent",
            registry=reg,
        )
        self.parts = Counter(
            "maia:emulated_time_by_part_seconds",
            "Emulated step time by part (compute, memory, communication, launch)",
            ["part"],
            registry=reg,
        )
        self.tokens = Counter("maia:emulated_tokens", "Tokens the emulated device processed", registry=reg)
        self.collectives = Counter(
            "maia:emulated_collectives",
            "Collectives the engine performed and the emulated interconnect was charged for",
            registry=reg,
        )
        self.comm_bytes = Counter("maia:emulated_collective_bytes", "Bytes of the charged collectives", registry=reg)
        self.errors = Counter(
            "maia:emulation_errors",
            "Steps left uncharged or records dropped because of an error in the emulation "
            "(the engine kept serving); see the server log",
            ["stage"],
            registry=reg,
        )
        self.ttft = Histogram(
            "maia:emulated_time_to_first_token_seconds", "Emulated TTFT", buckets=_LATENCY_BUCKETS, registry=reg
        )
        self.tpot = Histogram(
            "maia:emulated_time_per_output_token_seconds", "Emulated TPOT", buckets=_LATENCY_BUCKETS, registry=reg
        )
        self.e2e = Histogram(
            "maia:emulated_e2e_request_latency_seconds",
            "Emulated end-to-end request latency",
            buckets=_LATENCY_BUCKETS,
            registry=reg,
        )
        self.hbm_used = Gauge(
            "maia:hbm_used_bytes", "Emulated HBM in use on one chip", multiprocess_mode="mostrecent", registry=reg
        )
        self.hbm_total = Gauge(
            "maia:hbm_total_bytes", "Emulated HBM capacity of one chip", multiprocess_mode="mostrecent", registry=reg
        )
        self.kv_used = Gauge(
            "maia:kv_cache_blocks_used",
            "KV cache blocks held by running requests",
            multiprocess_mode="mostrecent",
            registry=reg,
        )
        self.kv_cached = Gauge(
            "maia:kv_cache_blocks_cached",
            "KV cache blocks held only by the prefix cache (reusable, evictable)",
            multiprocess_mode="mostrecent",
            registry=reg,
        )
        self.kv_total = Gauge(
            "maia:kv_cache_blocks", "KV cache blocks", ["holder"], multiprocess_mode="mostrecent", registry=reg
        )
        self.kv_tokens = Gauge(
            "maia:kv_cache_tokens",
            "KV cache capacity in tokens (blocks x block size)",
            ["holder"],
            multiprocess_mode="mostrecent",
            registry=reg,
        )
        self.device = Gauge(
            "maia:device_info",
            "The emulated device",
            ["profile", "model", "kv_cache_dtype", "tensor_parallel_size"],
            multiprocess_mode="mostrecent",
            registry=reg,
        )
        for stage in ("charge", "channel"):
            self.errors.labels(stage)  # present, at 0, before anything goes wrong

    def apply(self, item: DeviceInfo | StepRecord) -> None:
        if isinstance(item, DeviceInfo):
            self._apply_info(item)
        else:
            self._apply_step(item)

    def count_errors(self, stage: str, count: int = 1) -> None:
        self.errors.labels(stage).inc(count)

    def set_kv(self, used_blocks: int, cached_blocks: int) -> None:
        """KV blocks held by requests and only by the prefix cache, also between steps (an
        abort frees blocks without a step to report it)."""
        self.kv_used.set(used_blocks)
        self.kv_cached.set(cached_blocks)
        if self.info is not None:
            # Blocks only the prefix cache holds are free to reuse: not counted as used, as vLLM counts them.
            self.hbm_used.set(self.info.hbm_static_bytes + used_blocks * self.info.kv_block_bytes)

    def _apply_info(self, info: DeviceInfo) -> None:
        self.info = info
        self.hbm_total.set(info.hbm_total_bytes)
        self.hbm_used.set(info.hbm_static_bytes)
        self.kv_used.set(0)
        self.kv_cached.set(0)
        self.kv_total.labels("emulated").set(info.emulated_kv_blocks)
        self.kv_total.labels("engine").set(info.engine_kv_blocks)
        self.kv_tokens.labels("emulated").set(info.emulated_kv_blocks * info.block_size)
        self.kv_tokens.labels("engine").set(info.engine_kv_blocks * info.block_size)
        self.device.labels(info.profile, info.model, info.kv_cache_dtype, str(info.tensor_parallel_size)).set(1)

    def _apply_step(self, rec: StepRecord) -> None:
        self.steps.observe(rec.step_s)
        self.host_steps.inc(rec.wall_s)
        self.overhead.inc(rec.overhead_s)
        self.busy.inc(rec.step_s)
        self.clock.set(rec.now_s)
        self.parts.labels("compute").inc(rec.compute_s)
        self.parts.labels("memory").inc(rec.memory_s)
        self.parts.labels("communication").inc(rec.comm_s)
        self.parts.labels("launch").inc(rec.launch_s)
        self.tokens.inc(rec.num_tokens)
        self.collectives.inc(rec.num_collectives)
        self.comm_bytes.inc(rec.comm_bytes)
        for ttft in rec.first_token_ttfts_s:
            self.ttft.observe(ttft)
        for timing in rec.finished:
            if timing.tpot_s is not None:
                self.tpot.observe(timing.tpot_s)
            if timing.e2e_s is not None:
                self.e2e.observe(timing.e2e_s)
        self.set_kv(rec.kv_blocks_used, rec.kv_blocks_cached)
