"""The device's C++ extension (``csrc/``), built from the project's own sources with torch's extension
builder, once per torch version (``make setup`` runs ``python -m maia_serving.torch`` in each engine's
environment).

Loading it registers the allocator, the device guard, the hooks and the operators with PyTorch. The
autoload path (``import torch``) only ever loads a built module: it must never start a compiler.
"""

from __future__ import annotations

import functools
import importlib.machinery
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import torch

NAME = "maia_torch"
CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = (CSRC / "device.cpp",)  # the one translation unit; it includes the other files


def build_dir() -> Path:
    return CSRC / "build" / f"torch-{torch.__version__.replace('+', '-')}"


def built_path() -> Path:
    return build_dir() / f"{NAME}.so"


@functools.cache
def build() -> ModuleType:
    """Build (when a source changed) and load; RuntimeError with the compiler's message if it cannot."""
    from torch.utils import cpp_extension

    folder = build_dir()
    folder.mkdir(parents=True, exist_ok=True)
    try:
        module: ModuleType = cpp_extension.load(
            name=NAME,
            sources=[str(p) for p in SOURCES],
            build_directory=str(folder),
            extra_cflags=["-O2"],
            verbose=False,
        )
    except Exception as exc:  # the builder raises several types; the message is what matters
        raise RuntimeError(f"building the maia device ({CSRC}) into {folder} failed: {exc}") from exc
    sys.modules[NAME] = module  # load_built() answers with this one, not a second module over the same library
    return module


def load_built() -> ModuleType:
    """The module as built (or as build() loaded it), without checking its sources (the autoload path);
    RuntimeError if not built."""
    if NAME in sys.modules:
        return sys.modules[NAME]
    path = built_path()
    if not path.exists():
        raise RuntimeError(
            f"the maia device is not built for torch {torch.__version__} ({path} is missing); "
            "run `make setup` or `python -m maia_serving.torch`"
        )
    spec = importlib.util.spec_from_file_location(
        NAME, path, loader=importlib.machinery.ExtensionFileLoader(NAME, str(path))
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[NAME] = module
    return module
