"""Platform selection: --device maia or MAIA_SERVING_DEVICE=maia, else vLLM's own choice."""

import argparse
import subprocess
import sys

import pytest

import maia_serving.vllm as plugin


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    monkeypatch.delenv("MAIA_SERVING_DEVICE", raising=False)
    monkeypatch.delenv("MAIA_SERVING_STATS_ADDR", raising=False)


@pytest.mark.parametrize("argv", [["vllm", "serve", "m", "--device", "maia"], ["vllm", "serve", "m", "--device=maia"]])
def test_device_flag_selects_maia_and_tells_children(monkeypatch, argv):
    monkeypatch.setattr(sys, "argv", argv)
    assert plugin.activate() == "maia_serving.vllm.platform.MaiaPlatform"
    import os

    assert os.environ["MAIA_SERVING_DEVICE"] == "maia"
    assert os.environ["MAIA_SERVING_STATS_ADDR"].startswith("ipc://")


def test_environment_selects_maia(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["python", "script.py"])
    monkeypatch.setenv("MAIA_SERVING_DEVICE", "maia")
    assert plugin.activate() == "maia_serving.vllm.platform.MaiaPlatform"


@pytest.mark.parametrize("argv", [["vllm", "serve", "m"], ["vllm", "serve", "m", "--device", "cpu"]])
def test_without_the_switch_the_plugin_declines(monkeypatch, argv):
    monkeypatch.setattr(sys, "argv", argv)
    assert plugin.activate() is None


def _platform_in_fresh_process(env_extra: dict[str, str]) -> str:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("MAIA_SERVING")} | env_extra
    code = "from vllm.platforms import current_platform as p; print(type(p).__name__, p.device_type)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1]


def test_installed_plugin_leaves_vllm_default_platform_untouched():
    assert _platform_in_fresh_process({}) == "CpuPlatform cpu"


def test_maia_platform_keeps_the_cpu_device_type():
    assert _platform_in_fresh_process({"MAIA_SERVING_DEVICE": "maia"}) == "MaiaPlatform cpu"


def test_pre_register_adds_device_flag_once():
    from maia_serving.vllm.platform import MaiaPlatform

    parser = argparse.ArgumentParser()
    MaiaPlatform.pre_register_and_update(parser)
    MaiaPlatform.pre_register_and_update(parser)  # idempotent
    MaiaPlatform.pre_register_and_update(None)
    assert parser.parse_args(["--device", "maia"]).device == "maia"
    with pytest.raises(SystemExit):
        parser.parse_args(["--device", "tpu"])
