"""The torch FP8 references against codes worked out from the OCP FP8 spec (fp8_spec_table).

The existing FP8 tests compare the kernels with the references and the references with torch's
own casts: a rounding or saturation rule that torch, the references and the kernels all got
wrong would pass them. These compare with an oracle that owes nothing to torch.
"""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

from maia_serving.ops.fp8 import dequantize_fp8_ref, quantize_fp8_ref
from tests.utils.fp8_spec_table import DECODE_ANCHORS, NAN_CODE, SPECS, Fp8Spec, all_cases, decode, f32

FORMATS = ["e4m3", "e5m2"]
# A float, a 0-d tensor and per-KV-head scales; powers of two, so value * scale is exact in float32
# and the scaled inputs must land on the table's codes.
SCALES = {"float": 1.0, "tensor": torch.tensor(8.0), "per_head": torch.tensor([1.0, 2.0**-4])}


def scale_list(scale: float | torch.Tensor) -> list[float]:
    return [float(scale)] if not isinstance(scale, torch.Tensor) else scale.reshape(-1).tolist()


def scaled_inputs(values: list[float], scale: float | torch.Tensor) -> torch.Tensor:
    """``[1, heads, len(values)]`` float32 with head ``h`` holding ``values * scale[h]``."""
    return torch.tensor([[[v * s for v in values] for s in scale_list(scale)]], dtype=torch.float32)


def nearest_even_code(x: float, spec: Fp8Spec) -> int:
    """OFP8 5.2.1 conversion in saturating mode by brute force, exactly in rationals: the nearest
    finite value, ties to the even mantissa; a tie or nearest beyond max normal saturates."""
    sign = 0x80 if math.copysign(1.0, x) < 0 else 0
    if math.isinf(x):
        return sign | spec.max_code
    # (value, odd mantissa, code) of every finite non-negative code ...
    candidates = [(Fraction(decode(c, spec)), c & 1, c) for c in range(0x80) if math.isfinite(decode(c, spec))]
    # ... and of the step past max normal (480 for E4M3, 2^16 for E5M2), which saturates to max.
    top_mantissa = spec.max_code & ((1 << spec.mantissa_bits) - 1)
    top = Fraction(decode(spec.max_code, spec))
    step = top / ((1 << spec.mantissa_bits) + top_mantissa)
    candidates.append((top + step, (top_mantissa + 1) & 1, spec.max_code))
    target = abs(Fraction(x))
    _, _, code = min(candidates, key=lambda c: (abs(c[0] - target), c[1]))
    return sign | code


def assert_same_float32(got: torch.Tensor, expected: torch.Tensor) -> None:
    """Bit-equal float32 (so -0.0 != 0.0), NaN anywhere NaN is expected."""
    nan = expected.isnan()
    assert torch.equal(got.isnan(), nan), "NaN positions differ"
    assert torch.equal(got[~nan].view(torch.int32), expected[~nan].view(torch.int32))


@pytest.mark.parametrize("fmt", FORMATS)
def test_decode_formula_gives_the_spec_table_2_values(fmt):
    for code, value in DECODE_ANCHORS[fmt]:
        got = decode(code, SPECS[fmt])
        if math.isnan(value):
            assert math.isnan(got), hex(code)
        else:
            assert got == value and math.copysign(1, got) == math.copysign(1, value), hex(code)


@pytest.mark.parametrize("fmt", FORMATS)
def test_hand_worked_codes_agree_with_a_brute_force_search(fmt):
    """Guards the table against slips in the hand work: every case, as the float32 the kernels
    see, is the nearest-even code over all 256 decoded values."""
    for case in all_cases(fmt):
        assert nearest_even_code(f32(case.value), SPECS[fmt]) == case.code, case


@pytest.mark.parametrize("scale", SCALES.values(), ids=SCALES.keys())
@pytest.mark.parametrize("fmt", FORMATS)
def test_quantize_ref_writes_the_spec_codes(fmt, scale):
    cases = all_cases(fmt)
    codes = quantize_fp8_ref(scaled_inputs([c.value for c in cases], scale), scale, fmt)
    for head in codes[0]:
        got = [f"{c:#04x}" for c in head.tolist()]
        assert got == [f"{c.code:#04x}" for c in cases], list(zip([c.value for c in cases], got))


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantize_ref_keeps_nan_as_the_signed_all_ones_nan_code(fmt):
    x = torch.tensor([math.nan, -math.nan]).reshape(1, 1, 2)
    assert x.signbit().tolist() == [[[False, True]]]
    codes = quantize_fp8_ref(x, 0.5, fmt)[0, 0].tolist()
    assert codes == [NAN_CODE[fmt][False], NAN_CODE[fmt][True]]
    assert set(codes) <= SPECS[fmt].nan_codes


@pytest.mark.parametrize("scale", [1.0, 0.037, torch.tensor([0.037, 2.5])], ids=["one", "float", "per_head"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_dequantize_ref_decodes_every_code(fmt, scale):
    """All 256 codes against the spec formula times the float32 scale, rounded once to float32
    (the product of a 4-bit and a 24-bit significand is exact in float64)."""
    scales = [f32(s) for s in scale_list(scale)]
    codes = torch.arange(256, dtype=torch.uint8).repeat(len(scales), 1).unsqueeze(0)
    expected = torch.tensor([[[f32(decode(c, SPECS[fmt]) * s) for c in range(256)] for s in scales]])
    assert_same_float32(dequantize_fp8_ref(codes, scale, fmt), expected)
