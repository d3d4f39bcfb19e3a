"""Shared by every unit test folder: pytest puts this file's folder on ``sys.path`` when it loads
it (rootdir "prepend" import mode, no ``__init__.py``), so tests in the subfolders (kernels/,
sglang/, vllm/) import the helper modules that live here: ``fp8_spec_table`` (FP8 codes worked
out from the OCP spec) and ``attention_float64`` (the float64 attention reference and its
bf16 tolerance)."""


import pytest  # noqa: E402


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
