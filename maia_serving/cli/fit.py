"""`maia-serving fit`: does a model fit a device? Memory per chip, and what to try where it does not."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

from maia_serving.cli import flags
from maia_serving.cli.base import Subcommand, table
from maia_serving.emulator.memory import MemoryPlan, kv_bits_per_value, plan_memory, suggest
from maia_serving.emulator.model_shape import load_model_shape
from maia_serving.formats.units import format_bytes
from maia_serving.serving.profiles import load_profile


def _against_model_dtype(plan: MemoryPlan, auto: MemoryPlan, model_dtype: str) -> str:
    """ " (3.76x the 1455280 tokens of a bfloat16 cache)" where the KV cache is smaller or larger than in
    the model's dtype (``auto``: the same plan with ``--kv-cache-dtype auto``)."""
    if plan.kv_bytes_per_token == auto.kv_bytes_per_token or not auto.kv_tokens:
        return ""
    return f" ({plan.kv_tokens / auto.kv_tokens:.2f}x the {auto.kv_tokens} tokens of a {model_dtype} cache)"


class Fit(Subcommand):
    name = "fit"
    help = "does a model fit a device? memory breakdown per chip"

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        flags.add_model(p)
        p.add_argument(
            "--profile",
            "--device",
            dest="profile",
            required=True,
            help="device profile (see `maia-serving profiles`); --device is the old spelling",
        )
        flags.add_parallel(p)
        flags.add_memory_limits(p)
        flags.add_weight_dtype(p)
        p.add_argument("--json", action="store_true")

    def run(self, args: argparse.Namespace) -> int:
        model = load_model_shape(args.model)
        profile = load_profile(args.profile)
        config = flags.serving_config(args)
        if args.weight_dtype != "auto":
            config = replace(config, weight_dtype=args.weight_dtype)
        plan = plan_memory(model, profile, config)
        if args.json:
            print(json.dumps({**plan.to_dict(), "config": config.__dict__}, indent=2))
            return 0 if plan.fits else 1
        weights = f", weights in {config.weight_dtype}" if config.weight_dtype else ""
        print(
            f"{model.name} ({model.num_params() / 1e9:.2f} B parameters, {model.dtype}{weights}) on "
            f"{config.parallel.chips} x {profile.name} ({config.layout_words}), per chip:"
        )
        rows = [
            ["", "bytes"],
            ["HBM capacity", format_bytes(plan.hbm_capacity_bytes)],
            [f"usable (x{config.gpu_memory_utilization} - runtime reserve)", format_bytes(plan.usable_bytes)],
            ["weights", format_bytes(plan.weight_bytes)],
            ["activation workspace", format_bytes(plan.workspace_bytes)],
            ["KV cache budget", format_bytes(plan.kv_budget_bytes)],
            [
                f"KV per token ({config.kv_cache_dtype}, {kv_bits_per_value(model, config):g} bits a value)",
                format_bytes(plan.kv_bytes_per_token),
            ],
        ]
        print(table(rows))
        auto = plan_memory(model, profile, replace(config, kv_cache_dtype="auto"))
        print(
            f"KV cache: {plan.num_blocks} blocks of {config.block_size} = {plan.kv_tokens} tokens"
            f"{_against_model_dtype(plan, auto, model.dtype)}; "
            f"{plan.max_concurrent_seqs} concurrent sequences of {plan.max_model_len} tokens."
        )
        if plan.fits:
            print("FITS")
            return 0
        print(f"DOES NOT FIT: short by {format_bytes(plan.shortfall_bytes)} per chip.")
        for tip in suggest(model, profile, config):
            print(f"  try {tip}")
        return 1
