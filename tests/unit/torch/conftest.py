"""The maia torch device in this process: loaded by PyTorch's autoload (the package's entry point) or by
importing maia_serving.torch; sized from MAIA_SERVING_PROFILE (default maia200)."""

import gc
from dataclasses import replace

import pytest

import maia_serving.torch as maia_torch
from maia_serving.emulator.hardware import load_profile


@pytest.fixture
def small_hbm():
    """A Maia 100 node whose chips hold 1 MiB each (a profile override), the default back afterwards."""
    gc.collect()
    profile = replace(load_profile("maia100"), hbm_capacity_bytes=float(2**20))
    maia_torch.set_profile(profile)
    yield profile
    gc.collect()
    maia_torch.set_profile(load_profile("maia200"))


def _node(name: str):
    gc.collect()
    maia_torch.set_profile(name)
    yield load_profile(name)
    gc.collect()
    maia_torch.set_profile("maia200")


@pytest.fixture
def maia100():
    yield from _node("maia100")


@pytest.fixture
def h100():
    yield from _node("h100-sxm")
