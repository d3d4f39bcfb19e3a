"""kv_absmax: the kernel vs the reference, and the op-level backend switch."""

from __future__ import annotations

import pytest
import torch

from maia_serving import ops
from maia_serving.ops.fp8 import kv_absmax_ref
from maia_serving.ops.triton import kv_absmax


@pytest.mark.parametrize(
    ("num_tokens", "num_kv_heads", "head_dim", "dtype"),
    [
        (37, 3, 72, torch.bfloat16),
        (300, 2, 128, torch.float32),
        (1, 4, 80, torch.float16),
    ],
)
def test_kernel_matches_reference(num_tokens, num_kv_heads, head_dim, dtype, device):
    g = torch.Generator().manual_seed(num_tokens)
    x = (torch.randn(num_tokens, num_kv_heads, head_dim, generator=g) * 5).to(dtype)
    x[-1, 0, 1] = -1000.0  # the largest magnitude is negative, in the last token
    torch.testing.assert_close(kv_absmax(x.to(device)).cpu(), kv_absmax_ref(x), rtol=0, atol=0)
    assert kv_absmax_ref(x)[0] == 1000.0


def test_nan_ignored_inf_counted(device):
    x = torch.ones(5, 2, 16, device=device)
    x[2, 0, 3] = float("nan")
    x[4, 1, 0] = float("-inf")
    expected = torch.tensor([1.0, float("inf")])
    torch.testing.assert_close(kv_absmax(x).cpu(), expected)
    torch.testing.assert_close(kv_absmax_ref(x).cpu(), expected)


def test_strided_input_and_no_tokens(device):
    qkv = torch.randn(6, 3 * 2 * 32, device=device)  # a fused QKV projection
    key = qkv[:, 64:128].view(6, 2, 32)
    torch.testing.assert_close(kv_absmax(key), kv_absmax_ref(key), rtol=0, atol=0)
    torch.testing.assert_close(kv_absmax(key[:0]), torch.zeros(2, device=device))


def test_bad_input_raises(device):
    with pytest.raises(ValueError, match="num_tokens, num_kv_heads, head_dim"):
        kv_absmax(torch.zeros(4, 8, device=device))


@pytest.mark.parametrize(
    ("env", "interpret", "expected"),
    [
        ("torch", "1", "torch"),
        ("triton", "0", "triton"),
        ("auto", "1", "triton"),
        ("auto", "0", "torch"),
        ("", "", "torch"),
    ],
)
def test_backend_switch_on_cpu(env, interpret, expected, monkeypatch):
    monkeypatch.setenv(ops.KERNELS_ENV, env)
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    assert ops.kernel_backend(torch.device("cpu")) == expected


def test_backend_switch_rejects_unknown_value(monkeypatch):
    monkeypatch.setenv(ops.KERNELS_ENV, "cuda")
    with pytest.raises(ValueError, match="MAIA_SERVING_KERNELS=.cuda.*auto, triton or torch"):
        ops.kernel_backend(torch.device("cpu"))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_ops_dispatch(backend, monkeypatch, device):
    monkeypatch.setenv(ops.KERNELS_ENV, backend)
    x = torch.randn(9, 2, 16, device=device)
    torch.testing.assert_close(ops.kv_absmax(x), kv_absmax_ref(x), rtol=0, atol=0)
