"""FP8 KV-cache formats, argument checks and plain-torch references.

The references define the numerics that the Triton kernels in ``maia_serving.ops.triton``
must reproduce; they import no engine and run on any torch device.

Quantization: ``q = fp8(clamp(x.float() / scale, -max, +max))`` with round-to-nearest-even,
stored as ``torch.uint8`` (the engines' FP8 cache dtype). Scales are float32, either one per
tensor (a float, a 0-d or a 1-element tensor) or one per KV head (shape ``[num_kv_heads]``).

Special values: NaN stays NaN (its FP8 code keeps the sign); +-inf saturates to +-max through
the clamp, as does every finite value beyond the format's range.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from maia_serving.formats import precision


@dataclass(frozen=True)
class Fp8Format:
    """One FP8 encoding: ``torch_dtype`` is the torch type, ``max_value`` its largest finite."""

    name: str
    torch_dtype: torch.dtype
    max_value: float


# The canonical dtypes of maia_serving.formats.precision (the one vocabulary) as torch holds them.
TORCH_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp8_e4m3": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
    "int8": torch.int8,
}
FP8_FORMATS: dict[str, Fp8Format] = {
    "e4m3": Fp8Format("e4m3", TORCH_DTYPES["fp8_e4m3"], 448.0),
    "e5m2": Fp8Format("e5m2", TORCH_DTYPES["fp8_e5m2"], 57344.0),
}
_FP8_BY_DTYPE = {"fp8_e4m3": FP8_FORMATS["e4m3"], "fp8_e5m2": FP8_FORMATS["e5m2"]}
_UNQUANTIZED_CACHE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of any spelling of a dtype that torch holds natively ("bf16", "bfloat16", "fp8"...)."""
    canonical = precision.dtype(name).name
    if canonical not in TORCH_DTYPES:
        raise ValueError(f"{name!r} has no torch dtype; those with one: {', '.join(TORCH_DTYPES)}")
    return TORCH_DTYPES[canonical]


def get_fp8_format(fmt: str | Fp8Format) -> Fp8Format:
    """Look up an FP8 format by name ("e4m3", "e5m2") or pass one through."""
    if isinstance(fmt, Fp8Format):
        return fmt
    if fmt not in FP8_FORMATS:
        raise ValueError(f"unknown FP8 format {fmt!r}; allowed: {sorted(FP8_FORMATS)}")
    return FP8_FORMATS[fmt]


def resolve_kv_cache_dtype(kv_cache_dtype: str) -> Fp8Format | None:
    """Map a KV-cache dtype name to its FP8 format, or None for an unquantized cache."""
    if precision.check_kv_cache_dtype(kv_cache_dtype) == "auto":
        return None
    return _FP8_BY_DTYPE.get(precision.dtype(kv_cache_dtype).name)


def check_cache_dtype(kv_cache_dtype: str, *caches: torch.Tensor) -> Fp8Format | None:
    """Resolve ``kv_cache_dtype`` and check that each cache tensor stores it.

    FP8 caches are ``torch.uint8``; unquantized ones bf16/fp16/fp32 ("auto" accepts any of
    them, a named dtype only itself).
    """
    fmt = resolve_kv_cache_dtype(kv_cache_dtype)
    for cache in caches:
        if fmt is not None:
            expected: tuple[torch.dtype, ...] = (torch.uint8,)
        elif kv_cache_dtype == "auto":
            expected = _UNQUANTIZED_CACHE_DTYPES
        else:
            expected = (torch_dtype(kv_cache_dtype),)
        if cache.dtype not in expected:
            raise ValueError(
                f"kv_cache_dtype={kv_cache_dtype!r} needs a cache of dtype "
                f"{' or '.join(map(str, expected))}, got {cache.dtype}"
            )
    return fmt


def scale_tensor(scale: float | torch.Tensor | None, num_kv_heads: int, device: torch.device) -> torch.Tensor:
    """Normalize an FP8 scale to float32 of shape ``[1]`` or ``[num_kv_heads]`` on ``device``.

    None means 1.0. Python floats must be finite and positive; tensor values are not checked
    (that would synchronize with the device).
    """
    if scale is None:
        scale = 1.0
    if not isinstance(scale, torch.Tensor):
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"FP8 scale must be finite and positive, got {scale}")
        return torch.full((1,), float(scale), dtype=torch.float32, device=device)
    if scale.numel() == 1:
        return scale.reshape(1).to(device=device, dtype=torch.float32)
    if scale.dim() == 1 and scale.numel() == num_kv_heads:
        return scale.to(device=device, dtype=torch.float32).contiguous()
    raise ValueError(
        f"FP8 scale must be a float, a 1-element tensor or a [num_kv_heads={num_kv_heads}] "
        f"tensor, got shape {tuple(scale.shape)}"
    )


def _head_broadcast(scale: torch.Tensor | float | None, x: torch.Tensor) -> torch.Tensor:
    """A scale shaped to broadcast over ``[..., num_kv_heads, head_dim]``."""
    return scale_tensor(scale, x.shape[-2], x.device).reshape(-1, 1)


