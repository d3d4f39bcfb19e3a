"""MX element and scale encodings worked out by hand from the OCP Microscaling Formats (MX) v1.0 spec.

An oracle for the MX tests that owes nothing to torch or to maia_serving: every code below was
worked out on paper and is written in the spec's S.E...E.M...M notation as a binary literal;
``decode`` is the spec's value formula on the bit fields.

- Element formats (MX v1.0 section 5.3, Tables 2 and 3): no infinities and no NaN.
  FP4 E2M1: bias 1, S.EE.M; min subnormal S.00.1 = 0.5, min normal S.01.0 = 1.0, max
  S.11.1 = 1.5 * 2^2 = 6.0. FP6 E3M2: bias 3, S.EEE.MM; subnormals S.000.mm = mm/4 * 2^-2
  (min 0.0625), min normal 0.25, max S.111.11 = 1.75 * 2^4 = 28. FP6 E2M3: bias 1, S.EE.MMM;
  subnormals mmm/8 (min 0.125), min normal 1.0, max S.11.111 = 1.875 * 2^2 = 7.5. FP8 E4M3 as
  in OFP8 (fp8_spec_table.py): max 448, NaN S.1111.111.
- Scale E8M0 (section 5.4.1): unsigned exponent, bias 127, value 2^(E - 127) for E = 0..254
  (2^-127 .. 2^127; no zero), 0xFF = NaN.
- Conversion of a block V_1..V_k (section 6.3): shared_exp = floor(log2(max |V_i|)) - emax_elem,
  where emax_elem is the exponent of the element format's largest normal (E2M1 2, E3M2 4,
  E2M3 2, E4M3 8); X = 2^shared_exp; P_i = V_i / X rounded to nearest, ties to even, with normal
  values past max normal clamped to it. shared_exp below E8M0's range is clamped to -127 (an
  all-zero block gets 2^-127). A NaN scale makes the whole block NaN (section 5.4.1); the
  project's policy gives any block holding a NaN or an infinity that scale (FP4/FP6 elements
  cannot hold either) and zero elements.
- NVFP4 (NVIDIA's format, for the GPU comparison): 16 E2M1 elements share an E4M3 scale s, and
  the tensor a float32 scale t: s = e4m3(amax / (6 t)), P_i = e2m1(V_i / (s t)).

Each case's input is a float32 value; none sits close enough to a rounding boundary for the
float32 rounding of the decimal literal to matter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class ElementSpec:
    """One MX element format's fields (MX v1.0 Tables 2 and 3; E4M3 from OFP8)."""

    name: str
    exponent_bits: int
    mantissa_bits: int
    bias: int
    max_code: int  # +max normal
    nan_magnitude: int | None  # the NaN code without its sign bit; None: the format has no NaN

    @property
    def bits(self) -> int:
        return 1 + self.exponent_bits + self.mantissa_bits


E2M1 = ElementSpec("e2m1", 2, 1, 1, 0b0_11_1, None)
E3M2 = ElementSpec("e3m2", 3, 2, 3, 0b0_111_11, None)
E2M3 = ElementSpec("e2m3", 2, 3, 1, 0b0_11_111, None)
E4M3 = ElementSpec("e4m3", 4, 3, 7, 0b0_1111_110, 0b1111_111)
SPECS = {s.name: s for s in (E2M1, E3M2, E2M3, E4M3)}
EMAX_ELEM = {"e2m1": 2, "e3m2": 4, "e2m3": 2, "e4m3": 8}  # section 6.3, from the max normals above


def decode(code: int, spec: ElementSpec) -> float:
    """(-1)^S * 2^(E - bias) * 1.M for E > 0, (-1)^S * 2^(1 - bias) * 0.M for E = 0."""
    sign = -1.0 if code >> (spec.bits - 1) else 1.0
    magnitude = code & ((1 << (spec.bits - 1)) - 1)
    if magnitude == spec.nan_magnitude:
        return math.nan
    exponent = magnitude >> spec.mantissa_bits
    mantissa = magnitude & ((1 << spec.mantissa_bits) - 1)
    if exponent == 0:
        return sign * math.ldexp(mantissa, 1 - spec.bias - spec.mantissa_bits)
    return sign * math.ldexp((1 << spec.mantissa_bits) + mantissa, exponent - spec.bias - spec.mantissa_bits)


