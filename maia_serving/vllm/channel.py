"""The emulated figures from vLLM's engine process to its API server's ``/metrics``.

vLLM schedules in one process (EngineCore) and serves HTTP in another. The scheduler
charges each step and publishes the records over a ZeroMQ PUSH socket; the API server
drains them into an ``EmulatedMetricSet`` in the default registry, which vLLM's own
``/metrics`` route serves.

The channel carries plain JSON, never pickles, over a Unix socket in a folder private
to the user (``MAIA_SERVING_STATS_ADDR``, checked by ``maia_serving.envs``). A message
that does not decode is dropped and counted in ``maia:emulation_errors_total{stage="channel"}``;
messages above ``MAX_MESSAGE_BYTES`` are refused by ZeroMQ itself.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from dataclasses import dataclass, field

from maia_serving.emulator.device.clock import RequestTiming
from maia_serving.emulator.device.session import StepRecord
from maia_serving.serving.metrics import DeviceInfo, EmulatedMetricSet

logger = logging.getLogger("vllm.maia_serving")

VERSION = 1
MAX_MESSAGE_BYTES = 8 << 20
_FLOAT_FIELDS = ("step_s", "compute_s", "memory_s", "comm_s", "launch_s", "now_s", "wall_s", "overhead_s")
_INT_FIELDS = ("num_tokens", "num_seqs", "kv_blocks_used", "kv_blocks_cached", "num_collectives", "comm_bytes")


@dataclass
class Message:
    """One send: device facts (until delivered once), step records, emulation errors since
    the last send, and the KV blocks (used, cached) at the time of sending."""

    info: DeviceInfo | None = None
    steps: list[StepRecord] = field(default_factory=list)
    errors: int = 0
    kv: tuple[int, int] | None = None


def encode(msg: Message) -> bytes:
    return json.dumps(
        {
            "v": VERSION,
            "info": msg.info.to_dict() if msg.info else None,
            "steps": [_step_dict(r) for r in msg.steps],
            "errors": msg.errors,
            "kv": list(msg.kv) if msg.kv is not None else None,
        }
    ).encode()


def _step_dict(record: StepRecord) -> dict:
    """``asdict(record)`` without its deep copies (a tenth of the time, on every step)."""
    return {**vars(record), "finished": [vars(t) for t in record.finished]}


def decode(data: bytes) -> Message:
    """The message in ``data``; ValueError, TypeError or KeyError if it is malformed."""
    msg = json.loads(data)
    if not isinstance(msg, dict) or msg.get("v") != VERSION:
        raise ValueError("not a maia-serving stats message")
    info = DeviceInfo.from_dict(msg["info"]) if msg["info"] is not None else None
    steps, kv = msg["steps"], msg["kv"]
    if not isinstance(steps, list):
        raise TypeError("steps must be a list")
    if kv is not None:
        if not isinstance(kv, list) or len(kv) != 2:
            raise TypeError("kv must be [used, cached]")
        kv = (int(_number({"used": kv[0]}, "used", int)), int(_number({"cached": kv[1]}, "cached", int)))
    return Message(info, [_record(s) for s in steps], int(_number(msg, "errors", int)), kv)


def _number(data: dict, name: str, kind: type) -> float:
    value = data[name]
    allowed = (int, float) if kind is float else (int,)
    if isinstance(value, bool) or not isinstance(value, allowed):
        raise TypeError(f"{name} must be a number")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite")
    return value


def _record(data: dict) -> StepRecord:
    if not isinstance(data, dict):
        raise TypeError("a step must be an object")
    bound = data["bound"]
    if not isinstance(bound, str):
        raise TypeError("bound must be a string")
    ttfts = data["first_token_ttfts_s"]
    finished = data["finished"]
    if not isinstance(ttfts, list) or not isinstance(finished, list):
        raise TypeError("first_token_ttfts_s and finished must be lists")
    return StepRecord(
        bound=bound,
        **{k: float(_number(data, k, float)) for k in _FLOAT_FIELDS},
        **{k: int(_number(data, k, int)) for k in _INT_FIELDS},
        first_token_ttfts_s=[float(_number({"t": t}, "t", float)) for t in ttfts],
        finished=[_timing(t) for t in finished],
    )


def _timing(data: dict) -> RequestTiming:
    if not isinstance(data, dict):
        raise TypeError("a request timing must be an object")
    optional = {
        k: (None if data[k] is None else float(_number(data, k, float))) for k in ("first_token_s", "last_token_s")
    }
    return RequestTiming(
        arrival_s=float(_number(data, "arrival_s", float)),
        num_output_tokens=int(_number(data, "num_output_tokens", int)),
        **optional,
    )


class StatsPublisher:
    """Engine side: sends records in batches, without ever blocking a step.

    A batch leaves when a request got its first token or finished (so a client that has
    its answer finds it on /metrics), when ``max_batch`` records wait, or when the oldest
    has waited ``max_delay_s``: one send per step would cost more than the emulation.
    """

    def __init__(self, addr: str, max_batch: int = 64, max_delay_s: float = 0.05):
        import zmq

        self._zmq = zmq
        self._socket = zmq.Context.instance().socket(zmq.PUSH)
        self._socket.setsockopt(zmq.SNDHWM, 10000)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.connect(addr)
        self._msg = Message()
        self._oldest = 0.0
        self.max_batch = max_batch
        self.max_delay_s = max_delay_s

    def announce(self, info: DeviceInfo) -> None:
        """Send the device's static facts now, so /metrics has them before any request."""
        self._msg.info = info
        self.flush()

    def count_error(self) -> None:
        self._msg.errors += 1
        self.flush()

    def send(self, record: StepRecord, now: float) -> None:
        pending = self._msg.steps
        if not pending:
            self._oldest = now
        pending.append(record)
        urgent = record.first_token_ttfts_s or record.finished
        if urgent or len(pending) >= self.max_batch or now - self._oldest >= self.max_delay_s:
            self.flush()

    def flush(self, kv: tuple[int, int] | None = None) -> None:
        """Send what waits; ``kv`` (used, cached blocks) when the engine goes idle, since no
        step will report what an abort freed."""
        msg = self._msg
        msg.kv = kv
        if not (msg.steps or msg.info or msg.errors or kv):
            return
        try:
            self._socket.send(encode(msg), self._zmq.NOBLOCK)
            self._msg = Message()
        except self._zmq.Again:
            # The API server is not reading: the figures are also in the engine's log.
            self._msg = Message(info=msg.info, errors=msg.errors)


