"""The engines import our entry points in every process, with or without --device maia:
those imports must stay cheap (no emulator, no YAML, no torch until the platform is chosen)."""

import subprocess
import sys

import pytest

HEAVY = ("torch", "yaml", "zmq", "prometheus_client", "maia_serving.emulator", "maia_serving.serving")


@pytest.mark.parametrize("module", ["maia_serving.vllm", "maia_serving.sglang"])
def test_the_entry_point_module_imports_nothing_heavy(module):
    code = f"import sys, {module}; print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""
