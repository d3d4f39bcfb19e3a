"""The model a server's steps are priced as: the served model, or a proxy shape.

A host cannot run a 70B model, but the serving dynamics (batching, preemption, prefix hits)
come from the engine, not the weights. With a proxy shape (vLLM: ``--additional-config
'{"maia_model": NAME}'``; either engine: ``MAIA_SERVING_MODEL``) a small model runs on the
host while every step is priced, and the emulated KV capacity sized, as the named model on
the chosen profile and layout. The host engine's KV cache is then sized in tokens, at most
the emulated device's, so it never holds more sequences at once than the device could.

A MoE priced model is routed uniformly unless a routing file is named (vLLM: ``--additional-config
'{"maia_expert_load": FILE}'``; either engine: ``MAIA_SERVING_EXPERT_LOAD``), as ``simulate
--expert-load`` reads it: the live server then charges each step as ``simulate`` would.
"""

from __future__ import annotations

from maia_serving.emulator.memory import MemoryPlan
from maia_serving.emulator.model_shape import ModelShape, load_model_shape, with_expert_load


def priced_shape(
    served: ModelShape, spec: str | None, setting: str, load: str | None = None, load_setting: str = ""
) -> ModelShape:
    """``served`` itself, or the shape ``spec`` names (a built-in name, a config.json or a model
    folder), routed as the file ``load`` counts if one is given; ValueError naming the setting
    (``setting`` or ``load_setting``) and what is wrong with its value."""
    shape = served
    if spec:
        try:
            shape = load_model_shape(spec)
        except (OSError, ValueError) as exc:
            raise ValueError(f"{setting}={spec!r}: {exc}") from None
    if load:
        try:
            shape = with_expert_load(shape, load)
        except (OSError, ValueError) as exc:
            raise ValueError(f"{load_setting}={load!r}: {exc}") from None
    return shape


def engine_kv_tokens(plan: MemoryPlan, host_plan: MemoryPlan, host_cap_bytes: float) -> int:
    """Tokens the host engine's KV cache holds: the emulated device's (``plan``), at most what
    ``host_cap_bytes`` holds of the served model (``host_plan``, the same model without a proxy)."""
    return int(min(plan.kv_tokens, host_cap_bytes // host_plan.kv_bytes_per_token))


def routing_note(model: ModelShape) -> str | None:
    """The log line saying which measured routing prices ``model``'s MoE layers (None: uniform or dense)."""
    if model.moe is None or model.moe.load is None:
        return None
    return (
        f"Maia routing: {model.name}'s MoE layers are priced with the measured expert load of "
        f"{model.moe.load.source} (not uniform routing)."
    )
