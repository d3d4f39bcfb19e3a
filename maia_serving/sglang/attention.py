"""MaiaAttnBackend: SGLang attention over its token-to-KV pool with the maia numerics.

SGLang keeps one ``[slots, kv_heads, head_dim]`` buffer per layer for K and for V (uint8
codes for an FP8 cache) and maps each request's tokens to slots in ``req_to_token``. With
pages of ``page_size`` slots that is exactly the paged layout of ``maia_serving.ops``
(``[num_pages, page_size, kv_heads, head_dim]``, block table = page numbers), so this
backend is a view plus a call: the same kernels and torch references as the vLLM
backend, with no second copy of the numerics. Extend (prefill, chunked prefill, prefix
hits) and decode differ only in how many query rows each request has. A layer with
SGLang's ``sliding_window_size`` S (exclusive: S keys before the query's own) sees the
last S + 1 keys, the ops' window. A block-scaled cache (MAIA_SERVING_KV_CACHE_DTYPE) lives in
``kv_pool.BlockScaledKVPool``: uint8 rows of ``ops.mx.head_bytes`` per head.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

import torch
from sglang.srt.layers.attention.base_attn_backend import AttentionBackend
from sglang.srt.mem_cache.base_swa_memory_pool import BaseSWAKVPool

from maia_serving import envs, ops
from maia_serving.ops import native
from maia_serving.ops.batch import KvQuant, PagedBatch
from maia_serving.ops.host import plan_paged_attention
from maia_serving.ops.mx import MX_FORMATS
from maia_serving.serving import kv_scales

logger = logging.getLogger(__name__)


@dataclass
class MaiaForwardMetadata:
    """One step's batch in the ops' vocabulary, shared by every layer: seen by each sliding window (a model may
    mix windowed and full layers) as a PagedBatch of its own, with the torch path's plan, made once a step by
    the window's first layer."""

    batch: PagedBatch
    num_tokens: int
    torch_path: bool  # the torch ops (not the native kernel) plan their index tensors once per step and window
    windows: dict[int | None, PagedBatch] = field(default_factory=dict)

    def for_window(self, window: int | None, num_heads: int, page_size: int) -> PagedBatch:
        batch = self.windows.get(window)
        if batch is None:
            batch = self.batch.windowed(window)
            if self.torch_path:
                batch = replace(batch, plan=plan_paged_attention(batch, self.num_tokens, num_heads, page_size))
            self.windows[window] = batch
        return batch


def kv_cache_dtype_name(dtype: torch.dtype) -> str:
    """SGLang's KV dtype in the ops' vocabulary ("auto" for an unquantized cache)."""
    for fmt in ops.FP8_FORMATS.values():
        if fmt.torch_dtype == dtype:
            return f"fp8_{fmt.name}"
    return "auto"


def layer_scale(layer, kind: str) -> float | None:
    """The per-tensor scale SGLang loaded into the layer (checkpoint or scales file)."""
    value = getattr(layer, f"{kind}_scale_float", None)
    if value is None:
        value = getattr(layer, f"{kind}_scale", None)
    if isinstance(value, torch.Tensor):
        value = float(value.reshape(-1)[0])
    return float(value) if value is not None and value > 0 else None


def layer_window(layer) -> int | None:
    """The ops' window (keys seen, the query's own included) of SGLang's exclusive
    ``sliding_window_size`` (-1 or None: none)."""
    size = getattr(layer, "sliding_window_size", None)
    return None if size is None or size < 0 else size + 1


def config_window(hf_config: dict) -> int | None:
    """The sliding window a model's config asks for (Qwen2's is off unless ``use_sliding_window``)."""
    return hf_config.get("sliding_window") if hf_config.get("use_sliding_window", True) else None


def dropped_window_warning(config: int, layer_windows: set[int | None]) -> str | None:
    """What to tell a user whose model code gave no layer the config's window (SGLang 0.5.23's
    Llama, Mistral and Mixtral classes, on every attention backend)."""
    if layer_windows != {None}:
        return None
    return (
        f"the model's config.json sets sliding_window={config}, but SGLang's code for this architecture "
        "gives no layer a window: every query attends over all its keys, so the outputs are full attention's "
        "(serve it with vLLM for the window), while the emulated figures price the window"
    )


