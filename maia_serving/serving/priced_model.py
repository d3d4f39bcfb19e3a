"""The model a server's steps are priced as: the served model, or a proxy shape.

A host cannot run a 70B model, but the serving dynamics (batching, preemption, prefix hits)
come from the engine, not the weights. With a proxy shape (vLLM: ``--additional-config
'{"maia_model": NAME}'``; either engine: ``MAIA_SERVING_MODEL``) a small model runs on the
host while every step is priced, and the emulated KV capacity sized, as the named model on
the chosen profile and layout. The host engine's KV cache is then sized in tokens, at most
the emulated device's, so it never holds more sequences at once than the device could.
"""

from __future__ import annotations

from maia_serving.emulator.memory import MemoryPlan
from maia_serving.emulator.model_shape import ModelShape, load_model_shape


def priced_shape(served: ModelShape, spec: str | None, setting: str) -> ModelShape:
    """``served`` itself, or the shape ``spec`` names (a built-in name, a config.json or a model
    folder); ValueError naming ``setting``, and the file or the choices, if ``spec`` names none."""
    if not spec:
        return served
    try:
        return load_model_shape(spec)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{setting}={spec!r}: {exc}") from None


def engine_kv_tokens(plan: MemoryPlan, host_plan: MemoryPlan, host_cap_bytes: float) -> int:
    """Tokens the host engine's KV cache holds: the emulated device's (``plan``), at most what
    ``host_cap_bytes`` holds of the served model (``host_plan``, the same model without a proxy)."""
    return int(min(plan.kv_tokens, host_cap_bytes // host_plan.kv_bytes_per_token))
