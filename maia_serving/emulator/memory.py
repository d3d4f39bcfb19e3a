"""HBM capacity model: weights + workspace + KV cache against one chip's HBM.

Per chip, with tensor parallel size ``tp`` and pipeline parallel size ``pp``::

    usable    = hbm_capacity * gpu_memory_utilization - runtime_reserve
    weights   = layer_params * layers / pp / tp + embeddings / tp   (vocab-parallel)
    workspace = activations of one max_num_batched_tokens forward pass + fp32 logits
    kv_budget = usable - weights - workspace
    kv/token  = 2 (K and V) * layers / pp * ceil(kv_heads / tp) * head_dim * kv_bytes

The model fits when the budget holds at least one sequence of ``max_model_len``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

from maia_serving.emulator.hardware import DeviceProfile
from maia_serving.emulator.model_shape import ModelShape, kv_cache_bytes_per_element
from maia_serving.emulator.units import format_bytes

GiB = 2.0**30


@dataclass(frozen=True)
class ServingConfig:
    """The engine settings that decide memory use, with vLLM's defaults."""

    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    kv_cache_dtype: str = "auto"
    max_model_len: int | None = None
    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    max_num_batched_tokens: int = 8192
    max_num_seqs: int = 256

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1 or self.pipeline_parallel_size < 1:
            raise ValueError("parallel sizes must be at least 1")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )


@dataclass(frozen=True)
class MemoryPlan:
    """Where one chip's HBM goes. Byte figures are per chip."""

    profile: str
    model: str
    config: ServingConfig
    max_model_len: int
    hbm_capacity_bytes: float
    usable_bytes: float
    runtime_reserve_bytes: float
    weight_bytes: float
    workspace_bytes: float
    kv_budget_bytes: float
    kv_bytes_per_token: float
    num_blocks: int
    kv_tokens: int
    max_concurrent_seqs: int

    @property
    def fits(self) -> bool:
        return self.max_concurrent_seqs >= 1

    @property
    def shortfall_bytes(self) -> float:
        """Bytes missing to hold one sequence of ``max_model_len`` (0 when it fits)."""
        needed = self.weight_bytes + self.workspace_bytes + self.max_model_len * self.kv_bytes_per_token
        return max(0.0, needed - self.usable_bytes)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["fits"] = self.fits
        out["shortfall_bytes"] = self.shortfall_bytes
        return out


class NotEnoughMemory(ValueError):
    """The model does not fit the emulated device; the message says what would."""

    def __init__(self, plan: MemoryPlan, suggestions: list[str]):
        self.plan = plan
        self.suggestions = suggestions
        msg = (
            f"{plan.model} does not fit on {plan.profile} "
            f"(tp={plan.config.tensor_parallel_size}, pp={plan.config.pipeline_parallel_size}, "
            f"kv_cache_dtype={plan.config.kv_cache_dtype}, max_model_len={plan.max_model_len}): "
            f"per chip it needs {format_bytes(plan.weight_bytes)} weights "
            f"+ {format_bytes(plan.workspace_bytes)} workspace "
            f"+ {format_bytes(plan.max_model_len * plan.kv_bytes_per_token)} KV for one sequence, "
            f"but only {format_bytes(plan.usable_bytes)} of {format_bytes(plan.hbm_capacity_bytes)} "
            f"HBM is usable; "
            f"short by {format_bytes(plan.shortfall_bytes)}."
        )
        if suggestions:
            msg += " Try: " + "; ".join(suggestions) + "."
        super().__init__(msg)


def kv_bytes_per_token(model: ModelShape, config: ServingConfig) -> float:
    """KV bytes one token takes on one chip (K and V of this chip's layers and heads)."""
    layers = math.ceil(model.num_layers / config.pipeline_parallel_size)
    # With more TP ranks than KV heads, each rank keeps a replica of one head.
    heads = math.ceil(model.num_kv_heads / config.tensor_parallel_size)
    elem = kv_cache_bytes_per_element(config.kv_cache_dtype, model.dtype)
    return 2 * layers * heads * model.head_dim * elem


