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


def _served_model(url: str) -> str:
    """The one model the server at ``url`` serves (/v1/models)."""
    import json
    import urllib.request

    with urllib.request.urlopen(f"{url}/v1/models", timeout=10) as resp:
        models = [m["id"] for m in json.loads(resp.read())["data"]]
    if len(models) != 1:
        raise ValueError(f"--server {url} serves {models}: name one with --served-model")
    return models[0]


def _front_end_calibration(path: Path, url: str, model: str | None) -> int:
    """The front end of the server at ``url`` measured into the host profile at ``path`` (measured first if absent)."""
    import urllib.error
    from datetime import datetime, timezone

    import yaml

    from maia_serving.tools.calibrate_host import (
        FRONT_END_PROMPTS,
        FRONT_END_ROUNDS,
        fit_front_end,
        host_profile_dict,
        measure_front_end,
        with_front_end,
        write_profile,
    )

    try:
        model = model or _served_model(url)
        print(f"timing the front end of {url} ({model}): lone requests of {FRONT_END_PROMPTS} prompt tokens (~20 s)")
        samples = measure_front_end(url, model)
    except (OSError, urllib.error.URLError, RuntimeError, KeyError) as exc:
        raise ValueError(f"--server {url}: {exc}. The host profile was not changed.") from None
    front_end = fit_front_end(samples)
    data = yaml.safe_load(path.read_text()) if path.is_file() else host_profile_dict()
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    source = (
        f"measured by calibrate-host --server on {model}: client time of lone one-token requests less the "
        f"server's emulated TTFT, median of {FRONT_END_ROUNDS} per prompt length, {when}"
    )
    write_profile(path, with_front_end(data, front_end, source))
    print(f"host profile written to {path}")
    print(
        f"  front end per request: {front_end.fixed_s * 1e3:.2f} ms + "
        f"{front_end.per_input_token_s * 1e6:.2f} us a prompt token, and "
        f"{front_end.per_output_token_s * 1e6:.0f} us a streamed token, {front_end.per_step_s * 1e6:.0f} us a step"
    )
    return 0


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
        p.add_argument(
            "--server",
            metavar="URL",
            help="time the front end of a running `vllm serve --device maia` (or SGLang) server at URL: lone "
            "requests against its own emulated TTFT (about 20 s); written into the host profile as its "
            "request_overhead figures, which `simulate --front-end host` charges, the rest of the profile kept",
        )
        p.add_argument(
            "--served-model", default=None, help="with --server: the model name it serves (default: its only one)"
        )

    def run(self, args: argparse.Namespace) -> int:
        from maia_serving.tools.calibrate_host import host_profile_dict, write_profile

        path = Path(args.out) if args.out else host_profile_path()
        if args.server:
            return _front_end_calibration(path, args.server.rstrip("/"), args.served_model)
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
