"""Turning PyTorch's PrivateUse1 backend into the emulated Maia: rename it "maia", load the C++ device,
size the node from the device profile, register ``torch.maia``.

Two ways in: ``import maia_serving.torch`` (always), and PyTorch's device-backend autoload
(``maia_serving/torch_autoload.py``).
"""

from __future__ import annotations

import threading

import torch

from maia_serving import envs
from maia_serving.emulator.hardware import DeviceProfile, load_profile

NAME = "maia"
# Tensors a chip without FP64 units cannot compute with (c10's names): no profile here lists an fp64 peak.
WITHOUT_FP64_UNITS = ("Double", "ComplexFloat", "ComplexDouble", "ComplexHalf")
_lock = threading.Lock()
_state: dict[str, object] = {}


class MaiaSetupError(RuntimeError):
    """The maia device could not be set up; the message says what failed and what to do."""


def _rename() -> None:
    current = torch._C._get_privateuse1_backend_name()
    if current == NAME:
        return
    if current != "privateuseone":
        raise MaiaSetupError(
            f"PyTorch's PrivateUse1 backend is already {current!r} in this process (one out-of-tree device per "
            f"process); maia cannot be registered beside it"
        )
    torch.utils.rename_privateuse1_backend(NAME)


def configure(profile: DeviceProfile) -> None:
    """Size the emulated node: the profile's chips, each with the profile's HBM."""
    from maia_serving.torch import extension, pricing

    module = extension.load_built()
    refused = [] if "fp64" in profile.peak_flops_per_s else list(WITHOUT_FP64_UNITS)
    refusal = (
        f"the {profile.name} profile prices {', '.join(profile.peak_flops_per_s)} (and fp32 at the nearest of them). "
        f"Convert the model first, e.g. model.float() or model.to(torch.bfloat16), then .to('maia')"
    )
    module.configure(profile.network.node_chips, int(profile.hbm_capacity_bytes), chip_name(profile), refused, refusal)
    pricing.catch_up()  # what ran on the previous node is priced on it
    pricing.LEDGER.reset(profile, profile.network.node_chips)
    module.on_full(pricing.catch_up, pricing.FLUSH_EVENTS)
    _state["profile"] = profile


def chip_name(profile: DeviceProfile) -> str:
    """The chip as ``get_device_name`` says it: the profile's description up to its parenthesis."""
    return profile.description.partition(" (")[0]


def enable(*, build: bool = True) -> None:
    """Set the device up once per process (idempotent). ``build``: compile the extension if it is not built
    (``import maia_serving.torch``); the autoload path passes False."""
    with _lock:
        if _state.get("enabled"):
            return
        from maia_serving.torch import device, extension

        # Everything that can fail before the rename, which cannot be undone: a failure leaves no device.
        if build:
            extension.build()
        else:
            extension.load_built()
        configure(load_profile(envs.get(envs.MAIA_SERVING_PROFILE)))
        if not hasattr(torch, NAME):
            torch._register_device_module(NAME, device)
        _rename()
        _state["enabled"] = True


def profile() -> DeviceProfile:
    """The profile the node was sized from."""
    enable()
    found = _state["profile"]
    assert isinstance(found, DeviceProfile)
    return found
