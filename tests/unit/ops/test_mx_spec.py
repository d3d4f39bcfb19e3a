"""The torch MX/NVFP4 references against codes worked out from the OCP MX spec (mx_spec_table).

The oracle owes nothing to torch or to the references: element and scale values come from the
spec's formula, element codes from hand work checked by an exact brute-force search, and the
bytes of a block from a bit-by-bit packing of the layout.
"""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

from maia_serving.ops.mx import (
    ELEMENT_FORMATS,
    MX_FORMATS,
    bits_per_element,
    decode_e8m0_ref,
    decode_table,
    dequantize_mx_ref,
    encode_minifloat_ref,
    head_bytes,
    quantize_mx_ref,
)
from tests.utils.fp8_spec_table import all_cases as fp8_cases
from tests.utils.mx_spec_table import (
    BLOCK_CASES,
    BLOCK_SIZE,
    DECODE_ANCHORS,
    E8M0_ANCHORS,
    ELEMENT,
    EMAX_ELEM,
    SPECS,
    BlockCase,
    ElementSpec,
    all_cases,
    decode,
    decode_e8m0,
    pack_block,
)

ELEMENTS = ["e2m1", "e3m2", "e2m3"]


def same_float(got: float, expected: float) -> bool:
    """Equal with the sign of zero, or both NaN."""
    if math.isnan(expected):
        return math.isnan(got)
    return got == expected and math.copysign(1, got) == math.copysign(1, expected)


def nearest_even_code(x: float, spec: ElementSpec) -> int:
    """MX 6.3 element conversion by brute force, exactly in rationals: the nearest finite value,
    ties to the even mantissa; the step past max normal counts as a candidate that clamps to max."""
    sign = 1 << (spec.bits - 1) if math.copysign(1.0, x) < 0 else 0
    finite = [c for c in range(1 << (spec.bits - 1)) if not math.isnan(decode(c, spec))]
    candidates = [(Fraction(decode(c, spec)), c & 1, c) for c in finite]
    top_mantissa = spec.max_code & ((1 << spec.mantissa_bits) - 1)
    top = Fraction(decode(spec.max_code, spec))
    step = top / ((1 << spec.mantissa_bits) + top_mantissa)
    candidates.append((top + step, (top_mantissa + 1) & 1, spec.max_code))
    _, _, code = min(candidates, key=lambda c: (abs(c[0] - abs(Fraction(x))), c[1]))
    return sign | code


def f32(x: float) -> float:
    return torch.tensor(x, dtype=torch.float32).item()


@pytest.mark.parametrize("elem", ELEMENTS)
def test_decode_formula_gives_the_spec_table_values(elem):
    for code, value in DECODE_ANCHORS[elem]:
        assert same_float(decode(code, SPECS[elem]), value), bin(code)


def test_e8m0_formula_gives_the_spec_values():
    for code, value in E8M0_ANCHORS:
        assert same_float(decode_e8m0(code), value), code


@pytest.mark.parametrize("elem", ELEMENTS)
def test_emax_elem_is_the_exponent_of_max_normal(elem):
    spec = SPECS[elem]
    assert math.frexp(decode(spec.max_code, spec))[1] - 1 == EMAX_ELEM[elem]
    assert ELEMENT_FORMATS[elem].emax == EMAX_ELEM[elem]


@pytest.mark.parametrize("elem", ELEMENTS)
def test_hand_worked_codes_agree_with_a_brute_force_search(elem):
    for case in all_cases(elem):
        assert nearest_even_code(f32(case.value), SPECS[elem]) == case.code, case


@pytest.mark.parametrize("elem", [*ELEMENTS, "e4m3"])
def test_reference_decodes_every_code_by_the_formula(elem):
    table = decode_table(ELEMENT_FORMATS[elem]).tolist()
    assert len(table) == 1 << SPECS[elem].bits
    for code, got in enumerate(table):
        assert same_float(got, decode(code, SPECS[elem])), bin(code)


def test_reference_decodes_every_e8m0_code_by_the_formula():
    got = decode_e8m0_ref(torch.arange(256, dtype=torch.uint8)).tolist()
    for code in range(256):
        assert same_float(got[code], decode_e8m0(code)), code


@pytest.mark.parametrize("elem", ELEMENTS)
def test_reference_encodes_the_hand_worked_codes(elem):
    cases = all_cases(elem)
    got = encode_minifloat_ref(torch.tensor([c.value for c in cases]), ELEMENT_FORMATS[elem]).tolist()
    assert got == [c.code for c in cases], [(c.value, bin(g), bin(c.code)) for c, g in zip(cases, got) if g != c.code]


def test_reference_encodes_the_ofp8_e4m3_codes_in_saturating_mode():
    """MXFP8's elements against the FP8 table (inf excluded: an MX block with one is NaN)."""
    cases = [c for c in fp8_cases("e4m3") if math.isfinite(c.value)]
    got = encode_minifloat_ref(torch.tensor([c.value for c in cases]), ELEMENT_FORMATS["e4m3"]).tolist()
    assert got == [c.code for c in cases]


