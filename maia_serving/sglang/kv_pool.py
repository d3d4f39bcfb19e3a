"""The KV pool of a block-scaled cache (MXFP8/6/4, NVFP4) on --device maia.

SGLang's own pool stores each head's K and V rows in the model's dtype (or one FP8 byte per
element). A block-scaled row is ``ops.mx.head_bytes`` uint8 bytes, elements and block scales
together, so this pool is SGLang's with the row sized in bytes: the maia attention backend
reads and writes it through the same ops as vLLM's pages, and the host holds what the format
holds, no more. SGLang builds it through the platform's ``get_kv_pool_cls`` hook.
"""

from __future__ import annotations

import torch
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

from maia_serving import envs
from maia_serving.ops.mx import head_bytes


class BlockScaledKVPool(MHATokenToKVPool):
    """MHATokenToKVPool with uint8 rows of ``head_bytes`` per head (MAIA_SERVING_KV_CACHE_DTYPE)."""

    def __init__(self, size: int, **kwargs) -> None:
        fmt = envs.get(envs.MAIA_SERVING_KV_CACHE_DTYPE)
        head_dim = kwargs["head_dim"]
        if kwargs.get("v_head_dim") not in (None, head_dim):
            raise NotImplementedError(f"a {fmt} KV cache on --device maia needs equal K and V head sizes")
        row = head_bytes(fmt, head_dim)
        super().__init__(size, **{**kwargs, "dtype": torch.uint8, "head_dim": row, "v_head_dim": row})
