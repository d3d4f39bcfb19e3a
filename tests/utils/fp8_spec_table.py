"""FP8 encodings worked out by hand from the OCP 8-bit Floating Point Specification (OFP8) rev 1.0.

An oracle for the FP8 tests that owes nothing to torch: every expected code below was worked out
on paper from the spec and is written in the spec's own S.EEEE.MMM (E4M3) / S.EEEEE.MM (E5M2)
notation as a binary literal; ``decode`` is the spec's value formula on the three bit fields.

- Formats (OFP8 Tables 1 and 2): E4M3 has exponent bias 7, no infinities, NaN = S.1111.111,
  max normal S.1111.110 = 1.75 * 2^8 = 448, min normal S.0001.000 = 2^-6, subnormals
  S.0000.mmm = mmm/8 * 2^-6 (min 2^-9). E5M2 has bias 15, infinities S.11111.00, NaN =
  S.11111.{01, 10, 11}, max normal S.11110.11 = 1.75 * 2^15 = 57344, min normal S.00001.00 =
  2^-14, subnormals S.00000.mm = mm/4 * 2^-14 (min 2^-16). Both keep +0 and -0.
- Conversion from a wider format (OFP8 section 5.2.1 and Table 3): round to nearest, ties to
  even, as if the exponent range were unbounded; a result beyond max normal then saturates to
  +-max (saturating mode) or becomes NaN (E4M3) / +-inf (E5M2) (non-saturating mode). The
  project's quantization clamps to +-max before casting (maia_serving.ops.fp8 and the
  reshape_and_cache kernel), so its mode is the saturating one, +-inf included; NaN stays NaN.

Each case's input is a float32 value (what the kernels divide and cast); none sits close
enough to a rounding boundary for the float32 rounding of the decimal literal to matter.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass


@dataclass(frozen=True)
class Fp8Spec:
    """One OFP8 format's fields and special codes (OFP8 Tables 1 and 2)."""

    name: str
    exponent_bits: int
    mantissa_bits: int
    bias: int
    max_code: int  # +max normal
    nan_codes: frozenset[int]
    inf_code: int | None  # +inf, None for E4M3


E4M3 = Fp8Spec("e4m3", 4, 3, 7, 0b0_1111_110, frozenset({0b0_1111_111, 0b1_1111_111}), None)
E5M2 = Fp8Spec(
    "e5m2",
    5,
    2,
    15,
    0b0_11110_11,
    frozenset({0b0_11111_01, 0b0_11111_10, 0b0_11111_11, 0b1_11111_01, 0b1_11111_10, 0b1_11111_11}),
    0b0_11111_00,
)
SPECS = {"e4m3": E4M3, "e5m2": E5M2}


def decode(code: int, spec: Fp8Spec) -> float:
    """The value of an FP8 code by the spec's formula: (-1)^S * 2^(E - bias) * 1.M for normals,
    (-1)^S * 2^(1 - bias) * 0.M for E = 0; NaN and inf as the spec reserves them."""
    sign = -1.0 if code >> 7 else 1.0
    exponent = (code >> spec.mantissa_bits) & ((1 << spec.exponent_bits) - 1)
    mantissa = code & ((1 << spec.mantissa_bits) - 1)
    if code in spec.nan_codes:
        return math.nan
    if spec.inf_code is not None and code & 0x7F == spec.inf_code:
        return sign * math.inf
    if exponent == 0:
        return sign * math.ldexp(mantissa, 1 - spec.bias - spec.mantissa_bits)
    return sign * math.ldexp((1 << spec.mantissa_bits) + mantissa, exponent - spec.bias - spec.mantissa_bits)


@dataclass(frozen=True)
class Case:
    """A float32 input and the code that OFP8 conversion in saturating mode gives it."""

    value: float
    code: int


# Named codes of OFP8 Table 2 (E4M3 and E5M2 columns): code -> value.
DECODE_ANCHORS: dict[str, list[tuple[int, float]]] = {
    "e4m3": [
        (0b0_0000_000, 0.0),
        (0b1_0000_000, -0.0),
        (0b0_0000_001, 2.0**-9),  # min subnormal
        (0b0_0000_111, 0.875 * 2.0**-6),  # max subnormal
        (0b0_0001_000, 2.0**-6),  # min normal
        (0b0_0111_000, 1.0),
        (0b0_1111_000, 256.0),  # E = 1111 holds normals in E4M3
        (0b0_1111_110, 448.0),  # max normal
        (0b1_1111_110, -448.0),
        (0b0_1111_111, math.nan),
        (0b1_1111_111, math.nan),
    ],
    "e5m2": [
        (0b0_00000_00, 0.0),
        (0b1_00000_00, -0.0),
        (0b0_00000_01, 2.0**-16),  # min subnormal
        (0b0_00000_11, 0.75 * 2.0**-14),  # max subnormal
        (0b0_00001_00, 2.0**-14),  # min normal
        (0b0_01111_00, 1.0),
        (0b0_11110_11, 57344.0),  # max normal
        (0b1_11110_11, -57344.0),
        (0b0_11111_00, math.inf),
        (0b1_11111_00, -math.inf),
        (0b0_11111_01, math.nan),
        (0b1_11111_11, math.nan),
    ],
}

