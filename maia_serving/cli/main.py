"""The `maia-serving` command: profiles, fit, simulate, calibrate-host, demo-model, train-model,
calibrate-kv, qat-kv, reshard, merge."""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import replace
from pathlib import Path

from maia_serving.emulator.cost import ALL2ALL_BACKENDS, FUSIONS
from maia_serving.emulator.hardware import host_profile_path, load_profile, profile_names
from maia_serving.emulator.memory import (
    MemoryPlan,
    ServingConfig,
    check_redundant_experts,
    kv_bits_per_value,
    plan_memory,
    suggest,
)
from maia_serving.emulator.model_shape import KV_CACHE_DTYPES, builtin_model_names, load_model_shape, with_expert_load
from maia_serving.emulator.units import format_bytes
from maia_serving.models.demo import FAMILIES as DEMO_FAMILIES


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def cmd_profiles(args: argparse.Namespace) -> int:
    if args.show:
        profile = load_profile(args.show)
        print(f"{profile.name}: {profile.description}")
        for key, source in profile.sources.items():
            mark = " (estimate)" if key in profile.estimates else ""
            print(f"  {key}: {source}{mark}")
        return 0
    names = [n for n in profile_names() if n != "host" or host_profile_path().exists()]
    rows = [["profile", "HBM GB", "HBM TB/s", "BF16 TFLOP/s", "scale-up GB/s/dir", "chips", "topology",
             "scale-out GB/s/dir", "estimates"]]
    for name in names:
        p = load_profile(name)
        up, out = p.scale_up, p.scale_out
        topology = up.topology + ("+reduction" if up.in_network_reduction else "")
        rows.append([p.name, f"{p.hbm_capacity_bytes / 1e9:.0f}", f"{p.hbm_bandwidth_bytes_per_s / 1e12:.2f}",
                     f"{p.peak_flops('bf16') / 1e12:.0f}", f"{up.bandwidth_bytes_per_s / 1e9:.0f}",
                     str(up.chips), topology, f"{out.bandwidth_bytes_per_s / 1e9:.0f}" if out else "-",
                     str(len(p.estimates))])
    print(_table(rows))
    if "host" not in names:
        print("\n(host: run `maia-serving calibrate-host` to measure this machine)")
    return 0


def _serving_config(args: argparse.Namespace) -> ServingConfig:
    return ServingConfig(
        tensor_parallel_size=args.tensor_parallel_size,
        pipeline_parallel_size=args.pipeline_parallel_size,
        data_parallel_size=args.data_parallel_size,
        enable_expert_parallel=args.enable_expert_parallel,
        all2all_backend=args.all2all_backend,
        **_eplb_settings(args),
        fusions=tuple(args.fusions),
        kv_cache_dtype=args.kv_cache_dtype,
        max_model_len=args.max_model_len,
        block_size=args.block_size,
        gpu_memory_utilization=args.gpu_memory_utilization,
    )


def _against_model_dtype(plan: MemoryPlan, auto: MemoryPlan, model_dtype: str) -> str:
    """" (3.76x the 1455280 tokens of a bfloat16 cache)" where the KV cache is smaller or larger than in
    the model's dtype (``auto``: the same plan with ``--kv-cache-dtype auto``)."""
    if plan.kv_bytes_per_token == auto.kv_bytes_per_token or not auto.kv_tokens:
        return ""
    return f" ({plan.kv_tokens / auto.kv_tokens:.2f}x the {auto.kv_tokens} tokens of a {model_dtype} cache)"


def cmd_fit(args: argparse.Namespace) -> int:
    model = load_model_shape(args.model)
    profile = load_profile(args.profile)
    config = _serving_config(args)
    if args.weight_dtype != "auto":
        config = replace(config, weight_dtype=args.weight_dtype)
    plan = plan_memory(model, profile, config)
    if args.json:
        print(json.dumps({**plan.to_dict(), "config": config.__dict__}, indent=2))
        return 0 if plan.fits else 1
    weights = f", weights in {config.weight_dtype}" if config.weight_dtype else ""
    print(f"{model.name} ({model.num_params() / 1e9:.2f} B parameters, {model.dtype}{weights}) on "
          f"{config.parallel.chips} x {profile.name} ({config.layout_words}), per chip:")
    rows = [["", "bytes"],
            ["HBM capacity", format_bytes(plan.hbm_capacity_bytes)],
            [f"usable (x{config.gpu_memory_utilization} - runtime reserve)", format_bytes(plan.usable_bytes)],
            ["weights", format_bytes(plan.weight_bytes)],
            ["activation workspace", format_bytes(plan.workspace_bytes)],
            ["KV cache budget", format_bytes(plan.kv_budget_bytes)],
            [f"KV per token ({config.kv_cache_dtype}, {kv_bits_per_value(model, config):g} bits a value)",
             format_bytes(plan.kv_bytes_per_token)]]
    print(_table(rows))
    auto = plan_memory(model, profile, replace(config, kv_cache_dtype="auto"))
    print(f"KV cache: {plan.num_blocks} blocks of {config.block_size} = {plan.kv_tokens} tokens"
          f"{_against_model_dtype(plan, auto, model.dtype)}; "
          f"{plan.max_concurrent_seqs} concurrent sequences of {plan.max_model_len} tokens.")
    if plan.fits:
        print("FITS")
        return 0
    print(f"DOES NOT FIT: short by {format_bytes(plan.shortfall_bytes)} per chip.")
    for tip in suggest(model, profile, config):
        print(f"  try {tip}")
    return 1


