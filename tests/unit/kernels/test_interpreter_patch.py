"""The interpreter patch in conftest.py: its targets still exist and it is still needed."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="the interpreter is only patched without a GPU"
)


def test_patched_symbols_still_exist(torch_conversions_in_interpreter):
    from triton.runtime import interpreter

    expected = {
        "cast_impl": ["self", "src", "dst_type"],
        "create_fp_to_fp": ["self", "src", "dst_type", "rounding_mode"],
    }
    for name, params in expected.items():
        original = torch_conversions_in_interpreter[name]
        assert list(inspect.signature(original).parameters) == params, name
    assert hasattr(interpreter, "TensorHandle")
    assert hasattr(interpreter._ir.ROUNDING_MODE, "RTNE")


def test_interpreter_still_needs_patch(torch_conversions_in_interpreter):
    """Fails once Triton's own fp32 -> fp8 e4m3 conversion is right: then drop the patch."""
    import triton.language as tl
    from triton.runtime import interpreter

    x = np.array([1.976, 500.0], dtype=np.float32)
    expected = torch.from_numpy(x).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    builder, rtne = interpreter.interpreter_builder, interpreter._ir.ROUNDING_MODE.RTNE
    handle = interpreter.TensorHandle(x, tl.float32)

    patched = builder.create_fp_to_fp(handle, tl.float8e4nv, rtne)
    assert patched.data.tolist() == expected.tolist()
    original = torch_conversions_in_interpreter["create_fp_to_fp"](builder, handle, tl.float8e4nv, rtne)
    assert original.data.tolist() != expected.tolist(), (
        "Triton's interpreter now converts fp32 -> fp8 e4m3 correctly: check bf16 and NaN "
        "decoding too, then remove the patch in tests/unit/kernels/conftest.py"
    )