# Conversion cases per format and group; groups cite the spec rule they exercise.
ENCODE_CASES: dict[str, dict[str, list[Case]]] = {
    "e4m3": {
        # Table 2: values the format holds exactly map to their own code.
        "exact": [
            Case(1.0, 0b0_0111_000),
            Case(-2.0, 0b1_1000_000),
            Case(1.5, 0b0_0111_100),  # 1.100 * 2^0
            Case(3.25, 0b0_1000_101),  # 1.101 * 2^1
            Case(0.5, 0b0_0110_000),
            Case(240.0, 0b0_1110_111),  # 1.111 * 2^7
            Case(256.0, 0b0_1111_000),
            Case(448.0, 0b0_1111_110),  # max normal
            Case(-448.0, 0b1_1111_110),
            Case(2.0**-6, 0b0_0001_000),  # min normal
            Case(-1.125 * 2.0**-6, 0b1_0001_001),
        ],
        # 5.2.1: nearest representable; ties to the even mantissa, up or down.
        "nearest": [
            Case(0.3, 0b0_0101_010),  # 1.2 * 2^-2: mantissa 1.6/8 -> 2/8, 0.3125
            Case(1.0625 + 2.0**-20, 0b0_0111_001),  # just above the 1.0/1.125 tie
            Case(1.1875 - 2.0**-20, 0b0_0111_001),  # just below the 1.125/1.25 tie
            Case(1.976, 0b0_1000_000),  # rounds up into the next binade: 2.0
        ],
        "ties_to_even": [
            Case(1.0625, 0b0_0111_000),  # 1.000 | 1.001 -> down to .000
            Case(1.1875, 0b0_0111_010),  # 1.001 | 1.010 -> up to .010
            Case(-1.0625, 0b1_0111_000),
            Case(-1.1875, 0b1_0111_010),
            Case(1.9375, 0b0_1000_000),  # 1.111 * 2^0 | 1.000 * 2^1 -> up, carry into the exponent
            Case(17.0, 0b0_1011_000),  # 16 | 18 -> 16
            Case(19.0, 0b0_1011_010),  # 18 | 20 -> 20
        ],
        # 5.2.1: between max normal (448 = 1.110 * 2^8) and the next step (480 = 1.111 * 2^8, the
        # NaN code): below the midpoint 464 and at it (tie, 448 is even) rounding itself gives max.
        "above_max": [
            Case(450.0, 0b0_1111_110),
            Case(463.5, 0b0_1111_110),
            Case(464.0, 0b0_1111_110),
            Case(-460.0, 0b1_1111_110),
        ],
        # Table 3, saturating mode: what rounds past max normal (and +-inf) gives +-max; the
        # non-saturating mode would give NaN here.
        "saturation": [
            Case(465.0, 0b0_1111_110),
            Case(480.0, 0b0_1111_110),
            Case(500.0, 0b0_1111_110),
            Case(1e9, 0b0_1111_110),
            Case(math.inf, 0b0_1111_110),
            Case(-500.0, 0b1_1111_110),
            Case(-math.inf, 0b1_1111_110),
        ],
        # Table 2 subnormals S.0000.mmm = mmm * 2^-9, rounded like normals (5.2.1).
        "subnormal": [
            Case(2.0**-9, 0b0_0000_001),  # min subnormal
            Case(7 * 2.0**-9, 0b0_0000_111),  # max subnormal
            Case(0.75 * 2.0**-9, 0b0_0000_001),
            Case(1.5 * 2.0**-9, 0b0_0000_010),  # tie 001 | 010 -> up
            Case(2.5 * 2.0**-9, 0b0_0000_010),  # tie 010 | 011 -> down
            Case(-3.5 * 2.0**-9, 0b1_0000_100),  # tie 011 | 100 -> up
            Case(7.5 * 2.0**-9, 0b0_0001_000),  # tie max subnormal | min normal -> min normal
        ],
        # Below half the min subnormal the result is a zero of the input's sign; at exactly half
        # it is a tie between 0 (even) and 2^-9 (odd).
        "underflow": [
            Case(2.0**-10, 0b0_0000_000),
            Case(-(2.0**-10), 0b1_0000_000),
            Case(2.0**-10 * (1 + 2.0**-10), 0b0_0000_001),  # just above the tie
            Case(2.0**-11, 0b0_0000_000),
            Case(1e-30, 0b0_0000_000),
            Case(-1e-30, 0b1_0000_000),
        ],
        "zero": [Case(0.0, 0b0_0000_000), Case(-0.0, 0b1_0000_000)],
    },
    "e5m2": {
        "exact": [
            Case(1.0, 0b0_01111_00),
            Case(-1.0, 0b1_01111_00),
            Case(1.5, 0b0_01111_10),  # 1.10 * 2^0
            Case(3.0, 0b0_10000_10),  # 1.10 * 2^1
            Case(0.25, 0b0_01101_00),
            Case(49152.0, 0b0_11110_10),  # 1.10 * 2^15
            Case(57344.0, 0b0_11110_11),  # max normal
            Case(-57344.0, 0b1_11110_11),
            Case(2.0**-14, 0b0_00001_00),  # min normal
            Case(1.25 * 2.0**-14, 0b0_00001_01),
        ],
        "nearest": [
            Case(0.3, 0b0_01101_01),  # 1.2 * 2^-2: mantissa 0.8/4 -> 1/4, 0.3125
            Case(1.125 + 2.0**-20, 0b0_01111_01),  # just above the 1.0/1.25 tie
            Case(1.95, 0b0_10000_00),  # rounds up into the next binade: 2.0
        ],
        "ties_to_even": [
            Case(1.125, 0b0_01111_00),  # 1.00 | 1.01 -> down
            Case(1.375, 0b0_01111_10),  # 1.01 | 1.10 -> up
            Case(-1.125, 0b1_01111_00),
            Case(-1.375, 0b1_01111_10),
            Case(1.875, 0b0_10000_00),  # 1.11 * 2^0 | 1.00 * 2^1 -> up, carry into the exponent
            Case(36.0, 0b0_10100_00),  # 32 | 40 -> 32
            Case(44.0, 0b0_10100_10),  # 40 | 48 -> 48
        ],
        # Between max normal (57344 = 1.11 * 2^15) and the midpoint 61440 to 2^16, rounding
        # itself gives max.
        "above_max": [
            Case(57345.0, 0b0_11110_11),
            Case(60000.0, 0b0_11110_11),
            Case(61439.0, 0b0_11110_11),
            Case(-61000.0, 0b1_11110_11),
        ],
        # Table 3, saturating mode. 61440 is a tie between 57344 (odd mantissa 11) and 2^16 (even):
        # it rounds to 2^16, past max normal, so it saturates too; non-saturating mode gives +-inf.
        "saturation": [
            Case(61440.0, 0b0_11110_11),
            Case(65536.0, 0b0_11110_11),
            Case(1e9, 0b0_11110_11),
            Case(math.inf, 0b0_11110_11),
            Case(-61440.0, 0b1_11110_11),
            Case(-math.inf, 0b1_11110_11),
        ],
        # Table 2 subnormals S.00000.mm = mm * 2^-16.
        "subnormal": [
            Case(2.0**-16, 0b0_00000_01),  # min subnormal
            Case(3 * 2.0**-16, 0b0_00000_11),  # max subnormal
            Case(0.75 * 2.0**-16, 0b0_00000_01),
            Case(1.5 * 2.0**-16, 0b0_00000_10),  # tie 01 | 10 -> up
            Case(2.5 * 2.0**-16, 0b0_00000_10),  # tie 10 | 11 -> down
            Case(-1.5 * 2.0**-16, 0b1_00000_10),
            Case(3.5 * 2.0**-16, 0b0_00001_00),  # tie max subnormal | min normal -> min normal
        ],
        "underflow": [
            Case(2.0**-17, 0b0_00000_00),  # tie 0 | 2^-16 -> 0
            Case(-(2.0**-17), 0b1_00000_00),
            Case(2.0**-17 * (1 + 2.0**-10), 0b0_00000_01),
            Case(2.0**-18, 0b0_00000_00),
            Case(1e-30, 0b0_00000_00),
            Case(-1e-30, 0b1_00000_00),
        ],
        "zero": [Case(0.0, 0b0_00000_00), Case(-0.0, 0b1_00000_00)],
    },
}

# What the torch reference writes for a NaN input: the all-ones NaN code with the input's sign
# (maia_serving.ops.fp8's contract; OFP8 5.2.1 leaves the NaN produced open, so a kernel may
# write any code of ``Fp8Spec.nan_codes``).
NAN_CODE = {"e4m3": {False: 0b0_1111_111, True: 0b1_1111_111}, "e5m2": {False: 0b0_11111_11, True: 0b1_11111_11}}


def f32(x: float) -> float:
    """``x`` rounded to float32 (to nearest, ties to even), as a Python float."""
    return struct.unpack("f", struct.pack("f", x))[0]


def all_cases(fmt: str) -> list[Case]:
    """Every conversion case of one format, groups in order."""
    return [case for group in ENCODE_CASES[fmt].values() for case in group]