def _simulate_workload(args: argparse.Namespace) -> tuple[list, str]:
    """The requests the flags describe, and a line that names them."""
    from maia_serving.emulator.workload import read_trace, synthetic

    if args.trace:
        given = [flag for flag, value in (("--input-len", args.input_len), ("--output-len", args.output_len))
                 if value is not None]
        if given:
            raise ValueError(f"{' and '.join(given)} describe synthetic requests; --trace gives each request's lengths")
        requests = read_trace(Path(args.trace), args.num_prompts)
        return requests, f"{len(requests)} requests from {args.trace}"
    num, input_len, output_len = (default if value is None else value for value, default in
                                  ((args.num_prompts, 8), (args.input_len, 1024), (args.output_len, 128)))
    requests = synthetic(num, input_len, output_len, args.request_rate, args.seed)
    rate = "all at once" if math.isinf(args.request_rate) else f"Poisson at {args.request_rate:g}/s, seed {args.seed}"
    return requests, f"{num} x ({input_len} in, {output_len} out), {rate}"


def _simulate_table(rows: list[dict]) -> str:
    def ms(latency: dict | None, key: str) -> str:
        return "-" if latency is None else f"{latency[key]:.2f}"

    table = [["device", "req/s", "output tok/s", "total tok/s", "goodput req/s", "TTFT ms mean/p99",
              "TPOT ms mean/p99", "e2e ms mean/p99", "KV peak", "preempted"]]
    for r in rows:
        if not r["fits"]:
            table.append([r["device"], "does not fit"] + [""] * 8)
            continue
        goodput = "-" if r["goodput_req_s"] is None else f"{r['goodput_req_s']:.2f}"
        table.append([r["device"], f"{r['request_throughput_req_s']:.2f}", f"{r['output_throughput_tok_s']:.0f}",
                      f"{r['total_throughput_tok_s']:.0f}", goodput,
                      *(f"{ms(r[k], 'mean')}/{ms(r[k], 'p99')}" for k in ("ttft_ms", "tpot_ms", "e2e_ms")),
                      f"{r['kv_peak_usage']:.0%}", str(r["num_preemptions"])])
    return _table(table)


def _routed_model(args: argparse.Namespace):
    """The model shape, priced with ``--expert-load``'s measured routing where given."""
    model = load_model_shape(args.model)
    return with_expert_load(model, args.expert_load) if args.expert_load else model


def _routing_words(model) -> str:
    load = model.moe.load if model.moe else None
    return f", expert routing measured ({load.source})" if load else ""


def _add_expert_load(p: argparse.ArgumentParser) -> None:
    p.add_argument("--expert-load", metavar="FILE",
                   help="MoE models: measured routing, JSON {\"source\": ..., \"layers\": [[tokens per expert, ...], "
                        "...]} (one list for all layers or one per MoE layer); default: every expert alike")


