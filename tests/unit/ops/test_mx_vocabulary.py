"""One vocabulary: ops.mx's block-scaled KV formats are precision.py's entries; both size a head row alike."""

import pytest

from maia_serving.formats import precision
from maia_serving.ops import mx


def test_the_mx_formats_are_the_vocabularys_block_scaled_kv_formats_in_order():
    assert (
        tuple(mx.MX_FORMATS) == precision.BLOCK_SCALED_KV_FORMATS == ("mxfp8", "mxfp6", "mxfp6_e2m3", "mxfp4", "nvfp4")
    )
    assert set(precision.BLOCK_SCALED_KV_FORMATS) <= set(precision.KV_CACHE_FORMATS)


@pytest.mark.parametrize("name", list(mx.MX_FORMATS))
def test_element_block_and_scale_agree(name):
    fmt, d = mx.MX_FORMATS[name], precision.dtype(name)
    elem = fmt.element
    assert elem.name == d.element == f"e{elem.exponent_bits}m{elem.mantissa_bits}"
    assert elem.bits == d.element_bits
    assert fmt.block_size == d.block_size
    assert fmt.scale == d.scale
    assert fmt.block_bytes * 8 == d.block_size * d.element_bits + d.scale_bits


@pytest.mark.parametrize("name", list(mx.MX_FORMATS))
def test_head_bytes_is_the_vocabularys_row_size_at_every_head_dim(name):
    d = precision.dtype(name)
    for head_dim in range(1, 577):
        assert mx.head_bytes(name, head_dim) == d.row_bytes(head_dim), head_dim
    assert mx.bits_per_element(name, 128) == d.bits_per_element


def test_mxfp6_is_e3m2_as_ocp_mx_and_issue_10_name_it():
    assert mx.MX_FORMATS["mxfp6"].element is mx.ELEMENT_FORMATS["e3m2"]
    assert mx.MX_FORMATS["mxfp6"].element.max_value == 28.0  # OCP MX v1.0 Table 2: FP6 E3M2 max normal
    assert mx.MX_FORMATS["mxfp6_e2m3"].element.max_value == 7.5  # FP6 E2M3 max normal


def test_a_layout_the_pages_cannot_hold_is_refused():
    wide_scale = precision.DType(
        "mxfp4_wide", 4, "fp4", "test", block_size=32, scale_bits=16, element="e2m1", scale="e8m0"
    )
    with pytest.raises(ValueError, match="one 8-bit scale per block"):
        mx._from_vocabulary(wide_scale)
