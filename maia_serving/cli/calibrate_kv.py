"""`maia-serving calibrate-kv`: FP8 KV-cache scales calibrated on text, written into a checkpoint vLLM loads."""

from __future__ import annotations

import argparse
from pathlib import Path

from maia_serving.cli import flags
from maia_serving.cli.base import Subcommand, table


class CalibrateKv(Subcommand):
    name = "calibrate-kv"
    help = "calibrate FP8 KV-cache scales; write a checkpoint vLLM loads"

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", required=True, help="model directory (config.json + safetensors)")
        p.add_argument("--data", required=True, nargs="+", help="calibration text file(s)")
        p.add_argument("--out", required=True, help="output model directory")
        p.add_argument("--max-tokens", type=int, default=32768, help="calibration tokens at most")
        p.add_argument(
            "--seq-len",
            type=int,
            default=None,
            help="tokens per forward pass (default: the model's max_position_embeddings, at most 2048)",
        )
        p.add_argument("--format", choices=["e4m3", "e5m2"], default="e4m3", help="FP8 format of the KV cache")
        flags.add_overwrite(p)

    def run(self, args: argparse.Namespace) -> int:
        from maia_serving.tools.calibrate_kv import calibrate_kv

        result = calibrate_kv(
            Path(args.model),
            [Path(f) for f in args.data],
            Path(args.out),
            max_tokens=args.max_tokens,
            seq_len=args.seq_len,
            fmt=args.format,
            overwrite=args.overwrite,
        )
        print(f"calibrated {args.format} KV-cache scales on {result.num_tokens} tokens written to {args.out}")
        rows = [["layer", "k absmax", "v absmax", "k_scale", "v_scale"]]
        for i, (k, v) in enumerate(zip(result.k_absmax, result.v_absmax)):
            rows.append(
                [
                    str(i),
                    f"{k.max().item():.4g}",
                    f"{v.max().item():.4g}",
                    f"{result.k_scale[i].max().item():.4g}",
                    f"{result.v_scale[i].max().item():.4g}",
                ]
            )
        print(table(rows))
        return 0
