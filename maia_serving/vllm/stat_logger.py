"""MaiaStatLogger: puts the emulated figures on the API server's ``/metrics``.

Loaded by vLLM from the ``vllm.stat_logger_plugins`` entry point in the serving
process whether or not the maia platform is active; inert when it is not.
"""

from __future__ import annotations

import os

from vllm.v1.metrics.loggers import StatLoggerBase

from maia_serving.metrics import ADDR_ENV, EmulatedMetrics
from maia_serving.vllm import envs

_metrics: EmulatedMetrics | None = None


def _shared_metrics() -> EmulatedMetrics | None:
    """One channel and one set of Prometheus metrics per process, however many loggers."""
    global _metrics
    if _metrics is None and envs.device_requested() and os.environ.get(ADDR_ENV):
        _metrics = EmulatedMetrics(os.environ[ADDR_ENV])
    return _metrics


class MaiaStatLogger(StatLoggerBase):
    def __init__(self, vllm_config, engine_index: int = 0):
        self.metrics = _shared_metrics()

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
        if self.metrics is not None:
            self.metrics.drain()

    def log_engine_initialized(self) -> None:
        if self.metrics is not None:
            self.metrics.drain()
