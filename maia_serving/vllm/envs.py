"""Environment variables of the maia platform for vLLM, read lazily."""

from __future__ import annotations

import os

# "maia" activates the platform; `vllm serve ... --device maia` sets it for the
# engine's child processes, and offline `LLM(...)` users set it themselves.
MAIA_SERVING_DEVICE = "MAIA_SERVING_DEVICE"
# Emulated device profile when --additional-config has no "maia_profile".
MAIA_SERVING_PROFILE = "MAIA_SERVING_PROFILE"
DEFAULT_PROFILE = "maia200"
# vLLM's own knob for the CPU KV cache (GiB): here, the most the host gives to the
# KV cache that the emulated HBM would hold.
VLLM_CPU_KVCACHE_SPACE = "VLLM_CPU_KVCACHE_SPACE"
DEFAULT_HOST_KV_GIB = 1.0
# Attention on the host: "maia" (default) is our backend with the maia numerics (BF16
# and FP8 KV, per-head scales); "vllm-cpu" is vLLM's C++ CPU kernel, faster on a host,
# for runs that only want the emulated figures.
MAIA_SERVING_ATTENTION = "MAIA_SERVING_ATTENTION"
ATTENTION_CHOICES = ("maia", "vllm-cpu")
# Seconds between the engine's emulation log lines.
MAIA_SERVING_LOG_INTERVAL_S = "MAIA_SERVING_LOG_INTERVAL_S"


def device_requested() -> bool:
    return os.environ.get(MAIA_SERVING_DEVICE, "").lower() == "maia"


def profile_name(additional_config: dict | None = None) -> str:
    from_config = (additional_config or {}).get("maia_profile")
    return str(from_config or os.environ.get(MAIA_SERVING_PROFILE) or DEFAULT_PROFILE)


def host_kv_cap_bytes() -> int:
    raw = os.environ.get(VLLM_CPU_KVCACHE_SPACE) or DEFAULT_HOST_KV_GIB
    try:
        return int(float(raw) * 2**30)
    except ValueError as exc:
        raise ValueError(f"{VLLM_CPU_KVCACHE_SPACE} must be a number of GiB, got {raw!r}") from exc


def log_interval_s() -> float:
    return float(os.environ.get(MAIA_SERVING_LOG_INTERVAL_S, "10"))


def attention() -> str:
    value = os.environ.get(MAIA_SERVING_ATTENTION, "maia").strip().lower() or "maia"
    if value not in ATTENTION_CHOICES:
        raise ValueError(f"{MAIA_SERVING_ATTENTION}={value!r} is not valid; allowed: {', '.join(ATTENTION_CHOICES)}")
    return value