class _DrainOnScrape:
    """A collector that yields nothing but first drains the channel, so a scrape sees
    every step that finished before it."""

    def __init__(self, receiver: StatsReceiver):
        self.receiver = receiver

    def describe(self) -> list:
        return []

    def collect(self) -> list:
        self.receiver.drain()
        return []


class StatsReceiver:
    """API-server side: drains the engine's messages into an EmulatedMetricSet."""

    def __init__(self, addr: str, registry=None):
        import zmq
        from prometheus_client import REGISTRY

        registry = REGISTRY if registry is None else registry
        self._zmq = zmq
        self._lock = threading.Lock()  # drained from the engine loop and from scrapes
        self._socket = zmq.Context.instance().socket(zmq.PULL)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        self._socket.bind(addr)
        self.dropped = 0
        registry.register(_DrainOnScrape(self))  # before the metrics: collected first
        self.metrics = EmulatedMetricSet(registry)

    def drain(self) -> int:
        """Apply every message waiting on the channel; returns how many records."""
        count = 0
        with self._lock:
            while True:
                try:
                    data = self._socket.recv(self._zmq.NOBLOCK)
                except self._zmq.Again:
                    return count
                try:
                    msg = decode(data)
                except (ValueError, TypeError, KeyError) as exc:
                    self._drop(exc)
                    continue
                if msg.info is not None:
                    self.metrics.apply(msg.info)
                for step in msg.steps:
                    self.metrics.apply(step)
                if msg.errors:
                    self.metrics.count_errors("charge", msg.errors)
                if msg.kv is not None:
                    self.metrics.set_kv(*msg.kv)
                count += len(msg.steps)

    def _drop(self, exc: Exception) -> None:
        self.dropped += 1
        self.metrics.count_errors("channel")
        if self.dropped == 1:
            logger.warning(
                "maia-serving: dropped a malformed message on the metrics channel (%s); "
                'counted in maia:emulation_errors_total{stage="channel"}',
                exc,
            )

    def close(self) -> None:
        self._socket.close(0)
