"""The engine's KV cache sized as the emulated HBM would hold it, the same way for both engines."""

from __future__ import annotations

import logging

from maia_serving import envs
from maia_serving.emulator.device.session import EmulatedDevice
from maia_serving.emulator.memory import Flags, MemoryPlan
from maia_serving.formats.units import format_bytes
from maia_serving.serving.host_fit import check_host
from maia_serving.serving.priced_model import engine_kv_tokens, routing_note


def size_engine_kv(
    device: EmulatedDevice,
    served: MemoryPlan,
    host_setting: envs.Name[float] | envs.Name[int],
    flags: Flags,
    logger: logging.Logger,
    engine_limit: int | None = None,
) -> int:
    """Tokens the engine's KV cache may hold: the emulated device's (of the proxy shape, if one is priced), at
    most what the host gives the served model (``host_setting``, GiB) and the engine's own limit; refused by
    ``check_host`` where the host cannot hold one sequence. Logs what was priced and both sizes, once."""
    plan = device.plan
    host_cap = envs.gib_bytes(host_setting)
    tokens = engine_kv_tokens(plan, served, host_cap)
    if engine_limit:
        tokens = min(tokens, engine_limit)
    check_host(served, tokens * served.kv_bytes_per_token, host_setting, flags)
    if plan.model != served.model:
        logger.info(
            "Maia proxy shape: every step is priced, and the emulated KV cache sized, as %s on %s; the host runs %s.",
            plan.model,
            plan.profile,
            served.model,
        )
    if note := routing_note(device.cost_model.model):
        logger.info(note)
    logger.info(
        "Maia KV cache: emulated %s holds %d blocks (%d tokens of %s, %.2f GiB) after %s of "
        "weights; the host gives at most %.2f GiB (%s), so the engine gets %d tokens (%.2f GiB).",
        plan.profile,
        plan.num_blocks,
        plan.kv_tokens,
        plan.model,
        plan.kv_tokens * plan.kv_bytes_per_token / 2**30,
        format_bytes(plan.weight_bytes),
        host_cap / 2**30,
        host_setting,
        tokens,
        tokens * served.kv_bytes_per_token / 2**30,
    )
    return tokens
