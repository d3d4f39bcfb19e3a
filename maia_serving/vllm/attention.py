"""MaiaAttentionBackend: vLLM attention over a paged KV cache in BF16, FP8 or a block-scaled format.

Writes each step's keys and values into the cache (quantizing for FP8), then
attends every query over the cache it just wrote, so prefill, decode, chunked
prefill and prefix-cache hits all read the same (possibly quantized) pages.
Sliding-window layers see the last ``sliding_window`` keys, their own included, as
vLLM's other backends do (flash-attn's ``(W - 1, 0)``). The
numerics are maia_serving.ops: the Triton kernels where a Triton device is present,
their torch references on a host (``MAIA_SERVING_KERNELS`` forces either).

Cache page layout (per layer, vLLM's logical ``[blocks, kv_heads, block_size, 2 *
head_size]``): the content axis holds a token's key then its value, so the key and
value caches are equal-strided views ``[blocks, block_size, kv_heads, head_size]``. A block-scaled
cache (MXFP8/6/4, NVFP4: MAIA_SERVING_KV_CACHE_DTYPE, recorded by the platform) stores uint8 rows of
``ops.mx.head_bytes`` per head in the same layout: ``customize_spec`` tells vLLM the packed page
size, so its block count, and the emulator's, count the scales and no more.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch
from vllm.config import VllmConfig, get_current_vllm_config
from vllm.logger import init_logger
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
)
from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend
from vllm.v1.kv_cache_interface import AttentionSpec, KVCacheLayout

from maia_serving import envs, ops
from maia_serving.formats import precision
from maia_serving.ops import native
from maia_serving.ops.batch import KvQuant, PagedBatch
from maia_serving.ops.host import plan_paged_attention
from maia_serving.ops.mx import MX_FORMATS, head_bytes
from maia_serving.serving import kv_scales as scales

logger = init_logger("vllm.maia_serving")

# vLLM's own cache dtypes MAIA_ATTN stores: BF16 or FP8 (every spelling in precision.py's vocabulary); the
# block-scaled formats come through MAIA_SERVING_KV_CACHE_DTYPE and customize_spec.
KV_CACHE_FORMATS = ("bf16", "fp8_e4m3", "fp8_e5m2")


class MaiaAttentionBackend(AttentionBackend):
    forward_includes_kv_cache_update: bool = True
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.bfloat16, torch.float16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list[str]] = [
        name
        for name in precision.kv_cache_spellings()
        if name == "auto" or precision.dtype(name).name in KV_CACHE_FORMATS
    ]

    @staticmethod
    def get_name() -> str:
        return "MAIA_ATTN"

    @classmethod
    def customize_spec(cls, spec: AttentionSpec) -> AttentionSpec:
        """A block-scaled cache's page: uint8, ``head_bytes`` for K and for V per head and token."""
        fmt = envs.get(envs.MAIA_SERVING_KV_CACHE_DTYPE)
        if not fmt or spec.state_content_bytes is not None:
            return spec
        if spec.head_size_v != spec.head_size:
            raise NotImplementedError(f"a {fmt} KV cache on --device maia needs equal K and V head sizes")
        return replace(spec, dtype=torch.uint8, state_content_bytes=2 * head_bytes(fmt, spec.head_size))

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list[int | MultipleOf]:
        return [MultipleOf(16)]

    @classmethod
    def supported_kv_cache_layouts(cls) -> tuple[KVCacheLayout, ...]:
        return (KVCacheLayout.LBHNC,)

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return True

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    @staticmethod
    def get_impl_cls() -> type[MaiaAttentionImpl]:
        return MaiaAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[MaiaMetadataBuilder]:
        return MaiaMetadataBuilder


@dataclass
class MaiaAttentionMetadata:
    num_actual_tokens: int
    slot_mapping: torch.Tensor  # [num_actual_tokens]
    batch: PagedBatch  # the step's batch for its KV cache group's window, with the torch path's plan


class MaiaMetadataBuilder(AttentionMetadataBuilder[MaiaAttentionMetadata]):
    def __init__(
        self, kv_cache_spec: AttentionSpec, layer_names: list[str], vllm_config: VllmConfig, device: torch.device
    ) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.block_size = kv_cache_spec.block_size
        # One window per KV cache group (vLLM groups sliding-window layers apart); a layer of
        # another window plans for itself.
        self.sliding_window = getattr(kv_cache_spec, "sliding_window", None)
        self.num_heads = vllm_config.model_config.get_num_attention_heads(vllm_config.parallel_config)
        self.device = device

    def build(
        self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata, fast_build: bool = False
    ) -> MaiaAttentionMetadata:
        m = common_attn_metadata
        num_seqs = m.num_reqs
        query_start_loc = m.query_start_loc[: num_seqs + 1]
        seq_lens = m.seq_lens[:num_seqs]
        block_table = m.block_table_tensor[:num_seqs]
        torch_path = ops.kernel_backend(self.device) == "torch"
        native_path = torch_path and native.module() is not None
        if native_path:
            # The C++ kernel reads int64 (vLLM keeps int32): converted once a step, not in every layer.
            block_table, seq_lens, query_start_loc = block_table.long(), seq_lens.long(), query_start_loc.long()
        batch = PagedBatch(block_table, seq_lens, query_start_loc, m.max_query_len, self.sliding_window)
        if torch_path and not native_path:  # the torch ops' index tensors, once a step
            plan = plan_paged_attention(batch, m.num_actual_tokens, self.num_heads, self.block_size)
            batch = replace(batch, plan=plan)
        return MaiaAttentionMetadata(m.num_actual_tokens, m.slot_mapping[: m.num_actual_tokens], batch)


