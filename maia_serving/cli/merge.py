"""`maia-serving merge`: the Hugging Face checkpoint a reshard was made from, rebuilt byte for byte."""

from __future__ import annotations

import argparse
from pathlib import Path

from maia_serving.cli import flags
from maia_serving.cli.base import Subcommand


class Merge(Subcommand):
    name = "merge"
    help = "rebuild the Hugging Face checkpoint a reshard was made from, byte for byte"

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", required=True, help="a directory written by `maia-serving reshard`")
        p.add_argument("--out", required=True, help="output model directory")
        flags.add_overwrite(p)

    def run(self, args: argparse.Namespace) -> int:
        from maia_serving.tools.checkpoints.reshard import merge

        files = merge(Path(args.model), Path(args.out), overwrite=args.overwrite)
        print(f"{', '.join(files)} rebuilt in {args.out}, equal to the source's sha256")
        return 0