class MaiaAttnBackend(AttentionBackend):
    """Registered with SGLang as ``--attention-backend maia``, the default on ``--device maia``."""

    def __init__(self, model_runner) -> None:
        super().__init__()
        self.device = model_runner.device
        self.req_to_token_pool = model_runner.req_to_token_pool
        self.token_to_kv_pool = model_runner.token_to_kv_pool
        if isinstance(self.token_to_kv_pool, BaseSWAKVPool):
            raise NotImplementedError(
                "the maia attention backend reads one KV pool, not SGLang's hybrid "
                "full/sliding-window pools; serve this model with --disable-hybrid-swa-memory"
            )
        self.page_size = model_runner.page_size
        block_scaled = envs.get(envs.MAIA_SERVING_KV_CACHE_DTYPE)
        self.kv_cache_dtype = block_scaled or kv_cache_dtype_name(model_runner.kv_cache_dtype)
        self.fp8 = self.kv_cache_dtype.startswith("fp8")
        # NVFP4 keeps a tensor scale beside its E4M3 block scales; the MX formats keep none.
        self.tensor_scaled = bool(block_scaled) and MX_FORMATS[block_scaled].scale == "e4m3"
        self.model_dir = model_runner.model_config.model_path
        # (layers, KV heads) of the whole model: the sidecar is checked against them.
        hf_config = model_runner.model_config.hf_config.to_dict()
        self.model_dims = kv_scales.model_dims(hf_config)
        self.config_window = config_window(hf_config)
        # The windows the first forward pass's layers bring, checked against the config's once it ran.
        self._layer_windows: set[int | None] | None = set() if self.config_window else None
        self.forward_metadata: MaiaForwardMetadata | None = None
        self._scales: dict[int, tuple[torch.Tensor | float, torch.Tensor | float]] = {}
        self._warned_default_scale = False

    # -- per step --------------------------------------------------------------------
    def init_forward_metadata(self, forward_batch) -> None:
        if self._layer_windows:  # a forward pass has run
            if warning := dropped_window_warning(self.config_window, self._layer_windows):
                logger.warning(warning)
            self._layer_windows = None
        mode = forward_batch.forward_mode
        if mode.is_idle() or forward_batch.batch_size == 0:
            self.forward_metadata = None
            return
        seq_lens_cpu = forward_batch.seq_lens_cpu
        if seq_lens_cpu is None:
            seq_lens_cpu = forward_batch.seq_lens.cpu()
        if mode.is_decode():
            q_lens = torch.ones_like(seq_lens_cpu)
        elif mode.is_extend():
            q_lens = torch.tensor(forward_batch.extend_seq_lens_cpu, dtype=seq_lens_cpu.dtype)
        else:
            raise NotImplementedError(f"the maia attention backend does not run {mode.name} batches")
        max_len = int(seq_lens_cpu.max())
        pages = -(-max_len // self.page_size)
        device = forward_batch.seq_lens.device
        torch_path = ops.kernel_backend(device) == "torch"
        native_path = torch_path and native.module() is not None
        # The C++ host kernel reads int64 indices: made so here once a step, not in every layer.
        index = torch.int64 if native_path else torch.int32
        rows = self.req_to_token_pool.req_to_token[forward_batch.req_pool_indices]
        # Slot s of a request lives in page s // page_size; pages are page-aligned runs.
        block_tables = (rows[:, : pages * self.page_size : self.page_size] // self.page_size).to(index)
        query_start_loc = torch.zeros(len(q_lens) + 1, dtype=index)
        torch.cumsum(q_lens, 0, out=query_start_loc[1:])
        seq_lens = forward_batch.seq_lens.to(index)
        query_start_loc = query_start_loc.to(device)
        batch = PagedBatch(block_tables, seq_lens, query_start_loc, int(q_lens.max()))
        self.forward_metadata = MaiaForwardMetadata(batch, int(q_lens.sum()), torch_path and not native_path)

    # -- per layer -------------------------------------------------------------------
    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache: bool = True):
        return self._forward(q, k, v, layer, forward_batch, save_kv_cache)

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache: bool = True):
        return self._forward(q, k, v, layer, forward_batch, save_kv_cache)

    def _forward(self, q, k, v, layer, forward_batch, save_kv_cache: bool) -> torch.Tensor:
        self._check_layer(layer)
        num_heads, num_kv_heads, head_dim = layer.tp_q_head_num, layer.tp_k_head_num, layer.qk_head_dim
        key_cache, value_cache = self._caches(layer)
        kv = KvQuant(self.kv_cache_dtype, *self._layer_scales(layer))
        if save_kv_cache and k is not None and v is not None:
            ops.reshape_and_cache(
                k.view(-1, num_kv_heads, head_dim),
                v.view(-1, num_kv_heads, layer.v_head_dim),
                key_cache,
                value_cache,
                forward_batch.out_cache_loc,
                kv,
            )
        query = q.reshape(-1, num_heads, head_dim)
        out = torch.empty_like(query)
        meta = self.forward_metadata
        if meta is None:
            return out.view(-1, num_heads * head_dim)
        window = layer_window(layer)
        if self._layer_windows is not None:
            self._layer_windows.add(window)
        batch = meta.for_window(window, num_heads, self.page_size)
        ops.paged_attention(query, key_cache, value_cache, batch, layer.scaling, kv, out=out)
        return out.view(-1, num_heads * head_dim)

    def _caches(self, layer) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's K and V buffers viewed as pages (uint8 codes when FP8)."""
        pool = self.token_to_kv_pool
        caches = []
        for buf in (pool.get_key_buffer(layer.layer_id), pool.get_value_buffer(layer.layer_id)):
            if self.fp8:
                buf = buf.view(torch.uint8)
            caches.append(buf.view(-1, self.page_size, *buf.shape[1:]))
        return caches[0], caches[1]

    def _layer_scales(self, layer) -> tuple[torch.Tensor | float | None, torch.Tensor | float | None]:
        """Per-head scales from the sidecar when asked for, else the layer's per-tensor ones; NVFP4's
        tensor scales from the sidecar; none for the MX formats."""
        if not (self.fp8 or self.tensor_scaled):
            return (None, None) if self.kv_cache_dtype in MX_FORMATS else (1.0, 1.0)
        cached = self._scales.get(layer.layer_id)
        if cached is not None:
            return cached
        mode = kv_scales.scale_mode()
        if self.tensor_scaled or mode == "per_head":
            from sglang.srt.distributed.parallel_state import (
                get_tensor_model_parallel_rank,
                get_tensor_model_parallel_world_size,
            )

            read = kv_scales.nvfp4_tensor_scales if self.tensor_scaled else kv_scales.per_head_scales
            k, v = read(
                self.model_dir,
                *self.model_dims,
                layer.layer_id,
                layer.tp_k_head_num,
                get_tensor_model_parallel_rank(),
                get_tensor_model_parallel_world_size(),
            )
            scales = (k.to(self.device), v.to(self.device)) if isinstance(k, torch.Tensor) else (k, v)
        else:
            k, v = layer_scale(layer, "k"), layer_scale(layer, "v")
            if k is None or v is None:
                if not self._warned_default_scale:
                    logger.warning(kv_scales.missing_scales_warning(self.kv_cache_dtype, self.model_dir))
                    self._warned_default_scale = True
                k, v, mode = k or 1.0, v or 1.0, "default 1.0"
            else:
                mode = "per_tensor"
            scales = (k, v)
        if not self._scales:
            logger.info(
                "Maia KV cache %s: %s scales, layer %d: k=%s v=%s",
                self.kv_cache_dtype,
                mode,
                layer.layer_id,
                kv_scales.show_scales(scales[0]),
                kv_scales.show_scales(scales[1]),
            )
        self._scales[layer.layer_id] = scales
        return scales

    @staticmethod
    def _check_layer(layer) -> None:
        if layer.is_cross_attention or layer.qk_head_dim != layer.v_head_dim:
            raise NotImplementedError(
                "the maia attention backend serves decoder self-attention with equal K and V head sizes only"
            )
        if layer.logit_cap:
            raise NotImplementedError(
                "the maia attention backend has no logit soft-cap; serve this model with another --attention-backend"
            )

    def support_triton(self) -> bool:
        return False
