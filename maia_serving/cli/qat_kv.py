"""`maia-serving qat-kv`: a model fine-tuned with its KV cache fake-quantized, written as a checkpoint that
serves with that KV format."""

from __future__ import annotations

import argparse
from pathlib import Path

from maia_serving.cli import flags
from maia_serving.cli.base import Subcommand


class QatKv(Subcommand):
    name = "qat-kv"
    help = (
        "fine-tune a model with its KV cache fake-quantized (QAT); write a checkpoint that serves with that KV format"
    )

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", required=True, help="model directory (config.json + safetensors); only read")
        p.add_argument(
            "--format", required=True, help="KV-cache format: mxfp8, mxfp6, mxfp6_e2m3, mxfp4, nvfp4 or fp8_e4m3"
        )
        p.add_argument(
            "--data",
            nargs="+",
            help="training text file(s) (default: the stdlib sources train-model trained on, held-out files excluded)",
        )
        p.add_argument("--out", required=True, help="output model directory")
        p.add_argument(
            "--objective",
            choices=["distill", "lm"],
            default=None,
            help="distill: match the unquantized model's predictions (default); lm: next-token loss",
        )
        p.add_argument("--steps", type=int, default=None, help="optimizer steps (default 400)")
        p.add_argument("--batch-size", type=int, default=None, help="windows per step (default 8)")
        p.add_argument("--lr", type=float, default=None, help="peak learning rate (default 1e-4)")
        p.add_argument(
            "--ema-decay",
            type=float,
            default=None,
            help="write the moving average of the weights with this decay per step (default 0.99; 0: "
            "the last step's weights)",
        )
        p.add_argument("--save-every", type=int, default=None, help="steps between resumable checkpoints (default 25)")
        p.add_argument("--seed", type=int, default=0)
        flags.add_overwrite(p)

    def run(self, args: argparse.Namespace) -> int:
        from maia_serving.tools.training.qat import QatConfig, qat_kv, state_dir, training_split_files

        given = {
            "steps": args.steps,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "save_every": args.save_every,
            "objective": args.objective,
            "ema_decay": args.ema_decay,
        }
        config = QatConfig(fmt=args.format, seed=args.seed, **{k: v for k, v in given.items() if v is not None})
        print(f"checkpoint every {config.save_every} steps in {state_dir(Path(args.out))} (rerun to resume)")
        data = [Path(f) for f in args.data] if args.data else training_split_files()
        report = qat_kv(Path(args.model), data, Path(args.out), config, overwrite=args.overwrite)
        print(f"{args.format} KV-cache QAT model written to {args.out} in {report.total_s:.0f} s")
        print(f"  fake-quantized training-data loss: {report.loss_before:.4f} -> {report.loss_after:.4f}")
        if report.heldout_ppl is not None:
            ppl = report.heldout_ppl
            print(
                f"  held-out perplexity: bf16 {ppl['bf16']:.3f}, {args.format} PTQ {ppl['ptq']:.3f}, "
                f"{args.format} QAT {ppl['qat']:.3f} (QAT weights, unquantized KV {ppl['qat_unquantized']:.3f})"
            )
        return 0
