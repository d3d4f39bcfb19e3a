"""The general plugin (``sglang.srt.plugins``): runs in every SGLang process.

Registers the ``maia`` attention backend by name, so ``--attention-backend maia`` is
accepted and resolvable, and, when the maia platform is active, hooks SGLang's
scheduler so that every step is charged to the emulated device
(``maia_serving.sglang.stepping``). SGLang applies the hooks in each process before it
builds the scheduler.
"""

from __future__ import annotations

SCHEDULER = "sglang.srt.managers.scheduler.Scheduler"


def register() -> None:
    from sglang.srt.arg_groups.choices import add_attention_backend_choices
    from sglang.srt.layers.attention.attention_registry import register_attention_backend

    from maia_serving.envs import device_requested
    from maia_serving.sglang import ATTENTION_BACKEND
    from maia_serving.sglang.patch import collectives, offline_device, request_age, request_checks

    add_attention_backend_choices([ATTENTION_BACKEND])

    @register_attention_backend(ATTENTION_BACKEND)
    def _create(runner):
        from maia_serving.sglang.attention import MaiaAttnBackend

        return MaiaAttnBackend(runner)

    offline_device.register()
    if device_requested():
        request_checks.register()
        request_age.register()
        collectives.register()
        _register_step_hooks()


def _register_step_hooks() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    from maia_serving.sglang.patch.request_age import request_age_s

    def after_init(result, scheduler, *args, **kwargs):
        from sglang.srt.runtime_context import get_parallel

        from maia_serving import envs
        from maia_serving.sglang.device import build_device
        from maia_serving.sglang.ledger import require_hooks_applied
        from maia_serving.sglang.patch.collectives import TARGETS
        from maia_serving.sglang.stepping import MaiaStepper

        require_hooks_applied(STEP_HOOKS + TARGETS)
        # Every tensor-parallel rank, and every pipeline stage, runs a scheduler over the same batches;
        # the emulated device (which prices the whole group's step) is charged once, by the first rank.
        scheduler.maia = None
        parallel, args = get_parallel(), scheduler.server_args
        if parallel.tp_rank == 0 and parallel.pp_rank == 0:
            # The calls the ranks make are the step's when they run the served model (not a priced shape).
            engine_collectives = not envs.priced_model()
            scheduler.maia = MaiaStepper(build_device(args), scheduler.max_total_num_tokens, engine_collectives)

    def on_request(scheduler, recv_req, *args, **kwargs):
        if scheduler.maia is not None:
            scheduler.maia.arrive(recv_req.rid, request_age_s(recv_req))

    def before_run(scheduler, batch, *args, **kwargs):
        if scheduler.maia is not None:
            scheduler.maia.before_run(batch)

    def after_result(result, scheduler, batch, *args, **kwargs):
        if scheduler.maia is not None:
            scheduler.maia.after_result(batch, scheduler, args[0] if args else kwargs.get("result"))

    def after_abort(result, scheduler, recv_req, *args, **kwargs):
        if scheduler.maia is not None:
            scheduler.maia.abort(recv_req, scheduler)

    hooks = {
        "__init__": (after_init, HookType.AFTER),
        "handle_generate_request": (on_request, HookType.BEFORE),
        "run_batch": (before_run, HookType.BEFORE),
        "process_batch_result": (after_result, HookType.AFTER),
        "abort_request": (after_abort, HookType.AFTER),
    }
    for method, (hook, kind) in hooks.items():
        HookRegistry.register(f"{SCHEDULER}.{method}", hook, kind)


# The scheduler methods we hook (maia_serving.sglang.ledger lists them with why).
STEP_HOOKS = tuple(
    f"{SCHEDULER}.{m}"
    for m in ("__init__", "handle_generate_request", "run_batch", "process_batch_result", "abort_request")
)
