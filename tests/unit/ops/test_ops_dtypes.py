"""maia_serving.ops maps the emulator's dtype vocabulary to torch, and reads KV cache dtypes through it."""

import pytest
import torch

from maia_serving import ops
from maia_serving.formats import precision


@pytest.mark.parametrize(
    ("spelling", "expected"),
    [
        ("bfloat16", torch.bfloat16),
        ("bf16", torch.bfloat16),
        ("half", torch.float16),
        ("float", torch.float32),
        ("fp8", torch.float8_e4m3fn),
        ("float8_e5m2", torch.float8_e5m2),
        ("int8", torch.int8),
    ],
)
def test_every_spelling_maps_to_its_torch_dtype(spelling, expected):
    assert ops.torch_dtype(spelling) is expected


def test_formats_torch_does_not_hold_are_named():
    with pytest.raises(ValueError, match=r"'mxfp4' has no torch dtype; those with one: fp32, bf16"):
        ops.torch_dtype("mxfp4")


def test_every_kv_cache_spelling_of_the_vocabulary_resolves():
    """The emulator prices and the kernels store the same KV cache formats."""
    for spelling in precision.kv_cache_spellings():
        fmt = ops.resolve_kv_cache_dtype(spelling)
        fp8 = spelling != "auto" and precision.dtype(spelling).name.startswith("fp8")
        assert (fmt is not None) == fp8
        if fp8:
            assert fmt.torch_dtype is ops.torch_dtype(spelling)


def test_a_named_unquantized_cache_must_have_its_dtype():
    cache = torch.zeros(1, 16, 2, 8, dtype=torch.float16)
    assert ops.check_cache_dtype("half", cache) is None
    with pytest.raises(ValueError, match="needs a cache of dtype torch.bfloat16, got torch.float16"):
        ops.check_cache_dtype("bfloat16", cache)
