"""Patch: ``sglang.Engine(..., device="maia")`` selects the maia platform.

Why: SGLang resolves its platform once, when ``import sglang`` first touches
``current_platform``, which is before an offline script builds ``Engine(device=...)``.
A server started as ``--device maia`` is seen in sys.argv at that moment
(``maia_serving.sglang.activate``); an ``Engine`` keyword argument is not. This hook
runs before the engine resolves its arguments: for ``device="maia"`` it tells the
engine's child processes through the environment (they resolve their platform afresh)
and swaps the launcher's platform for ours, so argument resolution takes the maia
defaults.

When it can go: when SGLang resolves the platform from the engine's own ``device``
argument (or re-resolves it in ``resolve_once``).
"""

from __future__ import annotations

import os

from maia_serving.envs import MAIA_SERVING_DEVICE

TARGET = "sglang.srt.server_args.ServerArgs.resolve_once"


def select_maia_platform(server_args, *args, **kwargs) -> None:
    if getattr(server_args, "device", None) != "maia":
        return
    import sglang.srt.platforms as platforms

    from maia_serving.sglang.platform import MaiaSRTPlatform

    os.environ[MAIA_SERVING_DEVICE] = "maia"
    if not isinstance(platforms._current_platform, MaiaSRTPlatform):
        platforms._current_platform = MaiaSRTPlatform()


def register() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(TARGET, select_maia_platform, HookType.BEFORE)
