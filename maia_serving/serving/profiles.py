"""Profiles as the servers and the CLI load them: ``host`` is measured on first use."""

from __future__ import annotations

from maia_serving.emulator import hardware
from maia_serving.emulator.hardware import DeviceProfile, HostProfileMissing
from maia_serving.tools.calibrate_host import calibrate_host


def load_profile(name: str) -> DeviceProfile:
    """``hardware.load_profile``, measuring this machine first where ``host`` has no profile yet, so that a
    server started with ``MAIA_SERVING_PROFILE=host`` or ``--profile host`` needs no step before it."""
    try:
        return hardware.load_profile(name)
    except HostProfileMissing as missing:
        calibrate_host(missing.path)
        return hardware.load_profile(name)
