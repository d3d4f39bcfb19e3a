"""`maia-serving train-model`: the small Llama trained here for the accuracy measurements."""

from __future__ import annotations

import argparse
from pathlib import Path

from maia_serving.cli import flags
from maia_serving.cli.base import Subcommand


class TrainModel(Subcommand):
    name = "train-model"
    help = "train the small Llama used for accuracy measurements (~6 min)"

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("--out", required=True)
        p.add_argument("--steps", type=int, default=None, help="optimizer steps (default 400)")
        flags.add_overwrite(p)
        p.add_argument("--seed", type=int, default=0)

    def run(self, args: argparse.Namespace) -> int:
        from maia_serving.tools.training.train import TrainConfig, train_model

        config = TrainConfig(seed=args.seed) if args.steps is None else TrainConfig(steps=args.steps, seed=args.seed)
        report = train_model(Path(args.out), config, overwrite=args.overwrite)
        print(f"trained model written to {args.out} in {report['total_s']:.0f} s")
        print(f"  loss: train {report['train_loss']:.3f}, held-out {report['heldout_loss']:.3f}")
        print(
            f"  held-out perplexity (transformers): fp32 {report['heldout_ppl_hf_fp32']:.3f}, "
            f"bf16 {report['heldout_ppl_hf_bf16']:.3f}"
        )
        return 0
