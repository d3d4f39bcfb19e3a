"""Flag groups more than one verb takes, built once, and what they make: the serving config, the workload,
the routed model. Each verb adds the groups it needs, in the order its --help shows them."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from maia_serving.emulator.cost.layout import ALL2ALL_BACKENDS
from maia_serving.emulator.cost.terms import FUSIONS
from maia_serving.emulator.memory import ServingConfig
from maia_serving.emulator.model_shape import (
    KV_CACHE_DTYPES,
    ModelShape,
    builtin_model_names,
    load_model_shape,
    with_expert_load,
)
from maia_serving.emulator.sim.scheduler import POLICIES
from maia_serving.emulator.sim.workload import Request


def add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", required=True, help=f"model directory, config.json, or one of: {', '.join(builtin_model_names())}"
    )


def add_expert_load(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--expert-load",
        metavar="FILE",
        help='MoE models: measured routing, JSON {"source": ..., "layers": [[tokens per expert, ...], '
        "...]} (one list for all layers or one per MoE layer); default: every expert alike",
    )


def add_kv_cache_dtype(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default="auto")


def add_all2all(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--all2all-backend",
        choices=ALL2ALL_BACKENDS,
        default=ALL2ALL_BACKENDS[0],
        help="how a MoE layer's tokens reach the experts of other data-parallel replicas (vLLM's flag)",
    )
    p.add_argument(
        "--enable-eplb",
        action="store_true",
        help="MoE under expert parallelism: experts placed by vLLM's load balancer, on --expert-load's "
        "counts (or uniform routing)",
    )
    p.add_argument(
        "--eplb-config",
        type=_eplb_config,
        default={},
        metavar="JSON",
        help="vLLM's EPLB settings; priced: num_redundant_experts (extra replicas of the hottest experts) "
        "and step_interval (the first rearrangement comes a quarter of it into the run)",
    )


def add_parallel(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    p.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1)
    p.add_argument(
        "--fusions",
        nargs="*",
        choices=FUSIONS,
        default=[],
        help="kernel fusions beyond vLLM's own, as other engines run them (TensorRT-LLM: qkv_rotary)",
    )
    p.add_argument(
        "--data-parallel-size",
        "-dp",
        type=int,
        default=1,
        help="replicas, each tp x pp chips with its own batch and KV cache",
    )
    p.add_argument(
        "--enable-expert-parallel",
        "-ep",
        action="store_true",
        help="MoE: whole experts spread over the tp x dp chips of a stage instead of split",
    )
    add_all2all(p)
    add_kv_cache_dtype(p)


def add_weight_dtype(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--weight-dtype",
        default="auto",
        help="the linear layers' storage (bf16, fp8, int4, mxfp4, ...); auto: the checkpoint's",
    )


def add_comm_dtype(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--comm-dtype",
        default="auto",
        help="the tensor/pipeline collectives' payload (bf16, fp8, int8, ...: a quantized all-reduce); "
        "auto: the model's dtype",
    )


def add_scheduler_limits(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument(
        "--scheduler-policy",
        choices=POLICIES,
        default="vllm",
        help="KV admission: vLLM's (blocks as tokens are computed, preempting under pressure; SGLang alike) or "
        "TensorRT-LLM's default GUARANTEED_NO_EVICT (a request admitted only with blocks for its prompt and all its "
        "output, never preempted), to replay measurements of that engine",
    )


def add_memory_limits(p: argparse.ArgumentParser, block_size: bool = True) -> None:
    p.add_argument("--max-model-len", type=int, default=None)
    if block_size:
        p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)


def add_seed(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=0, help="seed of the Poisson arrivals")


def add_request_rate(p: argparse.ArgumentParser | argparse._MutuallyExclusiveGroup) -> None:
    p.add_argument(
        "--request-rate",
        type=float,
        default=float("inf"),
        help="Poisson arrivals per second; inf (default): all at once, a static batch",
    )


def add_max_concurrency(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--max-concurrency",
        type=int,
        default=None,
        help="at most this many requests in flight, as vllm bench serve's flag: with the default infinite rate a "
        "closed loop of N clients, how concurrency sweeps are measured; TTFT counts from when a request is sent",
    )


FRONT_ENDS = ("profile", "host", "none")


def add_front_end(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--front-end",
        choices=FRONT_ENDS,
        default="profile",
        help="the serving front end's time per request in TTFT (HTTP, tokenization, the hand-off to the engine): "
        "each profile's own (default), this host's as `calibrate-host --server` measured it (to replay a live run "
        "served here), or none (the device's time alone, as the engine's own clock counts TTFT)",
    )


def add_output_len(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output-len", type=int, default=None, help="output tokens per request (default 128)")


def add_overwrite(p: argparse.ArgumentParser, what: str = "replace a non-empty --out whole") -> None:
    p.add_argument("--overwrite", action="store_true", help=what)


# vLLM's EPLBConfig fields: all are accepted, as vLLM takes them; the redundant experts and the step interval
# change a price (the others set how vLLM measures the load and moves the weights, which is not charged).
EPLB_CONFIG_KEYS = (
    "window_size",
    "step_interval",
    "num_redundant_experts",
    "log_balancedness",
    "log_balancedness_interval",
    "use_async",
    "policy",
    "communicator",
    "enable_migration_batching",
)


def _eplb_config(text: str) -> dict:
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON ({exc}); e.g. '{{\"num_redundant_experts\": 8}}'") from None
    if not isinstance(config, dict):
        raise argparse.ArgumentTypeError("a JSON object, e.g. '{\"num_redundant_experts\": 8}'")
    unknown = sorted(set(config) - set(EPLB_CONFIG_KEYS))
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown key(s) {', '.join(unknown)}; vLLM's are {', '.join(EPLB_CONFIG_KEYS)}"
        )
    for key, least in (("num_redundant_experts", 0), ("step_interval", 1)):
        value = config.get(key, least)
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise argparse.ArgumentTypeError(f"{key} must be a whole number, at least {least}; got {value!r}")
    return config


def eplb_settings(args: argparse.Namespace) -> dict:
    """ServingConfig's EPLB fields from --enable-eplb and --eplb-config."""
    return {
        "enable_eplb": args.enable_eplb,
        "num_redundant_experts": args.eplb_config.get("num_redundant_experts", 0),
        "eplb_step_interval": args.eplb_config.get("step_interval", ServingConfig.eplb_step_interval),
    }


