"""The host attention as one C++ call per layer (``csrc/host_attention.cpp``), and the write into a
block-scaled cache (``csrc/cache_write.cpp``), built from the project's own source with torch's
extension builder.

The entry points are operators (``torch.ops.maia_host.*``), not a Python module: registering them needs
ATen's core headers only, where pybind11 and torch's Python bindings took most of the build.

The torch path (``ops.host``) chains a dozen small ops per layer and materializes float32
pages; this kernel decodes each KV row while reading it and meets it with every query of its
KV head under an online softmax, threads over (sequence, KV head). ``make setup`` builds it
into ``csrc/build/`` once per torch version (the two engines' environments each get theirs);
a process that finds it built loads it in well under a second. Where it cannot be built (no
compiler), ``MAIA_SERVING_HOST_KERNEL=auto`` serves with the torch path and says so once.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import torch

from maia_serving import envs

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).resolve().parent / "csrc" / "host_attention.cpp"
SOURCES = (SOURCE, SOURCE.with_name("cache_write.cpp"))  # the module's entry points are in SOURCE
# Kinds of cache rows the kernel decodes (host_attention.cpp's Kind).
PLAIN, FP8_E4M3, BLOCK_SCALED, FP8_E5M2 = 0, 1, 2, 3


def build_dir() -> Path:
    return SOURCE.parent / "build" / f"torch-{torch.__version__.replace('+', '-')}"


@functools.cache
def load():
    """The compiled operators (``torch.ops.maia_host``), built first if a source changed; RuntimeError (with
    the compiler's message) if they cannot be built."""
    from torch.utils import cpp_extension

    folder = build_dir()
    folder.mkdir(parents=True, exist_ok=True)
    try:
        cpp_extension.load(
            name="maia_host_attention",
            sources=[str(p) for p in SOURCES],
            build_directory=str(folder),
            extra_cflags=["-O3", "-fopenmp", "-march=native", "-ffp-contract=off"],
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            verbose=False,
        )
    except Exception as exc:  # the builder raises several types; the message is what matters
        raise RuntimeError(f"building {SOURCE.name} into {folder} failed: {exc}") from exc
    return torch.ops.maia_host


@functools.cache
def module():
    """The kernel operators to serve with, or None for the torch path (MAIA_SERVING_HOST_KERNEL)."""
    choice = envs.get(envs.MAIA_SERVING_HOST_KERNEL)
    if choice == "torch":
        return None
    try:
        return load()
    except RuntimeError as exc:
        if choice == "native":
            raise RuntimeError(
                f"{envs.MAIA_SERVING_HOST_KERNEL}=native: {exc}. Install a C++ compiler "
                f"(g++) and run `make setup`, or set {envs.MAIA_SERVING_HOST_KERNEL}=torch."
            ) from exc
        logger.warning(
            "maia-serving: the native host attention is unavailable (%s); serving with the torch path, "
            "which is slower (set %s=torch to silence this).",
            exc,
            envs.MAIA_SERVING_HOST_KERNEL,
        )
        return None


def main() -> None:
    """``python -m maia_serving.ops.native``: build now (``make setup`` does), report where."""
    os.environ.setdefault("MAX_JOBS", "2")
    load()
    print(f"maia-serving: native host attention built in {build_dir()}")


if __name__ == "__main__":
    main()
