"""`maia-serving profile`: any model run once on the maia device and priced on each device profile: does it fit,
how long one forward (or training step) takes, its throughput at the batch size, where the time goes."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from maia_serving.cli.base import Subcommand, table
from maia_serving.formats.units import format_bytes, format_seconds
from maia_serving.serving.profiles import load_profile

DEFAULT_PROFILES = ["maia100", "maia200", "h100-sxm"]


def _progress(message: str) -> None:
    print(f"maia-serving profile: {message}", file=sys.stderr, flush=True)


class ProfileModel(Subcommand):
    name = "profile"
    help = "run any model on the maia device; per device profile: fits, latency, throughput, top operators"

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--model",
            required=True,
            help="a built-in model (yolov8n, yolov8s, yolov8m, yolov8l, yolov8x, vit-tiny-16, vit-base-16, "
            "vit-large-16, unet-tiny, unet-sd15, llama-tiny, llama-3-8b), an .onnx file, or module:callable "
            "returning (nn.Module, example input)",
        )
        p.add_argument("--profile", nargs="+", default=DEFAULT_PROFILES, help="device profiles to price on")
        p.add_argument("--batch-size", type=int, default=1)
        p.add_argument(
            "--input-shape",
            type=int,
            metavar="N",
            help="built-in models: the image side in pixels, or the sequence length (default: the model's own)",
        )
        p.add_argument(
            "--dtype",
            choices=["bf16", "fp16", "fp32", "fp8"],
            default="bf16",
            help="fp8: linear and convolution layers in FP8 E4M3 (per-tensor scales, as vLLM's --quantization fp8), "
            "the rest BF16; reports its output error against BF16",
        )
        p.add_argument("--train", action="store_true", help="a training step: forward, backward, AdamW")
        p.add_argument(
            "--meta",
            action="store_true",
            help="shapes only: build the model on PyTorch's meta device and record its forward without running it "
            "(no host memory, no outputs): for models the host cannot hold",
        )
        p.add_argument("--json", action="store_true", help="one object per profile")
        p.add_argument("--trace", metavar="FILE", help="the run's operators as a Chrome trace (Perfetto)")
        p.add_argument("--plot", metavar="FILE", help="per-operator time on each profile, as a picture")
        p.add_argument(
            "--save-outputs",
            metavar="FILE.npz",
            help="the outputs on maia (float32, by output name) with the inputs they came from, to compare with "
            "another runtime's",
        )

    def run(self, args: argparse.Namespace) -> int:
        if args.batch_size < 1:
            raise ValueError(f"--batch-size {args.batch_size}: at least 1")
        if args.meta and (args.trace or args.save_outputs):
            raise ValueError("--meta runs nothing: --trace and --save-outputs need a run (drop --meta)")
        if args.train and args.model.endswith(".onnx"):
            raise ValueError("--train: an ONNX file holds an inference graph; train a built-in or module:callable")
        profiles = [load_profile(name) for name in args.profile]  # an unknown one fails before the model is built
        from maia_serving.tools import profile_model as tool

        _progress(f"building {args.model} (batch {args.batch_size})")
        example = tool.load_example(args.model, args.batch_size, args.input_shape, args.meta)
        if args.meta:
            _progress(f"recording its forward on the meta device in {args.dtype}")
        else:
            _progress(f"running it once on maia in {args.dtype}{' (a training step)' if args.train else ''}")
        reports, measured = tool.profile_model(example, profiles, args.dtype, args.train, args.meta)
        if args.trace:
            measured.block.export_chrome_trace(args.trace)
        if args.save_outputs:
            tool.save_outputs(Path(args.save_outputs), example, measured)
        if args.plot:
            _plot(reports, Path(args.plot))
        if args.json:
            print(json.dumps([r.to_dict() for r in reports], indent=2))
        else:
            _print(args, reports, measured)
        return 0 if all(r.fits for r in reports) else 1


def _print(args: argparse.Namespace, reports: list[Any], measured: Any) -> None:
    step = "training step" if args.train else "forward"
    print(f"{args.model}, batch {measured.batch} ({measured.unit}), {args.dtype}, one {step}:")
    rows = [["profile", "fits", "peak memory", "HBM", "latency", f"{measured.unit}/s", "where the time goes"]]
    for r in reports:
        rows.append(
            [
                r.profile,
                "yes" if r.fits else "NO",
                format_bytes(r.peak_memory_bytes),
                format_bytes(r.hbm_bytes),
                format_seconds(r.latency_ms / 1e3),
                f"{r.throughput_per_s:.4g}",
                r.where,
            ]
        )
    print(table(rows))
    for r in reports:
        if r.error:
            print(f"{r.profile}: does not fit: {r.error}")
    error = reports[0].fp8_error
    if error is not None:
        top1 = "" if error.top1_agreement is None else f", top-1 agreement {error.top1_agreement:.1%}"
        print(
            f"FP8 against BF16 on this input: largest difference {error.max_rel:.2%} of the largest output, "
            f"mean difference {error.mean_rel:.2%} of the mean magnitude{top1}"
        )
    first = reports[0]
    print(f"\nTop operators on {first.profile} ({first.flops / 1e9:.4g} GFLOP, {format_bytes(first.bytes)} moved):")
    rows = [["operator", "calls", "time", "share", "bound"]]
    rows += [[t.op, str(t.calls), format_seconds(t.time_ms / 1e3), f"{t.share:.1%}", t.bound] for t in first.top_ops]
    print(table(rows))


def _plot(reports: list[Any], path: Path) -> None:
    """One bar chart per profile: the top operators' emulated milliseconds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(reports), 1, figsize=(8, 2.2 * len(reports)), squeeze=False)
    for ax, r in zip(axes[:, 0], reports, strict=True):
        names = [t.op.removeprefix("aten::") for t in r.top_ops][::-1]
        ax.barh(names, [t.time_ms for t in r.top_ops][::-1])
        ax.set_title(f"{r.profile}: {r.latency_ms:.3g} ms", fontsize=9)
        ax.set_xlabel("emulated ms")
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
