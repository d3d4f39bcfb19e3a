"""Every SGLang surface the maia adapter depends on beyond its documented plugin API.

``tests/unit/sglang/test_ledger.py`` resolves each one in the installed SGLang, and the
platform checks them before the server starts (``require_surfaces``), so an SGLang
upgrade that renames one fails loudly instead of charging nothing.
"""

from __future__ import annotations

from maia_serving.serving.ledger import Surface, require_all

_SCHED = "sglang.srt.managers.scheduler.Scheduler"
_TOKENIZER = "sglang.srt.managers.tokenizer_manager.TokenizerManager"
_BATCH = "sglang.srt.managers.schedule_batch.ScheduleBatch"
_REQ = "sglang.srt.managers.schedule_batch.Req"
_GROUP = "sglang.srt.distributed.parallel_state.GroupCoordinator"
_UNTIL_HOOKS = "SGLang offers a public per-step callback with the batch and its result"

SURFACES: tuple[Surface, ...] = (
    # Step charging (maia_serving.sglang.plugin, .stepping)
    Surface(
        f"{_SCHED}.__init__", "hook", "creates the emulated device once the scheduler knows its KV pool", _UNTIL_HOOKS
    ),
    Surface(f"{_SCHED}.handle_generate_request", "hook", "a request's arrival on the emulated clock", _UNTIL_HOOKS),
    Surface(
        f"{_SCHED}.run_batch",
        "hook",
        "reads each step's batch before it runs; a step's tally starts and ends with it",
        _UNTIL_HOOKS,
    ),
    Surface(f"{_SCHED}.process_batch_result", "hook", "charges the step once its outputs are known", _UNTIL_HOOKS),
    Surface(f"{_SCHED}.abort_request", "hook", "forgets requests aborted before they ran", _UNTIL_HOOKS),
    Surface(f"{_SCHED}#max_total_num_tokens", "private attribute", "the engine's KV capacity in tokens", _UNTIL_HOOKS),
    Surface(
        f"{_SCHED}#token_to_kv_pool_allocator", "private attribute", "free KV slots (available_size)", _UNTIL_HOOKS
    ),
    Surface(
        f"{_SCHED}#tree_cache", "private attribute", "slots only the prefix cache holds (evictable_size)", _UNTIL_HOOKS
    ),
    Surface(f"{_SCHED}#running_batch", "private attribute", "which requests an abort leaves running", _UNTIL_HOOKS),
    Surface(f"{_SCHED}#chunked_req", "private attribute", "the request being prefilled in chunks", _UNTIL_HOOKS),
    Surface(
        "sglang.srt.mem_cache.base_prefix_cache.BasePrefixCache.evictable_size",
        "private attribute",
        "blocks held only by the prefix cache, reported apart from used ones",
        _UNTIL_HOOKS,
    ),
    Surface(f"{_BATCH}#forward_mode", "private attribute", "extend or decode", _UNTIL_HOOKS),
    Surface(f"{_BATCH}#extend_lens", "private attribute", "new tokens per request of an extend step", _UNTIL_HOOKS),
    Surface(f"{_BATCH}#prefix_lens", "private attribute", "cached tokens per request of an extend step", _UNTIL_HOOKS),
    Surface(f"{_BATCH}#seq_lens_cpu", "private attribute", "contexts of a decode step", _UNTIL_HOOKS),
    Surface(f"{_REQ}#output_ids", "private attribute", "tokens each request emitted", _UNTIL_HOOKS),
    Surface(f"{_REQ}.finished", "private attribute", "which requests left the engine", _UNTIL_HOOKS),
    Surface(
        "sglang.srt.runtime_context.get_parallel",
        "private attribute",
        "only the first rank (TP rank 0 of pipeline stage 0) charges the device",
        _UNTIL_HOOKS,
    ),
    # Collectives (maia_serving.sglang.patch.collectives)
    *(
        Surface(
            f"{_GROUP}.{method}",
            "hook",
            "counts each call for the emulated interconnect",
            "SGLang lets a platform supply its communicator",
        )
        for method in ("all_reduce", "all_gather", "gather", "reduce_scatter")
    ),
    Surface(
        f"{_GROUP}#world_size",
        "private attribute",
        "the group a collective ran over",
        "SGLang lets a platform supply its communicator",
    ),
    Surface(
        f"{_GROUP}#rank_in_group",
        "private attribute",
        "which pipeline stage sends (whether a hop leaves a node)",
        "SGLang lets a platform supply its communicator",
    ),
    Surface(
        f"{_SCHED}#pp_group",
        "private attribute",
        "the pipeline group a stage sends over",
        "SGLang lets a platform supply its communicator",
    ),
    Surface(
        f"{_SCHED}._pp_send_proxy_to_next_stage",
        "hook",
        "a pipeline stage relays the step's tally with its activations",
        "SGLang lets a platform supply its communicator",
    ),
    Surface(
        f"{_SCHED}._pp_prepare_tensor_dict",
        "hook",
        "the last stage returns the step's tally with the sampled tokens",
        "SGLang lets a platform supply its communicator",
    ),
    Surface(
        f"{_SCHED}._pp_prep_batch_result",
        "hook",
        "the first stage's result of a micro-batch takes the returned tally",
        "SGLang lets a platform supply its communicator",
    ),
    Surface(
        "sglang.srt.managers.utils.GenerationBatchResult#pp_hidden_states_proxy_tensors",
        "private attribute",
        "the activations a stage sends",
        "SGLang lets a platform supply its communicator",
    ),
    Surface(
        "sglang.srt.model_executor.forward_batch_info.PPProxyTensors#tensors",
        "private attribute",
        "the dict a stage sends and the next receives",
        "SGLang lets a platform supply its communicator",
    ),
    Surface(
        "sglang.srt.plugins.hook_registry.HookRegistry#_patched",
        "private attribute",
        "checks at startup that every hook above applied (require_hooks_applied)",
        "HookRegistry raises when a hook fails to apply",
    ),
    # Patches (maia_serving.sglang.patch)
    Surface(
        "sglang.srt.server_args.ServerArgs.resolve_once",
        "patch",
        "Engine(device='maia') selects the platform (patch/offline_device.py)",
        "SGLang resolves the platform from the engine's device argument",
    ),
    Surface(
        "sglang.srt.platforms._current_platform",
        "patch",
        "the platform the offline patch swaps",
        "SGLang resolves the platform from the engine's device argument",
    ),
    Surface(
        f"{_TOKENIZER}._validate_one_request",
        "patch",
        "refuses out-of-vocabulary token ids with a 400 (patch/request_checks.py)",
        "SGLang checks prompt token ids against the vocabulary",
    ),
    Surface(
        f"{_TOKENIZER}._tokenize_one_request",
        "patch",
        "refuses texts that cannot fit the context before tokenizing them (patch/request_checks.py)",
        "SGLang checks the length before tokenizing",
    ),
    Surface(
        "sglang.srt.entrypoints.openai.serving_base.OpenAIServingBase.handle_request",
        "patch",
        "a 404 for a model the server does not serve (patch/request_checks.py)",
        "SGLang checks model names",
    ),
    Surface(
        "sglang.srt.observability.req_time_stats.APIServerReqTimeStats.__getstate__",
        "patch",
        "a request's created_time reaches the scheduler, which a paced clock stamps arrivals with "
        "(patch/request_age.py)",
        "SGLang sends a request's creation time to the scheduler",
    ),
    Surface(
        "sglang.srt.observability.req_time_stats.APIServerReqTimeStats#created_time",
        "private attribute",
        "when the API server created the request (perf_counter)",
        "SGLang sends it to the scheduler",
    ),
    Surface(
        f"{_TOKENIZER}#served_model_name",
        "private attribute",
        "the name the model check accepts",
        "SGLang checks model names",
    ),
    Surface(
        f"{_TOKENIZER}#context_len",
        "private attribute",
        "the length the pre-check compares with",
        "SGLang checks the length before tokenizing",
    ),
    # Platform and attention backend (maia_serving.sglang.platform, .attention)
    Surface(
        "sglang.srt.platforms.cpu.CpuDeviceMixin",
        "subclass",
        "host tensors under the maia platform",
        "SGLang exports a CPU platform base class",
    ),
    Surface(
        "sglang.srt.model_executor.cuda_graph_config.with_phase",
        "private attribute",
        "turns graph capture off for both phases",
        "graph capture follows the platform's capabilities",
    ),
    Surface(
        "sglang.srt.mem_cache.memory_pool.MHATokenToKVPool.get_key_buffer",
        "private attribute",
        "the attention backend pages the KV pool itself",
        "never: the backend reads the pool by design",
    ),
    Surface(
        "sglang.srt.platforms.interface.SRTPlatform.get_kv_pool_cls",
        "extension point",
        "a block-scaled KV cache gets the pool of kv_pool.BlockScaledKVPool",
        "never: the platform's pool hook",
    ),
    Surface(
        "sglang.srt.mem_cache.memory_pool.MHATokenToKVPool",
        "subclass",
        "BlockScaledKVPool: SGLang's pool with uint8 rows of head_bytes, built with its keyword arguments",
        "never: the pool hook asks for a subclass",
    ),
    Surface(
        "sglang.srt.layers.radix_attention.RadixAttention#tp_k_head_num",
        "private attribute",
        "per-rank KV heads of a layer",
        "never: the backend reads the layer by design",
    ),
    Surface(
        "sglang.srt.layers.radix_attention.RadixAttention#sliding_window_size",
        "private attribute",
        "refuses sliding-window layers it cannot serve",
        "the backend serves sliding windows",
    ),
    # Install workaround (scripts/setup-sglang.sh)
    Surface(
        "dist:sglang",
        "install workaround",
        "installed --no-deps over requirements/sglang-lean.txt (6.3 GB instead of 11 GB of GPU packages)",
        "SGLang publishes a CPU extra",
    ),
)


def require_surfaces() -> None:
    require_all(SURFACES, "SGLang")


def require_hooks_applied(targets: tuple[str, ...]) -> None:
    """In the scheduler process: every step hook applied, or the server stops with why."""
    from sglang.srt.plugins.hook_registry import HookRegistry

    missing = [t for t in targets if t not in HookRegistry._patched]
    if missing:
        raise RuntimeError(
            f"maia-serving could not hook SGLang's {', '.join(missing)}: emulated step times would "
            "be missing. Check the log above for 'Failed to apply hooks' and install the SGLang "
            "version pinned in pyproject.toml."
        )
