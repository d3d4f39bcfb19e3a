"""SGLang platform selection: --device maia, SGLANG_PLATFORM=maia or MAIA_SERVING_DEVICE=maia;
otherwise SGLang's own choice. `maia_serving.sglang` imports no engine, so this runs anywhere."""

import os
import sys

import pytest

from maia_serving.sglang import PLATFORM_CLS, activate


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for name in ("MAIA_SERVING_DEVICE", "SGLANG_PLATFORM"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize(
    "argv", [["launch_server", "--model-path", "m", "--device", "maia"], ["sglang", "serve", "--device=maia"]]
)
def test_device_flag_selects_maia_and_tells_children(monkeypatch, argv):
    monkeypatch.setattr(sys, "argv", argv)
    assert activate() == PLATFORM_CLS
    assert os.environ["MAIA_SERVING_DEVICE"] == "maia"


@pytest.mark.parametrize("name,value", [("SGLANG_PLATFORM", "maia"), ("MAIA_SERVING_DEVICE", "maia")])
def test_environment_selects_maia(monkeypatch, name, value):
    monkeypatch.setattr(sys, "argv", ["python", "script.py"])
    monkeypatch.setenv(name, value)
    assert activate() == PLATFORM_CLS


@pytest.mark.parametrize("argv", [["launch_server", "--model-path", "m"], ["launch_server", "--device", "cuda"]])
def test_declines_otherwise(monkeypatch, argv):
    monkeypatch.setattr(sys, "argv", argv)
    assert activate() is None
    assert "MAIA_SERVING_DEVICE" not in os.environ