def quantize_fp8_ref(x: torch.Tensor, scale: float | torch.Tensor | None, fmt: str | Fp8Format) -> torch.Tensor:
    """``x [..., num_kv_heads, head_dim]`` -> FP8 codes as ``torch.uint8`` (see module doc)."""
    f = get_fp8_format(fmt)
    y = torch.clamp(x.float() / _head_broadcast(scale, x), -f.max_value, f.max_value)
    return y.to(f.torch_dtype).view(torch.uint8)


def dequantize_fp8_ref(codes: torch.Tensor, scale: float | torch.Tensor | None, fmt: str | Fp8Format) -> torch.Tensor:
    """FP8 codes ``[..., num_kv_heads, head_dim]`` (uint8) -> float32 values times scale."""
    f = get_fp8_format(fmt)
    return codes.view(f.torch_dtype).float() * _head_broadcast(scale, codes)


def check_token_rows(key: torch.Tensor, value: torch.Tensor) -> None:
    """The new tokens' K and V, as every cache write takes them (FP8 and block-scaled alike)."""
    if key.dim() != 3 or key.shape != value.shape:
        raise ValueError(
            "key and value must both be [num_tokens, num_kv_heads, head_dim], got "
            f"{tuple(key.shape)} and {tuple(value.shape)}"
        )


def check_slot_mapping(slot_mapping: torch.Tensor, num_tokens: int) -> None:
    """One cache slot per new token, as every cache write takes them."""
    if slot_mapping.shape != (num_tokens,) or slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"slot_mapping must be int32/int64 of shape [num_tokens={num_tokens}], got "
            f"{slot_mapping.dtype} {tuple(slot_mapping.shape)}"
        )


def check_reshape_and_cache_args(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    kv_cache_dtype: str,
) -> Fp8Format | None:
    """Shape and dtype checks shared by the reference and the kernel wrapper."""
    fmt = check_cache_dtype(kv_cache_dtype, key_cache, value_cache)
    check_token_rows(key, value)
    if key_cache.dim() != 4 or key_cache.shape != value_cache.shape:
        raise ValueError(
            "key_cache and value_cache must both be [num_blocks, block_size, num_kv_heads, "
            f"head_dim], got {tuple(key_cache.shape)} and {tuple(value_cache.shape)}"
        )
    if key.shape[1:] != key_cache.shape[2:]:
        raise ValueError(
            f"key heads/head_dim {tuple(key.shape[1:])} do not match the cache's {tuple(key_cache.shape[2:])}"
        )
    check_slot_mapping(slot_mapping, key.shape[0])
    return fmt


def reshape_and_cache_ref(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    kv_cache_dtype: str = "auto",
    k_scale: float | torch.Tensor | None = None,
    v_scale: float | torch.Tensor | None = None,
) -> None:
    """Write ``key``/``value`` into the paged caches in place.

    Token ``t`` goes to block ``slot // block_size``, row ``slot % block_size`` with
    ``slot = slot_mapping[t]``; slot -1 marks padding and is skipped. FP8 caches get
    ``quantize_fp8_ref`` codes; unquantized caches a cast to their dtype (scales ignored).
    """
    fmt = check_reshape_and_cache_args(key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype)
    block_size = key_cache.shape[1]
    valid = slot_mapping >= 0
    slots = slot_mapping[valid].long()
    blocks, rows = slots // block_size, slots % block_size
    for src, cache, scale in ((key, key_cache, k_scale), (value, value_cache, v_scale)):
        x = src[valid]
        cache[blocks, rows] = quantize_fp8_ref(x, scale, fmt) if fmt else x.to(cache.dtype)


def check_paged_attention_args(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    kv_cache_dtype: str,
) -> Fp8Format | None:
    """Shape and dtype checks shared by the reference and the kernel wrapper."""
    fmt = check_cache_dtype(kv_cache_dtype, key_cache, value_cache)
    if query.dim() != 3 or query.dtype not in _UNQUANTIZED_CACHE_DTYPES:
        raise ValueError(
            "query must be bf16/fp16/fp32 [total_q_tokens, num_heads, head_dim], got "
            f"{query.dtype} {tuple(query.shape)}"
        )
    if key_cache.dim() != 4 or key_cache.shape != value_cache.shape:
        raise ValueError(
            "key_cache and value_cache must both be [num_blocks, block_size, num_kv_heads, "
            f"head_dim], got {tuple(key_cache.shape)} and {tuple(value_cache.shape)}"
        )
    num_heads, head_dim = query.shape[1:]
    num_kv_heads = key_cache.shape[2]
    if key_cache.shape[3] != head_dim or num_heads % num_kv_heads:
        raise ValueError(
            f"query has {num_heads} heads of {head_dim}; the cache {num_kv_heads} KV heads of "
            f"{key_cache.shape[3]}: head_dim must match and num_heads be a multiple of "
            "num_kv_heads"
        )
    num_seqs = seq_lens.shape[0]
    for name, t, shape in (
        ("seq_lens", seq_lens, (num_seqs,)),
        ("query_start_loc", query_start_loc, (num_seqs + 1,)),
        ("block_tables", block_tables, (num_seqs, block_tables.shape[-1])),
    ):
        if t.dtype not in (torch.int32, torch.int64) or tuple(t.shape) != shape:
            raise ValueError(
                f"{name} must be int32/int64 of shape {shape} (num_seqs={num_seqs}), got {t.dtype} {tuple(t.shape)}"
            )
    return fmt