def split_kv_cache(kv_cache: torch.Tensor, row: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Key and value views ``[blocks, block_size, kv_heads, row]`` of one layer's pages (``row``:
    head_size elements, or a block-scaled format's head_bytes)."""
    pages = kv_cache.transpose(1, 2)  # [blocks, block_size, kv_heads, 2 * row]
    return pages[..., :row], pages[..., row:]


class MaiaAttentionImpl(AttentionImpl):
    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int,
        alibi_slopes: list[float] | None,
        sliding_window: int | None,
        kv_cache_dtype: str,
        logits_soft_cap: float | None = None,
        attn_type: str = AttentionType.DECODER,
        kv_sharing_target_layer_name: str | None = None,
        sinks: torch.Tensor | None = None,
    ) -> None:
        unsupported = {
            "ALiBi": alibi_slopes is not None,
            "logits soft-capping": bool(logits_soft_cap),
            "attention sinks": sinks is not None,
            "non-decoder attention": attn_type != AttentionType.DECODER,
            "KV sharing across layers": kv_sharing_target_layer_name is not None,
        }
        if missing := [name for name, used in unsupported.items() if used]:
            raise NotImplementedError(
                f"the maia attention backend does not support {', '.join(missing)} yet; "
                "this model cannot run on --device maia"
            )
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads
        self.sliding_window = sliding_window
        config = get_current_vllm_config()
        # The block-scaled format the platform recorded (vLLM's own kv_cache_dtype is then auto).
        self.kv_cache_dtype = config.additional_config.get("maia_kv_cache_dtype") or kv_cache_dtype
        self.kv_sharing_target_layer_name = None
        block_scaled = MX_FORMATS.get(self.kv_cache_dtype)
        self.fp8 = block_scaled is None and ops.resolve_kv_cache_dtype(kv_cache_dtype) is not None
        # NVFP4 keeps a tensor scale beside its E4M3 block scales; the MX formats keep none.
        self.tensor_scaled = block_scaled is not None and block_scaled.scale == "e4m3"
        self.row = head_bytes(block_scaled, head_size) if block_scaled else head_size
        self.model_dir = config.model_config.model if config.model_config else ""
        # (layers, KV heads) of the whole model: the sidecar is checked against them.
        self.model_dims = scales.model_dims(config.model_config.hf_config.to_dict()) if config.model_config else (0, 0)
        self.tp_size = config.parallel_config.tensor_parallel_size
        self._sidecar_scales: tuple[torch.Tensor | float, torch.Tensor | float] | None = None  # per head, or NVFP4's
        self._logged = False

    def _kv(self, layer) -> KvQuant:
        """The cache's format with per-head scales from the sidecar when asked for, else the layer's per-tensor
        ones; NVFP4's tensor scales from the sidecar; none for the MX formats."""
        if not (self.fp8 or self.tensor_scaled):
            unit = None if self.kv_cache_dtype in MX_FORMATS else 1.0
            return KvQuant(self.kv_cache_dtype, unit, unit)
        if self.tensor_scaled or scales.scale_mode() == "per_head":
            if self._sidecar_scales is None:
                from vllm.distributed import get_tensor_model_parallel_rank

                read = scales.nvfp4_tensor_scales if self.tensor_scaled else scales.per_head_scales
                self._sidecar_scales = read(
                    self.model_dir,
                    *self.model_dims,
                    scales.layer_index(layer.layer_name),
                    self.num_kv_heads,
                    get_tensor_model_parallel_rank(),
                    self.tp_size,
                )
            k, v = self._sidecar_scales
            mode = scales.scale_mode()
        else:
            k, v, mode = layer._k_scale, layer._v_scale, "per_tensor"
        if not self._logged:
            # What the cache is quantized with, once, for the first layer: the proof in the log.
            self._logged = True
            if scales.layer_index(layer.layer_name) == 0:
                logger.info(
                    "Maia KV cache %s: %s scales, layer 0: k=%s v=%s",
                    self.kv_cache_dtype,
                    mode,
                    scales.show_scales(k),
                    scales.show_scales(v),
                )
        return KvQuant(self.kv_cache_dtype, k, v)

    def forward(
        self,
        layer,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: MaiaAttentionMetadata | None,
        output: torch.Tensor,
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("fused output quantization is not supported by the maia backend")
        if attn_metadata is None:  # profiling run
            return output
        n = attn_metadata.num_actual_tokens
        key_cache, value_cache = split_kv_cache(kv_cache, self.row)
        kv = self._kv(layer)
        ops.reshape_and_cache(key[:n], value[:n], key_cache, value_cache, attn_metadata.slot_mapping, kv)
        batch = attn_metadata.batch.windowed(self.sliding_window)
        ops.paged_attention(query[:n], key_cache, value_cache, batch, self.scale, kv, out=output[:n])
        return output


# vLLM's layers look their backend up by name in AttentionBackendEnum; importing this
# module (in every process that builds the model) adds ours once.
if MaiaAttentionBackend.get_name() not in AttentionBackendEnum.__members__:
    register_backend(MaiaAttentionBackend.get_name(), f"{__name__}.MaiaAttentionBackend")