def decode_e8m0(code: int) -> float:
    return math.nan if code == 0xFF else math.ldexp(1.0, code - 127)


# Every non-negative E2M1 value (Table 3), and named codes of the FP6 tables: code -> value.
DECODE_ANCHORS: dict[str, list[tuple[int, float]]] = {
    "e2m1": [
        (0b0_00_0, 0.0),
        (0b0_00_1, 0.5),  # the only subnormal
        (0b0_01_0, 1.0),
        (0b0_01_1, 1.5),
        (0b0_10_0, 2.0),
        (0b0_10_1, 3.0),
        (0b0_11_0, 4.0),
        (0b0_11_1, 6.0),  # max normal
        (0b1_00_0, -0.0),
        (0b1_11_1, -6.0),
    ],
    "e3m2": [
        (0b0_000_00, 0.0),
        (0b1_000_00, -0.0),
        (0b0_000_01, 0.0625),  # min subnormal
        (0b0_000_11, 0.1875),  # max subnormal
        (0b0_001_00, 0.25),  # min normal
        (0b0_011_00, 1.0),
        (0b0_011_01, 1.25),
        (0b0_111_00, 16.0),
        (0b0_111_11, 28.0),  # max normal
        (0b1_111_11, -28.0),
    ],
    "e2m3": [
        (0b0_00_000, 0.0),
        (0b0_00_001, 0.125),  # min subnormal
        (0b0_00_111, 0.875),  # max subnormal
        (0b0_01_000, 1.0),  # min normal
        (0b0_01_001, 1.125),
        (0b0_11_111, 7.5),  # max normal
        (0b1_11_111, -7.5),
        (0b1_00_000, -0.0),
    ],
}
E8M0_ANCHORS: list[tuple[int, float]] = [
    (0, 2.0**-127),
    (1, 2.0**-126),
    (126, 0.5),
    (127, 1.0),
    (128, 2.0),
    (254, 2.0**127),
    (0xFF, math.nan),
]


@dataclass(frozen=True)
class Case:
    """A float32 input (already divided by its block scale) and the element code it gets."""

    value: float
    code: int


