"""Patch: count SGLang's collectives, so the emulated interconnect is charged for the calls made.

Why: SGLang has no communicator a platform can supply (``get_communicator_class`` is marked
planned and is never read), and on a CPU host its ``GroupCoordinator`` runs every collective
through torch.distributed itself. An AFTER hook on each public collective records the call,
with its bytes and group, in this process's tally (``maia_serving.serving.collectives``). A step's
tally starts with ``run_batch`` and leaves with its result (``RELAY``), which the scheduler of
tensor-parallel rank 0 charges when it processes that result (``maia_serving.sglang.stepping``).

Pipeline stages run in processes of their own, so each relays the tally downstream in the dict of
activations it sends (as metadata, so it is no tensor the next stage all-gathers), adding the send
itself (the hidden states and the residual, from that stage); the last stage returns the whole
step's tally to the first with the sampled tokens, where it joins the result of that very
micro-batch. Not charged: the sampled tokens' way back (8 bytes a sequence; vLLM returns them
outside its pipeline group, and the cost model prices one hop between consecutive stages), the
all-gather a receiving stage makes to rebuild activations split over its tensor-parallel ranks, and a
step whose outputs SGLang skips sending (``SGLANG_PP_SKIP_PURE_CHUNKED_OUTPUT_COMM``): that step is
priced by the cost model's count.

When it can go: when SGLang lets a platform supply its communicator (wrap it as the vLLM adapter
wraps vLLM's CpuCommunicator).
"""

from __future__ import annotations

import functools
import logging

from maia_serving.serving.collectives import CollectiveTally
from maia_serving.serving.collectives import tensor_bytes as _nbytes

logger = logging.getLogger(__name__)

GROUP = "sglang.srt.distributed.parallel_state.GroupCoordinator"
SCHEDULER = "sglang.srt.managers.scheduler.Scheduler"
TALLY = CollectiveTally()
RELAY = "maia_collectives"  # the tally's key in a stage's tensor dict, and its attribute on a step's result


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


def _never_raises(hook):
    """A relay hook that fails logs it (once) and leaves SGLang's call as it was: the step is then priced by the
    cost model's count (its result carries no tally), and the engine serves on."""

    @functools.wraps(hook)
    def guarded(*args, **kwargs):
        try:
            return hook(*args, **kwargs)
        except Exception:
            if not guarded.failed:
                logger.exception(
                    "maia-serving: %s failed; steps are priced by the cost model's collectives "
                    "instead of the ones SGLang made. Please report this.",
                    hook.__name__,
                )
            guarded.failed = True
            return None

    guarded.failed = False
    return guarded


@_never_raises
def before_run_batch(scheduler, batch, pp_proxy_tensors=None, *args, **kwargs) -> None:
    """A step's tally starts afresh (calls between steps belong to none), with what earlier stages relayed."""
    TALLY.clear()
    if pp_proxy_tensors is not None:
        TALLY.merge(pp_proxy_tensors.tensors.pop(RELAY, ()))


@_never_raises
def after_run_batch(result, scheduler, *args, **kwargs) -> None:
    if result is not None:
        setattr(result, RELAY, TALLY.take())


@_never_raises
def before_send_proxy(scheduler, result, *args, **kwargs) -> None:
    """A stage hands on its activations with the step's calls so far, this send among them."""
    tensors = result.pp_hidden_states_proxy_tensors.tensors
    tally = CollectiveTally()
    tally.merge(getattr(result, RELAY, ()))
    tally.record(
        "send",
        2,
        sum(_nbytes(t) for t in tensors.values() if hasattr(t, "element_size")),
        scheduler.pp_group.rank_in_group,
    )
    tensors[RELAY] = tally.take()


@_never_raises
def after_prepare_outputs(tensor_dict, scheduler, result, *args, **kwargs):
    """The last stage returns the step's tally to the first with the sampled tokens."""
    tensor_dict[RELAY] = getattr(result, RELAY, [])
    return tensor_dict


@_never_raises
def after_prep_batch_result(batch_result, scheduler, batch, metadata, pp_outputs, *args, **kwargs) -> None:
    """The first stage's result of a micro-batch takes the tally its last stage returned."""
    rows = pp_outputs.tensors.pop(RELAY, None) if pp_outputs is not None else None
    if rows is not None and batch_result is not None:
        setattr(batch_result, RELAY, rows)


HOOKS = {
    "all_reduce": after_all_reduce,
    "all_gather": after_all_gather,
    "gather": after_gather,
    "reduce_scatter": after_reduce_scatter,
}
# (scheduler method, hook, "before" or "after"): a step's tally, and its relay between pipeline stages.
STEP_HOOKS = (
    ("run_batch", before_run_batch, "before"),
    ("run_batch", after_run_batch, "after"),
    ("_pp_send_proxy_to_next_stage", before_send_proxy, "before"),
    ("_pp_prepare_tensor_dict", after_prepare_outputs, "after"),
    ("_pp_prep_batch_result", after_prep_batch_result, "after"),
)
TARGETS = tuple(f"{GROUP}.{method}" for method in HOOKS) + tuple(
    dict.fromkeys(f"{SCHEDULER}.{method}" for method, _, _ in STEP_HOOKS)
)


def register() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    for method, hook in HOOKS.items():
        HookRegistry.register(f"{GROUP}.{method}", hook, HookType.AFTER)
    for method, hook, kind in STEP_HOOKS:
        HookRegistry.register(f"{SCHEDULER}.{method}", hook, HookType.BEFORE if kind == "before" else HookType.AFTER)
