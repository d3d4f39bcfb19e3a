"""Charge every SGLang engine step to the emulated device, in the scheduler process.

SGLang's scheduler runs ``run_batch`` then ``process_batch_result`` for each step (the
maia platform turns the overlap scheduler off). With pipeline parallelism the first stage
launches a micro-batch before it processes an earlier one's result, so what ``run_batch`` read is
kept per batch until that batch's result. The batch carries each request's new and cached tokens;
after the result is processed each request's output and finish state are known. Hooks (registered by
``maia_serving.sglang.plugin`` through SGLang's HookRegistry) hand both to a
``MaiaStepper`` kept on the scheduler, which charges through the engine-neutral
``StepCharger``: an error there is logged and counted, never raised into SGLang.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass

from maia_serving import envs
from maia_serving.emulator.device.session import EmulatedDevice
from maia_serving.serving.metrics import DeviceInfo, EmulatedMetricSet
from maia_serving.serving.stepping import EngineStep, StepCharger
from maia_serving.sglang.patch.collectives import RELAY

logger = logging.getLogger(__name__)


@dataclass
class _Pending:
    """What run_batch saw of a step, completed by process_batch_result."""

    new_tokens: tuple[int, ...]
    contexts: tuple[int, ...]
    outputs_before: tuple[int, ...]
    started: float
    read_s: float  # this thread's CPU time spent reading the batch


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

    def __init__(self, device: EmulatedDevice, engine_kv_tokens: int, engine_collectives: bool = False):
        self.engine_kv_tokens = engine_kv_tokens
        # Charge the collectives the step's ranks counted (maia_serving.sglang.patch.collectives, on its
        # result) in place of the cost model's count.
        self.engine_collectives = engine_collectives
        self.block_size = device.plan.config.block_size
        self._pending: dict[int, _Pending] = {}  # by id() of the batch run_batch ran, until its result
        # SGLang's /metrics aggregates the files that PROMETHEUS_MULTIPROC_DIR collects.
        self.metrics = EmulatedMetricSet() if os.environ.get("PROMETHEUS_MULTIPROC_DIR") else None
        metrics = self.metrics
        self.charger = StepCharger(
            device,
            logger,
            envs.get(envs.MAIA_SERVING_LOG_INTERVAL_S),
            sink=metrics.apply if metrics else lambda record: None,
            on_error=(lambda: metrics.count_errors("charge")) if metrics else lambda: None,
            pace=envs.get(envs.MAIA_SERVING_PACE),
        )
        if metrics is not None:
            metrics.apply(DeviceInfo.of(device, engine_kv_tokens // self.block_size))

    @property
    def device(self) -> EmulatedDevice:
        return self.charger.device

    def arrive(self, rid: str, age_s: float = 0.0) -> None:
        """A request the scheduler has just seen, ``age_s`` after it reached the server (patch/request_age.py)."""
        self.charger.arrive(rid, age_s)

    def before_run(self, batch) -> None:
        self._pending.pop(id(batch), None)
        self.charger.guard("reading a step's shape", self._read, batch)

    def _read(self, batch) -> None:
        start = time.thread_time()
        shape = step_shape(batch)
        if shape is None:
            return
        if len(self._pending) >= 64:  # results that never came (a micro-batch per pipeline stage is the most held)
            self._pending.clear()
        pending = self._pending[id(batch)] = _Pending(
            shape[0], shape[1], tuple(len(r.output_ids) for r in batch.reqs), time.perf_counter(), 0.0
        )
        pending.read_s = time.thread_time() - start

    def after_result(self, batch, scheduler, result=None) -> None:
        pending = self._pending.pop(id(batch), None)
        if pending is not None:
            self.charger.guard("charging a step", self._charge, pending, batch, scheduler, result)

    def _charge(self, pending: _Pending, batch, scheduler, result) -> None:
        wall_s = time.perf_counter() - pending.started
        start = time.thread_time()
        tokens_out: dict[str, int] = {}
        finished: list[str] = []
        for req, before in zip(batch.reqs, pending.outputs_before):
            tokens_out[req.rid] = len(req.output_ids) - before
            if req.finished():
                finished.append(req.rid)
        collectives = getattr(result, RELAY, None) if self.engine_collectives else None
        shape = EngineStep(
            pending.new_tokens, pending.contexts, tokens_out, finished, *self._kv_blocks(scheduler), collectives
        )
        self.charger.charge(shape, wall_s, pending.read_s + time.thread_time() - start)

    def _kv_blocks(self, scheduler) -> tuple[int, int]:
        """Emulated KV blocks held by requests, and held only by the radix (prefix) cache."""
        free = scheduler.token_to_kv_pool_allocator.available_size()
        cached = scheduler.tree_cache.evictable_size()  # free to evict, so not "used"
        used = max(0, self.engine_kv_tokens - free - cached)
        return math.ceil(used / self.block_size), cached // self.block_size

    def abort(self, recv_req, scheduler) -> None:
        """Forget requests SGLang aborted before they ran (matched as ``abort_request`` matches
        them: by id prefix, or all); running ones finish through their batch as usual."""
        self.charger.guard("a request's abort", self._abort, recv_req, scheduler)

    def _abort(self, recv_req, scheduler) -> None:
        running = {r.rid for r in scheduler.running_batch.reqs}
        if scheduler.chunked_req is not None:
            running.add(scheduler.chunked_req.rid)
        for rid in [r for r in self.device.clock.requests if recv_req.abort_all or r.startswith(recv_req.rid)]:
            if rid not in running:
                self.device.abort(rid)
        if self.metrics is not None:
            self.metrics.set_kv(*self._kv_blocks(scheduler))
