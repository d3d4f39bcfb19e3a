"""TTFT as the client sees it (issue 31, item 4): a paced `vllm serve --device maia` (the demo model priced as a
proxy shape), this host's front end measured on it first (`calibrate-host --server`: lone requests against the
server's own emulated TTFT), then Poisson arrivals at each rate, timed by the client's own stopwatch, against
`simulate` of the same send times with that front end, with none, and the engine's own TTFT against simulate's.

    .venv-vllm/bin/python benchmarks/client_ttft.py        # about 3 minutes; --shape, --profile, --rates
"""

from __future__ import annotations

from live_arrivals import arguments, serve, serving_of

from maia_serving.emulator import load_model_shape, load_profile
from maia_serving.emulator.hardware import NO_FRONT_END
from maia_serving.emulator.sim.simulate import simulate_device
from maia_serving.emulator.sim.workload import synthetic
from maia_serving.tools.calibrate_host import fit_front_end, measure_front_end
from tests.utils.replay import replay_trace


def main() -> int:
    args = arguments(__doc__, 384, 48, [1.0, 4.0, 16.0])
    profile, shape = load_profile(args.profile), load_model_shape(args.shape)
    with serve(args.model, args.shape, args.profile, True, "client-ttft") as server:
        serving = serving_of(server.url)
        front = fit_front_end(measure_front_end(server.url, "demo"))
        print(
            f"{args.shape} on {args.profile}, paced, {args.num_prompts} x ({args.input_len} in, "
            f"{args.output_len} out), Poisson arrivals (seed 0); front end measured: {front.fixed_s * 1e3:.2f} ms + "
            f"{front.per_input_token_s * 1e6:.2f} us a prompt token, {front.per_output_token_s * 1e6:.0f} us a "
            f"streamed token, {front.per_step_s * 1e6:.0f} us a step\n"
        )
        print(
            "| rate req/s | client TTFT ms | simulate, measured front end (ratio) | simulate, no front end (ratio) "
            "| engine TTFT ms live / sim | client TPOT ms / sim |"
        )
        print("|---|---|---|---|---|---|")
        for rate in args.rates:
            requests = synthetic(args.num_prompts, args.input_len, args.output_len, request_rate=rate)
            trace = replay_trace(server.url, "demo", requests)
            sent = list(trace.sent)
            sims = [simulate_device(profile, shape, serving, sent, front_end=f) for f in (front, NO_FRONT_END)]
            ttft = [sum(t.ttft_s for t in s.timings) / len(s.timings) for s in sims]
            engine = sum(t.ttft_s - t.front_end_s for t in sims[0].timings) / len(sent)
            tpot = sum(t.tpot_s for t in sims[0].timings) / len(sent)
            client = trace.client_ttft_s
            print(
                f"| {rate:g} | {client * 1e3:.1f} | {ttft[0] * 1e3:.1f} ({ttft[0] / client:.3f}) "
                f"| {ttft[1] * 1e3:.1f} ({ttft[1] / client:.3f}) "
                f"| {trace.emulated.ttft_s * 1e3:.1f} / {engine * 1e3:.1f} "
                f"| {trace.client_tpot_s * 1e3:.2f} / {tpot * 1e3:.2f} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
