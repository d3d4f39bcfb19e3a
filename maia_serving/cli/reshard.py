"""`maia-serving reshard`: a Hugging Face checkpoint split into the per-rank files vLLM's
``--load-format sharded_state`` reads."""

from __future__ import annotations

import argparse
from pathlib import Path

from maia_serving.cli import flags
from maia_serving.cli.base import Subcommand


class Reshard(Subcommand):
    name = "reshard"
    help = "split a Hugging Face checkpoint into the per-rank files vLLM's --load-format sharded_state reads"

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", required=True, help="model directory (config.json + safetensors); only read")
        p.add_argument("--out", required=True, help="output model directory")
        p.add_argument("--tensor-parallel-size", "-tp", type=int, required=True)
        p.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1)
        p.add_argument(
            "--weight-dtype",
            default="auto",
            help="auto: the linear layers as the source stores them; fp8: E4M3 with a scale per output "
            "channel (compressed-tensors, which vLLM serves; merge cannot undo it)",
        )
        flags.add_overwrite(p)

    def run(self, args: argparse.Namespace) -> int:
        from maia_serving.tools.checkpoints.reshard import reshard

        manifest = reshard(
            Path(args.model),
            Path(args.out),
            args.tensor_parallel_size,
            args.pipeline_parallel_size,
            overwrite=args.overwrite,
            weight_dtype=args.weight_dtype,
        )
        print(
            f"{len(manifest['files'])} rank files for TP {args.tensor_parallel_size} x PP "
            f"{args.pipeline_parallel_size} written to {args.out}; serve with --load-format sharded_state"
        )
        return 0
