"""A max-model-len the host's KV cache or memory cannot hold gets a clear message, not an
allocation error deep in the engine."""

import pytest

from maia_serving.emulator.hardware import load_profile
from maia_serving.emulator.memory import SGLANG_FLAGS, VLLM_FLAGS, ServingConfig, plan_memory
from maia_serving.emulator.model_shape import load_model_shape
from maia_serving.serving.host_fit import HostTooSmall, check_host

GiB = 2**30


def _plan(max_len: int, batched: int = 8192):
    return plan_memory(
        load_model_shape("llama-3-8b"),
        load_profile("maia200"),
        ServingConfig(max_model_len=max_len, max_num_batched_tokens=batched),
    )


def test_one_sequence_must_fit_the_host_kv_cache():
    plan = _plan(8192)  # 128 KiB per token in BF16: 1 GiB holds 8192 tokens exactly
    assert plan.kv_bytes_per_token == 131072
    check_host(plan, 1 * GiB, "VLLM_CPU_KVCACHE_SPACE", VLLM_FLAGS, memory_bytes=64 * GiB)
    with pytest.raises(HostTooSmall) as err:
        check_host(plan, 1 * GiB - 1, "VLLM_CPU_KVCACHE_SPACE", VLLM_FLAGS, memory_bytes=64 * GiB)
    msg = str(err.value)
    assert "--max-model-len 8192 needs 1.00 GiB of KV cache" in msg
    assert "raise VLLM_CPU_KVCACHE_SPACE or lower --max-model-len to at most 8191" in msg


def test_the_host_must_hold_weights_activations_and_kv():
    plan = _plan(8192, batched=2_000_000)
    need = plan.weight_bytes + plan.workspace_bytes + GiB
    check_host(plan, GiB, "MAIA_SERVING_HOST_KV_GIB", SGLANG_FLAGS, memory_bytes=int(need) + 1)
    with pytest.raises(HostTooSmall, match="2000000-token step.*lower --context-length"):
        check_host(plan, GiB, "MAIA_SERVING_HOST_KV_GIB", SGLANG_FLAGS, memory_bytes=int(need) - 1)
