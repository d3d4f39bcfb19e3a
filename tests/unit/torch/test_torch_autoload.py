"""PyTorch's device autoload, each case in a fresh interpreter: `import torch` alone makes the device; a broken
extension or setting never breaks `import torch` (one warning, no device); processes that run an engine keep
their CPU view of torch; a device object parsed before the backend loaded is PyTorch's built-in MAIA type."""

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[3]


def run(code: str, env: dict[str, str] | None = None, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MAIA_SERVING_", "TORCH_DEVICE_BACKEND"))}
    if pythonpath:
        clean["PYTHONPATH"] = str(pythonpath)
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
        cwd=pythonpath or ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def test_import_torch_alone_makes_the_maia_device():
    out = run(
        "import sys, torch\n"
        "x = torch.arange(4.0, device='maia') * 2\n"
        "print(x.device, x.cpu().tolist(), torch.accelerator.current_accelerator().type, torch.maia.device_count())\n"
        "print('maia_serving.torch' in sys.modules, torch.accelerator.get_memory_info(1)[1] == 216 * 2**30)"
    )
    assert out.stdout.split() == ["maia:0", "[0.0,", "2.0,", "4.0,", "6.0]", "maia", "4", "True", "True"]
    assert "Warning" not in out.stderr


def _absent(out: subprocess.CompletedProcess) -> str:
    assert out.stdout.split() == ["tensor([2.,", "2.])", "False", "None"], out.stdout
    assert out.stderr.count("the maia torch device was not loaded") == 1, out.stderr
    return out.stderr


CHECK = "import torch\nprint(torch.ones(2) + 1, hasattr(torch, 'maia'), torch.accelerator.current_accelerator())"


def test_a_broken_extension_never_breaks_import_torch(tmp_path):
    """The package as installed, its built device replaced by a file that is no shared library."""
    with tarfile.open(tmp_path / "pkg.tar", "w") as tar:
        tar.add(
            ROOT / "maia_serving",
            "maia_serving",
            filter=lambda i: None if "__pycache__" in i.name or "/build" in i.name else i,
        )
    with tarfile.open(tmp_path / "pkg.tar") as tar:
        tar.extractall(tmp_path / "site", filter="data")
    built = tmp_path / "site/maia_serving/torch/csrc/build" / f"torch-{torch.__version__.replace('+', '-')}"
    built.mkdir(parents=True)
    (built / "maia_torch.so").write_text("not a shared library")
    stderr = _absent(run(CHECK, pythonpath=tmp_path / "site"))
    assert "ImportError" in stderr and "maia_torch.so" in stderr and "TORCH_DEVICE_BACKEND_AUTOLOAD=0" in stderr
    shutil.rmtree(tmp_path / "site")


def test_a_bad_profile_never_breaks_import_torch():
    stderr = _absent(run(CHECK, env={"MAIA_SERVING_PROFILE": "maia999"}))
    assert "unknown device profile 'maia999'" in stderr


def test_engine_processes_keep_torch_as_they_know_it():
    """vLLM asks torch.accelerator for a GPU; in its processes the device stays off unless asked for."""
    code = "import vllm, torch\nprint(torch.accelerator.current_accelerator(), hasattr(torch, 'maia'))"
    assert run(code).stdout.split() == ["None", "False"]
    assert run(code, env={"MAIA_SERVING_TORCH_DEVICE": "on"}).stdout.split() == ["maia", "True"]
    assert run(CHECK, env={"MAIA_SERVING_TORCH_DEVICE": "off"}).stdout.split()[-2:] == ["False", "None"]


def test_a_device_parsed_before_the_backend_loads_is_the_builtin_maia():
    out = run(
        "import torch\n"
        "early = torch.device('maia')\n"
        "try:\n    torch.ones(1, device=early)\nexcept (RuntimeError, NotImplementedError) as e:\n"
        "    print('builtin:', 'MAIA' in str(e))\n"
        "import maia_serving.torch\n"
        "print(torch.ones(1, device='maia').device)",
        env={"TORCH_DEVICE_BACKEND_AUTOLOAD": "0"},
    )
    assert out.stdout.split() == ["builtin:", "True", "maia:0"]