def cmd_simulate(args: argparse.Namespace) -> int:
    from maia_serving.emulator.memory import NotEnoughMemory
    from maia_serving.emulator.report import SLO, refused, summarize, write_chrome_trace, write_plot
    from maia_serving.emulator.simulate import simulate_device

    model = _routed_model(args)
    requests, described = _simulate_workload(args)
    described += _routing_words(model)
    config = replace(_serving_config(args), max_num_batched_tokens=args.max_num_batched_tokens,
                     max_num_seqs=args.max_num_seqs)
    if args.weight_dtype != "auto":
        config = replace(config, weight_dtype=args.weight_dtype)
    if args.comm_dtype != "auto":
        config = replace(config, comm_dtype=args.comm_dtype)
    slo = SLO(args.ttft_slo_ms, args.tpot_slo_ms)
    rows, sims = [], []
    for profile in [load_profile(name) for name in args.profile]:  # a misspelt name stops before any run
        try:
            sim = simulate_device(profile, model, config, requests, args.enable_prefix_caching)
        except NotEnoughMemory as exc:
            rows.append(refused(profile.name, str(exc)))
            continue
        sims.append(sim)
        rows.append(summarize(sim, slo).to_dict())
    if args.chrome_trace and sims:
        write_chrome_trace(Path(args.chrome_trace), sims)
    if args.plot and sims:
        write_plot(Path(args.plot), sims)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        fused = f", fused: {' '.join(config.fusions)}" if config.fusions else ""
        print(f"{model.name}: {described}; {config.layout_words}{fused}, "
              f"kv={config.kv_cache_dtype}, max_num_seqs={config.max_num_seqs}, "
              f"max_num_batched_tokens={config.max_num_batched_tokens}, "
              f"prefix caching {'on' if args.enable_prefix_caching else 'off'}")
        print(_simulate_table(rows))
        for r in rows:
            if r["fits"]:
                print(f"{r['device']}: KV cache of {r['kv_cache_tokens']} tokens at "
                      f"{format_bytes(r['kv_bytes_per_token'])} per token ({config.kv_cache_dtype})")
                usage = " ".join(f"{100 * u:.0f}" for _, u in r["kv_usage_over_time"])
                print(f"{r['device']}: KV use over {r['duration_s']:.3g} s (%): {usage}")
                if r["eplb_initial_steps"] is not None:
                    print(f"{r['device']}: {_eplb_words(r['eplb_initial_steps'], r['num_steps'], config)}")
            else:
                print(f"{r['device']}: {r['error']}")
    return 0 if all(r["fits"] for r in rows) else 1


def _eplb_never_words(config: ServingConfig) -> str:
    """Why a run's EPLB kept its initial map, and how to price a server that has run a while."""
    return (f"(vLLM first rearranges a quarter of step_interval {config.eplb_step_interval} = "
            f"{config.eplb_first_rearrangement} steps in); --eplb-config '{{\"step_interval\": 4}}' prices the "
            "balanced map from the second step on, as a long-running server has it")


def _eplb_words(initial_steps: int, steps: int, config: ServingConfig) -> str:
    """When EPLB balanced the experts in a simulated run, or that it never did."""
    if initial_steps < steps:
        return (f"EPLB balanced the experts after step {initial_steps} of {steps} (a quarter of step_interval "
                f"{config.eplb_step_interval}); before, its initial map")
    return f"EPLB never rearranged: all {steps} steps at its initial expert map {_eplb_never_words(config)}"


