"""`maia-serving calibrate-host --engine-model`: the engine's own time per step, fitted on the live engine."""

import subprocess
import sys

import yaml

from maia_serving.emulator.hardware import profile_from_dict


def _calibrate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "maia_serving.cli.main", "calibrate-host", *args],
        capture_output=True,
        text=True,
        timeout=900,
    )


def test_the_engine_time_is_fitted_on_vllm_and_loads_with_the_profile(demo_model, tmp_path):
    """vLLM's Python around a step is never free, and a time that shrinks as the batch grows is no fit."""
    out = tmp_path / "elsewhere.yaml"  # not host.yaml: the engine is pointed at a profile of its own
    done = _calibrate("--out", str(out), "--engine-model", str(demo_model))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "engine time per step" in done.stdout
    assert "rounds: the slowest" in done.stdout and "the fastest is kept" in done.stdout
    profile = profile_from_dict(yaml.safe_load(out.read_text()))
    assert profile.step_overhead_s > 0
    assert profile.step_overhead_per_seq_s >= 0 and profile.step_overhead_per_token_s >= 0
    assert "fitted by calibrate-host on vLLM's eager steps" in profile.sources["step_overhead_per_seq"]
    # The device's rates too are the host as the engine finds it: measured inside vLLM's engine process.
    for figure in ("attention_compute_efficiency", "hbm_bandwidth"):
        assert f"inside vLLM's engine process serving {demo_model}" in profile.sources[figure], figure


def test_a_missing_engine_model_is_refused_before_anything_is_written(tmp_path):
    out = tmp_path / "host.yaml"
    done = _calibrate("--out", str(out), "--engine-model", str(tmp_path / "nowhere"))
    assert done.returncode == 2
    assert "no model there" in done.stderr and "demo-model" in done.stderr
    assert not out.exists()
