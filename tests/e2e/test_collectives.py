"""The emulated interconnect is charged for the collectives vLLM really performs on `--device maia`.

One request of a known prompt and length through TP 2 servers, eager and compiled (where the collectives
are opaque custom ops the compiled graph calls), and a PP 2 server (compiled: vLLM's CPU runner needs it
for PP): `/metrics` counts each collective of its steps, their bytes,
and charges exactly what the cost model's formula prices for the same steps (so the formula's counts
are the engine's: 2 all-reduces a layer and the embedding's, the logits' all-gather, and the hidden
states with the residual between stages).
"""

import json
import os
import time

import pytest

from maia_serving.emulator.cost import CostModel, Parallel
from maia_serving.emulator.hardware import load_profile
from maia_serving.emulator.model_shape import shape_from_config
from maia_serving.launch import Server, free_port, metric, scrape, vllm_serve_cmd

PROMPT = list(range(5, 5 + 37))  # 37 prompt tokens, given as ids so the count is exact
LIMITS = ("--max-model-len", "256", "--max-num-batched-tokens", "2048", "--max-num-seqs", "8")


@pytest.fixture(scope="module", params=[(2, 1, True), (2, 1, False), (1, 2, False)],
                ids=["tp2-eager", "tp2-compiled", "pp2-compiled"])
def parallel_server(request, demo_model, logs_dir):
    tp, pp, eager = request.param
    port = free_port()
    cmd = vllm_serve_cmd(demo_model, port, "--served-model-name", "demo", *LIMITS, "--tensor-parallel-size", str(tp),
                         "--pipeline-parallel-size", str(pp), *(["--enforce-eager"] if eager else []),
                         "--additional-config", '{"maia_profile": "maia100"}')
    env = {"MAIA_SERVING_LOG_INTERVAL_S": "1", **({"VLLM_CPU_CI_ENV": "1"} if eager else {}),
           "VLLM_CPU_OMP_THREADS_BIND": "|".join(str(i % (os.cpu_count() or 1)) for i in range(tp * pp))}
    name = f"collectives-tp{tp}-pp{pp}-{'eager' if eager else 'compiled'}.log"
    with Server(cmd, port, logs_dir / name, env=env) as server:
        yield server, Parallel(tp=tp, pp=pp)


def _settled(url: str, name: str, at_least: float) -> dict[str, float]:
    """/metrics once ``name`` reaches ``at_least`` (the figures reach the API server a moment after the reply)."""
    deadline = time.monotonic() + 30
    while (samples := scrape(url)) and metric(samples, name) < at_least and time.monotonic() < deadline:
        time.sleep(0.2)
    return samples


def test_each_step_charges_the_collectives_the_engine_performed(parallel_server, demo_model):
    from openai import OpenAI

    server, parallel = parallel_server
    model = shape_from_config(json.loads((demo_model / "config.json").read_text()))
    cost = CostModel(load_profile("maia100"), model, parallel)
    hidden = model.hidden_size * 2  # bf16 activations
    if parallel.tp > 1:  # (2 layers + the embedding) all-reduces and the logits' all-gather, per step
        per_step = {"count": 2 * model.num_layers + 2,
                    "bytes": lambda t: (2 * model.num_layers + 1) * t * hidden + model.vocab_size * 2}
    else:  # the first stage sends the hidden states and the residual to the last
        per_step = {"count": 1, "bytes": lambda t: 2 * t * hidden}

    before = scrape(server.url)
    client = OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
    out = client.completions.create(model="demo", prompt=PROMPT, max_tokens=4, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 4
    steps = [(37, 1), (1, 1), (1, 1), (1, 1)]  # the prefill, then three decodes
    count = sum(per_step["count"] for _ in steps)
    after = _settled(server.url, "maia:emulated_collectives_total",
                     metric(before, "maia:emulated_collectives_total") + count)

    def delta(name, **labels):
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert delta("maia:emulated_collectives_total") == count
    assert delta("maia:emulated_collective_bytes_total") == sum(per_step["bytes"](t) for t, _ in steps)
    want = sum(cost.comm_s(t, s) for t, s in steps)
    assert want > 0
    assert delta("maia:emulated_time_by_part_seconds_total", part="communication") == pytest.approx(want, rel=1e-6)
