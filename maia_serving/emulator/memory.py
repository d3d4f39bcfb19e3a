"""HBM capacity model: weights + workspace + KV cache against one chip's HBM.

Per chip, with tensor parallel size ``tp`` and pipeline parallel size ``pp``::

    usable    = hbm_capacity * gpu_memory_utilization - runtime_reserve
    weights   = decoder layers' weights * ceil(layers / pp) / layers / tp + embeddings / tp   (vocab-parallel)
                (routed experts over the tp * dp chips of a stage: each expert's width split, or with
                expert parallelism ceil(experts / (tp * dp)) whole experts on a chip)
    workspace = activations of one max_num_batched_tokens forward pass + fp32 logits
    kv_budget = usable - weights - workspace
    kv/token  = ceil(layers / pp) * (2 * ceil(kv_heads / tp) head rows, or MLA's latent) at the KV format's row size

Each weight is counted at its stored size (precision.py: quantized layers with their scales), and
each KV row too: a block-scaled KV format (MXFP8/6/4, NVFP4) stores whole blocks along head_dim, each
with its scale (MXFP4 at head_dim 128: 68 bytes a row, 4.25 bits an element).
Linear layers vLLM replicates (routers, MLA's latent down-projections) are whole on every
chip; norms are counted split with the rest (they are under 0.01% of these models). A
sequence holds every token in full-attention layers and the last ``sliding_window`` in
sliding ones; the model fits when the budget holds one sequence of ``max_model_len``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

from maia_serving.emulator.cost.layout import Parallel
from maia_serving.emulator.cost.terms import check_fusions
from maia_serving.emulator.hardware import DeviceProfile
from maia_serving.emulator.model_shape import Linear, ModelShape
from maia_serving.formats import precision
from maia_serving.formats.units import format_bytes

GiB = 2.0**30


def check_redundant_experts(enable_eplb: bool, num_redundant_experts: int) -> None:
    """Redundant experts without EPLB are refused, as vLLM refuses them (``plan`` checks its flags here too, as
    its template config enables EPLB only on the expert-parallel layouts it tries)."""
    if num_redundant_experts and not enable_eplb:
        raise ValueError(
            f"num_redundant_experts={num_redundant_experts} without EPLB: vLLM refuses it; add "
            "--enable-eplb or leave the redundant experts out"
        )


@dataclass(frozen=True)
class ServingConfig:
    """The engine settings that decide memory use, with vLLM's defaults."""

    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    data_parallel_size: int = 1  # replicas, each with its own KV cache and batch (--data-parallel-size)
    enable_expert_parallel: bool = False
    all2all_backend: str = "allgather_reducescatter"
    enable_eplb: bool = False  # vLLM's expert-parallel load balancer (--enable-eplb)
    num_redundant_experts: int = 0  # its extra expert replicas (--eplb-config '{"num_redundant_experts": R}')
    eplb_step_interval: int = 3000  # steps between its rearrangements (--eplb-config's step_interval; vLLM's default)
    kv_cache_dtype: str = "auto"
    max_model_len: int | None = None
    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    max_num_batched_tokens: int = 8192
    max_num_seqs: int = 256
    weight_dtype: str | None = None  # the linear layers' storage instead of the checkpoint's (--weight-dtype)
    activation_dtype: str | None = None  # their GEMM inputs; None: as the weights' scheme feeds them
    comm_dtype: str | None = None  # the collectives' payload (--comm-dtype); None: the model dtype
    fusions: tuple[str, ...] = ()  # kernel fusions beyond vLLM's own (cost.FUSIONS; --fusions)
    scheduler_policy: str = "vllm"  # KV admission: vLLM's, or TensorRT-LLM's "trtllm-no-evict" (sim/scheduler.py)

    def __post_init__(self) -> None:
        check_redundant_experts(self.enable_eplb, self.num_redundant_experts)
        if not isinstance(self.eplb_step_interval, int) or self.eplb_step_interval < 1:
            raise ValueError(
                f"EPLB's step_interval must be a whole number of steps, at least 1; got {self.eplb_step_interval!r}"
            )
        _ = self.parallel  # building the layout checks its sizes, its all2all backend and EPLB's need of EP
        check_fusions(self.fusions)
        precision.check_kv_cache_dtype(self.kv_cache_dtype, precision.KV_CACHE_FORMATS)
        for name in (self.weight_dtype, self.activation_dtype, self.comm_dtype):
            if name is not None:
                precision.dtype(name)
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")

    @property
    def parallel(self) -> Parallel:
        """The layout, as the cost model takes it."""
        return Parallel(
            self.tensor_parallel_size,
            self.pipeline_parallel_size,
            self.data_parallel_size,
            self.enable_expert_parallel,
            self.all2all_backend,
            self.num_redundant_experts if self.enable_eplb else None,
        )

    @property
    def eplb_first_rearrangement(self) -> int:
        """The steps EPLB serves with its initial map: vLLM starts its step counter three quarters of the way
        to ``step_interval`` and rearranges when it gets there (``EplbState``), after a quarter of the interval."""
        return max(1, self.eplb_step_interval // 4)

    @property
    def layout_words(self) -> str:
        """ "tp=2, pp=1", with the replicas (and their all2all backend) and expert parallelism where the layout
        has them: how messages and the CLI name the layout."""
        words = f"tp={self.tensor_parallel_size}, pp={self.pipeline_parallel_size}"
        if self.data_parallel_size > 1:
            words += f", dp={self.data_parallel_size} ({self.all2all_backend})"
        words += ", expert parallel" if self.enable_expert_parallel else ""
        if self.enable_eplb:
            words += f", EPLB ({self.num_redundant_experts} redundant experts)"
        return words


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
    kv_bytes_per_sequence: float  # one sequence of max_model_len, in whole blocks
    num_blocks: int
    kv_tokens: int
    max_concurrent_seqs: int

    @property
    def fits(self) -> bool:
        return self.max_concurrent_seqs >= 1

    @property
    def shortfall_bytes(self) -> float:
        """Bytes missing to hold one sequence of ``max_model_len`` (0 when it fits)."""
        needed = self.weight_bytes + self.workspace_bytes + self.kv_bytes_per_sequence
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
            f"({plan.config.layout_words}, kv_cache_dtype={plan.config.kv_cache_dtype}, "
            f"max_model_len={plan.max_model_len}): "
            f"per chip it needs {format_bytes(plan.weight_bytes)} weights "
            f"+ {format_bytes(plan.workspace_bytes)} workspace "
            f"+ {format_bytes(plan.kv_bytes_per_sequence)} KV for one sequence, "
            f"but only {format_bytes(plan.usable_bytes)} of {format_bytes(plan.hbm_capacity_bytes)} "
            f"HBM is usable; "
            f"short by {format_bytes(plan.shortfall_bytes)}."
        )
        if suggestions:
            msg += " Try: " + "; ".join(suggestions) + "."
        super().__init__(msg)


