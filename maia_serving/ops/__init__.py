"""KV-cache ops for the maia device: Triton kernels with plain-torch references.

Each op below runs either the Triton kernel from ``maia_serving.ops.triton`` or the reference
from ``maia_serving.ops.fp8`` (same arguments, same numerics); a ``kv_cache_dtype`` that names a
block-scaled format of ``maia_serving.ops.mx`` (mxfp8, mxfp6, mxfp6_e2m3, mxfp4, nvfp4) goes to
``kernels.reshape_and_cache_mx`` or ``ops.host.reshape_and_cache_mx_host`` (the reference's bytes, in
C++ where ``ops.native`` is built) for writes, and to the same
attention entry points, which decode it; any other name meets the FP8 path's checks and errors.
The choice is made on every call from the environment variable ``MAIA_SERVING_KERNELS``:

- ``auto`` (default): Triton when the tensors live on a CUDA (or ROCm) device, or on the CPU
  when ``TRITON_INTERPRET`` is true; the torch reference otherwise (a plain CPU host).
- ``triton``: always Triton. On a CPU host this needs ``TRITON_INTERPRET=1`` in the
  environment before the process imports Triton (it is read when ``@triton.jit`` decorates
  a function, ours and ``triton.language``'s alike).
- ``torch``: always the torch path: ``ops.host.paged_attention_host`` (the reference's
  numerics, batched over sequences) for attention, the references for the rest.

Note: Triton 3.9's interpreter converts fp32 to FP8 and bf16 inexactly; the kernel tests
patch it (tests/unit/ops/triton_kernels/conftest.py). Serve with the torch reference on CPU hosts.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from maia_serving import envs
from maia_serving.ops.batch import UNQUANTIZED, KvQuant, PagedBatch
from maia_serving.ops.fp8 import (
    FP8_FORMATS,
    Fp8Format,
    check_cache_dtype,
    dequantize_fp8_ref,
    get_fp8_format,
    kv_absmax_ref,
    paged_attention_ref,
    quantize_fp8_ref,
    reshape_and_cache_ref,
    resolve_kv_cache_dtype,
    scale_tensor,
    torch_dtype,
)
from maia_serving.ops.mx import MX_FORMATS

KERNELS_ENV = envs.MAIA_SERVING_KERNELS
_TRUE = ("1", "true", "on", "yes")

__all__ = [
    "FP8_FORMATS",
    "KERNELS_ENV",
    "MX_FORMATS",
    "Fp8Format",
    "KvQuant",
    "PagedBatch",
    "check_cache_dtype",
    "dequantize_fp8_ref",
    "get_fp8_format",
    "kernel_backend",
    "kv_absmax",
    "kv_absmax_ref",
    "paged_attention",
    "paged_attention_ref",
    "quantize_fp8_ref",
    "reshape_and_cache",
    "reshape_and_cache_ref",
    "resolve_kv_cache_dtype",
    "scale_tensor",
    "torch_dtype",
]


@functools.cache
def _has_triton() -> bool:
    """Looked up once: a find_spec per call costs more than a decode step's attention."""
    return importlib.util.find_spec("triton") is not None


def kernel_backend(device: torch.device) -> str:
    """Which implementation, "triton" or "torch", runs for tensors on ``device``."""
    return _kernel_backend(os.environ.get(KERNELS_ENV, ""), os.environ.get("TRITON_INTERPRET", ""), device.type)


@functools.lru_cache(maxsize=64)  # asked on every layer call; parsing the setting each time cost more than the op
def _kernel_backend(choice: str, interpret: str, device_type: str) -> str:
    choice = envs.SETTINGS[KERNELS_ENV].read({KERNELS_ENV: choice})
    if choice != "auto":
        return choice
    if not _has_triton():
        return "torch"
    if device_type == "cuda":
        return "triton"
    return "triton" if device_type == "cpu" and interpret.strip().lower() in _TRUE else "torch"


def reshape_and_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    kv: KvQuant = UNQUANTIZED,
) -> None:
    """Write key/value into the paged caches in place; see ``reshape_and_cache_ref`` (and
    ``reshape_and_cache_mx_ref`` for the block-scaled formats)."""
    args = (key, value, key_cache, value_cache, slot_mapping, kv.dtype, kv.k_scale, kv.v_scale)
    block_scaled = kv.dtype in MX_FORMATS
    if kernel_backend(key.device) == "triton":
        from maia_serving.ops import triton as kernels

        (kernels.reshape_and_cache_mx if block_scaled else kernels.reshape_and_cache)(*args)
    else:
        from maia_serving.ops import host

        (host.reshape_and_cache_mx_host if block_scaled else host.reshape_and_cache_host)(*args)


def paged_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    batch: PagedBatch,
    scale: float,
    kv: KvQuant = UNQUANTIZED,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Paged attention of ``batch``'s varlen queries; see ``paged_attention_ref`` (``paged_attention_mx_ref``
    for the block-scaled formats: both implementations decode them while reading). ``out`` receives the
    result when given and is returned."""
    if kernel_backend(query.device) == "triton":
        from maia_serving.ops import triton as kernels

        # The launch stays flat, as its reference's signature is.
        return kernels.paged_attention(
            query,
            key_cache,
            value_cache,
            batch.block_tables,
            batch.seq_lens,
            batch.query_start_loc,
            scale,
            kv.dtype,
            kv.k_scale,
            kv.v_scale,
            batch.causal,
            max_query_len=batch.max_query_len,
            out=out,
            sliding_window=batch.sliding_window,
        )
    from maia_serving.ops.host import paged_attention_host

    return paged_attention_host(query, key_cache, value_cache, batch, scale, kv, out=out)


def kv_absmax(x: torch.Tensor) -> torch.Tensor:
    """Per-KV-head ``max |x|`` as float32 ``[num_kv_heads]``; see ``kv_absmax_ref``."""
    if kernel_backend(x.device) == "triton":
        from maia_serving.ops import triton as kernels

        return kernels.kv_absmax(x)
    return kv_absmax_ref(x)
