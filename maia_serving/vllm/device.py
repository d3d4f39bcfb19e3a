"""Build the emulated device from a vLLM config: the one place that reads vLLM's fields."""

from __future__ import annotations

from typing import TYPE_CHECKING

from maia_serving import envs
from maia_serving.emulator import precision
from maia_serving.emulator.hardware import load_profile
from maia_serving.emulator.memory import ServingConfig
from maia_serving.emulator.model_shape import shape_from_config
from maia_serving.emulator.session import EmulatedDevice

if TYPE_CHECKING:
    from vllm.config import VllmConfig


def kv_cache_dtype(vllm_config: VllmConfig) -> str:
    """vLLM's cache dtype, checked against the emulator's vocabulary ("auto", "fp8", ...)."""
    return precision.check_kv_cache_dtype(str(vllm_config.cache_config.cache_dtype))


def build_device(vllm_config: VllmConfig) -> EmulatedDevice:
    """The emulated device this engine runs on; NotEnoughMemory if the model does not fit."""
    model_config = vllm_config.model_config
    parallel = vllm_config.parallel_config
    sched = vllm_config.scheduler_config
    cache = vllm_config.cache_config
    profile = load_profile(envs.profile_name(vllm_config.additional_config.get("maia_profile")))
    hf = model_config.hf_config.to_dict()
    hf["torch_dtype"] = str(model_config.dtype).removeprefix("torch.")
    model = shape_from_config(hf, name=model_config.served_model_name or model_config.model)
    config = ServingConfig(
        tensor_parallel_size=parallel.tensor_parallel_size,
        pipeline_parallel_size=parallel.pipeline_parallel_size,
        kv_cache_dtype=kv_cache_dtype(vllm_config),
        max_model_len=model_config.max_model_len,
        block_size=cache.block_size,
        gpu_memory_utilization=cache.gpu_memory_utilization,
        max_num_batched_tokens=sched.max_num_batched_tokens,
        max_num_seqs=sched.max_num_seqs,
    )
    return EmulatedDevice.fit(profile, model, config)
