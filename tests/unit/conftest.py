"""Fixtures shared by every unit test folder; the helper modules (FP8 and MX spec tables, the float64
attention reference, paged batches) live in tests/utils."""

import pytest


@pytest.fixture
def native_host_path(monkeypatch) -> None:
    """The C++ host attention, which this project's setup builds: it must load here."""
    from maia_serving.ops import native

    kernel = native.load()
    monkeypatch.setattr(native, "module", lambda: kernel)


@pytest.fixture
def torch_host_path(monkeypatch) -> None:
    """The torch path alone: for what only it does (its score limit, its per-sequence fallback)."""
    from maia_serving.ops import native

    monkeypatch.setattr(native, "module", lambda: None)


@pytest.fixture(params=["native", "torch"])
def host_kernel(request) -> str:
    """Both host attention paths: the C++ kernel and the chain of torch ops."""
    request.getfixturevalue(f"{request.param}_host_path")
    return request.param
