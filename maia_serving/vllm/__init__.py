"""vLLM adapter: the `maia` platform, thin over maia_serving.emulator.

Entry points (pyproject.toml): ``vllm.platform_plugins`` -> register_platform,
``vllm.stat_logger_plugins`` -> maia_serving.vllm.stat_logger.MaiaStatLogger. Importing this module must stay
cheap: vLLM calls the platform hook in every process before it parses arguments.
"""

from __future__ import annotations

import os
import sys

from maia_serving.envs import MAIA_SERVING_DEVICE, device_flag, device_requested
from maia_serving.metrics import ensure_stats_addr


def register_platform() -> str | None:
    """Choose the maia platform from ``--device maia`` or MAIA_SERVING_DEVICE=maia.

    vLLM resolves platforms before it parses arguments, so the flag is read from
    sys.argv and handed to child processes through the environment. Otherwise
    decline, leaving vLLM's own platform choice untouched.
    """
    if device_flag(sys.argv[1:]) == "maia":
        os.environ[MAIA_SERVING_DEVICE] = "maia"
    if not device_requested():
        return None
    ensure_stats_addr()  # created by the first process, inherited by the engine's
    return "maia_serving.vllm.platform.MaiaPlatform"