# Element conversion (section 6.3: round to nearest even, clamp to max normal), by group.
ENCODE_CASES: dict[str, dict[str, list[Case]]] = {
    "e2m1": {
        "exact": [Case(0.5, 0b0_00_1), Case(1.5, 0b0_01_1), Case(-3.0, 0b1_10_1), Case(6.0, 0b0_11_1)],
        "nearest": [Case(1.3, 0b0_01_1), Case(2.6, 0b0_10_1), Case(4.9, 0b0_11_0), Case(-0.7, 0b1_00_1)],
        "ties_to_even": [
            Case(1.25, 0b0_01_0),  # 1.0 | 1.5 -> 1.0
            Case(1.75, 0b0_10_0),  # 1.5 | 2.0 -> 2.0, carry into the exponent
            Case(2.5, 0b0_10_0),  # 2 | 3 -> 2
            Case(3.5, 0b0_11_0),  # 3 | 4 -> 4
            Case(5.0, 0b0_11_0),  # 4 | 6 -> 4
            Case(-5.0, 0b1_11_0),
        ],
        "subnormal": [
            Case(0.25, 0b0_00_0),  # 0 | 0.5 -> 0
            Case(0.26, 0b0_00_1),
            Case(0.75, 0b0_01_0),  # 0.5 | 1.0 -> 1.0 (min normal)
            Case(-0.25, 0b1_00_0),
        ],
        # Past 6 the next step would be 8: below the midpoint 7 and at it rounding gives 6; beyond
        # it the spec clamps normal values to max normal.
        "saturation": [Case(6.9, 0b0_11_1), Case(7.0, 0b0_11_1), Case(7.9, 0b0_11_1), Case(-1e6, 0b1_11_1)],
        "zero": [Case(0.0, 0b0_00_0), Case(-0.0, 0b1_00_0), Case(1e-30, 0b0_00_0)],
    },
    "e3m2": {
        "exact": [Case(0.25, 0b0_001_00), Case(1.75, 0b0_011_11), Case(-12.0, 0b1_110_10), Case(28.0, 0b0_111_11)],
        "nearest": [Case(1.1, 0b0_011_00), Case(1.2, 0b0_011_01), Case(27.0, 0b0_111_11)],
        "ties_to_even": [
            Case(1.125, 0b0_011_00),  # 1.00 | 1.01 -> down
            Case(1.375, 0b0_011_10),  # 1.01 | 1.10 -> up
            Case(1.875, 0b0_100_00),  # 1.11 | 2.00 -> up, carry into the exponent
            Case(22.0, 0b0_111_10),  # 20 | 24 -> 24
            Case(-18.0, 0b1_111_00),  # 16 | 20 -> 16
        ],
        "subnormal": [
            Case(0.0625, 0b0_000_01),
            Case(0.09375, 0b0_000_10),  # 0.0625 | 0.125 -> 0.125
            Case(0.15625, 0b0_000_10),  # 0.125 | 0.1875 -> 0.125
            Case(0.21875, 0b0_001_00),  # 0.1875 | 0.25 -> 0.25 (min normal)
            Case(0.03125, 0b0_000_00),  # 0 | 0.0625 -> 0
            Case(-0.04, 0b1_000_01),
        ],
        "saturation": [
            Case(29.9, 0b0_111_11),
            Case(30.0, 0b0_111_11),  # 28 | 32 -> 32, clamped
            Case(31.0, 0b0_111_11),
            Case(-500.0, 0b1_111_11),
        ],
        "zero": [Case(0.0, 0b0_000_00), Case(-0.0, 0b1_000_00)],
    },
    "e2m3": {
        "exact": [Case(0.125, 0b0_00_001), Case(1.0, 0b0_01_000), Case(-5.5, 0b1_11_011), Case(7.5, 0b0_11_111)],
        "ties_to_even": [
            Case(1.0625, 0b0_01_000),  # 1.000 | 1.001 -> down
            Case(1.1875, 0b0_01_010),  # 1.001 | 1.010 -> up
            Case(1.9375, 0b0_10_000),  # 1.111 | 2.000 -> up, carry
            Case(0.0625, 0b0_00_000),  # 0 | 0.125 -> 0
            Case(0.9375, 0b0_01_000),  # 0.875 | 1.0 -> 1.0 (min normal)
        ],
        "saturation": [Case(7.7, 0b0_11_111), Case(7.75, 0b0_11_111), Case(7.99, 0b0_11_111), Case(-9.0, 0b1_11_111)],
        "zero": [Case(0.0, 0b0_00_000), Case(-0.0, 0b1_00_000)],
    },
}


@dataclass(frozen=True)
class BlockCase:
    """One block's float32 inputs (padded with zeros to the block size), its scale code and the
    element codes of the listed inputs (the padding's codes are 0)."""

    name: str
    fmt: str
    values: tuple[float, ...]
    scale_code: int
    codes: tuple[int, ...]
    tensor_scale: float = 1.0  # NVFP4's t