def weight_bytes_per_chip(model: ModelShape, config: ServingConfig) -> float:
    layers = math.ceil(model.num_layers / config.pipeline_parallel_size)
    tp = config.tensor_parallel_size
    params = layers * model.layer_params() / tp + model.embedding_params() / tp
    return params * model.dtype_bytes


def workspace_bytes_per_chip(model: ModelShape, config: ServingConfig) -> float:
    """Peak activations of one forward pass at the token budget, plus fp32 logits.

    Per token, the live tensors are the residual stream, the normed input, the
    q/k/v and attention outputs, and the gated MLP's two intermediate tensors.
    """
    tp = config.tensor_parallel_size
    tokens = config.max_num_batched_tokens
    per_token = (
        2 * model.hidden_size
        + (model.q_size * 2 + model.kv_size * 2) / tp
        + 2 * model.intermediate_size / tp
    )
    logits = config.max_num_seqs * model.vocab_size / tp * 4
    return tokens * per_token * model.dtype_bytes + logits


def plan_memory(model: ModelShape, profile: DeviceProfile, config: ServingConfig) -> MemoryPlan:
    """Size the KV cache of one chip; never raises for a model that does not fit."""
    max_len = config.max_model_len or model.max_position_embeddings
    usable = profile.hbm_capacity_bytes * config.gpu_memory_utilization - profile.runtime_reserve_bytes
    weights = weight_bytes_per_chip(model, config)
    workspace = workspace_bytes_per_chip(model, config)
    per_token = kv_bytes_per_token(model, config)
    budget = max(0.0, usable - weights - workspace)
    num_blocks = int(budget // (per_token * config.block_size))
    blocks_per_seq = math.ceil(max_len / config.block_size)
    return MemoryPlan(
        profile=profile.name,
        model=model.name,
        config=config,
        max_model_len=max_len,
        hbm_capacity_bytes=profile.hbm_capacity_bytes,
        usable_bytes=usable,
        runtime_reserve_bytes=profile.runtime_reserve_bytes,
        weight_bytes=weights,
        workspace_bytes=workspace,
        kv_budget_bytes=budget,
        kv_bytes_per_token=per_token,
        num_blocks=num_blocks,
        kv_tokens=num_blocks * config.block_size,
        max_concurrent_seqs=num_blocks // blocks_per_seq,
    )


@dataclass(frozen=True)
class Flags:
    """How an engine's command line spells the settings that suggestions change."""

    tensor_parallel: str
    fp8_kv: str
    max_len: str


VLLM_FLAGS = Flags("--tensor-parallel-size", "--kv-cache-dtype fp8", "--max-model-len")
SGLANG_FLAGS = Flags("--tp-size", "--kv-cache-dtype fp8_e4m3", "--context-length")


def suggest(model: ModelShape, profile: DeviceProfile, config: ServingConfig,
            flags: Flags = VLLM_FLAGS) -> list[str]:
    """Changes that would make the model fit, cheapest first, as ``flags`` spells them."""
    out: list[str] = []
    tp = config.tensor_parallel_size * 2
    while tp <= profile.scale_up.chips:
        if plan_memory(model, profile, replace(config, tensor_parallel_size=tp)).fits:
            out.append(f"{flags.tensor_parallel} {tp} (up to {profile.scale_up.chips} chips per node)")
            break
        tp *= 2
    if not config.kv_cache_dtype.startswith("fp8"):
        if plan_memory(model, profile, replace(config, kv_cache_dtype="fp8")).fits:
            out.append(f"{flags.fp8_kv} (half the KV bytes per token)")
    plan = plan_memory(model, profile, config)
    room = int(plan.kv_budget_bytes // plan.kv_bytes_per_token) // config.block_size * config.block_size
    if 0 < room < plan.max_model_len:
        out.append(f"{flags.max_len} {room} (the longest sequence the KV budget holds)")
    if not out:
        out.append("a profile with more HBM (see `maia-serving profiles`)")
    return out


def require_fit(model: ModelShape, profile: DeviceProfile, config: ServingConfig,
                flags: Flags = VLLM_FLAGS) -> MemoryPlan:
    """The memory plan, or NotEnoughMemory with the numbers and what would fit."""
    plan = plan_memory(model, profile, config)
    if not plan.fits:
        raise NotEnoughMemory(plan, suggest(model, profile, config, flags))
    return plan
