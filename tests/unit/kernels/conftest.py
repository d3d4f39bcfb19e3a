"""Run the Triton kernel tests on a GPU when there is one, else in Triton's interpreter.

Interpreter mode: Triton reads ``TRITON_INTERPRET`` when ``@triton.jit`` decorates a kernel
(``triton.runtime.jit.jit`` picks ``InterpretedFunction`` then), so it is set here, before
``maia_serving.kernels`` is first imported, and restored right after, so that other tests
in the same session (and ``maia_serving.ops``' backend choice) do not see it. Triton also
reads it at run time (the first launch imports ``triton.experimental.gluon``, which asserts
interpreter mode), so the autouse ``_triton_interpret_env`` sets it again for each kernel test.

Triton 3.9.0's interpreter converts floats with its own bit arithmetic, which is wrong for
the types these kernels use (measured; see /work/shared/notes/engines.md):

- fp32 -> fp8 e4m3: the rounding carry does not reach the exponent (1.976 -> 1.0), no
  saturation (500 -> 256), subnormals flushed;
- fp8 -> fp32: NaN codes decode as 480 (e4m3) and 98304 (e5m2);
- bf16 is kept as raw uint16 and fp32 -> bf16 truncates instead of rounding to nearest even
  (arithmetic on a bf16 tensor computes on the raw integers: the kernels upcast right
  after every load, so that one is not patched).

``torch_conversions_in_interpreter`` replaces the two conversion entry points of
``triton.runtime.interpreter.InterpreterBuilder`` (``cast_impl`` and ``create_fp_to_fp``)
with torch conversions whenever bf16 or an FP8 type is involved. torch's casts round to
nearest even like the GPU's ``cvt.rn``; torch does not saturate on overflow, but the kernels
clamp before every FP8 cast, so the difference never shows. Remove the patch when
``test_interpreter_patch.py::test_interpreter_still_needs_patch`` fails after a Triton
upgrade (the interpreter then converts correctly by itself).
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Iterator

import numpy as np
import pytest
import torch

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")


def _import_kernels_interpreted() -> None:
    """Import (decorate) the kernels with TRITON_INTERPRET=1, then restore the env."""
    if "maia_serving.kernels" in sys.modules:
        from triton.runtime.interpreter import InterpretedFunction

        module = importlib.import_module("maia_serving.kernels.reshape_and_cache")
        if not isinstance(module._reshape_and_cache_kernel, InterpretedFunction):
            raise RuntimeError(
                "maia_serving.kernels was imported before tests/unit/kernels/conftest.py set "
                "TRITON_INTERPRET=1; run the kernel tests on their own or import the kernels "
                "lazily elsewhere"
            )
        return
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import maia_serving.kernels  # noqa: F401
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


def patch_interpreter_conversions() -> dict:
    """Patch ``InterpreterBuilder`` in place; returns the originals for ``restore``."""
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    originals = {name: getattr(builder, name) for name in ("cast_impl", "create_fp_to_fp")}
    torch_dtypes = _torch_dtypes()
    # The interpreter stores these as unsigned integers of the same width.
    storage = {torch.bfloat16: torch.uint16, torch.float8_e4m3fn: torch.uint8,
               torch.float8_e5m2: torch.uint8, torch.float8_e4m3fnuz: torch.uint8,
               torch.float8_e5m2fnuz: torch.uint8}  # fmt: skip
    special = {tl.bfloat16, tl.float8e4nv, tl.float8e5, tl.float8e4b8, tl.float8e5b16}

    def use_torch(src_ty, dst_ty) -> bool:
        return (src_ty in special or dst_ty in special) and {src_ty, dst_ty} <= torch_dtypes.keys()

    def convert(src, dst_type):
        src_dtype, dst_dtype = torch_dtypes[src.dtype.scalar], torch_dtypes[dst_type.scalar]
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

    builder.cast_impl = cast_impl
    builder.create_fp_to_fp = create_fp_to_fp
    return originals


def restore_interpreter_conversions(originals: dict) -> None:
    from triton.runtime import interpreter

    for name, fn in originals.items():
        setattr(interpreter.InterpreterBuilder, name, fn)


@pytest.fixture(autouse=True, scope="session")
def torch_conversions_in_interpreter() -> Iterator[dict]:
    """Exact bf16/FP8 conversions in Triton's interpreter for the kernel tests (see above).

    Yields the original ``InterpreterBuilder`` methods by name (none on a GPU host).
    """
    if ON_GPU:
        yield {}
        return
    originals = patch_interpreter_conversions()
    try:
        yield originals
    finally:
        restore_interpreter_conversions(originals)
