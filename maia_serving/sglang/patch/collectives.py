"""Patch: count SGLang's collectives, so the emulated interconnect is charged for the calls made.

Why: SGLang has no communicator a platform can supply (``get_communicator_class`` is marked
planned and is never read), and on a CPU host its ``GroupCoordinator`` runs every collective
through torch.distributed itself. An AFTER hook on each public collective records the call,
with its bytes and group, in this process's tally (``maia_serving.serving.collectives``); the
scheduler of tensor-parallel rank 0 takes the tally of each step (``maia_serving.sglang.stepping``),
since the model runs in the scheduler's own process. Pipeline stages run in other processes: with
``--pp-size`` above 1 the cost model's count is charged instead.

When it can go: when SGLang lets a platform supply its communicator (wrap it as the vLLM adapter
wraps vLLM's CpuCommunicator).
"""

from __future__ import annotations

from maia_serving.serving.collectives import CollectiveTally
from maia_serving.serving.collectives import tensor_bytes as _nbytes

GROUP = "sglang.srt.distributed.parallel_state.GroupCoordinator"
TALLY = CollectiveTally()


def after_all_reduce(result, group, input_, *args, **kwargs) -> None:
    if group.world_size > 1:
        TALLY.record("all_reduce", group.world_size, _nbytes(input_))


def after_all_gather(result, group, input_, *args, **kwargs) -> None:
    """The gathered result: ``world_size`` inputs (also when gathered into a list of tensors)."""
    if group.world_size > 1:
        TALLY.record("all_gather", group.world_size, group.world_size * _nbytes(input_))


def after_gather(result, group, input_, *args, **kwargs) -> None:
    if group.world_size > 1:
        TALLY.record("gather", group.world_size, group.world_size * _nbytes(input_))


def after_reduce_scatter(result, group, output, input_list, *args, **kwargs) -> None:
    if group.world_size > 1:
        TALLY.record("reduce_scatter", group.world_size, sum(_nbytes(t) for t in input_list))


HOOKS = {"all_reduce": after_all_reduce, "all_gather": after_all_gather, "gather": after_gather,
         "reduce_scatter": after_reduce_scatter}
TARGETS = tuple(f"{GROUP}.{method}" for method in HOOKS)


def register() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    for method, hook in HOOKS.items():
        HookRegistry.register(f"{GROUP}.{method}", hook, HookType.AFTER)