BLOCK_CASES: list[BlockCase] = [
    # amax 0: log2 is -inf, clamped to E8M0's smallest scale 2^-127; zeros keep their sign.
    BlockCase("zeros", "mxfp4", (0.0, -0.0), 0, (0b0_00_0, 0b1_00_0)),
    # amax a power of two: floor(log2 4) = 2 = emax_elem, X = 1, so 4 is stored as 4 (not 6).
    BlockCase(
        "amax_pow2_fp4", "mxfp4", (4.0, -1.0, 0.75, 0.25, 2.5), 127, (0b0_11_0, 0b1_01_0, 0b0_01_0, 0b0_00_0, 0b0_10_0)
    ),
    # amax 4: shared_exp 2 - 8 = -6, X = 2^-6: 4 -> 256 (S.1111.000), 1/512 -> 2^-3 = 1.000 * 2^-3.
    BlockCase("amax_pow2_fp8", "mxfp8", (4.0, -(2.0**-9), 3.0), 127 - 6, (0b0_1111_000, 0b1_0100_000, 0b0_1110_100)),
    # amax 28 in E3M2: floor(log2 28) = 4 = emax_elem, X = 1; 0.1 -> nearest 0.125 (subnormal).
    BlockCase("fp6_e3m2", "mxfp6", (28.0, 0.1, -17.0), 127, (0b0_111_11, 0b0_000_10, 0b1_111_00)),
    # E2M3: amax 3 -> floor(log2 3) = 1, shared_exp -1, X = 0.5: 3 -> 6 (S.11.100), 0.1 -> 0.2 -> 0.25,
    # -0.0625 -> -0.125 (the min subnormal).
    BlockCase("fp6_e2m3", "mxfp6_e2m3", (3.0, 0.1, -0.0625), 126, (0b0_11_100, 0b0_00_010, 0b1_00_001)),
    # amax just under the next power of two: 7.9 -> X = 1 (floor(log2 7.9) = 2), saturates to 6;
    # 7.0 rounds (tie 6 | 8) to the clamp, 5.0 ties to 4.
    BlockCase("saturation", "mxfp4", (7.9, -7.0, 5.0), 127, (0b0_11_1, 0b1_11_1, 0b0_11_0)),
    # amax 48: floor(log2 48) = 5, X = 2^3: 48 / 8 = 6 (max), 20 / 8 = 2.5 -> 2 (tie), 3 / 8 -> 0.5.
    BlockCase("scaled", "mxfp4", (48.0, 20.0, -3.0), 130, (0b0_11_1, 0b0_10_0, 0b1_00_1)),
    # amax 2^-130 (a float32 subnormal): shared_exp -132 clamps to -127, so the block is stored at
    # X = 2^-127 and 2^-130 / 2^-127 = 0.125 underflows to 0.
    BlockCase("below_e8m0", "mxfp4", (2.0**-130, -(2.0**-131)), 0, (0b0_00_0, 0b1_00_0)),
    # amax 2^100: X = 2^98.
    BlockCase("large", "mxfp4", (2.0**100, 3 * 2.0**98), 127 + 98, (0b0_11_0, 0b0_10_1)),
    # A NaN or an infinity: the NaN scale and zero elements.
    BlockCase("nan", "mxfp4", (1.0, math.nan, 2.0), 0xFF, (0, 0, 0)),
    BlockCase("inf", "mxfp8", (1.0, -math.inf), 0xFF, (0, 0)),
    BlockCase("nan_fp6", "mxfp6", (math.nan,), 0xFF, (0,)),
    # NVFP4: amax 6, t 1 -> s = 1.0 (S.0111.000); elements as they are.
    BlockCase("nvfp4_unit", "nvfp4", (6.0, -1.5, 0.25), 0b0_0111_000, (0b0_11_1, 0b1_01_1, 0b0_00_0)),
    # amax 7: 7/6 = 1.1667 -> E4M3 1.125 (S.0111.001); 7 / 1.125 = 6.22 saturates to 6;
    # 2.25 / 1.125 = 2.
    BlockCase("nvfp4_round", "nvfp4", (7.0, 2.25), 0b0_0111_001, (0b0_11_1, 0b0_10_0)),
    # t = 0.5: amax 6 -> s = 6 / 3 = 2 (S.1000.000), denominator s * t = 1.
    BlockCase("nvfp4_tensor_scale", "nvfp4", (6.0, 3.0), 0b0_1000_000, (0b0_11_1, 0b0_10_1), 0.5),
    # amax 1e-5: s = 1.67e-6 is below half E4M3's min subnormal (2^-10): s = 0, elements signed 0.
    BlockCase("nvfp4_zero_scale", "nvfp4", (1e-5, -1e-5), 0, (0b0_00_0, 0b1_00_0)),
    BlockCase("nvfp4_nan", "nvfp4", (math.nan, 1.0), 0b0_1111_111, (0, 0)),
]
BLOCK_SIZE = {"mxfp8": 32, "mxfp6": 32, "mxfp6_e2m3": 32, "mxfp4": 32, "nvfp4": 16}
ELEMENT = {"mxfp8": "e4m3", "mxfp6": "e3m2", "mxfp6_e2m3": "e2m3", "mxfp4": "e2m1", "nvfp4": "e2m1"}


def pack_block(codes: list[int], scale_code: int, bits: int) -> list[int]:
    """One block's bytes as the layout defines them, bit by bit: element i's bits at stream
    position bits * i (least significant first), then the scale byte."""
    stream = 0
    for i, code in enumerate(codes):
        stream |= code << (bits * i)
    return [(stream >> (8 * b)) & 0xFF for b in range(len(codes) * bits // 8)] + [scale_code]


def all_cases(elem: str) -> list[Case]:
    return [case for group in ENCODE_CASES[elem].values() for case in group]
