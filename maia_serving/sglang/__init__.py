"""SGLang adapter: the `maia` platform, thin over maia_serving.emulator.

Entry points (pyproject.toml): ``sglang.srt.platforms`` -> activate (the platform),
``sglang.srt.plugins`` -> maia_serving.sglang.plugin.register (attention backend and
hooks). Importing this module must stay cheap: SGLang calls ``activate`` in every
process, before it parses arguments.
"""

from __future__ import annotations

import os
import sys

from maia_serving import envs
from maia_serving.envs import MAIA_SERVING_DEVICE, device_flag, device_requested

PLATFORM_CLS = "maia_serving.sglang.platform.MaiaSRTPlatform"
# `--attention-backend maia`: maia_serving.sglang.attention.MaiaAttnBackend.
ATTENTION_BACKEND = "maia"


def activate() -> str | None:
    """Choose the maia platform from ``--device maia``, SGLANG_PLATFORM=maia or
    MAIA_SERVING_DEVICE=maia; otherwise decline, leaving SGLang's choice untouched.

    SGLang resolves its platform before it parses arguments, so the flag is read from
    sys.argv and handed to child processes through the environment.
    """
    if device_flag(sys.argv[1:]) == "maia" or os.environ.get("SGLANG_PLATFORM") == "maia":
        os.environ[MAIA_SERVING_DEVICE] = "maia"
    if not device_requested():
        return None
    # The engine's workers import torch too: the maia torch device stays out of them (an accelerator to SGLang).
    os.environ.setdefault(envs.MAIA_SERVING_TORCH_DEVICE, "off")
    return PLATFORM_CLS
