"""`maia-serving route-stats`: which experts a MoE checkpoint's routers choose on some text, written as the
--expert-load file that simulate and plan price."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from maia_serving.cli import flags
from maia_serving.cli.base import Subcommand


class RouteStats(Subcommand):
    name = "route-stats"
    help = (
        "count which experts a MoE checkpoint's routers choose on some text: the --expert-load file of simulate "
        "and plan"
    )

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", required=True, help="MoE model directory (config.json + safetensors); only read")
        p.add_argument(
            "--data", nargs="+", help="text file(s) to route (default: the stdlib sources train-model trained on)"
        )
        p.add_argument("--max-tokens", type=int, default=65536, help="tokens of the text to route (default 65536)")
        p.add_argument("--out", required=True, help="the JSON file to write")
        flags.add_overwrite(p, "replace an existing --out")

    def run(self, args: argparse.Namespace) -> int:
        from maia_serving.tools.checkpoints.route_stats import route_counts
        from maia_serving.tools.training.qat import training_split_files

        out = Path(args.out)
        if out.exists() and not args.overwrite:
            raise ValueError(f"{out} exists; pass --overwrite to replace it")
        data = [Path(f) for f in args.data] if args.data else training_split_files()
        counts = route_counts(Path(args.model), data, args.max_tokens)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(counts) + "\n")
        tmp.replace(out)
        busiest = max(max(layer) * counts["top_k"] / sum(layer) for layer in counts["layers"])
        print(
            f"expert choices of {counts['tokens']} tokens in {len(counts['layers'])} MoE layers written to {out} "
            f"(the most chosen expert of any layer is chosen by {busiest:.0%} of the tokens, uniform routing's "
            f"{counts['top_k'] / len(counts['layers'][0]):.0%}); "
            f"price them with `maia-serving simulate --expert-load {out}`"
        )
        return 0
