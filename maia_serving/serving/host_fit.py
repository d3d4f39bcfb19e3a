"""Does the host hold what the emulated device would? Checked before the engine allocates.

The emulated HBM sizes the KV cache, but the host really allocates it (clamped to what
the user gives it) and really runs each step's activations. A ``--max-model-len`` that
the emulated device holds can still be more than the host's KV cache or memory; without
this check the engine fails late, in a raw allocation error.
"""

from __future__ import annotations

import os

from maia_serving.emulator.memory import Flags, MemoryPlan
from maia_serving.formats.units import format_bytes


class HostTooSmall(ValueError):
    """The host cannot run what was asked; the message says what to change."""


def host_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_host(
    plan: MemoryPlan, host_kv_bytes: float, kv_setting: str, flags: Flags, memory_bytes: int | None = None
) -> None:
    """HostTooSmall if one sequence of ``max_model_len`` does not fit the host's KV cache, or
    the host's memory cannot hold the weights, the KV cache and one step's activations of
    every rank."""
    one_seq = plan.max_model_len * plan.kv_bytes_per_token
    if host_kv_bytes < one_seq:
        raise HostTooSmall(
            f"{plan.model} with {flags.max_len} {plan.max_model_len} needs {format_bytes(one_seq)} of KV cache for one "
            f"sequence, but the host gives the KV cache {format_bytes(host_kv_bytes)} ({kv_setting}); raise "
            f"{kv_setting} or lower {flags.max_len} to at most "
            f"{int(host_kv_bytes // plan.kv_bytes_per_token)}"
        )
    ranks = plan.config.tensor_parallel_size * plan.config.pipeline_parallel_size
    need = ranks * (plan.weight_bytes + plan.workspace_bytes + host_kv_bytes)
    memory = host_memory_bytes() if memory_bytes is None else memory_bytes
    if need > memory:
        raise HostTooSmall(
            f"the host has {format_bytes(memory)} of memory, but {ranks} rank(s) of {plan.model} need about "
            f"{format_bytes(need)} (weights {format_bytes(plan.weight_bytes)}, activations of a "
            f"{plan.config.max_num_batched_tokens}-token step {format_bytes(plan.workspace_bytes)} and KV cache "
            f"{format_bytes(host_kv_bytes)} each); lower {flags.max_len} or the batched-token budget, or {kv_setting}"
        )