def eplb_never_words(config: ServingConfig) -> str:
    """Why a run's EPLB kept its initial map, and how to price a server that has run a while."""
    return (
        f"(vLLM first rearranges a quarter of step_interval {config.eplb_step_interval} = "
        f"{config.eplb_first_rearrangement} steps in); --eplb-config '{{\"step_interval\": 4}}' prices the "
        "balanced map from the second step on, as a long-running server has it"
    )


def serving_config(args: argparse.Namespace) -> ServingConfig:
    """The layout and memory flags (add_parallel, add_memory_limits) as the emulator's config."""
    return ServingConfig(
        tensor_parallel_size=args.tensor_parallel_size,
        pipeline_parallel_size=args.pipeline_parallel_size,
        data_parallel_size=args.data_parallel_size,
        enable_expert_parallel=args.enable_expert_parallel,
        all2all_backend=args.all2all_backend,
        **eplb_settings(args),
        fusions=tuple(args.fusions),
        kv_cache_dtype=args.kv_cache_dtype,
        max_model_len=args.max_model_len,
        block_size=args.block_size,
        gpu_memory_utilization=args.gpu_memory_utilization,
    )


def workload(args: argparse.Namespace) -> tuple[list[Request], str]:
    """The requests the flags describe, and a line that names them (with the client's limit on those in flight)."""
    requests, described = _requests(args)
    limit = getattr(args, "max_concurrency", None)
    return requests, described + (f", at most {limit} in flight" if limit is not None else "")


def _requests(args: argparse.Namespace) -> tuple[list[Request], str]:
    from maia_serving.emulator.sim.workload import read_trace, synthetic

    if getattr(args, "trace", None):
        given = [
            flag
            for flag, value in (("--input-len", args.input_len), ("--output-len", args.output_len))
            if value is not None
        ]
        if given:
            raise ValueError(f"{' and '.join(given)} describe synthetic requests; --trace gives each request's lengths")
        requests = read_trace(Path(args.trace), args.num_prompts)
        return requests, f"{len(requests)} requests from {args.trace}"
    num, input_len, output_len = (
        default if value is None else value
        for value, default in ((args.num_prompts, 8), (args.input_len, 1024), (args.output_len, 128))
    )
    requests = synthetic(num, input_len, output_len, args.request_rate, args.seed)
    rate = "all at once" if math.isinf(args.request_rate) else f"Poisson at {args.request_rate:g}/s, seed {args.seed}"
    return requests, f"{num} x ({input_len} in, {output_len} out), {rate}"


def routed_model(args: argparse.Namespace) -> ModelShape:
    """The model shape, priced with ``--expert-load``'s measured routing where given."""
    model = load_model_shape(args.model)
    return with_expert_load(model, args.expert_load) if args.expert_load else model


def routing_words(model: ModelShape) -> str:
    load = model.moe.load if model.moe else None
    return f", expert routing measured ({load.source})" if load else ""
