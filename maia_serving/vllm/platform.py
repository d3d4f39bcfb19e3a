"""The `maia` platform for vLLM: vLLM's CPU platform underneath, the emulator on top.

``device_type`` stays "cpu" so every ``is_cpu()`` path (CPU worker, model runner,
custom ops) runs unchanged on the host; ``device_name`` is "maia".
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vllm.logger import init_logger
from vllm.platforms.cpu import CpuPlatform

from maia_serving.vllm import envs

if TYPE_CHECKING:
    from vllm.config import VllmConfig

# A child of vLLM's logger, so our lines share its handlers and format.
logger = init_logger("vllm.maia_serving")

SCHEDULER_CLS = "maia_serving.vllm.scheduler.MaiaScheduler"


class MaiaPlatform(CpuPlatform):
    device_name: str = "maia"
    device_type: str = "cpu"

    @classmethod
    def get_device_name(cls, device_id: int = 0) -> str:
        return "maia (emulated on the host CPU)"

    @classmethod
    def pre_register_and_update(cls, parser=None) -> None:
        """Give `vllm serve` back its ``--device`` flag (vLLM 0.32 dropped it)."""
        if parser is None or any("--device" in a.option_strings for a in parser._actions):
            return
        parser.add_argument(
            "--device",
            choices=["maia"],
            default="maia",
            help="Run on the emulated Maia device (maia-serving). The profile comes from "
            "--additional-config '{\"maia_profile\": NAME}' or MAIA_SERVING_PROFILE.",
        )

    @classmethod
    def check_and_update_config(cls, vllm_config: VllmConfig) -> None:
        super().check_and_update_config(vllm_config)
        if vllm_config.model_config is None:
            return
        _apply_profile(vllm_config)
        _apply_kv_cache_size(vllm_config)
        _apply_scheduler(vllm_config)


def _apply_profile(vllm_config: VllmConfig) -> None:
    """Record the resolved profile in the config, so every engine process agrees."""
    vllm_config.additional_config["maia_profile"] = envs.profile_name(vllm_config.additional_config)


def _apply_kv_cache_size(vllm_config: VllmConfig) -> None:
    """Size the KV cache as the emulated HBM would, clamped to what the host gives."""
    from maia_serving.emulator.units import format_bytes
    from maia_serving.vllm.device import build_device

    device = build_device(vllm_config)  # raises NotEnoughMemory with what would fit
    plan = device.plan
    emulated = plan.num_blocks * plan.config.block_size * plan.kv_bytes_per_token
    host_cap = envs.host_kv_cap_bytes()
    vllm_config.cache_config.kv_cache_memory_bytes = int(min(emulated, host_cap))
    logger.info(
        "Maia KV cache: emulated %s holds %d blocks (%d tokens, %.2f GiB) after %s of "
        "weights; the host gives at most %.2f GiB (%s), so the engine gets %.2f GiB.",
        plan.profile, plan.num_blocks, plan.kv_tokens, emulated / 2**30,
        format_bytes(plan.weight_bytes),
        host_cap / 2**30, envs.VLLM_CPU_KVCACHE_SPACE,
        vllm_config.cache_config.kv_cache_memory_bytes / 2**30,
    )


def _apply_scheduler(vllm_config: VllmConfig) -> None:
    """Charge every step to the emulator through our Scheduler subclass."""
    sched = vllm_config.scheduler_config
    if sched.scheduler_cls not in (None, SCHEDULER_CLS):
        logger.warning("A custom scheduler (%s) is set: emulated step times are off.",
                       sched.scheduler_cls)
        return
    sched.scheduler_cls = SCHEDULER_CLS
