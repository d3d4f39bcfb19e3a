"""`maia-serving plan`: every layout of N chips on each device, rejected with a reason or simulated and ranked."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from maia_serving.cli import flags
from maia_serving.cli.base import Subcommand, table
from maia_serving.emulator.memory import ServingConfig, check_redundant_experts
from maia_serving.serving.profiles import load_profile


def _table(results: list, slo_given: bool) -> str:
    def num(value: float | None, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    moe = any(r.dp > 1 or r.ep for r in results)
    out = [
        ["rank", "device", "topology", "tp", "pp"]
        + (["dp", "ep"] if moe else [])
        + ["output tok/s"]
        + (["goodput tok/s"] if slo_given else [])
        + ["TTFT ms mean/p99", "TPOT ms mean/p99", "comm"]
    ]
    for r in results:
        head = [num(r.rank, "d"), r.device, r.topology, str(r.tp), str(r.pp)] + (
            [str(r.dp), "yes" if r.ep else "no"] if moe else []
        )
        if not r.fits:
            out.append(head + ["rejected"] + [""] * (3 + slo_given))
            continue
        out.append(
            head
            + [f"{r.output_throughput_tok_s:.0f}"]
            + ([f"{r.goodput_tok_s:.0f}"] if slo_given else [])
            + [
                f"{r.ttft_ms:.1f}/{r.ttft_p99_ms:.1f}",
                f"{num(r.tpot_ms, '.2f')}/{num(r.tpot_p99_ms, '.2f')}",
                f"{r.comm_share:.1%}",
            ]
        )
    return table(out)


class Plan(Subcommand):
    name = "plan"
    help = "rank the tensor x pipeline layouts of N chips on each device by what the simulator serves within the SLOs"

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        flags.add_model(p)
        p.add_argument(
            "--device",
            "--profile",
            dest="profile",
            nargs="+",
            required=True,
            help="device profiles to compare, topology variants included (h100-sxm@pcie; see `profiles`)",
        )
        flags.add_expert_load(p)
        p.add_argument(
            "--num-devices",
            type=int,
            required=True,
            help="chips per layout: every tp x pp = N is tried (a MoE model: every tp x pp x dp, with and "
            "without expert parallelism)",
        )
        flags.add_all2all(p)
        flags.add_kv_cache_dtype(p)
        flags.add_weight_dtype(p)
        flags.add_comm_dtype(p)
        p.add_argument("--num-prompts", type=int, default=None, help="requests to simulate (default 8)")
        p.add_argument("--input-len", type=int, default=None, help="prompt tokens per request (default 1024)")
        flags.add_output_len(p)
        flags.add_request_rate(p)
        flags.add_seed(p)
        flags.add_max_concurrency(p)
        flags.add_scheduler_limits(p)
        flags.add_memory_limits(p, block_size=False)
        p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
        p.add_argument("--ttft-slo-ms", type=float, default=None, help="rank by goodput: TTFT at most this")
        p.add_argument("--tpot-slo-ms", type=float, default=None, help="rank by goodput: TPOT at most this")
        p.add_argument(
            "--plot", metavar="DIR", help="write throughput_vs_tpot.png and comm_share.png (needs matplotlib)"
        )
        p.add_argument("--json", action="store_true", help="a list of layouts")

    def run(self, args: argparse.Namespace) -> int:
        from maia_serving.emulator.sim.plan import plan, write_plots
        from maia_serving.emulator.sim.report import SLO

        model = flags.routed_model(args)
        requests, described = flags.workload(args)
        described += flags.routing_words(model)
        settings = flags.eplb_settings(args)
        check_redundant_experts(settings["enable_eplb"], settings["num_redundant_experts"])
        eplb = settings["num_redundant_experts"] if args.enable_eplb else None
        if eplb is not None:
            described += f", EPLB on the expert-parallel layouts ({eplb} redundant experts)"
        config = ServingConfig(
            kv_cache_dtype=args.kv_cache_dtype,
            max_model_len=args.max_model_len,
            gpu_memory_utilization=args.gpu_memory_utilization,
            max_num_batched_tokens=args.max_num_batched_tokens,
            max_num_seqs=args.max_num_seqs,
            scheduler_policy=args.scheduler_policy,
            all2all_backend=args.all2all_backend,
            eplb_step_interval=settings["eplb_step_interval"],
            weight_dtype=None if args.weight_dtype == "auto" else args.weight_dtype,
            comm_dtype=None if args.comm_dtype == "auto" else args.comm_dtype,
        )
        slo = SLO(args.ttft_slo_ms, args.tpot_slo_ms)
        profiles = [load_profile(name) for name in args.profile]  # a misspelt name stops before any run
        results = plan(
            profiles,
            model,
            args.num_devices,
            config,
            requests,
            slo,
            args.enable_prefix_caching,
            eplb,
            args.max_concurrency,
        )
        if args.plot:
            write_plots(Path(args.plot), results, f"{model.name} on {args.num_devices} chips")
        if args.json:
            print(json.dumps([r.to_dict() for r in results], indent=2))
            return 0 if any(r.fits for r in results) else 1
        slos = ", ".join(f"{k} <= {v:g} ms" for k, v in (("TTFT", slo.ttft_ms), ("TPOT", slo.tpot_ms)) if v is not None)
        print(
            f"{model.name} on {args.num_devices} chips: {described}; kv={config.kv_cache_dtype}, "
            f"max_num_seqs={config.max_num_seqs}, max_num_batched_tokens={config.max_num_batched_tokens}"
            f"{'; ranked by goodput under ' + slos if slos else '; ranked by output throughput'}"
        )
        print(_table(results, slo.given))
        if any(r.eplb_rearranged is False for r in results):
            print(
                "EPLB never rearranged in some layouts' runs: their experts stayed at its initial map "
                + flags.eplb_never_words(config)
            )
        for r in results:
            if not r.fits:
                extra = (f" dp={r.dp}" if r.dp > 1 else "") + (" ep" if r.ep else "")
                print(f"{r.device} tp={r.tp} pp={r.pp}{extra}: {r.reason}")
        return 0 if any(r.fits for r in results) else 1
