"""The `maia` platform for SGLang: tensors on the host CPU, the emulator on top.

``device_type`` is "cpu" and ``apply_server_args_defaults`` maps ``--device maia`` to
"cpu", so SGLang's model runner, pools and samplers run unchanged on the host, while
``device_name`` stays "maia" and the KV pool is sized as the emulated HBM would hold it.
"""

from __future__ import annotations

import logging
import os

from sglang.srt.platforms.cpu import CpuDeviceMixin
from sglang.srt.platforms.device_mixin import PlatformEnum
from sglang.srt.platforms.interface import PlatformCapabilities, SRTPlatform

from maia_serving import envs
from maia_serving.sglang import ATTENTION_BACKEND as BACKEND_NAME
from maia_serving.sglang import ledger

logger = logging.getLogger(__name__)


class MaiaSRTPlatform(CpuDeviceMixin, SRTPlatform):
    _enum = PlatformEnum.OOT
    device_name: str = "maia"
    device_type: str = "cpu"
    # The host runs no Triton and captures no graphs: SGLang takes its torch-native paths.
    capabilities = PlatformCapabilities()

    def get_device(self, device_id: int = 0) -> str:
        """A string, as SGLang's argument defaults split it (CpuDeviceMixin returns a torch.device)."""
        return "cpu"

    def get_device_name(self, device_id: int = 0) -> str:
        return "maia (emulated on the host CPU)"

    def get_default_attention_backend(self) -> str:
        return BACKEND_NAME

    def get_kv_pool_cls(self, *, kind: str) -> type | None:
        """Packed uint8 rows for a block-scaled KV cache; SGLang's own pools otherwise."""
        if kind != "mha" or not envs.get(envs.MAIA_SERVING_KV_CACHE_DTYPE):
            return None
        from maia_serving.sglang.kv_pool import BlockScaledKVPool

        return BlockScaledKVPool

    def apply_server_args_defaults(self, server_args) -> None:
        """Host tensors, our attention backend, and a KV pool sized by the emulated HBM."""
        # In the launcher, before any engine process: bad settings and missing engine
        # surfaces stop the server now, by name.
        envs.check_all("sglang")
        ledger.require_surfaces()
        if server_args.device not in (None, "maia", "cpu"):
            raise ValueError(
                f"the maia platform is active but --device is {server_args.device!r}; "
                "pass --device maia or unset SGLANG_PLATFORM/MAIA_SERVING_DEVICE"
            )
        server_args.device = "cpu"
        if server_args.attention_backend in (None, BACKEND_NAME):
            server_args.attention_backend = BACKEND_NAME
        else:
            logger.warning(
                "--attention-backend %s on --device maia: the maia numerics (FP8 scales, "
                "per-head) and kernels are not used.",
                server_args.attention_backend,
            )
        if server_args.sampling_backend is None:
            server_args.sampling_backend = "pytorch"
        # One step at a time: the host has nothing to overlap, and each step is charged
        # to the emulator with its own batch (maia_serving.sglang.stepping).
        server_args.disable_overlap_schedule = True
        # An idle scheduler otherwise polls its sockets flat out, taking a host core
        # from every other engine process (seen: 80-90% of a core per idle server).
        server_args.sleep_on_idle = True
        server_args.cuda_graph_config = _no_graphs(server_args.cuda_graph_config)
        _apply_block_scaled_kv(server_args)
        _validate_kv_scales(server_args)
        _size_kv_pool(server_args)


def _no_graphs(config):
    """Graph capture off for decode and prefill: the host runs eagerly."""
    from sglang.srt.model_executor.cuda_graph_config import Backend, Phase, with_phase

    config = with_phase(config, Phase.DECODE, backend=Backend.DISABLED)
    return with_phase(config, Phase.PREFILL, backend=Backend.DISABLED)


