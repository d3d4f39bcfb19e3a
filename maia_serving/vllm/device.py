"""Build the emulated device from a vLLM config: the one place that reads vLLM's fields."""

from __future__ import annotations

from typing import TYPE_CHECKING

from maia_serving import envs
from maia_serving.emulator.device.session import EmulatedDevice
from maia_serving.emulator.memory import MemoryPlan, ServingConfig, plan_memory
from maia_serving.emulator.model_shape import ModelShape, shape_from_config
from maia_serving.formats import precision
from maia_serving.serving.priced_model import priced_shape
from maia_serving.serving.profiles import load_profile

if TYPE_CHECKING:
    from vllm.config import VllmConfig


def kv_cache_dtype(vllm_config: VllmConfig) -> str:
    """The KV format served: a block-scaled one the platform recorded, else vLLM's cache dtype,
    checked against the emulator's vocabulary ("auto", "fp8", ...)."""
    block_scaled = vllm_config.additional_config.get("maia_kv_cache_dtype")
    if block_scaled:
        return precision.check_kv_cache_dtype(block_scaled, precision.BLOCK_SCALED_KV_FORMATS)
    return precision.check_kv_cache_dtype(str(vllm_config.cache_config.cache_dtype))


def served_shape(vllm_config: VllmConfig) -> ModelShape:
    """The model the host runs, at the dtype vLLM runs it in."""
    model_config = vllm_config.model_config
    hf = model_config.hf_config.to_dict()
    hf["torch_dtype"] = str(model_config.dtype).removeprefix("torch.")
    return shape_from_config(hf, name=model_config.served_model_name or model_config.model)


def serving_config(vllm_config: VllmConfig) -> ServingConfig:
    """vLLM's memory-relevant settings in the emulator's terms."""
    parallel = vllm_config.parallel_config
    sched = vllm_config.scheduler_config
    cache = vllm_config.cache_config
    replicas = parallel.data_parallel_size
    return ServingConfig(
        tensor_parallel_size=parallel.tensor_parallel_size,
        pipeline_parallel_size=parallel.pipeline_parallel_size,
        data_parallel_size=replicas,
        enable_expert_parallel=parallel.enable_expert_parallel,
        # Only replicas move tokens between MoE layers' chips; with one the backend is never used.
        **({"all2all_backend": parallel.all2all_backend} if replicas > 1 else {}),
        kv_cache_dtype=kv_cache_dtype(vllm_config),
        max_model_len=vllm_config.model_config.max_model_len,
        block_size=cache.block_size,
        gpu_memory_utilization=cache.gpu_memory_utilization,
        max_num_batched_tokens=sched.max_num_batched_tokens,
        max_num_seqs=sched.max_num_seqs,
    )


def build_device(vllm_config: VllmConfig) -> EmulatedDevice:
    """The emulated device this engine runs on, priced as the served model or the proxy shape
    ``maia_model`` names (routed as ``maia_expert_load`` counts, if set); NotEnoughMemory if that
    model does not fit."""
    profile = load_profile(envs.profile_name(vllm_config.additional_config.get("maia_profile")))
    spec, setting = _setting(vllm_config, "maia_model", envs.MAIA_SERVING_MODEL, envs.priced_model)
    load, load_setting = _setting(vllm_config, "maia_expert_load", envs.MAIA_SERVING_EXPERT_LOAD, envs.expert_load)
    model = priced_shape(served_shape(vllm_config), spec, setting, load, load_setting)
    return EmulatedDevice.fit(profile, model, serving_config(vllm_config))


def _setting(vllm_config: VllmConfig, key: str, variable: str, read) -> tuple[str | None, str]:
    """``read``'s value of the ``key`` of ``--additional-config`` (else of ``variable``), and the spelling the
    user gave it, for errors to name."""
    configured = vllm_config.additional_config.get(key)
    return read(configured), f"--additional-config {key}" if configured else variable


def host_plan(vllm_config: VllmConfig, device: EmulatedDevice) -> MemoryPlan:
    """The served model's own memory plan on the device's profile: what the host's KV tokens and
    memory are measured in (the device's plan when no proxy shape is priced)."""
    return plan_memory(served_shape(vllm_config), device.profile, serving_config(vllm_config))