def check_sliding_window(sliding_window: int | None, causal: bool) -> None:
    """A window is a positive key count and only meaningful for causal attention."""
    if sliding_window is None:
        return
    if isinstance(sliding_window, bool) or not isinstance(sliding_window, int) or sliding_window < 1:
        raise ValueError(
            f"sliding_window must be a positive int (keys each query sees, itself included) or None, "
            f"got {sliding_window!r}"
        )
    if not causal:
        raise ValueError("sliding_window needs causal attention")


def attended(q_pos: torch.Tensor, k_pos: torch.Tensor, sliding_window: int | None) -> torch.Tensor:
    """True where the query at ``q_pos`` sees the key at ``k_pos`` (broadcast): keys up to its own
    position and, with a window of W, the last W of them (itself included), as vLLM and HF define it
    (flash-attn window ``(W - 1, 0)``; SGLang's exclusive ``sliding_window_size`` is W - 1)."""
    seen = k_pos <= q_pos
    if sliding_window is not None:
        seen = seen & (k_pos > q_pos - sliding_window)
    return seen


def _gather_kv(
    cache: torch.Tensor,
    blocks: torch.Tensor,
    seq_len: int,
    scale: float | torch.Tensor | None,
    fmt: Fp8Format | None,
) -> torch.Tensor:
    """The first ``seq_len`` cached tokens of the pages ``blocks`` as float32."""
    pages = cache[blocks].reshape(-1, *cache.shape[2:])[:seq_len]
    return dequantize_fp8_ref(pages, scale, fmt) if fmt else pages.float()


def paged_attention_ref(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    kv_cache_dtype: str = "auto",
    k_scale: float | torch.Tensor | None = None,
    v_scale: float | torch.Tensor | None = None,
    causal: bool = True,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Attention of varlen queries over a paged KV cache, computed in float32.

    Sequence ``i`` owns query rows ``query_start_loc[i]:query_start_loc[i+1]``: the last
    ``q_len`` tokens of its ``seq_lens[i]`` tokens of context (decode, prefill, chunked
    prefill and prefix caching alike). Query head ``h`` reads KV head
    ``h // (num_heads // num_kv_heads)``. ``sliding_window`` (causal only): each query sees
    its last ``sliding_window`` keys, itself included (``attended``). Returns
    ``[total_q_tokens, num_heads, head_dim]`` in the query's dtype.
    """
    check_sliding_window(sliding_window, causal)
    fmt = check_paged_attention_args(
        query,
        key_cache,
        value_cache,
        block_tables,
        seq_lens,
        query_start_loc,
        kv_cache_dtype,
    )
    block_size, num_kv_heads = key_cache.shape[1:3]
    group = query.shape[1] // num_kv_heads
    out = torch.zeros_like(query)
    starts, lens = query_start_loc.tolist(), seq_lens.tolist()
    for i, seq_len in enumerate(lens):
        q0, q1 = starts[i], starts[i + 1]
        if q1 - q0 > seq_len:
            raise ValueError(f"sequence {i} has {q1 - q0} queries but seq_len {seq_len}")
        if q1 == q0:
            continue
        blocks = block_tables[i, : -(-seq_len // block_size)].long()
        k = _gather_kv(key_cache, blocks, seq_len, k_scale, fmt).repeat_interleave(group, dim=1)
        v = _gather_kv(value_cache, blocks, seq_len, v_scale, fmt).repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", query[q0:q1].float(), k) * scale
        if causal:
            q_pos = torch.arange(seq_len - (q1 - q0), seq_len, device=query.device)
            k_pos = torch.arange(seq_len, device=query.device)
            scores.masked_fill_(~attended(q_pos[:, None], k_pos[None, :], sliding_window), float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[q0:q1] = torch.einsum("hqk,khd->qhd", probs, v).to(query.dtype)
    return out


def kv_absmax_ref(x: torch.Tensor) -> torch.Tensor:
    """Per-KV-head ``max |x|`` of ``[num_tokens, num_kv_heads, head_dim]`` as float32.

    NaN entries are ignored (they would poison a calibrated scale); inf counts.
    """
    if x.dim() != 3:
        raise ValueError(f"x must be [num_tokens, num_kv_heads, head_dim], got {tuple(x.shape)}")
    if x.shape[0] == 0:
        return torch.zeros(x.shape[1], dtype=torch.float32, device=x.device)
    a = x.float().abs()
    return torch.where(torch.isnan(a), torch.zeros_like(a), a).amax(dim=(0, 2))
