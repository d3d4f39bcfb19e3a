"""Triton kernels, installed as maia_serving.ops.triton.

One file per op: a ``@triton.jit`` kernel plus a wrapper that checks its arguments and
launches it. Each wrapper has the signature of its plain-torch reference in
``maia_serving.ops.fp8``; call them through ``maia_serving.ops``, which picks the kernel or
the reference per device. ``reshape_and_cache_mx`` (the block-scaled MX/NVFP4 formats, any
Triton device: integer code arithmetic, no FP8 types) follows ``maia_serving.ops.mx``.

FP8 caches need a GPU with native FP8 conversions (CUDA sm_89 or newer: Ada, Hopper,
Blackwell); bf16/fp16/fp32 caches run wherever Triton does. tests/unit/ops/triton_kernels checks the
kernels in Triton's interpreter and compiles them for sm_90.
"""

from .kv_absmax import kv_absmax
from .mx_cache import reshape_and_cache_mx
from .paged_attention import paged_attention
from .reshape_and_cache import reshape_and_cache

__all__ = ["kv_absmax", "paged_attention", "reshape_and_cache", "reshape_and_cache_mx"]
