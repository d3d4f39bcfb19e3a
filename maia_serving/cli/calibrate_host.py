"""`maia-serving calibrate-host`: this machine measured as the `host` profile."""

from __future__ import annotations

import argparse
from pathlib import Path

from maia_serving.cli.base import Subcommand
from maia_serving.emulator.hardware import host_profile_path
from maia_serving.emulator.model_shape import load_model_shape


def _engine_calibration(data: dict, model: str, heads: tuple[int, int, int]) -> dict:
    """The host profile as vLLM's engine on ``model`` finds the host: every figure measured again inside an
    engine process (``step_timing.measure_host`` says why), then the engine's own time per step, sequence
    and token (calibrate_host.fit_engine_time) timed in another on that profile. ``data``, measured in this
    process, is the profile those engines start with."""
    import tempfile
    from datetime import datetime, timezone

    from maia_serving.envs import MAIA_SERVING_CACHE_DIR
    from maia_serving.tools.calibrate_host import (
        ENGINE_ROUNDS,
        ENGINE_WORKLOADS,
        QUIET_SPREAD,
        fit_engine_time,
        round_spread,
        shape_timings,
        with_engine_time,
        write_profile,
    )
    from maia_serving.vllm import step_timing

    with tempfile.TemporaryDirectory() as cache:
        env = {MAIA_SERVING_CACHE_DIR: cache}
        try:
            write_profile(Path(cache) / "host.yaml", data)
            data = step_timing.run_measure_host(model, heads, env=env)
            write_profile(Path(cache) / "host.yaml", data)
            steps = step_timing.run(model, list(ENGINE_WORKLOADS), rounds=ENGINE_ROUNDS, env=env)
        except RuntimeError as exc:
            raise ValueError(f"{exc}\nThe host profile was not written.") from None
    shapes = shape_timings(steps)
    engine = fit_engine_time(shapes)
    spread = round_spread(shapes)
    print(f"  rounds: the slowest {100 * spread:.0f}% over the fastest (median shape); the fastest is kept")
    if spread > QUIET_SPREAD:
        print(
            f"  warning: the host's speed moved by more than {100 * QUIET_SPREAD:.0f}% while vLLM's steps were "
            "timed (another process?); if the figures below look high, calibrate again when it is quiet"
        )
    names = ", ".join(f"{p}x{t}" for p, t, _ in ENGINE_WORKLOADS)
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return with_engine_time(
        data,
        engine,
        f"fitted by calibrate-host on vLLM's eager steps of {model} "
        f"(prompts x tokens: {names}; each shape's fastest of {ENGINE_ROUNDS} "
        f"rounds), {when}",
    )


class CalibrateHost(Subcommand):
    name = "calibrate-host"
    help = "measure this machine as the `host` profile"

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("--out", help=f"where to write it (default {host_profile_path()})")
        p.add_argument(
            "--engine-model",
            metavar="DIR",
            help="measure the host inside vLLM's engine serving this model on --device maia, time the "
            "engine's own steps and fit its time per step, sequence and token (about 30 s): without "
            "it the host profile prices torch's work only, measured in a bare process",
        )

    def run(self, args: argparse.Namespace) -> int:
        from maia_serving.tools.calibrate_host import host_profile_dict, write_profile

        path = Path(args.out) if args.out else host_profile_path()
        if args.engine_model:
            if not (Path(args.engine_model) / "config.json").is_file():
                raise ValueError(
                    f"--engine-model {args.engine_model}: no model there (a folder with config.json "
                    "and weights, e.g. one `maia-serving demo-model --out DIR` wrote)"
                )
            shape = load_model_shape(args.engine_model)  # the host attention is measured at the engine's heads
            heads = (shape.num_heads, shape.num_kv_heads, shape.head_dim)
            print(f"measuring the host inside vLLM's engine on {args.engine_model} and timing its steps (about 30 s)")
            data = _engine_calibration(host_profile_dict(heads), args.engine_model, heads)
        else:
            data = host_profile_dict()
        write_profile(path, data)
        print(f"host profile written to {path}")
        print(f"  memory bandwidth: {data['hbm_bandwidth']['value']:.1f} GB/s")
        for dtype, fig in data["peak_compute"].items():
            print(f"  matmul {dtype}: {fig['value'] * 1e3:.1f} GFLOP/s")
        if args.engine_model:
            print(f"  prefill attention: {100 * data['attention_compute_efficiency']['value']:.1f}% of the bf16 matmul")
            print(
                f"  engine time per step: {data['step_overhead']['value']:.3f} ms + "
                f"{data['step_overhead_per_seq']['value']:.1f} us a sequence + "
                f"{data['step_overhead_per_token']['value']:.2f} us a token"
            )
        return 0
