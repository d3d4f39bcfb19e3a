"""MaiaScheduler: vLLM's scheduler, charging every step to the emulated device.

The scheduler is the one place that sees each step's exact batch and its outputs, so
the emulated clock advances here, in the engine process. The batch's shape is read in
``schedule()``, while every scheduled request is still known: a client can disconnect
and its request be aborted before ``update_from_output`` (the work was still done, so
the step is charged in full). Records go to the API server for ``/metrics``
(maia_serving.vllm.channel) and into a periodic log line (maia_serving.serving.stepping).
"""

from __future__ import annotations

import time
from typing import Any

from vllm.logger import init_logger
from vllm.v1.core.sched.scheduler import Scheduler

from maia_serving import envs
from maia_serving.serving.metrics import DeviceInfo
from maia_serving.serving.stepping import EngineStep, StepCharger
from maia_serving.vllm.channel import StatsPublisher
from maia_serving.vllm.communicator import OUTPUT_ATTR
from maia_serving.vllm.device import build_device

logger = init_logger("vllm.maia_serving")


class _Scheduled:
    """What schedule() saw of a step, completed by update_from_output."""

    __slots__ = ("contexts", "new_tokens", "read_s", "started")

    def __init__(self, new_tokens: tuple[int, ...], contexts: tuple[int, ...], started: float, read_s: float):
        self.new_tokens = new_tokens
        self.contexts = contexts
        self.started = started
        self.read_s = read_s


class MaiaScheduler(Scheduler):
    def __init__(self, vllm_config, *args: Any, **kwargs: Any) -> None:
        super().__init__(vllm_config, *args, **kwargs)
        device = build_device(vllm_config)
        self._publisher = StatsPublisher(envs.get(envs.MAIA_SERVING_STATS_ADDR))
        self.maia = StepCharger(
            device,
            logger,
            envs.get(envs.MAIA_SERVING_LOG_INTERVAL_S),
            sink=lambda record: self._publisher.send(record, time.monotonic()),
            on_error=self._publisher.count_error,
            pace=envs.get(envs.MAIA_SERVING_PACE),
        )
        # Keyed by the SchedulerOutput's id: with a batch queue, two steps can be in flight.
        self._in_flight: dict[int, _Scheduled] = {}
        # The engine's collectives move the served model's tensors: a proxy shape's are the cost model's.
        self._charge_collectives = not envs.priced_model(vllm_config.additional_config.get("maia_model"))
        self._publisher.announce(DeviceInfo.of(device, self.cache_config.num_gpu_blocks or 0))

    def add_request(self, request) -> None:
        super().add_request(request)
        # arrival_time: the front end's time.time() when the request came in (a paced clock needs how long ago).
        self.maia.arrive(request.request_id, max(0.0, time.time() - request.arrival_time))

    def finish_requests(self, request_ids, finished_status):
        aborted = super().finish_requests(request_ids, finished_status)
        for request in aborted or ():
            self.maia.abort(request.request_id)
        if aborted:
            self.maia.guard("reporting the KV cache", self._report_if_idle)
        return aborted

    def schedule(self, *args: Any, **kwargs: Any):
        out = super().schedule(*args, **kwargs)
        if out.num_scheduled_tokens:
            self.maia.guard("reading a step's shape", self._read_shape, out)
        return out

    def _read_shape(self, out) -> None:
        start = time.thread_time()
        scheduled = out.num_scheduled_tokens
        # num_computed_tokens already counts this step's tokens (see _update_after_schedule).
        contexts = tuple(self.requests[rid].num_computed_tokens for rid in scheduled)
        self._in_flight[id(out)] = _Scheduled(
            tuple(scheduled.values()), contexts, time.perf_counter(), time.thread_time() - start
        )

    def update_from_output(self, scheduler_output, model_runner_output):
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        step = self._in_flight.pop(id(scheduler_output), None)
        if step is not None:
            self.maia.guard("charging a step", self._charge, step, outputs, model_runner_output)
        return outputs

    def _charge(self, step: _Scheduled, outputs, model_runner_output) -> None:
        wall_s = time.perf_counter() - step.started
        start = time.thread_time()
        tokens_out: dict[str, int] = {}
        finished: list[str] = []
        for eco in outputs.values():
            for out in eco.outputs:
                tokens_out[out.request_id] = len(out.new_token_ids)
                if out.finish_reason is not None:
                    finished.append(out.request_id)
        used, cached = self._kv_blocks()
        collectives = getattr(model_runner_output, OUTPUT_ATTR, None) if self._charge_collectives else None
        shape = EngineStep(step.new_tokens, step.contexts, tokens_out, finished, used, cached, collectives)
        self.maia.charge(shape, wall_s, step.read_s + time.thread_time() - start)
        self._report_if_idle()

    def _kv_blocks(self) -> tuple[int, int]:
        """KV blocks held by requests, and held only by the prefix cache."""
        pool = self.kv_cache_manager.block_pool
        free = pool.get_num_free_blocks()
        used = pool.num_gpu_blocks - 1 - free  # the null block is never free
        # Blocks that hold a reusable prefix and no running request: at least the cached ones
        # beyond those in use (exact when nothing runs).
        return used, min(free, max(0, len(pool.cached_block_hash_to_block) - used))

    def _report_if_idle(self) -> None:
        """When nothing is left to run, send what waits with the KV state: no step will."""
        if not self.has_unfinished_requests():
            self._publisher.flush(self._kv_blocks())
