"""Attention in float64 over exactly dequantized KV, and the tolerance one bf16 rounding allows.

The reference owes nothing to maia_serving.ops: FP8 codes are decoded by the OCP spec formula
(fp8_spec_table) and multiplied by the float32 scale the product holds, both exact in float64;
bf16/fp16/fp32 cache entries are exact in float64 as they are. The block-scaled MX/NVFP4 rows are
read as the layout defines them (each block's element bits as one little-endian bit stream, then
its scale byte) and decoded by mx_spec_table's formulas: element times E8M0 scale, or NVFP4's
element times E4M3 scale times the float32 tensor scale, exact in float64 (the product rounds
NVFP4's scale product once more in float32, a u the budget's factor of 2 below covers). So the
only differences between a product output and this reference are the product's float32
arithmetic and its final rounding to the output dtype, and ``assert_within_one_bf16_step``
bounds exactly those.

Why the bound (u = 2^-24, float32's unit roundoff; first-order error analysis):

- a score s_i = scale * sum_j q_j k_ij in float32 is off by at most
  (d + 3) u |scale| sum_j |q_j k_ij| (the d-term dot product, plus one rounding each for the
  dequantized k, the float32 scale and the multiplication); with the subtraction of the row
  maximum inside the softmax (<= 2u max|s|) call the largest of these over the keys E;
- softmax p_i = exp(s_i - m) / sum_k exp(s_k - m) is then off by at most a relative
  2E + (n + 5) u (numerator and denominator each E plus an exp rounding; n-term sum; division);
- the output o = sum_i p_i v_i adds a relative (n + 1) u per term (the value's dequantization and
  the n-term sum), so |o32 - ref| <= err = A (4E + (2n + 8) u) with A = sum_i p_i |v_i|
  (E doubled to cover second-order terms and torch's exp being within a few ulp, not 1);
- rounding o32 to bf16 moves it by at most half a bf16 ulp of o32. If err <= |ref|, |o32| <= 2|ref|,
  so that half ulp is at most one ulp of ref; otherwise it is at most 2^-8 |o32| < err.

Hence |out - ref| <= ulp_bf16(ref) + 2 err. err is about 1e-4 A in these tests, far below a bf16
ulp (2^-8 to 2^-7 relative): the bound is one bf16 rounding step, and a 1% error is not.
"""

from __future__ import annotations

import functools

import torch

from tests.utils import mx_spec_table as mx_spec
from tests.utils.fp8_spec_table import E4M3, E5M2, Fp8Spec, decode

U32 = 2.0**-24
FP8_CACHE_DTYPES: dict[str, Fp8Spec] = {"fp8": E4M3, "fp8_e4m3": E4M3, "fp8_e5m2": E5M2}
_DECODE_TABLES = {
    spec.name: torch.tensor([decode(code, spec) for code in range(256)], dtype=torch.float64) for spec in (E4M3, E5M2)
}


def _float32_scale(scale: float | torch.Tensor | None) -> torch.Tensor:
    """A float, 0-d, 1-element or per-KV-head scale as the float32 the product holds, in float64,
    shaped to broadcast over ``[..., kv_heads, x]``."""
    return torch.as_tensor(1.0 if scale is None else scale, dtype=torch.float32).double().reshape(-1, 1)


