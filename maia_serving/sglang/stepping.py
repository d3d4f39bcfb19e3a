"""Charge every SGLang engine step to the emulated device, in the scheduler process.

SGLang's scheduler runs ``run_batch`` then ``process_batch_result`` for each step (the
maia platform turns the overlap scheduler off, so the two belong to the same batch).
The batch carries each request's new and cached tokens; after the result is processed
each request's output and finish state are known. Hooks (registered by
``maia_serving.sglang.plugin`` through SGLang's HookRegistry) hand both to a
``MaiaStepper`` kept on the scheduler.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass

from maia_serving.emulator.session import EmulatedDevice
from maia_serving.envs import log_interval_s
from maia_serving.metrics import DeviceInfo, EmulatedMetricSet, PeriodicLog

logger = logging.getLogger(__name__)


@dataclass
class _Pending:
    """What run_batch saw of a step, completed by process_batch_result."""

    new_tokens: tuple[int, ...]
    contexts: tuple[int, ...]
    outputs_before: tuple[int, ...]
    started: float
    overhead_s: float  # this thread's CPU time spent reading the batch


def step_shape(batch) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """Per request: tokens this step adds and the context after them; None if no forward."""
    mode = batch.forward_mode
    if mode.is_extend():
        new = tuple(batch.extend_lens)
        return new, tuple(p + n for p, n in zip(batch.prefix_lens, new))
    if mode.is_decode():
        contexts = tuple(batch.seq_lens_cpu.tolist())
        return (1,) * len(contexts), contexts
    return None


class MaiaStepper:
    """The emulated device of one scheduler, with its log line and metrics."""

    def __init__(self, device: EmulatedDevice, engine_kv_tokens: int):
        self.device = device
        self.engine_kv_tokens = engine_kv_tokens
        self.block_size = device.plan.config.block_size
        self._log = PeriodicLog(device, log_interval_s())
        self._pending: _Pending | None = None
        self._last_apply_s = 0.0
        # SGLang's /metrics aggregates the files that PROMETHEUS_MULTIPROC_DIR collects.
        self.metrics = EmulatedMetricSet() if os.environ.get("PROMETHEUS_MULTIPROC_DIR") else None
        if self.metrics is not None:
            self.metrics.apply(DeviceInfo.of(device, engine_kv_tokens // self.block_size))

    def arrive(self, rid: str) -> None:
        self.device.arrive(rid)

    def before_run(self, batch) -> None:
        start = time.thread_time()
        shape = step_shape(batch)
        if shape is None:
            self._pending = None
            return
        self._pending = _Pending(shape[0], shape[1], tuple(len(r.output_ids) for r in batch.reqs),
                                 time.perf_counter(), 0.0)
        self._pending.overhead_s = time.thread_time() - start

    def after_result(self, batch, free_tokens: int) -> None:
        pending, self._pending = self._pending, None
        if pending is None:
            return
        wall_s = time.perf_counter() - pending.started
        start = time.thread_time()
        tokens_out: dict[str, int] = {}
        finished: list[str] = []
        for req, before in zip(batch.reqs, pending.outputs_before):
            tokens_out[req.rid] = len(req.output_ids) - before
            if req.finished():
                finished.append(req.rid)
        used_blocks = math.ceil(max(0, self.engine_kv_tokens - free_tokens) / self.block_size)
        record = self.device.charge(pending.new_tokens, pending.contexts, tokens_out, finished,
                                    used_blocks, wall_s)
        if (line := self._log.observe(record, time.monotonic())) is not None:
            logger.info(line)
        # Overhead is this thread's CPU time: reading the batch, charging, and writing the
        # previous step's metrics (measured after they were written), as under vLLM.
        record.overhead_s = pending.overhead_s + (time.thread_time() - start) + self._last_apply_s
        if self.metrics is not None:
            applied = time.thread_time()
            self.metrics.apply(record)
            self._last_apply_s = time.thread_time() - applied
