"""`maia-serving simulate`: a workload served on one or more devices, simulated with vLLM v1's scheduler on the
live cost model."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from maia_serving.cli import flags
from maia_serving.cli.base import Subcommand, table
from maia_serving.emulator.hardware import NO_FRONT_END, FrontEnd
from maia_serving.emulator.memory import ServingConfig
from maia_serving.formats.units import format_bytes
from maia_serving.serving.profiles import load_profile


def _table(rows: list[dict]) -> str:
    def ms(latency: dict | None, key: str) -> str:
        return "-" if latency is None else f"{latency[key]:.2f}"

    out = [
        [
            "device",
            "req/s",
            "output tok/s",
            "total tok/s",
            "goodput req/s",
            "TTFT ms mean/p99",
            "TPOT ms mean/p99",
            "e2e ms mean/p99",
            "KV peak",
            "preempted",
        ]
    ]
    for r in rows:
        if not r["fits"]:
            out.append([r["device"], "does not fit"] + [""] * 8)
            continue
        goodput = "-" if r["goodput_req_s"] is None else f"{r['goodput_req_s']:.2f}"
        out.append(
            [
                r["device"],
                f"{r['request_throughput_req_s']:.2f}",
                f"{r['output_throughput_tok_s']:.0f}",
                f"{r['total_throughput_tok_s']:.0f}",
                goodput,
                *(f"{ms(r[k], 'mean')}/{ms(r[k], 'p99')}" for k in ("ttft_ms", "tpot_ms", "e2e_ms")),
                f"{r['kv_peak_usage']:.0%}",
                str(r["num_preemptions"]),
            ]
        )
    return table(out)


def _eplb_words(initial_steps: int, steps: int, config: ServingConfig) -> str:
    """When EPLB balanced the experts in a simulated run, or that it never did."""
    if initial_steps < steps:
        return (
            f"EPLB balanced the experts after step {initial_steps} of {steps} (a quarter of step_interval "
            f"{config.eplb_step_interval}); before, its initial map"
        )
    return f"EPLB never rearranged: all {steps} steps at its initial expert map {flags.eplb_never_words(config)}"


def _front_end(which: str) -> FrontEnd | None:
    """The front end ``--front-end`` names: None for each profile's own."""
    if which == "none":
        return NO_FRONT_END
    if which == "profile":
        return None
    host = load_profile("host").front_end
    if host == NO_FRONT_END:
        raise ValueError(
            "--front-end host: the host profile has no front-end figures; measure them on a running server with "
            "`maia-serving calibrate-host --server URL`"
        )
    return host


class Simulate(Subcommand):
    name = "simulate"
    help = "serve a workload on one or more devices, simulated: vLLM v1's scheduler, the live cost model"

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        flags.add_model(p)
        p.add_argument(
            "--profile",
            "--device",
            dest="profile",
            nargs="+",
            default=["maia100", "maia200", "h100-sxm"],
            help="device profiles to compare; --device is the old spelling",
        )
        flags.add_expert_load(p)
        flags.add_parallel(p)
        flags.add_weight_dtype(p)
        flags.add_comm_dtype(p)
        p.add_argument(
            "--num-prompts",
            "--num-seqs",
            dest="num_prompts",
            type=int,
            default=None,
            help="requests to simulate (default 8; with --trace, its first N, default all)",
        )
        p.add_argument(
            "--input-len",
            "--prompt-len",
            dest="input_len",
            type=int,
            default=None,
            help="prompt tokens per request (default 1024)",
        )
        flags.add_output_len(p)
        arrivals = p.add_mutually_exclusive_group()
        flags.add_request_rate(arrivals)
        arrivals.add_argument(
            "--trace",
            metavar="FILE",
            help="JSONL, one request a line: arrival_s, input_len, output_len, optional prefix_id "
            "and prefix_len (see maia_serving/emulator/sim/workload.py)",
        )
        flags.add_seed(p)
        flags.add_max_concurrency(p)
        flags.add_front_end(p)
        flags.add_scheduler_limits(p)
        flags.add_memory_limits(p)
        p.add_argument(
            "--enable-prefix-caching",
            action=argparse.BooleanOptionalAction,
            default=True,
            help="reuse cached KV blocks of shared prefixes (vLLM v1's default: on)",
        )
        p.add_argument("--ttft-slo-ms", type=float, default=None, help="goodput: time to first token at most this")
        p.add_argument("--tpot-slo-ms", type=float, default=None, help="goodput: time per output token at most this")
        p.add_argument(
            "--chrome-trace", metavar="FILE", help="write a Chrome / Perfetto trace of every step and request"
        )
        p.add_argument("--plot", metavar="FILE", help="plot KV use and the queue over time (needs matplotlib)")
        p.add_argument("--json", action="store_true", help="one JSON object per device")

    def run(self, args: argparse.Namespace) -> int:
        from maia_serving.emulator.memory import NotEnoughMemory
        from maia_serving.emulator.sim.report import SLO, refused, summarize, write_chrome_trace, write_plot
        from maia_serving.emulator.sim.simulate import simulate_device

        model = flags.routed_model(args)
        requests, described = flags.workload(args)
        described += flags.routing_words(model)
        config = replace(
            flags.serving_config(args),
            max_num_batched_tokens=args.max_num_batched_tokens,
            max_num_seqs=args.max_num_seqs,
            scheduler_policy=args.scheduler_policy,
        )
        if args.weight_dtype != "auto":
            config = replace(config, weight_dtype=args.weight_dtype)
        if args.comm_dtype != "auto":
            config = replace(config, comm_dtype=args.comm_dtype)
        slo = SLO(args.ttft_slo_ms, args.tpot_slo_ms)
        front_end = _front_end(args.front_end)
        rows, sims = [], []
        for profile in [load_profile(name) for name in args.profile]:  # a misspelt name stops before any run
            try:
                sim = simulate_device(
                    profile, model, config, requests, args.enable_prefix_caching, args.max_concurrency, front_end
                )
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
            return 0 if all(r["fits"] for r in rows) else 1
        fused = f", fused: {' '.join(config.fusions)}" if config.fusions else ""
        print(
            f"{model.name}: {described}; {config.layout_words}{fused}, "
            f"kv={config.kv_cache_dtype}, max_num_seqs={config.max_num_seqs}, "
            f"max_num_batched_tokens={config.max_num_batched_tokens}, "
            f"prefix caching {'on' if args.enable_prefix_caching else 'off'}"
        )
        print(_table(rows))
        for r in rows:
            if r["fits"]:
                print(
                    f"{r['device']}: KV cache of {r['kv_cache_tokens']} tokens at "
                    f"{format_bytes(r['kv_bytes_per_token'])} per token ({config.kv_cache_dtype})"
                )
                usage = " ".join(f"{100 * u:.0f}" for _, u in r["kv_usage_over_time"])
                print(f"{r['device']}: KV use over {r['duration_s']:.3g} s (%): {usage}")
                front = r["ttft_front_end_ms"]["mean"]
                if front:
                    print(
                        f"{r['device']}: of the mean TTFT, {front:.2f} ms is the serving front end's "
                        f"(--front-end {args.front_end}), the rest the device's"
                    )
                if r["eplb_initial_steps"] is not None:
                    print(f"{r['device']}: {_eplb_words(r['eplb_initial_steps'], r['num_steps'], config)}")
            else:
                print(f"{r['device']}: {r['error']}")
        return 0 if all(r["fits"] for r in rows) else 1