def served_model(model: ModelShape, config: ServingConfig) -> ModelShape:
    """``model`` with its weights stored as ``config`` says (``weight_dtype`` over the checkpoint's) and
    its collectives' payload in ``comm_dtype`` (a quantized all-reduce) when one is given."""
    model = model.with_weights(config.weight_dtype, config.activation_dtype)
    return replace(model, comm_dtype=config.comm_dtype) if config.comm_dtype else model


def _stage_layers(count: int, config: ServingConfig) -> int:
    return math.ceil(count / config.pipeline_parallel_size)


def _kv_bytes_per_token_layer(model: ModelShape, config: ServingConfig) -> float:
    kv_cache = precision.kv_cache_dtype(config.kv_cache_dtype, model.dtype)
    return model.kv_bytes_per_token_layer(config.tensor_parallel_size, kv_cache)


def kv_bytes_per_token(model: ModelShape, config: ServingConfig) -> float:
    """KV bytes one token takes on one chip (this chip's layers and heads), windows aside."""
    return _stage_layers(model.num_layers, config) * _kv_bytes_per_token_layer(model, config)


def kv_bits_per_value(model: ModelShape, config: ServingConfig) -> float:
    """What one stored K or V value costs, its block's scale and padding included (MXFP4 at head_dim 128:
    4.25 bits; BF16: 16)."""
    width = model.mla.latent_size if model.mla else model.head_dim
    return precision.kv_cache_dtype(config.kv_cache_dtype, model.dtype).row_bytes(width) * 8 / width


def kv_bytes_per_sequence(model: ModelShape, config: ServingConfig, length: int) -> float:
    """KV bytes one sequence of ``length`` tokens holds on one chip, in whole blocks. A sliding layer keeps
    the blocks covering its last ``sliding_window`` tokens: ceil((window - 1) / block) + 1 once the sequence
    outgrows it, as vLLM's sliding-window manager holds them."""
    block = config.block_size
    layers = _stage_layers(model.num_layers, config)
    sliding = min(layers, _stage_layers(model.num_sliding_layers, config))
    blocks = math.ceil(length / block)
    window = model.sliding_window
    window_blocks = blocks if window is None or length <= window else math.ceil((window - 1) / block) + 1
    full = (layers - sliding) * blocks + sliding * window_blocks
    return full * block * _kv_bytes_per_token_layer(model, config)


def _shards(lin: Linear, config: ServingConfig) -> float:
    """How many chips share one ``lin``: replicated on each, split over the tensor-parallel group, or for the
    routed experts over the tp * dp chips of a stage (vLLM's MoE group), in equal slices or, with expert
    parallelism, as whole experts (the first chips taking one more where they do not divide evenly; with EPLB
    each chip also holds its share of the redundant replicas, which divide evenly)."""
    if lin.split == "none":
        return 1
    if lin.group != "experts":
        return config.tensor_parallel_size
    ranks = config.tensor_parallel_size * config.data_parallel_size
    if not config.enable_expert_parallel:
        return ranks
    redundant = config.num_redundant_experts if config.enable_eplb else 0
    return lin.experts / math.ceil((lin.experts + redundant) / ranks)