def _apply_block_scaled_kv(server_args) -> None:
    """A block-scaled KV cache: SGLang's own ``--kv-cache-dtype mxfp8`` / ``nvfp4`` (meant for its GPU
    kernels) or MAIA_SERVING_KV_CACHE_DTYPE for any of them; SGLang's dtype stays auto and the
    variable, inherited by the scheduler processes, tells the pool and the backend."""
    from maia_serving.formats.precision import BLOCK_SCALED_KV_FORMATS

    requested = str(server_args.kv_cache_dtype or "auto")
    fmt = envs.get(envs.MAIA_SERVING_KV_CACHE_DTYPE)
    if requested in BLOCK_SCALED_KV_FORMATS:
        if fmt and fmt != requested:
            raise ValueError(f"--kv-cache-dtype {requested} but {envs.MAIA_SERVING_KV_CACHE_DTYPE}={fmt}: give one")
        fmt = requested
        os.environ[envs.MAIA_SERVING_KV_CACHE_DTYPE] = fmt
        server_args.kv_cache_dtype = "auto"
    elif fmt and requested != "auto":
        raise ValueError(
            f"{envs.MAIA_SERVING_KV_CACHE_DTYPE}={fmt} and --kv-cache-dtype {requested} both name a "
            "KV cache format: give one"
        )
    if fmt and server_args.attention_backend != BACKEND_NAME:
        raise ValueError(
            f"a {fmt} KV cache needs the maia attention backend, not --attention-backend "
            f"{server_args.attention_backend}"
        )
    if fmt:
        logger.info(
            "Maia KV cache: %s (%s), stored as packed bytes; SGLang's kv cache dtype stays auto.",
            fmt,
            envs.MAIA_SERVING_KV_CACHE_DTYPE,
        )


def _validate_kv_scales(server_args) -> None:
    """FP8 without calibrated scales runs, but never quietly; a scales file must exist, parse and
    cover every layer, or the server stops (SGLang itself would log and serve with 1.0)."""
    from maia_serving.serving import kv_scales
    from maia_serving.sglang.device import hf_config, kv_cache_dtype

    cache_dtype = kv_cache_dtype(server_args)
    model = server_args.model_path
    if cache_dtype == "nvfp4":
        kv_scales.check_nvfp4_scales(model, hf_config(model))
    if not cache_dtype.startswith("fp8"):
        return
    config = hf_config(model)
    path = server_args.quantization_param_path if kv_scales.scale_mode() != "per_head" else None
    if path:
        if cache_dtype != "fp8_e4m3":
            raise ValueError(
                f"--quantization-param-path is read by SGLang for fp8_e4m3 only, not {cache_dtype}; "
                "use a calibrated checkpoint (its kv_cache_scheme) or MAIA_SERVING_KV_SCALES=per_head"
            )
        if kv_scales.checkpoint_has_kv_scales(config):
            # SGLang 0.5.23 then assigns a float to the layer's k_scale parameter and fails.
            raise ValueError(
                f"{model} already carries calibrated KV scales (kv_cache_scheme); serve it without "
                "--quantization-param-path, or pass the scales file with the original model"
            )
    kv_scales.check_fp8_scales(cache_dtype, model, config, path)


def _size_kv_pool(server_args) -> None:
    """Size the KV pool in tokens as the emulated HBM would hold them (of the proxy shape, if one is
    priced), clamped to what the host gives the served model and to --max-total-tokens."""
    from maia_serving.emulator.memory import SGLANG_FLAGS
    from maia_serving.serving.kv_sizing import size_engine_kv
    from maia_serving.sglang.device import build_device, host_plan

    device = build_device(server_args)  # raises NotEnoughMemory with what would fit
    served = host_plan(server_args, device)
    limit = int(server_args.max_total_tokens) if server_args.max_total_tokens else None
    server_args.max_total_tokens = size_engine_kv(
        device, served, envs.MAIA_SERVING_HOST_KV_GIB, SGLANG_FLAGS, logger, limit
    )
