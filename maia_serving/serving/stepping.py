"""Charging engine steps to the emulated device: one code path for both engines.

An adapter reads a step's shape off its engine (tokens per request, contexts, outputs,
KV blocks) and hands it to ``StepCharger.charge``, which advances the emulated clock,
writes the periodic log line and passes the record on. The emulation must never take
the engine down: an error in it is logged (in full the first time), counted, and the
step goes uncharged, while the engine serves on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from maia_serving.emulator.device.session import EmulatedDevice, StepRecord
from maia_serving.serving.metrics import PeriodicLog

_T = TypeVar("_T")


@dataclass(frozen=True)
class EngineStep:
    """What an engine step did, as an adapter reads it off the engine."""

    new_tokens: tuple[int, ...]  # per scheduled request
    contexts: tuple[int, ...]  # per scheduled request, after this step's tokens
    tokens_out: dict[str, int]  # tokens each request emitted this step
    finished: list[str]  # requests that left the engine this step
    kv_blocks_used: int  # emulated blocks held by running requests
    kv_blocks_cached: int  # emulated blocks held only by the prefix cache
    # The collectives the engine performed (maia_serving.serving.collectives rows); None: price the cost model's
    collectives: list[tuple[int, int, int, int, int]] | None = None


class StepCharger:
    """One engine's emulated device, its log line and where its records go."""

    def __init__(
        self,
        device: EmulatedDevice,
        logger: logging.Logger,
        log_interval_s: float,
        sink: Callable[[StepRecord], None],
        on_error: Callable[[], None],
        pace: bool = False,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.device = device
        self.pace = pace  # MAIA_SERVING_PACE: wait out each step's emulated time (clock.EmulatedClock.pace_s)
        device.clock.paced = pace  # and stamp arrivals during the wait as the clock's pacing rule says
        self._sleep = sleep
        self.logger = logger
        self.sink = sink
        self.on_error = on_error
        self.errors = 0
        self._log = PeriodicLog(device, log_interval_s)
        self._last_sink_s = 0.0

    def guard(self, what: str, fn: Callable[..., _T], *args: object) -> _T | None:
        """``fn(*args)``, or None after logging and counting an exception from it."""
        try:
            return fn(*args)
        except Exception:
            self.errors += 1
            if self.errors == 1:
                self.logger.exception(
                    "maia-serving: %s failed; the step is not charged to the emulated device "
                    "(counted in maia:emulation_errors_total) and the engine serves on. "
                    "Please report this.",
                    what,
                )
            else:
                self.logger.debug("maia-serving: %s failed again (%d errors)", what, self.errors, exc_info=True)
            try:
                self.on_error()
            except Exception:  # counting must not fail the engine either
                self.logger.debug("maia-serving: counting an emulation error failed", exc_info=True)
            return None

    def arrive(self, request_id: str, age_s: float = 0.0) -> None:
        """A request the engine has just seen, ``age_s`` seconds after it reached the server."""
        self.guard("a request's arrival", self.device.arrive, request_id, age_s)

    def abort(self, request_id: str) -> None:
        self.guard("a request's abort", self.device.abort, request_id)

    def charge(self, shape: EngineStep, wall_s: float, read_s: float) -> StepRecord | None:
        """Charge one step; ``read_s`` is the host time the adapter spent reading its shape. With pacing, return
        once the host's clock has caught up with the emulated one."""
        record = self.guard("charging a step", self._charge, shape, wall_s, read_s)
        if self.pace and (wait_s := self.guard("pacing a step", self.device.clock.pace_s)):
            self._sleep(wait_s)
        return record

    def _charge(self, shape: EngineStep, wall_s: float, read_s: float) -> StepRecord:
        start = time.thread_time()
        record = self.device.charge(
            shape.new_tokens,
            shape.contexts,
            shape.tokens_out,
            shape.finished,
            shape.kv_blocks_used,
            wall_s,
            shape.collectives,
        )
        record.kv_blocks_cached = shape.kv_blocks_cached
        if (line := self._log.observe(record, time.monotonic())) is not None:
            self.logger.info(line)
        # Overhead is this thread's CPU time (on a shared core, wall time would also count
        # other processes): reading the shape, charging, and handing the previous record on
        # (measured after it was handed on).
        record.overhead_s = read_s + (time.thread_time() - start) + self._last_sink_s
        sent = time.thread_time()
        self.sink(record)
        self._last_sink_s = time.thread_time() - sent
        return record