def _plan_table(results: list, slo_given: bool) -> str:
    def num(value: float | None, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    moe = any(r.dp > 1 or r.ep for r in results)
    table = [["rank", "device", "topology", "tp", "pp"] + (["dp", "ep"] if moe else []) + ["output tok/s"]
             + (["goodput tok/s"] if slo_given else []) + ["TTFT ms mean/p99", "TPOT ms mean/p99", "comm"]]
    for r in results:
        head = [num(r.rank, "d"), r.device, r.topology, str(r.tp), str(r.pp)] + (
            [str(r.dp), "yes" if r.ep else "no"] if moe else [])
        if not r.fits:
            table.append(head + ["rejected"] + [""] * (3 + slo_given))
            continue
        table.append(head + [f"{r.output_throughput_tok_s:.0f}"] + ([f"{r.goodput_tok_s:.0f}"] if slo_given else [])
                     + [f"{r.ttft_ms:.1f}/{r.ttft_p99_ms:.1f}", f"{num(r.tpot_ms, '.2f')}/{num(r.tpot_p99_ms, '.2f')}",
                        f"{r.comm_share:.1%}"])
    return _table(table)


def cmd_plan(args: argparse.Namespace) -> int:
    from maia_serving.emulator.plan import plan, write_plots
    from maia_serving.emulator.report import SLO

    model = _routed_model(args)
    args.trace = None
    requests, described = _simulate_workload(args)
    described += _routing_words(model)
    settings = _eplb_settings(args)
    check_redundant_experts(settings["enable_eplb"], settings["num_redundant_experts"])
    eplb = settings["num_redundant_experts"] if args.enable_eplb else None
    if eplb is not None:
        described += f", EPLB on the expert-parallel layouts ({eplb} redundant experts)"
    config = ServingConfig(kv_cache_dtype=args.kv_cache_dtype, max_model_len=args.max_model_len,
                           gpu_memory_utilization=args.gpu_memory_utilization,
                           max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs,
                           all2all_backend=args.all2all_backend, eplb_step_interval=settings["eplb_step_interval"],
                           weight_dtype=None if args.weight_dtype == "auto" else args.weight_dtype,
                           comm_dtype=None if args.comm_dtype == "auto" else args.comm_dtype)
    slo = SLO(args.ttft_slo_ms, args.tpot_slo_ms)
    profiles = [load_profile(name) for name in args.profile]  # a misspelt name stops before any run
    results = plan(profiles, model, args.num_devices, config, requests, slo, args.enable_prefix_caching, eplb)
    if args.plot:
        write_plots(Path(args.plot), results, f"{model.name} on {args.num_devices} chips")
    if args.json:
        print(json.dumps([r.to_dict() for r in results], indent=2))
    else:
        slos = ", ".join(f"{k} <= {v:g} ms" for k, v in (("TTFT", slo.ttft_ms), ("TPOT", slo.tpot_ms)) if v is not None)
        print(f"{model.name} on {args.num_devices} chips: {described}; kv={config.kv_cache_dtype}, "
              f"max_num_seqs={config.max_num_seqs}, max_num_batched_tokens={config.max_num_batched_tokens}"
              f"{'; ranked by goodput under ' + slos if slos else '; ranked by output throughput'}")
        print(_plan_table(results, slo.given))
        if any(r.eplb_rearranged is False for r in results):
            print("EPLB never rearranged in some layouts' runs: their experts stayed at its initial map "
                  + _eplb_never_words(config))
        for r in results:
            if not r.fits:
                extra = (f" dp={r.dp}" if r.dp > 1 else "") + (" ep" if r.ep else "")
                print(f"{r.device} tp={r.tp} pp={r.pp}{extra}: {r.reason}")
    return 0 if any(r.fits for r in results) else 1


def _engine_calibration(data: dict, model: str, heads: tuple[int, int, int]) -> dict:
    """The host profile as vLLM's engine on ``model`` finds the host: every figure measured again inside an
    engine process (``step_timing.measure_host`` says why), then the engine's own time per step, sequence
    and token (calibrate.fit_engine_time) timed in another on that profile. ``data``, measured in this
    process, is the profile those engines start with."""
    import tempfile
    from datetime import datetime, timezone

    from maia_serving.emulator.calibrate import (
        ENGINE_ROUNDS,
        ENGINE_WORKLOADS,
        QUIET_SPREAD,
        fit_engine_time,
        round_spread,
        shape_timings,
        with_engine_time,
        write_profile,
    )
    from maia_serving.envs import MAIA_SERVING_CACHE_DIR
    from maia_serving.vllm import step_timing

    with tempfile.TemporaryDirectory() as cache:
        env = {MAIA_SERVING_CACHE_DIR: cache}
        try:
            write_profile(Path(cache) / "host.yaml", data)
            data = step_timing.run_measure_host(model, heads, env=env)
            write_profile(Path(cache) / "host.yaml", data)
            steps = step_timing.run(model, list(ENGINE_WORKLOADS), rounds=ENGINE_ROUNDS, env=env)
        except RuntimeError as exc:
            raise ValueError(f"{exc}\nThe host profile was not written.") from None
    shapes = shape_timings(steps)
    engine = fit_engine_time(shapes)
    spread = round_spread(shapes)
    print(f"  rounds: the slowest {100 * spread:.0f}% over the fastest (median shape); the fastest is kept")
    if spread > QUIET_SPREAD:
        print(f"  warning: the host's speed moved by more than {100 * QUIET_SPREAD:.0f}% while vLLM's steps were "
              "timed (another process?); if the figures below look high, calibrate again when it is quiet")
    names = ", ".join(f"{p}x{t}" for p, t, _ in ENGINE_WORKLOADS)
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return with_engine_time(data, engine, f"fitted by calibrate-host on vLLM's eager steps of {model} "
                                          f"(prompts x tokens: {names}; each shape's fastest of {ENGINE_ROUNDS} "
                                          f"rounds), {when}")


def cmd_calibrate_host(args: argparse.Namespace) -> int:
    from maia_serving.emulator.calibrate import host_profile_dict, write_profile

    path = Path(args.out) if args.out else host_profile_path()
    if args.engine_model:
        if not (Path(args.engine_model) / "config.json").is_file():
            raise ValueError(f"--engine-model {args.engine_model}: no model there (a folder with config.json and "
                             "weights, e.g. one `maia-serving demo-model --out DIR` wrote)")
        shape = load_model_shape(args.engine_model)  # the host attention is measured at the heads the engine runs
        heads = (shape.num_heads, shape.num_kv_heads, shape.head_dim)
        print(f"measuring the host inside vLLM's engine on {args.engine_model} and timing its steps (about 30 s)")
        data = _engine_calibration(host_profile_dict(heads), args.engine_model, heads)
    else:
        data = host_profile_dict()
    write_profile(path, data)
    print(f"host profile written to {path}")
    print(f"  memory bandwidth: {data['hbm_bandwidth']['value']:.1f} GB/s")
    for dtype, fig in data["peak_compute"].items():
        print(f"  matmul {dtype}: {fig['value'] * 1e3:.1f} GFLOP/s")
    if args.engine_model:
        print(f"  prefill attention: {100 * data['attention_compute_efficiency']['value']:.1f}% of the bf16 matmul")
        print(f"  engine time per step: {data['step_overhead']['value']:.3f} ms + "
              f"{data['step_overhead_per_seq']['value']:.1f} us a sequence + "
              f"{data['step_overhead_per_token']['value']:.2f} us a token")
    return 0


def cmd_demo_model(args: argparse.Namespace) -> int:
    from maia_serving.models.demo import build_demo_model

    out = build_demo_model(Path(args.out), seed=args.seed, overwrite=args.overwrite, family=args.family)
    print(f"demo model ({args.family}) written to {out}")
    return 0


def cmd_train_model(args: argparse.Namespace) -> int:
    from maia_serving.models.train import TrainConfig, train_model

    config = TrainConfig(seed=args.seed) if args.steps is None else TrainConfig(steps=args.steps, seed=args.seed)
    report = train_model(Path(args.out), config, overwrite=args.overwrite)
    print(f"trained model written to {args.out} in {report['total_s']:.0f} s")
    print(f"  loss: train {report['train_loss']:.3f}, held-out {report['heldout_loss']:.3f}")
    print(f"  held-out perplexity (transformers): fp32 {report['heldout_ppl_hf_fp32']:.3f}, "
          f"bf16 {report['heldout_ppl_hf_bf16']:.3f}")
    return 0


def cmd_calibrate_kv(args: argparse.Namespace) -> int:
    from maia_serving.calibration import calibrate_kv

    result = calibrate_kv(Path(args.model), [Path(f) for f in args.data], Path(args.out),
                          max_tokens=args.max_tokens, seq_len=args.seq_len, fmt=args.format,
                          overwrite=args.overwrite)
    print(f"calibrated {args.format} KV-cache scales on {result.num_tokens} tokens written to {args.out}")
    rows = [["layer", "k absmax", "v absmax", "k_scale", "v_scale"]]
    for i, (k, v) in enumerate(zip(result.k_absmax, result.v_absmax)):
        rows.append([str(i), f"{k.max().item():.4g}", f"{v.max().item():.4g}",
                     f"{result.k_scale[i].max().item():.4g}", f"{result.v_scale[i].max().item():.4g}"])
    print(_table(rows))
    return 0


def cmd_qat_kv(args: argparse.Namespace) -> int:
    from maia_serving.models.qat import QatConfig, qat_kv, state_dir, training_split_files

    given = {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "save_every": args.save_every,
             "objective": args.objective, "ema_decay": args.ema_decay}
    config = QatConfig(fmt=args.format, seed=args.seed, **{k: v for k, v in given.items() if v is not None})
    print(f"checkpoint every {config.save_every} steps in {state_dir(Path(args.out))} (rerun to resume)")
    data = [Path(f) for f in args.data] if args.data else training_split_files()
    report = qat_kv(Path(args.model), data, Path(args.out), config, overwrite=args.overwrite)
    print(f"{args.format} KV-cache QAT model written to {args.out} in {report.total_s:.0f} s")
    print(f"  fake-quantized training-data loss: {report.loss_before:.4f} -> {report.loss_after:.4f}")
    if report.heldout_ppl is not None:
        ppl = report.heldout_ppl
        print(f"  held-out perplexity: bf16 {ppl['bf16']:.3f}, {args.format} PTQ {ppl['ptq']:.3f}, "
              f"{args.format} QAT {ppl['qat']:.3f} (QAT weights, unquantized KV {ppl['qat_unquantized']:.3f})")
    return 0


def cmd_route_stats(args: argparse.Namespace) -> int:
    from maia_serving.models.qat import training_split_files
    from maia_serving.models.route_stats import route_counts

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise ValueError(f"{out} exists; pass --overwrite to replace it")
    data = [Path(f) for f in args.data] if args.data else training_split_files()
    counts = route_counts(Path(args.model), data, args.max_tokens)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(counts) + "\n")
    tmp.replace(out)
    busiest = max(max(layer) * counts["top_k"] / sum(layer) for layer in counts["layers"])
    print(f"expert choices of {counts['tokens']} tokens in {len(counts['layers'])} MoE layers written to {out} "
          f"(the most chosen expert of any layer is chosen by {busiest:.0%} of the tokens, uniform routing's "
          f"{counts['top_k'] / len(counts['layers'][0]):.0%}); "
          f"price them with `maia-serving simulate --expert-load {out}`")
    return 0