@functools.cache
def _mx_tables(fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 (element value by code, block scale by byte) of a block-scaled format, by the spec."""
    elem = mx_spec.SPECS[mx_spec.ELEMENT[fmt]]
    values = [mx_spec.decode(code, elem) for code in range(1 << elem.bits)]
    scales = [
        mx_spec.decode(code, mx_spec.E4M3) if fmt == "nvfp4" else mx_spec.decode_e8m0(code) for code in range(256)
    ]
    return torch.tensor(values, dtype=torch.float64), torch.tensor(scales, dtype=torch.float64)


def dequantize_mx_exact(rows: torch.Tensor, scale: float | torch.Tensor | None, fmt: str) -> torch.Tensor:
    """uint8 rows ``[..., kv_heads, blocks * block bytes]`` -> float64
    ``[..., kv_heads, blocks * block_size]``, padding included: element ``i`` of a block is bits
    ``bits * i ..`` of its bytes read as one little-endian stream (mx_spec_table.pack_block), then
    its scale byte."""
    bits, size = mx_spec.SPECS[mx_spec.ELEMENT[fmt]].bits, mx_spec.BLOCK_SIZE[fmt]
    blocks = rows.long().unflatten(-1, (-1, size * bits // 8 + 1))
    stream = (blocks[..., :-1, None] >> torch.arange(8)) & 1  # [..., blocks, element bytes, 8]
    fields = stream.flatten(-2).unflatten(-1, (size, bits))
    codes = (fields << torch.arange(bits)).sum(-1)
    values, scales = _mx_tables(fmt)
    block_scale = scales[blocks[..., -1]]
    if fmt == "nvfp4":
        block_scale = block_scale * _float32_scale(scale)
    return (values[codes] * block_scale[..., None]).flatten(-2)


def dequantize_exact(entries: torch.Tensor, scale: float | torch.Tensor | None, kv_cache_dtype: str) -> torch.Tensor:
    """Cache entries ``[..., kv_heads, head_dim]`` as float64: FP8 codes (uint8) decoded and times
    the scale as float32 (a float, 0-d, 1-element or per-KV-head), MX/NVFP4 rows by
    ``dequantize_mx_exact`` (head_dim rounded up to whole blocks), the others as they are."""
    if kv_cache_dtype in mx_spec.BLOCK_SIZE:
        return dequantize_mx_exact(entries, scale, kv_cache_dtype)
    spec = FP8_CACHE_DTYPES.get(kv_cache_dtype)
    if spec is None:
        return entries.double()
    return _DECODE_TABLES[spec.name][entries.long()] * _float32_scale(scale)


def causal_attention_float64(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, sliding_window: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``q [n, heads, d]``, the last n of the L tokens of ``k, v [L, kv_heads, d]`` (float64,
    query head h reads KV head h // (heads // kv_heads)); with ``sliding_window`` W, the query at
    position p sees the keys p - W + 1 .. p (vLLM's and HF's window, its own key included).
    Returns the attention output and the float32 error budget ``err`` of each element (see the
    module doc)."""
    n, heads, d = q.shape
    group = heads // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    k_pos, q_pos = torch.arange(k.shape[0])[None, :], torch.arange(k.shape[0] - n, k.shape[0])[:, None]
    masked = k_pos > q_pos  # [n, L]
    if sliding_window is not None:
        masked |= k_pos <= q_pos - sliding_window
    s = torch.einsum("qhd,khd->hqk", q, k) * scale
    s.masked_fill_(masked, float("-inf"))
    p = torch.softmax(s, dim=-1)
    out = torch.einsum("hqk,khd->qhd", p, v)

    score_err = (d + 3) * U32 * abs(scale) * torch.einsum("qhd,khd->hqk", q.abs(), k.abs())
    s_max = s.masked_fill(masked, 0).abs().amax(-1)  # [heads, n]
    e = score_err.masked_fill(masked, 0).amax(-1) + 2 * U32 * s_max
    keys = (~masked).sum(-1).double()  # [n]
    relative = 4 * e + (2 * keys + 8) * U32  # [heads, n]
    err = torch.einsum("hqk,khd->qhd", p, v.abs()) * relative.T[:, :, None]
    return out, err


def paged_attention_float64(
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
    sliding_window: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Arguments as ``maia_serving.ops.paged_attention`` (causal; ``sliding_window`` a keyword
    there); returns float64 output and error budget ``[total_q, heads, d]``. Token t of
    sequence i lives in block ``block_tables[i, t // block_size]``, row ``t % block_size``."""
    out = torch.zeros(query.shape, dtype=torch.float64)
    err = torch.zeros_like(out)
    block_size = key_cache.shape[1]
    starts = query_start_loc.tolist()
    for i, seq_len in enumerate(seq_lens.tolist()):
        q0, q1 = starts[i], starts[i + 1]
        if q1 == q0:
            continue
        pos = torch.arange(seq_len)
        blocks, rows = block_tables[i].long()[pos // block_size], pos % block_size
        head_dim = query.shape[-1]
        k = dequantize_exact(key_cache[blocks, rows], k_scale, kv_cache_dtype)[..., :head_dim]
        v = dequantize_exact(value_cache[blocks, rows], v_scale, kv_cache_dtype)[..., :head_dim]
        out[q0:q1], err[q0:q1] = causal_attention_float64(query[q0:q1].double(), k, v, scale, sliding_window)
    return out, err


def bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """The spacing of bf16 values (8 significant bits) at the magnitude of each element of ``x``."""
    _, exponent = torch.frexp(x.abs())  # |x| = m 2^e, 0.5 <= m < 1: ulp = 2^(e - 8)
    ulp = torch.ldexp(torch.ones_like(x), (exponent - 8).clamp(min=-133))
    return torch.where(x == 0, torch.full_like(x, 2.0**-133), ulp)


def bf16_step_violations(out: torch.Tensor, ref: torch.Tensor, err: torch.Tensor) -> torch.Tensor:
    """Where ``out`` is further from ``ref`` than one bf16 rounding step allows (module doc)."""
    return (out.double() - ref).abs() > bf16_ulp(ref) + 2 * err


def assert_within_one_bf16_step(out: torch.Tensor, ref: torch.Tensor, err: torch.Tensor) -> None:
    bad = bf16_step_violations(out, ref, err)
    if bad.any():
        i = bad.nonzero()[0].tolist()
        raise AssertionError(
            f"{int(bad.sum())} of {bad.numel()} elements exceed one bf16 step; first at {i}: "
            f"got {out[tuple(i)].item()}, float64 reference {ref[tuple(i)].item()}, "
            f"allowed {(bf16_ulp(ref) + 2 * err)[tuple(i)].item():.3g}"
        )
