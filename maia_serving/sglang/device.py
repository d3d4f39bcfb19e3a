"""Build the emulated device from SGLang's server arguments: the one place that reads them."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from maia_serving import envs
from maia_serving.emulator.device.session import EmulatedDevice
from maia_serving.emulator.memory import SGLANG_FLAGS, MemoryPlan, ServingConfig, plan_memory
from maia_serving.emulator.model_shape import ModelShape, shape_from_config
from maia_serving.formats import precision
from maia_serving.serving.priced_model import priced_shape
from maia_serving.serving.profiles import load_profile

# The emulated device pages its KV cache like vLLM on maia, whatever SGLang's host
# page size, so both engines report the same capacity for the same profile.
EMULATED_BLOCK_SIZE = 16
DEFAULT_MAX_RUNNING_REQUESTS = 256  # vLLM's max_num_seqs default, for the same workspace
# vLLM 0.32's default gpu_memory_utilization: without --mem-fraction-static both engines
# give the same share of the emulated HBM to weights and KV cache.
DEFAULT_MEMORY_FRACTION = 0.92


def kv_cache_dtype(server_args) -> str:
    """The KV format served: a block-scaled one (MAIA_SERVING_KV_CACHE_DTYPE), else SGLang's
    --kv-cache-dtype, checked against the emulator's vocabulary ("auto", "bf16", "fp8_e4m3", ...)."""
    if block_scaled := envs.get(envs.MAIA_SERVING_KV_CACHE_DTYPE):
        return block_scaled
    return precision.check_kv_cache_dtype(str(server_args.kv_cache_dtype or "auto"))


def hf_config(model_path: str) -> dict:
    """The model's parsed config.json (read once per startup: the platform, the KV-scale
    checks and the scheduler all ask)."""
    return json.loads(_config_text(str(model_path)))


@lru_cache(maxsize=4)
def _config_text(model_path: str) -> str:
    path = Path(model_path) / "config.json"
    if not path.is_file():
        raise ValueError(f"--device maia needs a local model folder with config.json; {model_path!r} has none")
    text = path.read_text()
    try:
        json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc})") from None
    return text


def serving_config(server_args) -> ServingConfig:
    """SGLang's memory-relevant settings in the emulator's terms (vLLM's names)."""
    batched = server_args.chunked_prefill_size
    if not batched or batched <= 0:
        batched = server_args.max_prefill_tokens
    return ServingConfig(
        tensor_parallel_size=server_args.tp_size,
        pipeline_parallel_size=server_args.pp_size,
        kv_cache_dtype=kv_cache_dtype(server_args),
        max_model_len=server_args.context_length,
        block_size=EMULATED_BLOCK_SIZE,
        gpu_memory_utilization=float(server_args.mem_fraction_static or DEFAULT_MEMORY_FRACTION),
        max_num_batched_tokens=int(batched),
        max_num_seqs=int(server_args.max_running_requests or DEFAULT_MAX_RUNNING_REQUESTS),
    )


def served_shape(server_args) -> ModelShape:
    """The model the host runs, at the dtype SGLang runs it in."""
    hf = hf_config(server_args.model_path)
    if server_args.dtype not in (None, "auto"):
        hf["torch_dtype"] = str(server_args.dtype)
    return shape_from_config(hf, name=server_args.served_model_name or server_args.model_path)


def build_device(server_args, profile: str | None = None) -> EmulatedDevice:
    """The emulated device this engine runs on, priced as the served model or the proxy shape
    MAIA_SERVING_MODEL names (SGLang has no free-form config flag), routed as MAIA_SERVING_EXPERT_LOAD
    counts if set; NotEnoughMemory if that model does not fit."""
    model = priced_shape(
        served_shape(server_args),
        envs.priced_model(),
        envs.MAIA_SERVING_MODEL,
        envs.expert_load(),
        envs.MAIA_SERVING_EXPERT_LOAD,
    )
    return EmulatedDevice.fit(
        load_profile(envs.profile_name(profile)), model, serving_config(server_args), SGLANG_FLAGS
    )


def host_plan(server_args, device: EmulatedDevice) -> MemoryPlan:
    """The served model's own memory plan on the device's profile: what the host's KV tokens and
    memory are measured in (the device's plan when no proxy shape is priced)."""
    return plan_memory(served_shape(server_args), device.profile, serving_config(server_args))
