"""Run the Triton kernel tests on a GPU when there is one, else in Triton's interpreter.

On a host without a GPU (Triton 3.9.0):

1. Our kernels are decorated in interpreter mode. Triton reads ``TRITON_INTERPRET`` when
   ``@triton.jit`` runs (``triton.runtime.jit.jit`` then returns an ``InterpretedFunction``),
   so it is set while ``maia_serving.ops.triton`` is first imported, and restored after, so
   that other tests in the session (and ``maia_serving.ops``' backend choice) do not see
   it. Triton also reads it at run time (its first launch imports
   ``triton.experimental.gluon``, which checks it), so ``_triton_interpret_env`` sets it
   again for each kernel test.
2. ``triton.language`` is imported before that, in normal mode, as ``import vllm`` would do
   anyway in this process: its ``@jit`` library functions (``tl.max``, ``tl.sum``,
   ``tl.zeros``, ...) are then ``JITFunction`` objects, whose ``__call__`` only raises
   "Cannot call @triton.jit'd outside of the scope of a kernel". The patch makes that call
   run the function through ``InterpretedFunction``, as interpreter mode would have done.
3. The interpreter converts floats with its own bit arithmetic, which is wrong for the
   types these kernels use (measured; see /work/shared/notes/engines.md):
   fp32 -> fp8 e4m3 drops the rounding carry into the exponent (1.976 -> 1.0), does not
   saturate (500 -> 256) and flushes subnormals; fp8 NaN codes decode as 480 (e4m3) and
   98304 (e5m2); bf16 is kept as raw uint16 and fp32 -> bf16 truncates instead of rounding
   to nearest even (arithmetic on a bf16 tensor also computes on the raw integers: the
   kernels upcast right after every load, so that one is not patched). The patch replaces
   ``InterpreterBuilder.cast_impl`` and ``create_fp_to_fp`` with torch conversions whenever
   bf16 or an FP8 type is involved. torch rounds to nearest even like the GPU's ``cvt.rn``;
   it does not saturate on overflow, but the kernels clamp before every FP8 cast.

Patches 2 and 3 keep the originals and are undone after each test module. The tests in
test_interpreter_patch.py fail once Triton no longer needs them: then remove them.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Iterator

import numpy as np
import pytest
import torch
import triton.language  # noqa: F401 - before TRITON_INTERPRET is set: see 2. above

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")


def _import_kernels_interpreted() -> None:
    """Import (decorate) the kernels with TRITON_INTERPRET=1, then restore the env."""
    if "maia_serving.ops.triton" in sys.modules:
        from triton.runtime.interpreter import InterpretedFunction

        module = importlib.import_module("maia_serving.ops.triton.reshape_and_cache")
        if not isinstance(module._reshape_and_cache_kernel, InterpretedFunction):
            raise RuntimeError(
                "maia_serving.ops.triton was imported before tests/unit/ops/triton_kernels/conftest.py set "
                "TRITON_INTERPRET=1; run the kernel tests on their own or import the kernels "
                "lazily elsewhere"
            )
        return
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import maia_serving.ops.triton  # noqa: F401
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous


if not ON_GPU:
    _import_kernels_interpreted()


@pytest.fixture(autouse=True)
def _triton_interpret_env(monkeypatch: pytest.MonkeyPatch) -> None:
    if not ON_GPU:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture
def device() -> torch.device:
    """Where kernel tests put their tensors: the GPU, or the CPU for the interpreter."""
    return DEVICE


def _torch_dtypes() -> dict:
    """Triton scalar types -> torch dtypes, for the types torch can convert."""
    import triton.language as tl

    return {
        tl.int1: torch.bool,
        tl.int8: torch.int8,
        tl.uint8: torch.uint8,
        tl.int16: torch.int16,
        tl.int32: torch.int32,
        tl.int64: torch.int64,
        tl.float16: torch.float16,
        tl.float32: torch.float32,
        tl.float64: torch.float64,
        tl.bfloat16: torch.bfloat16,
        tl.float8e4nv: torch.float8_e4m3fn,
        tl.float8e5: torch.float8_e5m2,
        tl.float8e4b8: torch.float8_e4m3fnuz,
        tl.float8e5b16: torch.float8_e5m2fnuz,
    }


def patch_interpreter() -> dict:
    """Apply patches 2 and 3 in place; returns the originals by name for ``restore``."""
    import triton.language as tl
    from triton.runtime import interpreter
    from triton.runtime.jit import JITFunction

    builder = interpreter.InterpreterBuilder
    originals = {
        "JITFunction.__call__": JITFunction.__call__,
        "cast_impl": builder.cast_impl,
        "create_fp_to_fp": builder.create_fp_to_fp,
    }
    interpreted: dict = {}

    def call_interpreted(self, *args, **kwargs):
        if self.fn not in interpreted:
            interpreted[self.fn] = interpreter.InterpretedFunction(self.fn)
        return interpreted[self.fn](*args, **kwargs)

    torch_dtypes = _torch_dtypes()
    # The interpreter stores these as unsigned integers of the same width.
    storage = {
        torch.bfloat16: torch.uint16,
        torch.float8_e4m3fn: torch.uint8,
        torch.float8_e5m2: torch.uint8,
        torch.float8_e4m3fnuz: torch.uint8,
        torch.float8_e5m2fnuz: torch.uint8,
    }
    special = {tl.bfloat16, tl.float8e4nv, tl.float8e5, tl.float8e4b8, tl.float8e5b16}

    def use_torch(src_ty, dst_ty) -> bool:
        return (src_ty in special or dst_ty in special) and {
            src_ty,
            dst_ty,
        } <= torch_dtypes.keys()

    def convert(src, dst_type):
        src_dtype, dst_dtype = (
            torch_dtypes[src.dtype.scalar],
            torch_dtypes[dst_type.scalar],
        )
        data = torch.from_numpy(np.array(src.data, copy=True)).view(src_dtype)
        out = data.to(dst_dtype).view(storage.get(dst_dtype, dst_dtype)).numpy()
        return interpreter.TensorHandle(out, dst_type.scalar)

    def cast_impl(self, src, dst_type):
        if use_torch(src.dtype.scalar, dst_type.scalar):
            return convert(src, dst_type)
        return originals["cast_impl"](self, src, dst_type)

    def create_fp_to_fp(self, src, dst_type, rounding_mode):
        round_nearest_even = rounding_mode in (None, interpreter._ir.ROUNDING_MODE.RTNE)
        if round_nearest_even and use_torch(src.dtype.scalar, dst_type.scalar):
            return convert(src, dst_type)
        return originals["create_fp_to_fp"](self, src, dst_type, rounding_mode)

    JITFunction.__call__ = call_interpreted
    builder.cast_impl = cast_impl
    builder.create_fp_to_fp = create_fp_to_fp
    return originals


def restore_interpreter(originals: dict) -> None:
    from triton.runtime import interpreter
    from triton.runtime.jit import JITFunction

    JITFunction.__call__ = originals["JITFunction.__call__"]
    interpreter.InterpreterBuilder.cast_impl = originals["cast_impl"]
    interpreter.InterpreterBuilder.create_fp_to_fp = originals["create_fp_to_fp"]


@pytest.fixture(autouse=True, scope="module")
def triton_interpreter_patches() -> Iterator[dict]:
    """Patches 2 and 3 above for the kernel tests; yields the originals (none on a GPU)."""
    if ON_GPU:
        yield {}
        return
    originals = patch_interpreter()
    try:
        yield originals
    finally:
        restore_interpreter(originals)
