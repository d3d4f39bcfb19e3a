"""Triton kernels, installed as maia_serving.kernels.

One file per op: a ``@triton.jit`` kernel plus a wrapper that checks its arguments and
launches it. Each wrapper has the signature of its plain-torch reference in
``maia_serving.ops.fp8``; call them through ``maia_serving.ops``, which picks the kernel or
the reference per device.
"""

from .kv_absmax import kv_absmax
from .paged_attention import paged_attention
from .reshape_and_cache import reshape_and_cache

__all__ = ["kv_absmax", "paged_attention", "reshape_and_cache"]