def _add_all2all(p: argparse.ArgumentParser) -> None:
    p.add_argument("--all2all-backend", choices=ALL2ALL_BACKENDS, default=ALL2ALL_BACKENDS[0],
                   help="how a MoE layer's tokens reach the experts of other data-parallel replicas (vLLM's flag)")
    p.add_argument("--enable-eplb", action="store_true",
                   help="MoE under expert parallelism: experts placed by vLLM's load balancer, on --expert-load's "
                        "counts (or uniform routing)")
    p.add_argument("--eplb-config", type=_eplb_config, default={}, metavar="JSON",
                   help="vLLM's EPLB settings; priced: num_redundant_experts (extra replicas of the hottest experts) "
                        "and step_interval (the first rearrangement comes a quarter of it into the run)")


# vLLM's EPLBConfig fields: all are accepted, as vLLM takes them; the redundant experts and the step interval
# change a price (the others set how vLLM measures the load and moves the weights, which is not charged).
EPLB_CONFIG_KEYS = ("window_size", "step_interval", "num_redundant_experts", "log_balancedness",
                    "log_balancedness_interval", "use_async", "policy", "communicator", "enable_migration_batching")


def _eplb_config(text: str) -> dict:
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON ({exc}); e.g. '{{\"num_redundant_experts\": 8}}'") from None
    if not isinstance(config, dict):
        raise argparse.ArgumentTypeError("a JSON object, e.g. '{\"num_redundant_experts\": 8}'")
    unknown = sorted(set(config) - set(EPLB_CONFIG_KEYS))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown key(s) {', '.join(unknown)}; vLLM's are "
                                         f"{', '.join(EPLB_CONFIG_KEYS)}")
    for key, least in (("num_redundant_experts", 0), ("step_interval", 1)):
        value = config.get(key, least)
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise argparse.ArgumentTypeError(f"{key} must be a whole number, at least {least}; got {value!r}")
    return config


