"""MaiaStatLogger: puts the emulated figures on the API server's ``/metrics``.

Loaded by vLLM from the ``vllm.stat_logger_plugins`` entry point in the serving
process whether or not the maia platform is active; inert when it is not.
"""

from __future__ import annotations

from vllm.v1.metrics.loggers import StatLoggerBase

from maia_serving import envs

_receiver = None


def _shared_receiver():
    """One channel and one set of Prometheus metrics per process, however many loggers."""
    global _receiver
    if _receiver is None and envs.device_requested():
        addr = envs.get(envs.MAIA_SERVING_STATS_ADDR)
        if addr:
            from maia_serving.vllm.channel import StatsReceiver

            _receiver = StatsReceiver(addr)
    return _receiver


class MaiaStatLogger(StatLoggerBase):
    def __init__(self, vllm_config, engine_index: int = 0):
        self.receiver = _shared_receiver()

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
        if self.receiver is not None:
            self.receiver.drain()

    def log_engine_initialized(self) -> None:
        if self.receiver is not None:
            self.receiver.drain()
