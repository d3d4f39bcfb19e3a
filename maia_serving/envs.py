"""Environment variables shared by the engine adapters, read lazily. Imports no engine."""

from __future__ import annotations

import os

# "maia" activates the platform; `--device maia` on the command line sets it for the
# engine's child processes, and offline users set it themselves.
MAIA_SERVING_DEVICE = "MAIA_SERVING_DEVICE"
# The emulated device profile when the engine's own configuration names none.
MAIA_SERVING_PROFILE = "MAIA_SERVING_PROFILE"
DEFAULT_PROFILE = "maia200"
# Seconds between the engine's emulation log lines.
MAIA_SERVING_LOG_INTERVAL_S = "MAIA_SERVING_LOG_INTERVAL_S"
DEFAULT_HOST_KV_GIB = 1.0


def device_requested() -> bool:
    return os.environ.get(MAIA_SERVING_DEVICE, "").lower() == "maia"


def device_flag(argv: list[str]) -> str | None:
    """The value of ``--device`` on a command line, if any."""
    for i, arg in enumerate(argv):
        if arg == "--device" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--device="):
            return arg.split("=", 1)[1]
    return None


def profile_name(configured: str | None = None) -> str:
    return str(configured or os.environ.get(MAIA_SERVING_PROFILE) or DEFAULT_PROFILE)


def log_interval_s() -> float:
    return float(os.environ.get(MAIA_SERVING_LOG_INTERVAL_S, "10"))


def gib_bytes(name: str, default_gib: float = DEFAULT_HOST_KV_GIB) -> int:
    """An environment variable holding GiB, as bytes."""
    raw = os.environ.get(name) or default_gib
    try:
        return int(float(raw) * 2**30)
    except ValueError as exc:
        raise ValueError(f"{name} must be a number of GiB, got {raw!r}") from exc
