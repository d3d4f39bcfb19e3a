"""Environment variables of the maia platform for vLLM, read lazily."""

from __future__ import annotations

import os

from maia_serving.envs import (  # noqa: F401  (re-exported for the vLLM adapter)
    MAIA_SERVING_DEVICE,
    MAIA_SERVING_LOG_INTERVAL_S,
    MAIA_SERVING_PROFILE,
    device_requested,
    gib_bytes,
    log_interval_s,
)
from maia_serving.envs import profile_name as _profile_name

# vLLM's own knob for the CPU KV cache (GiB): here, the most the host gives to the
# KV cache that the emulated HBM would hold.
VLLM_CPU_KVCACHE_SPACE = "VLLM_CPU_KVCACHE_SPACE"
# Attention on the host: "maia" (default) is our backend with the maia numerics (BF16
# and FP8 KV, per-head scales); "vllm-cpu" is vLLM's C++ CPU kernel, faster on a host,
# for runs that only want the emulated figures.
MAIA_SERVING_ATTENTION = "MAIA_SERVING_ATTENTION"
ATTENTION_CHOICES = ("maia", "vllm-cpu")


def profile_name(additional_config: dict | None = None) -> str:
    return _profile_name((additional_config or {}).get("maia_profile"))


def host_kv_cap_bytes() -> int:
    return gib_bytes(VLLM_CPU_KVCACHE_SPACE)


def attention() -> str:
    value = os.environ.get(MAIA_SERVING_ATTENTION, "maia").strip().lower() or "maia"
    if value not in ATTENTION_CHOICES:
        raise ValueError(f"{MAIA_SERVING_ATTENTION}={value!r} is not valid; allowed: {', '.join(ATTENTION_CHOICES)}")
    return value
