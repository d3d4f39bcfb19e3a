"""The interpreter patches in conftest.py: their targets still exist and are still needed."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter is only patched without a GPU")


def test_patched_symbols_still_exist(triton_interpreter_patches):
    from triton.runtime import interpreter

    expected = {
        "JITFunction.__call__": ["self", "args", "kwargs"],
        "cast_impl": ["self", "src", "dst_type"],
        "create_fp_to_fp": ["self", "src", "dst_type", "rounding_mode"],
    }
    for name, params in expected.items():
        assert list(inspect.signature(triton_interpreter_patches[name]).parameters) == params, name
    assert hasattr(interpreter, "TensorHandle")
    assert hasattr(interpreter, "InterpretedFunction")
    assert hasattr(interpreter._ir.ROUNDING_MODE, "RTNE")


def test_jit_functions_still_refuse_python_calls(triton_interpreter_patches):
    """Fails once a JITFunction can be called from Python: then drop the __call__ patch."""
    import triton.language as tl

    with pytest.raises(RuntimeError, match="outside of the scope of a kernel"):
        triton_interpreter_patches["JITFunction.__call__"](tl.zeros, (4,), tl.float32)


def test_interpreter_still_needs_patch(triton_interpreter_patches):
    """Fails once Triton's own fp32 -> fp8 e4m3 conversion is right: then drop that patch."""
    import triton.language as tl
    from triton.runtime import interpreter

    x = np.array([1.976, 500.0], dtype=np.float32)
    expected = torch.from_numpy(x).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    builder, rtne = interpreter.interpreter_builder, interpreter._ir.ROUNDING_MODE.RTNE
    handle = interpreter.TensorHandle(x, tl.float32)

    patched = builder.create_fp_to_fp(handle, tl.float8e4nv, rtne)
    assert patched.data.tolist() == expected.tolist()
    original = triton_interpreter_patches["create_fp_to_fp"](builder, handle, tl.float8e4nv, rtne)
    assert original.data.tolist() != expected.tolist(), (
        "Triton's interpreter now converts fp32 -> fp8 e4m3 correctly: check bf16 and NaN "
        "decoding too, then remove the conversion patch in tests/unit/ops/triton_kernels/conftest.py"
    )
