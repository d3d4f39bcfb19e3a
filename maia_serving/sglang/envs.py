"""Environment variables of the maia platform for SGLang, read lazily."""

from __future__ import annotations

from maia_serving.envs import gib_bytes

# The most host memory (GiB) the KV pool may take of what the emulated HBM would hold;
# the counterpart of vLLM's VLLM_CPU_KVCACHE_SPACE.
MAIA_SERVING_HOST_KV_GIB = "MAIA_SERVING_HOST_KV_GIB"


def host_kv_cap_bytes() -> int:
    return gib_bytes(MAIA_SERVING_HOST_KV_GIB)
