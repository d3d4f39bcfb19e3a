"""vLLM adapter: the `maia` platform, thin over maia_serving.emulator.

Entry points (pyproject.toml): ``vllm.platform_plugins`` -> activate,
``vllm.stat_logger_plugins`` -> maia_serving.vllm.stat_logger.MaiaStatLogger. Importing
this module must stay cheap (no emulator, YAML or torch): vLLM calls the platform hook in
every process before it parses arguments, with or without ``--device maia``.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile

from maia_serving import envs
from maia_serving.envs import MAIA_SERVING_DEVICE, MAIA_SERVING_STATS_ADDR, device_flag, device_requested


def activate() -> str | None:
    """Choose the maia platform from ``--device maia`` or MAIA_SERVING_DEVICE=maia.

    vLLM resolves platforms before it parses arguments, so the flag is read from
    sys.argv and handed to child processes through the environment. Otherwise
    decline, leaving vLLM's own platform choice untouched.
    """
    if device_flag(sys.argv[1:]) == "maia":
        os.environ[MAIA_SERVING_DEVICE] = "maia"
    if not device_requested():
        return None
    # The engine's workers import torch too: the maia torch device stays out of them (an accelerator to vLLM).
    os.environ.setdefault(envs.MAIA_SERVING_TORCH_DEVICE, "off")
    ensure_stats_addr()  # created by the first process, inherited by the engine's
    return "maia_serving.vllm.platform.MaiaPlatform"


def ensure_stats_addr() -> str:
    """The metrics channel's address: a socket in a folder only this user can enter
    (mkdtemp makes it 0700), created by the first process, inherited by the engine's
    and removed when that first process exits."""
    addr = envs.get(MAIA_SERVING_STATS_ADDR)
    if not addr:
        folder = tempfile.mkdtemp(prefix="maia-serving-")
        addr = os.environ[MAIA_SERVING_STATS_ADDR] = f"ipc://{folder}/stats.sock"
        atexit.register(_remove_folder, folder, os.getpid())
    return addr


def _remove_folder(folder: str, owner_pid: int) -> None:
    if os.getpid() == owner_pid:  # not in a forked child that inherited the hook
        shutil.rmtree(folder, ignore_errors=True)