@pytest.mark.parametrize("elem", [*ELEMENTS, "e4m3"])
def test_reference_rounds_every_midpoint_like_the_brute_force(elem):
    """Every midpoint between neighbouring codes (ties) and a float32 step either side."""
    spec = SPECS[elem]
    values = sorted(v for v in (decode(c, spec) for c in range(1 << (spec.bits - 1))) if not math.isnan(v))
    mids = [(a + b) / 2 for a, b in zip(values, values[1:])]
    mids.append(values[-1] + math.ldexp(1.0, EMAX_ELEM[elem] - spec.mantissa_bits - 1))  # the tie past max
    xs = torch.tensor([m for m in mids for m in (m, -m)], dtype=torch.float32)
    xs = torch.cat([xs, torch.nextafter(xs, torch.zeros(())), torch.nextafter(xs, xs * 2)])
    got = encode_minifloat_ref(xs, ELEMENT_FORMATS[elem]).tolist()
    expected = [nearest_even_code(x, spec) for x in xs.tolist()]
    assert got == expected


def padded(case: BlockCase) -> list[float]:
    return list(case.values) + [0.0] * (BLOCK_SIZE[case.fmt] - len(case.values))


def expected_bytes(case: BlockCase) -> list[int]:
    codes = list(case.codes) + [0] * (BLOCK_SIZE[case.fmt] - len(case.codes))
    return pack_block(codes, case.scale_code, SPECS[ELEMENT[case.fmt]].bits)


def nvfp4_scale(case: BlockCase) -> float | None:
    return case.tensor_scale if case.fmt == "nvfp4" else None


@pytest.mark.parametrize("case", BLOCK_CASES, ids=[c.name for c in BLOCK_CASES])
def test_quantize_ref_writes_the_hand_worked_block(case):
    x = torch.tensor([[padded(case)]], dtype=torch.float32)
    got = quantize_mx_ref(x, case.fmt, nvfp4_scale(case))
    assert got.dtype == torch.uint8
    assert got[0, 0].tolist() == expected_bytes(case)


@pytest.mark.parametrize("case", BLOCK_CASES, ids=[c.name for c in BLOCK_CASES])
def test_dequantize_ref_gives_element_times_scale(case):
    """Each element's spec value times the block scale; a NaN scale makes the whole block NaN."""
    spec = SPECS[ELEMENT[case.fmt]]
    packed = torch.tensor([[expected_bytes(case)]], dtype=torch.uint8)
    got = dequantize_mx_ref(packed, case.fmt, BLOCK_SIZE[case.fmt], nvfp4_scale(case))[0, 0].tolist()
    if case.fmt == "nvfp4":
        scale = f32(decode(case.scale_code, SPECS["e4m3"]) * case.tensor_scale)
    else:
        scale = decode_e8m0(case.scale_code)
    codes = list(case.codes) + [0] * (BLOCK_SIZE[case.fmt] - len(case.codes))
    for code, value in zip(codes, got):
        assert same_float(value, decode(code, spec) * scale), (bin(code), value)


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
def test_blocks_of_a_row_are_independent_and_in_order(fmt):
    """All of a format's unit-scale cases as the consecutive blocks of one head's row."""
    cases = [c for c in BLOCK_CASES if c.fmt == fmt and c.tensor_scale == 1.0]
    x = torch.tensor([[sum((padded(c) for c in cases), [])]], dtype=torch.float32)
    assert quantize_mx_ref(x, fmt)[0, 0].tolist() == sum((expected_bytes(c) for c in cases), [])


def test_per_head_nvfp4_scales():
    case = next(c for c in BLOCK_CASES if c.name == "nvfp4_tensor_scale")
    x = torch.tensor([[padded(case), [2 * v for v in padded(case)]]])
    got = quantize_mx_ref(x, "nvfp4", torch.tensor([0.5, 1.0]))[0]
    assert got[0].tolist() == got[1].tolist() == expected_bytes(case)


@pytest.mark.parametrize(
    ("fmt", "head_dim", "nbytes", "bits"),
    [
        ("mxfp4", 128, 68, 4.25),
        ("mxfp6", 128, 100, 6.25),
        ("mxfp6_e2m3", 128, 100, 6.25),
        ("mxfp8", 128, 132, 8.25),
        ("nvfp4", 128, 72, 4.5),
        ("mxfp4", 80, 51, 51 * 8 / 80),  # 3 blocks, the last padded
        ("mxfp8", 64, 66, 8.25),
    ],
)
def test_bytes_per_token_per_head_count_the_scales(fmt, head_dim, nbytes, bits):
    assert head_bytes(fmt, head_dim) == nbytes
    assert bits_per_element(fmt, head_dim) == bits


def test_padded_head_dim_round_trips():
    x = torch.linspace(-3, 3, 80).reshape(1, 1, 80)
    packed = quantize_mx_ref(x, "mxfp8")
    assert packed.shape == (1, 1, 99)
    out = dequantize_mx_ref(packed, "mxfp8", 80)
    assert out.shape == x.shape
    torch.testing.assert_close(out, x, rtol=2**-3, atol=2**-8)


@pytest.mark.parametrize("fmt", [f for f in MX_FORMATS if f != "nvfp4"])
def test_mx_quantization_is_idempotent(fmt):
    """A dequantized block re-quantizes to the same bytes: rounding never leaves the amax's binade."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 64, generator=g) * 10.0 ** torch.empty(3, 2, 64).uniform_(-3, 3, generator=g)
    packed = quantize_mx_ref(x.to(torch.bfloat16), fmt)
    assert torch.equal(quantize_mx_ref(dequantize_mx_ref(packed, fmt, 64), fmt), packed)


def test_mx_formats_take_no_tensor_scale():
    with pytest.raises(ValueError, match="E8M0"):
        quantize_mx_ref(torch.zeros(1, 1, 32), "mxfp4", 2.0)


def test_unknown_format_is_an_error():
    with pytest.raises(ValueError, match="allowed: mxfp8"):
        quantize_mx_ref(torch.zeros(1, 1, 32), "mxfp3")
