"""Fixtures shared by every unit test folder; the helper modules (FP8 and MX spec tables, the float64
attention reference, paged batches) live in tests/utils."""

import gc
from dataclasses import replace

import pytest


@pytest.fixture(autouse=True)
def _no_inherited_stats_address(monkeypatch) -> None:
    """vLLM's maia platform, loaded in process, sets MAIA_SERVING_STATS_ADDR in os.environ for the engine
    processes it would start (a socket folder of its own): it must not outlive the test that loaded it."""
    monkeypatch.delenv("MAIA_SERVING_STATS_ADDR", raising=False)


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


# The maia torch device's nodes (tests/unit/torch), imported when asked for: the SGLang environment runs these
# fixtures' folder beside its engine's tests.
def _node(profile):
    """The maia torch device sized from ``profile`` (a name or a DeviceProfile) for one test, as before after it."""
    import maia_serving.torch as maia_torch

    gc.collect()  # what an earlier test left to the collector
    with maia_torch.sized_as(profile) as sized:
        yield sized


@pytest.fixture
def small_hbm():
    """A Maia 100 node whose chips hold 1 MiB each (a profile override)."""
    from maia_serving.emulator.hardware import load_profile

    yield from _node(replace(load_profile("maia100"), hbm_capacity_bytes=float(2**20)))


@pytest.fixture
def maia100():
    yield from _node("maia100")


@pytest.fixture
def h100():
    yield from _node("h100-sxm")