def _eplb_settings(args: argparse.Namespace) -> dict:
    """ServingConfig's EPLB fields from --enable-eplb and --eplb-config."""
    return {"enable_eplb": args.enable_eplb, "num_redundant_experts": args.eplb_config.get("num_redundant_experts", 0),
            "eplb_step_interval": args.eplb_config.get("step_interval", ServingConfig.eplb_step_interval)}


def _add_parallel(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    p.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1)
    p.add_argument("--fusions", nargs="*", choices=FUSIONS, default=[],
                   help="kernel fusions beyond vLLM's own, as other engines run them (TensorRT-LLM: qkv_rotary)")
    p.add_argument("--data-parallel-size", "-dp", type=int, default=1,
                   help="replicas, each tp x pp chips with its own batch and KV cache")
    p.add_argument("--enable-expert-parallel", "-ep", action="store_true",
                   help="MoE: whole experts spread over the tp x dp chips of a stage instead of split")
    _add_all2all(p)
    p.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default="auto")


def build_parser() -> argparse.ArgumentParser:
    models = ", ".join(builtin_model_names())
    parser = argparse.ArgumentParser(prog="maia-serving", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("profiles", help="list the device profiles")
    p.add_argument("--show", metavar="NAME", help="print one profile's sources")
    p.set_defaults(func=cmd_profiles)

    p = sub.add_parser("fit", help="does a model fit a device? memory breakdown per chip")
    p.add_argument("--model", required=True, help=f"model directory, config.json, or one of: {models}")
    p.add_argument("--profile", "--device", dest="profile", required=True,
                   help="device profile (see `maia-serving profiles`); --device is the old spelling")
    _add_parallel(p)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--weight-dtype", default="auto",
                   help="the linear layers' storage (bf16, fp8, int4, mxfp4, ...); auto: the checkpoint's")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_fit)

    p = sub.add_parser("simulate", help="serve a workload on one or more devices, simulated: vLLM v1's scheduler, "
                       "the live cost model")
    p.add_argument("--model", required=True, help=f"model directory, config.json, or one of: {models}")
    p.add_argument("--profile", "--device", dest="profile", nargs="+", default=["maia100", "maia200", "h100-sxm"],
                   help="device profiles to compare; --device is the old spelling")
    _add_expert_load(p)
    _add_parallel(p)
    p.add_argument("--weight-dtype", default="auto",
                   help="the linear layers' storage (bf16, fp8, int4, mxfp4, ...); auto: the checkpoint's")
    p.add_argument("--comm-dtype", default="auto",
                   help="the tensor/pipeline collectives' payload (bf16, fp8, int8, ...: a quantized all-reduce); "
                        "auto: the model's dtype")
    p.add_argument("--num-prompts", "--num-seqs", dest="num_prompts", type=int, default=None,
                   help="requests to simulate (default 8; with --trace, its first N, default all)")
    p.add_argument("--input-len", "--prompt-len", dest="input_len", type=int, default=None,
                   help="prompt tokens per request (default 1024)")
    p.add_argument("--output-len", type=int, default=None, help="output tokens per request (default 128)")
    arrivals = p.add_mutually_exclusive_group()
    arrivals.add_argument("--request-rate", type=float, default=float("inf"),
                          help="Poisson arrivals per second; inf (default): all at once, a static batch")
    arrivals.add_argument("--trace", metavar="FILE",
                          help="JSONL, one request a line: arrival_s, input_len, output_len, optional prefix_id and "
                               "prefix_len (see maia_serving/emulator/workload.py)")
    p.add_argument("--seed", type=int, default=0, help="seed of the Poisson arrivals")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse cached KV blocks of shared prefixes (vLLM v1's default: on)")
    p.add_argument("--ttft-slo-ms", type=float, default=None, help="goodput: time to first token at most this")
    p.add_argument("--tpot-slo-ms", type=float, default=None, help="goodput: time per output token at most this")
    p.add_argument("--chrome-trace", metavar="FILE", help="write a Chrome / Perfetto trace of every step and request")
    p.add_argument("--plot", metavar="FILE", help="plot KV use and the queue over time (needs matplotlib)")
    p.add_argument("--json", action="store_true", help="one JSON object per device")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("plan", help="rank the tensor x pipeline layouts of N chips on each device by what the "
                       "simulator serves within the SLOs")
    p.add_argument("--model", required=True, help=f"model directory, config.json, or one of: {models}")
    p.add_argument("--device", "--profile", dest="profile", nargs="+", required=True,
                   help="device profiles to compare, topology variants included (h100-sxm@pcie; see `profiles`)")
    _add_expert_load(p)
    p.add_argument("--num-devices", type=int, required=True,
                   help="chips per layout: every tp x pp = N is tried (a MoE model: every tp x pp x dp, with and "
                        "without expert parallelism)")
    _add_all2all(p)
    p.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default="auto")
    p.add_argument("--weight-dtype", default="auto",
                   help="the linear layers' storage (bf16, fp8, int4, mxfp4, ...); auto: the checkpoint's")
    p.add_argument("--comm-dtype", default="auto",
                   help="the tensor/pipeline collectives' payload (bf16, fp8, int8, ...: a quantized all-reduce); "
                        "auto: the model's dtype")
    p.add_argument("--num-prompts", type=int, default=None, help="requests to simulate (default 8)")
    p.add_argument("--input-len", type=int, default=None, help="prompt tokens per request (default 1024)")
    p.add_argument("--output-len", type=int, default=None, help="output tokens per request (default 128)")
    p.add_argument("--request-rate", type=float, default=float("inf"),
                   help="Poisson arrivals per second; inf (default): all at once, a static batch")
    p.add_argument("--seed", type=int, default=0, help="seed of the Poisson arrivals")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--ttft-slo-ms", type=float, default=None, help="rank by goodput: TTFT at most this")
    p.add_argument("--tpot-slo-ms", type=float, default=None, help="rank by goodput: TPOT at most this")
    p.add_argument("--plot", metavar="DIR", help="write throughput_vs_tpot.png and comm_share.png (needs matplotlib)")
    p.add_argument("--json", action="store_true", help="a list of layouts")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("calibrate-host", help="measure this machine as the `host` profile")
    p.add_argument("--out", help=f"where to write it (default {host_profile_path()})")
    p.add_argument("--engine-model", metavar="DIR",
                   help="measure the host inside vLLM's engine serving this model on --device maia, time the "
                        "engine's own steps and fit its time per step, sequence and token (about 30 s): without "
                        "it the host profile prices torch's work only, measured in a bare process")
    p.set_defaults(func=cmd_calibrate_host)

    p = sub.add_parser("demo-model", help="build the tiny random Llama used by the demo and tests")
    p.add_argument("--out", required=True)
    p.add_argument("--family", choices=list(DEMO_FAMILIES), default="llama",
                   help="llama (the demo), sliding-window (Mistral, every layer a window of 16 keys), "
                        "hybrid-window (Olmo-3, one windowed layer and one full) or moe (Mixtral, 4 experts, "
                        "top-2); same shape and tokenizer")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out whole")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo_model)

    p = sub.add_parser("train-model", help="train the small Llama used for accuracy measurements (~6 min)")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default 400)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out whole")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_train_model)

    p = sub.add_parser("calibrate-kv", help="calibrate FP8 KV-cache scales; write a checkpoint vLLM loads")
    p.add_argument("--model", required=True, help="model directory (config.json + safetensors)")
    p.add_argument("--data", required=True, nargs="+", help="calibration text file(s)")
    p.add_argument("--out", required=True, help="output model directory")
    p.add_argument("--max-tokens", type=int, default=32768, help="calibration tokens at most")
    p.add_argument("--seq-len", type=int, default=None,
                   help="tokens per forward pass (default: the model's max_position_embeddings, at most 2048)")
    p.add_argument("--format", choices=["e4m3", "e5m2"], default="e4m3", help="FP8 format of the KV cache")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out whole")
    p.set_defaults(func=cmd_calibrate_kv)

    p = sub.add_parser("route-stats", help="count which experts a MoE checkpoint's routers choose on some text: "
                                           "the --expert-load file of simulate and plan")
    p.add_argument("--model", required=True, help="MoE model directory (config.json + safetensors); only read")
    p.add_argument("--data", nargs="+",
                   help="text file(s) to route (default: the stdlib sources train-model trained on)")
    p.add_argument("--max-tokens", type=int, default=65536, help="tokens of the text to route (default 65536)")
    p.add_argument("--out", required=True, help="the JSON file to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=cmd_route_stats)

    p = sub.add_parser("qat-kv", help="fine-tune a model with its KV cache fake-quantized (QAT); write a checkpoint "
                                      "that serves with that KV format")
    p.add_argument("--model", required=True, help="model directory (config.json + safetensors); only read")
    p.add_argument("--format", required=True,
                   help="KV-cache format: mxfp8, mxfp6, mxfp6_e2m3, mxfp4, nvfp4 or fp8_e4m3")
    p.add_argument("--data", nargs="+",
                   help="training text file(s) (default: the stdlib sources train-model trained on, held-out "
                        "files excluded)")
    p.add_argument("--out", required=True, help="output model directory")
    p.add_argument("--objective", choices=["distill", "lm"], default=None,
                   help="distill: match the unquantized model's predictions (default); lm: next-token loss")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default 400)")
    p.add_argument("--batch-size", type=int, default=None, help="windows per step (default 8)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default 1e-4)")
    p.add_argument("--ema-decay", type=float, default=None,
                   help="write the moving average of the weights with this decay per step (default 0.99; 0: the "
                        "last step's weights)")
    p.add_argument("--save-every", type=int, default=None,
                   help="steps between resumable checkpoints (default 25)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out whole")
    p.set_defaults(func=cmd_qat_kv)

    p = sub.add_parser("reshard", help="split a Hugging Face checkpoint into the per-rank files vLLM's "
                                       "--load-format sharded_state reads")
    p.add_argument("--model", required=True, help="model directory (config.json + safetensors); only read")
    p.add_argument("--out", required=True, help="output model directory")
    p.add_argument("--tensor-parallel-size", "-tp", type=int, required=True)
    p.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1)
    p.add_argument("--weight-dtype", default="auto",
                   help="auto: the linear layers as the source stores them; fp8: E4M3 with a scale per output "
                        "channel (compressed-tensors, which vLLM serves; merge cannot undo it)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out whole")
    p.set_defaults(func=cmd_reshard)

    p = sub.add_parser("merge", help="rebuild the Hugging Face checkpoint a reshard was made from, byte for byte")
    p.add_argument("--model", required=True, help="a directory written by `maia-serving reshard`")
    p.add_argument("--out", required=True, help="output model directory")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out whole")
    p.set_defaults(func=cmd_merge)
    return parser


def cmd_reshard(args: argparse.Namespace) -> int:
    from maia_serving.models.reshard import reshard

    manifest = reshard(Path(args.model), Path(args.out), args.tensor_parallel_size, args.pipeline_parallel_size,
                       overwrite=args.overwrite, weight_dtype=args.weight_dtype)
    print(f"{len(manifest['files'])} rank files for TP {args.tensor_parallel_size} x PP "
          f"{args.pipeline_parallel_size} written to {args.out}; serve with --load-format sharded_state")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from maia_serving.models.reshard import merge

    files = merge(Path(args.model), Path(args.out), overwrite=args.overwrite)
    print(f"{', '.join(files)} rebuilt in {args.out}, equal to the source's sha256")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError) as exc:
        print(f"maia-serving {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
