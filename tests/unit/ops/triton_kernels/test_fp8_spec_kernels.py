"""The Triton kernels' FP8 casts against codes worked out from the OCP FP8 spec (fp8_spec_table).

On a host the kernels run in Triton's interpreter, whose FP8 conversions conftest.py replaces with
torch's; test_fp8_quant.py then compares the kernels with the same torch casts the patch uses.
These compare the kernel path, patch included, with the spec: encoding in reshape_and_cache,
decoding in paged_attention.
"""

from __future__ import annotations

import math

import pytest
import torch

from maia_serving.ops.triton import paged_attention, reshape_and_cache
from tests.utils.fp8_spec_table import SPECS, all_cases, decode, f32

FORMATS = ["e4m3", "e5m2"]
SCALES = {"float": 1.0, "per_head": torch.tensor([1.0, 2.0**-4])}  # powers of two: exact scaling


@pytest.mark.parametrize("scale", SCALES.values(), ids=SCALES.keys())
@pytest.mark.parametrize("fmt", FORMATS)
def test_reshape_and_cache_writes_the_spec_codes(fmt, scale, device):
    """Keys carry the table's inputs and values their negation (mirrored codes), plus a NaN each."""
    cases = all_cases(fmt)
    scales = [float(scale)] if not isinstance(scale, torch.Tensor) else scale.tolist()
    rows = [[c.value * s for c in cases] + [math.nan] for s in scales]
    key = torch.tensor([rows], dtype=torch.float32, device=device)
    k_cache = torch.zeros(1, 16, len(scales), key.shape[-1], dtype=torch.uint8, device=device)
    v_cache = torch.zeros_like(k_cache)
    scale_arg = scale.to(device) if isinstance(scale, torch.Tensor) else scale
    reshape_and_cache(key, -key, k_cache, v_cache, torch.tensor([5], device=device), f"fp8_{fmt}", scale_arg, scale_arg)

    for cache, flip in ((k_cache, 0), (v_cache, 0x80)):
        for head in cache[0, 5].tolist():
            got = [f"{c:#04x}" for c in head[:-1]]
            assert got == [f"{c.code ^ flip:#04x}" for c in cases], list(zip([c.value for c in cases], got))
            assert head[-1] in SPECS[fmt].nan_codes, f"NaN wrote {head[-1]:#04x}"


# The interpreter's padding rows weigh the inf codes by 0 (NaN rows that are never stored).
@pytest.mark.filterwarnings("ignore:invalid value encountered in matmul:RuntimeWarning")
@pytest.mark.parametrize("v_scale", [1.0, 0.037])
@pytest.mark.parametrize("fmt", FORMATS)
def test_paged_attention_decodes_every_code(fmt, v_scale, device):
    """One key, so the output is its value row exactly: all 256 codes, decoded by the kernel and
    scaled once in float32, against the spec formula (a -0.0 comes out as +0.0: the weighted sum
    adds the masked keys' +0.0)."""
    values = torch.arange(256, dtype=torch.uint8, device=device).view(1, 1, 1, 256)
    v_cache = torch.zeros(1, 16, 1, 256, dtype=torch.uint8, device=device)
    v_cache[0, :1] = values
    k_cache = torch.zeros_like(v_cache)  # code 0: +0.0, so the single score is 0
    query = torch.zeros(1, 1, 256, dtype=torch.float32, device=device)
    index = torch.tensor([[0]], dtype=torch.int32, device=device)
    out = paged_attention(
        query,
        k_cache,
        v_cache,
        index,
        torch.tensor([1], dtype=torch.int32, device=device),
        torch.tensor([0, 1], dtype=torch.int32, device=device),
        1.0,
        f"fp8_{fmt}",
        1.0,
        v_scale,
    )

    expected = torch.tensor([f32(decode(c, SPECS[fmt]) * f32(v_scale)) for c in range(256)])
    got = out.reshape(256).cpu()
    nan = expected.isnan()
    assert torch.equal(got.isnan(), nan), f"NaN codes: {got[nan].tolist()}"
    wrong = (got != expected) & ~nan
    assert not wrong.any(), [(hex(c), got[c].item(), expected[c].item()) for c in wrong.nonzero().flatten().tolist()]
