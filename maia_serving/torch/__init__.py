"""``torch.device("maia")``: any PyTorch model on the emulated Maia, its memory held to the chip's HBM and
every operator priced by the emulator's cost model.

    import torch, maia_serving.torch       # after `pip install`, `import torch` alone is enough
    model = model.to("maia")
    with maia_serving.torch.profile() as prof: model(x.to("maia"))
    print(prof.table())

PrivateUse1 renamed "maia" (PyTorch's out-of-tree device route; OpenReg is its reference), with a
C++ allocator that counts each chip's HBM, a device guard, hooks, a generator, the operators PrivateUse1
must have, convolution and fused attention, and a fallback that runs every other operator with the
host's CPU kernel on the same memory.
"""

from __future__ import annotations

import contextlib
import gc
import sys
from collections.abc import Iterator

from maia_serving.emulator.hardware import DeviceProfile
from maia_serving.torch.backend import MaiaSetupError, enable
from maia_serving.torch.profiler import profile


def _in_torch_import() -> bool:
    """True while ``import torch`` runs its device autoload: the entry point imports this package then, and
    nothing here may build the extension (the autoload itself loads the built one)."""
    spec = getattr(sys.modules.get("torch"), "__spec__", None)
    return bool(getattr(spec, "_initializing", False))


def set_profile(profile: str | DeviceProfile) -> None:
    """Emulate ``profile``'s node (a name: ``maia100``, ``maia200``, ``h100-sxm`` ...; or a DeviceProfile, e.g. one
    with another HBM) instead of MAIA_SERVING_PROFILE's. While the process holds no maia tensor."""
    from maia_serving.emulator.hardware import load_profile
    from maia_serving.torch.backend import configure

    enable()
    configure(load_profile(profile) if isinstance(profile, str) else profile)


@contextlib.contextmanager
def sized_as(profile: str | DeviceProfile) -> Iterator[DeviceProfile]:
    """The node sized as ``profile`` inside the block, as it was before after it (each is ``set_profile``, so no
    maia tensor may be alive at either end: the block's own are collected first). Where the block raised, a
    tensor its traceback still holds leaves the node as the block had it, and the block's error is the one seen."""
    from maia_serving.torch import backend

    before = backend.profile()
    set_profile(profile)
    try:
        yield backend.profile()
    except BaseException:
        gc.collect()
        with contextlib.suppress(RuntimeError):
            set_profile(before)
        raise
    gc.collect()
    set_profile(before)


from maia_serving.torch.pricing import clock_s  # noqa: E402

if not _in_torch_import():
    enable()

__all__ = ["MaiaSetupError", "clock_s", "enable", "profile", "set_profile", "sized_as"]
