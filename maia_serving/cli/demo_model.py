"""`maia-serving demo-model`: the tiny random Llama (or a sibling family) the demo and the tests serve; built
locally, since no model hub is reachable from where this runs."""

from __future__ import annotations

import argparse
from pathlib import Path

from maia_serving.cli import flags
from maia_serving.cli.base import Subcommand
from maia_serving.tools.training.demo import FAMILIES


class DemoModel(Subcommand):
    name = "demo-model"
    help = "build the tiny random Llama used by the demo and tests"

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("--out", required=True)
        p.add_argument(
            "--family",
            choices=list(FAMILIES),
            default="llama",
            help="llama (the demo), sliding-window (Mistral, every layer a window of 16 keys), "
            "hybrid-window (Olmo-3, one windowed layer and one full) or moe (Mixtral, 4 experts, "
            "top-2); same shape and tokenizer",
        )
        flags.add_overwrite(p)
        p.add_argument("--seed", type=int, default=0)

    def run(self, args: argparse.Namespace) -> int:
        from maia_serving.tools.training.demo import build_demo_model

        out = build_demo_model(Path(args.out), seed=args.seed, overwrite=args.overwrite, family=args.family)
        print(f"demo model ({args.family}) written to {out}")
        return 0
