"""Time vLLM's own steps on ``--device maia``: each charged step's shape, measured wall time and
emulated time, for ``maia-serving calibrate-host --engine-model`` and ``benchmarks/host_fidelity.py``;
and measure the host profile's figures inside such an engine (``--measure-host``).

Run as ``python -m maia_serving.vllm.step_timing --model M --workload P T O [--workload ...]``: in a
process of its own (the offline engine, engine core in process, eager, on the cached ``host`` profile),
which prints one ``STEPS`` line of JSON. Each workload is ``P`` prompts of ``T`` distinct tokens
generating ``O`` tokens each, once to warm up and ``--rounds`` times timed, the workloads taking turns
round by round, with no prefix caching so that every round prefills in full. Ids avoid the specials,
which sit at the vocabulary's start.

Why measure the host inside the engine: the host attention ran 1.4x faster in vLLM's engine process, once
its model was loaded, than in a bare process (one prefill of 1,024 tokens of the demo model, 9.7 against
13.3 ms a layer, 2026-12-04; the bare process turned fast too after one call of vLLM's CPU linear kernel,
for reasons not found), so the rates a bare ``calibrate-host`` measures priced long prefills 25% over.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from maia_serving.envs import MAIA_SERVING_DEVICE, VLLM_CPU_KVCACHE_SPACE

# The engine in this process and on the maia platform; our KV budget, not most of the host's memory.
ENGINE_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CPU_CI_ENV": "1",
    VLLM_CPU_KVCACHE_SPACE: "1",
    MAIA_SERVING_DEVICE: "maia",
}


def _engine(model: str, workloads: list[tuple[int, int, int]]):
    """The offline engine on the ``host`` profile: eager, no prefix caching, room for each workload at once."""
    from vllm import LLM

    longest = max((t + o for _, t, o in workloads), default=0)
    batched = max(4096, max((p * t for p, t, _ in workloads), default=0))
    return LLM(
        model,
        max_model_len=max(2048, longest),
        enforce_eager=True,
        max_num_batched_tokens=batched,
        enable_prefix_caching=False,
        max_num_seqs=max(64, max((p for p, _, _ in workloads), default=0)),
        additional_config={"maia_profile": "host"},
    )


def time_steps(model: str, workloads: list[tuple[int, int, int]], rounds: int) -> list[dict]:
    """Each timed step as ``{workload, round, tokens, seqs, predicted_s, measured_s}``."""
    from maia_serving.serving import stepping

    steps: list[dict] = []
    charge = stepping.StepCharger._charge
    current = ["", -1]

    def recording(self, shape, wall_s, read_s):
        record = charge(self, shape, wall_s, read_s)
        steps.append(
            {
                "workload": current[0],
                "round": current[1],
                "tokens": record.num_tokens,
                "seqs": record.num_seqs,
                "predicted_s": record.step_s,
                "measured_s": record.wall_s,
            }
        )
        return record

    stepping.StepCharger._charge = recording
    from vllm import SamplingParams

    llm = _engine(model, workloads)
    runs = [
        (
            f"{p}x{t}",
            [[5 + (i * 7 + j) % 1000 for j in range(t)] for i in range(p)],
            SamplingParams(max_tokens=o, ignore_eos=True, temperature=0),
        )
        for p, t, o in workloads
    ]
    current[0] = "warm-up"
    for _, batch, params in runs:
        llm.generate(batch, params, use_tqdm=False)
    for i in range(rounds):  # round robin: the host's drift over the run reaches every workload alike
        for name, batch, params in runs:
            current[:] = name, i
            llm.generate(batch, params, use_tqdm=False)
    return [s for s in steps if s["workload"] != "warm-up"]


def measure_host(model: str, heads: tuple[int, int, int]) -> dict:
    """The host profile's data (``calibrate.host_profile_dict``) measured in this process once an engine
    serving ``model`` is up (the module docstring says why)."""
    from maia_serving.tools.calibrate_host import host_profile_dict

    llm = _engine(model, [])
    data = host_profile_dict(heads, where=f" inside vLLM's engine process serving {model}")
    del llm  # up until every figure is measured
    return data


def _child(args: list[str], prefix: str, what: str, env: dict[str, str] | None, timeout_s: float):
    """This module as a script in a fresh process, with ``env`` over this one's: its ``prefix`` line's JSON."""
    out = subprocess.run(
        [sys.executable, "-m", "maia_serving.vllm.step_timing", *args],
        env={**os.environ, **ENGINE_ENV, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith(prefix + " ")), None)
    if out.returncode or line is None:
        raise RuntimeError(f"{what} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(line.removeprefix(prefix + " "))


def run(
    model: str,
    workloads: list[tuple[int, int, int]],
    rounds: int = 3,
    env: dict[str, str] | None = None,
    timeout_s: float = 1800,
) -> list[dict]:
    """``time_steps`` in a fresh process."""
    args = ["--model", model, "--rounds", str(rounds)]
    for workload in workloads:
        args += ["--workload", *map(str, workload)]
    return _child(args, "STEPS", f"timing vLLM's steps on {model}", env, timeout_s)


def run_measure_host(
    model: str, heads: tuple[int, int, int], env: dict[str, str] | None = None, timeout_s: float = 600
) -> dict:
    """``measure_host`` in a fresh process."""
    return _child(
        ["--model", model, "--measure-host", *map(str, heads)],
        "PROFILE",
        f"measuring the host inside vLLM's engine on {model}",
        env,
        timeout_s,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--workload", nargs=3, type=int, action="append", metavar=("PROMPTS", "PROMPT_TOKENS", "OUTPUT_TOKENS")
    )
    what.add_argument("--measure-host", nargs=3, type=int, metavar=("HEADS", "KV_HEADS", "HEAD_DIM"))
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    for key, value in ENGINE_ENV.items():
        os.environ.setdefault(key, value)
    if args.measure_host:
        print("PROFILE " + json.dumps(measure_host(args.model, tuple(args.measure_host))), flush=True)
    else:
        steps = time_steps(args.model, [tuple(w) for w in args.workload], args.rounds)
        print("STEPS " + json.dumps(steps), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
