"""The native host attention (maia_serving.ops.native): chosen by MAIA_SERVING_HOST_KERNEL, served
where built, and a build that fails is either refused by name (native) or replaced by the torch path
with a warning (auto). Its numerics against float64 attention: test_ops_host.py, test_ops_host_mx.py."""

import logging

import pytest
import torch
from attention_float64 import assert_within_one_bf16_step, paged_attention_float64
from paged_batch import CASES, paged_batch

from maia_serving.ops import host, native


@pytest.fixture
def fresh(monkeypatch):
    """module() decides once per process; each test decides afresh."""
    native.module.cache_clear()
    yield
    native.module.cache_clear()


def _broken_build():
    raise RuntimeError("building host_attention.cpp into /x failed: g++ not found")


def test_torch_is_the_torch_path(fresh, monkeypatch):
    monkeypatch.setenv("MAIA_SERVING_HOST_KERNEL", "torch")
    monkeypatch.setattr(native, "load", _broken_build)
    assert native.module() is None


def test_native_that_cannot_build_is_refused_with_what_to_do(fresh, monkeypatch):
    monkeypatch.setenv("MAIA_SERVING_HOST_KERNEL", "native")
    monkeypatch.setattr(native, "load", _broken_build)
    with pytest.raises(RuntimeError, match="MAIA_SERVING_HOST_KERNEL=native: building .* g\\+\\+ not found.*"
                                           "`make setup`"):
        native.module()


def test_auto_serves_with_the_torch_path_when_the_build_fails_and_says_so(fresh, monkeypatch, caplog):
    monkeypatch.delenv("MAIA_SERVING_HOST_KERNEL", raising=False)
    monkeypatch.setattr(native, "load", _broken_build)
    with caplog.at_level(logging.WARNING):
        assert native.module() is None
    assert "g++ not found" in caplog.text and "torch path" in caplog.text


def test_auto_serves_with_the_native_kernel_where_it_builds(fresh, monkeypatch):
    monkeypatch.delenv("MAIA_SERVING_HOST_KERNEL", raising=False)
    assert native.module() is native.load()


@pytest.mark.parametrize("fmt", ["auto", "fp8_e4m3", "mxfp4", "nvfp4"])
def test_where_built_the_kernel_serves_alone(native_host_path, monkeypatch, fmt):
    """No torch-path step runs: the pages are never gathered, the reference never called."""
    for name in ("_pages", "paged_attention_ref", "_mx_fallback"):
        monkeypatch.setattr(host, name, _refuse)
    scales = (torch.tensor([0.02, 0.05]), torch.tensor(0.03)) if fmt.startswith("fp8") else (
        (torch.tensor([0.01, 0.02]), torch.tensor([0.03, 0.04])) if fmt == "nvfp4" else (None, None))
    args = paged_batch(CASES["chunked_and_prefix_hit"], fmt, 2, 3, *scales, 16, 2, 64)
    assert_within_one_bf16_step(host.paged_attention_host(*args), *paged_attention_float64(*args))


def _refuse(*args, **kwargs):
    raise AssertionError("the native kernel must serve this call alone")


def test_a_cache_in_another_dtype_than_the_query_takes_the_torch_path(native_host_path):
    """The kernel reads a plain cache in the query's dtype; a float32 cache under bf16 queries does not
    fit it, and the torch path serves it."""
    args = list(paged_batch(CASES["decode"], "auto", 2, 4, None, None, 16, 2, 32))
    args[1], args[2] = args[1].float(), args[2].float()
    assert_within_one_bf16_step(host.paged_attention_host(*args), *paged_attention_float64(*args))