def weight_bytes_per_chip(model: ModelShape, config: ServingConfig) -> float:
    tp = config.tensor_parallel_size
    prec = model.precision()
    model_bytes = prec.model.bytes_per_element
    linear = sum(model.linear_bytes(lin, prec) / _shards(lin, config) for lin in model.linears())
    decoder = linear + model.norm_params() * model_bytes / tp
    stage = _stage_layers(model.num_layers, config) / model.num_layers
    return decoder * stage + model.embedding_params() * model_bytes / tp


def _mlp_width(model: ModelShape) -> int:
    """The widest MLP intermediate one token produces: a dense MLP's, or its routed and shared experts' together."""
    moe = model.moe
    if moe is None:
        return model.intermediate_size
    routed = moe.top_k * moe.intermediate_size + moe.shared_intermediate_size
    return max(routed, model.intermediate_size if moe.num_dense_layers else 0)


def workspace_bytes_per_chip(model: ModelShape, config: ServingConfig) -> float:
    """Peak activations of one forward pass at the token budget, plus fp32 logits.

    Per token, the live tensors are the residual stream, the normed input, the
    q/k/v and attention outputs, and the gated MLP's (or the experts') two intermediate tensors.
    """
    tp = config.tensor_parallel_size
    tokens = config.max_num_batched_tokens
    per_token = 2 * model.hidden_size + (model.q_size * 2 + model.kv_size * 2) / tp + 2 * _mlp_width(model) / tp
    logits = config.max_num_seqs * model.vocab_size / tp * 4
    return tokens * per_token * model.dtype_bytes + logits


def longest_sequence(model: ModelShape, config: ServingConfig, budget_bytes: float, limit: int) -> int:
    """The longest sequence, in whole blocks and at most ``limit`` tokens, whose KV fits ``budget_bytes``."""
    block = config.block_size
    lo, hi = 0, limit // block
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if kv_bytes_per_sequence(model, config, mid * block) <= budget_bytes:
            lo = mid
        else:
            hi = mid - 1
    return lo * block


def plan_memory(model: ModelShape, profile: DeviceProfile, config: ServingConfig) -> MemoryPlan:
    """Size the KV cache of one chip; never raises for a model that does not fit."""
    model = served_model(model, config)
    max_len = config.max_model_len or model.max_position_embeddings
    usable = profile.hbm_capacity_bytes * config.gpu_memory_utilization - profile.runtime_reserve_bytes
    weights = weight_bytes_per_chip(model, config)
    workspace = workspace_bytes_per_chip(model, config)
    per_token = kv_bytes_per_token(model, config)
    per_seq = kv_bytes_per_sequence(model, config, max_len)
    budget = max(0.0, usable - weights - workspace)
    num_blocks = int(budget // (per_token * config.block_size))
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
        kv_bytes_per_sequence=per_seq,
        num_blocks=num_blocks,
        kv_tokens=num_blocks * config.block_size,
        max_concurrent_seqs=int(budget // per_seq),
    )


@dataclass(frozen=True)
class Flags:
    """How an engine's command line spells the settings that suggestions change."""

    tensor_parallel: str
    fp8_kv: str
    max_len: str


VLLM_FLAGS = Flags("--tensor-parallel-size", "--kv-cache-dtype fp8", "--max-model-len")
SGLANG_FLAGS = Flags("--tp-size", "--kv-cache-dtype fp8_e4m3", "--context-length")


def suggest(model: ModelShape, profile: DeviceProfile, config: ServingConfig, flags: Flags = VLLM_FLAGS) -> list[str]:
    """Changes that would make the model fit, cheapest first, as ``flags`` spells them."""
    out: list[str] = []
    tp = config.tensor_parallel_size * 2
    while tp <= profile.scale_up.chips:
        if plan_memory(model, profile, replace(config, tensor_parallel_size=tp)).fits:
            out.append(f"{flags.tensor_parallel} {tp} (up to {profile.scale_up.chips} chips per node)")
            break
        tp *= 2
    fp8 = replace(config, kv_cache_dtype="fp8")
    share = kv_bytes_per_token(model, fp8) / kv_bytes_per_token(model, config)
    if share < 1 and plan_memory(model, profile, fp8).fits:  # never from MXFP4 up to FP8
        out.append(f"{flags.fp8_kv} ({'half' if share == 0.5 else f'{share:.2f}x'} the KV bytes per token)")
    plan = plan_memory(model, profile, config)
    room = longest_sequence(served_model(model, config), config, plan.kv_budget_bytes, plan.max_model_len)
    if 0 < room < plan.max_model_len:
        out.append(f"{flags.max_len} {room} (the longest sequence the KV budget holds)")
    if not out:
        out.append("a profile with more HBM (see `maia-serving profiles`)")
    return out


def require_fit(
    model: ModelShape, profile: DeviceProfile, config: ServingConfig, flags: Flags = VLLM_FLAGS
) -> MemoryPlan:
    """The memory plan, or NotEnoughMemory with the numbers and what would fit."""
    plan = plan_memory(model, profile, config)
    if not plan.fits:
        raise NotEnoughMemory(plan, suggest(model, profile, config, flags))
    return plan
