"""MaiaScheduler: vLLM's scheduler, charging every step to the emulated device.

The scheduler is the one place that sees each step's exact batch (tokens scheduled
per request and their context lengths) and its outputs, so the emulated clock
advances here, in the engine process. Records go to the serving process for
``/metrics`` (maia_serving.metrics) and into a periodic log line.
"""

from __future__ import annotations

import os
import time
from typing import Any

from vllm.logger import init_logger
from vllm.v1.core.sched.scheduler import Scheduler

from maia_serving.metrics import ADDR_ENV, DeviceInfo, PeriodicLog, StatsPublisher
from maia_serving.vllm import envs
from maia_serving.vllm.device import build_device

logger = init_logger("vllm.maia_serving")


class MaiaScheduler(Scheduler):
    def __init__(self, vllm_config, *args: Any, **kwargs: Any) -> None:
        super().__init__(vllm_config, *args, **kwargs)
        self.maia = build_device(vllm_config)
        self._publisher = StatsPublisher(os.environ.get(ADDR_ENV))
        self._log = PeriodicLog(self.maia, envs.log_interval_s())
        self._scheduled_at = 0.0
        self._last_send_s = 0.0
        self._publisher.announce(DeviceInfo.of(self.maia, self.cache_config.num_gpu_blocks or 0))

    def add_request(self, request) -> None:
        super().add_request(request)
        self.maia.arrive(request.request_id)

    def finish_requests(self, request_ids, finished_status):
        aborted = super().finish_requests(request_ids, finished_status)
        for request in aborted:
            self.maia.abort(request.request_id)
        return aborted

    def schedule(self, *args: Any, **kwargs: Any):
        out = super().schedule(*args, **kwargs)
        self._scheduled_at = time.perf_counter()
        return out

    def update_from_output(self, scheduler_output, model_runner_output):
        wall_s = time.perf_counter() - self._scheduled_at
        # Overhead is this thread's CPU time: on a shared core, wall time would also
        # count the moments the API server ran instead of us.
        start = time.thread_time()
        scheduled = scheduler_output.num_scheduled_tokens
        # num_computed_tokens already counts this step's tokens (see _update_after_schedule).
        contexts = tuple(self.requests[rid].num_computed_tokens for rid in scheduled)
        mid = time.thread_time()
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        if not scheduled:
            return outputs
        resumed = time.thread_time()
        tokens_out: dict[str, int] = {}
        finished: list[str] = []
        for eco in outputs.values():
            for out in eco.outputs:
                tokens_out[out.request_id] = len(out.new_token_ids)
                if out.finish_reason is not None:
                    finished.append(out.request_id)
        used = self.cache_config.num_gpu_blocks * self.kv_cache_manager.usage
        record = self.maia.charge(tuple(scheduled.values()), contexts, tokens_out, finished,
                                  int(round(used)), wall_s)
        now = time.monotonic()
        if (line := self._log.observe(record, now)) is not None:
            logger.info(line)
        # Our own work this step, plus the previous step's send (measured after it).
        record.overhead_s = (mid - start) + (time.thread_time() - resumed) + self._last_send_s
        sent = time.thread_time()
        self._publisher.send(record, now)
        self._last_send_s = time.thread_time() - sent
        return outputs
