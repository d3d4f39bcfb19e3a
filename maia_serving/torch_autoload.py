"""PyTorch's device-backend autoload: the ``torch.backends`` entry point, which ``import torch`` runs at its
end unless ``TORCH_DEVICE_BACKEND_AUTOLOAD=0``. After ``pip install``, ``import torch`` alone makes
``torch.device("maia")``.

Not in a process that runs vLLM or SGLang (MAIA_SERVING_TORCH_DEVICE=auto): their code asks
``torch.accelerator`` for the accelerator and would take the emulated chip for a GPU.

It must never break ``import torch``: a failure is said once, as a warning, and leaves no maia device.
It never builds the extension (a compiler run inside ``import torch``); ``make setup`` does. It lives
outside ``maia_serving/torch/`` so that deciding not to load imports nothing of it: a later
``import maia_serving.torch`` then sets the device up as it always does.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path


def _package_importing() -> bool:
    """``import maia_serving.torch`` started first and imported torch: the package sets the device up
    itself when torch is done, with the backend module only half-defined until then."""
    spec = getattr(sys.modules.get("maia_serving.torch.backend"), "__spec__", None)
    return bool(getattr(spec, "_initializing", False))


ENGINES = ("vllm", "sglang")


def _engine_process() -> bool:
    """The process runs vLLM or SGLang (it imports one, or was started as one; their worker processes inherit
    MAIA_SERVING_TORCH_DEVICE=off from the maia platform)."""
    argv0 = sys.argv[0] if sys.argv else ""  # `vllm serve`, or `python -m sglang.launch_server` (.../sglang/...)
    program = Path(argv0).name
    return any(e in sys.modules or program.startswith(e) or f"{os.sep}{e}{os.sep}" in argv0 for e in ENGINES)


def autoload() -> None:
    if _package_importing():
        return
    try:
        from maia_serving import envs

        choice = envs.get(envs.MAIA_SERVING_TORCH_DEVICE)
        if choice == "off" or (choice == "auto" and _engine_process()):
            return
        from maia_serving.torch import backend

        backend.enable(build=False)
    except Exception as exc:  # anything: import torch must survive us
        warnings.warn(
            f"maia-serving: the maia torch device was not loaded ({type(exc).__name__}: {exc}); torch works without "
            f"it. Fix the cause, or set TORCH_DEVICE_BACKEND_AUTOLOAD=0 to skip device autoloading.",
            RuntimeWarning,
            stacklevel=2,
        )
