"""The emulated interconnect is charged for the collectives the engine really performs on `--device maia`,
and tensor and pipeline parallelism compute what the checkpoint does, in both engines.

One request of a known prompt and length through each parallel server: vLLM at TP 2, eager and compiled
(where the collectives are opaque custom ops the compiled graph calls), and at PP 2 (compiled: vLLM's CPU
runner needs it for PP); SGLang at `--tp-size 2` and `--pp-size 2`. `/metrics` counts each collective of
the steps and their bytes, and charges exactly what the cost model's formula prices for the same steps
(so the formula's counts are the engines': 2 all-reduces a layer and the embedding's, the logits'
all-gather, the hidden states with the residual between stages). SGLang's pipeline stages run in other
processes than the one that charges: each relays its tally downstream, and the last returns the step's to
the first.

On a 2-core host each rank is pinned to a core (`VLLM_CPU_OMP_THREADS_BIND`, `SGLANG_CPU_OMP_THREADS_BIND`:
both engines refuse more ranks than NUMA nodes otherwise).
"""

import functools
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from maia_serving.emulator.cost.layout import Parallel
from maia_serving.emulator.cost.model import CostModel
from maia_serving.emulator.hardware import load_profile
from maia_serving.emulator.model_shape import shape_from_config
from tests.utils.e2e import ENGINE_ENV, SGLANG_ENV
from tests.utils.greedy_reference import assert_computes_the_checkpoint, served_greedy
from tests.utils.launch import Server, free_port, metric, scrape, settled_scrape, sglang_serve_cmd, vllm_serve_cmd

PROMPT = list(range(5, 5 + 37))  # 37 prompt tokens, given as ids so the count is exact
STEPS = [(37, 1), (1, 1), (1, 1), (1, 1)]  # the prefill, then three decodes
VLLM_LIMITS = ("--max-model-len", "256", "--max-num-batched-tokens", "2048", "--max-num-seqs", "8")
SGLANG_LIMITS = ("--context-length", "256", "--chunked-prefill-size", "2048", "--max-running-requests", "8")
CONFIGS = [
    ("vllm", 2, 1, True),
    ("vllm", 2, 1, False),
    ("vllm", 1, 2, False),
    ("sglang", 2, 1, True),
    ("sglang", 1, 2, True),
]


def _bind(ranks: int) -> str:
    return "|".join(str(i % (os.cpu_count() or 1)) for i in range(ranks))


@pytest.fixture(
    scope="module",
    params=CONFIGS,
    ids=[f"{e}-tp{t}-pp{p}{'' if e == 'sglang' else '-eager' if x else '-compiled'}" for e, t, p, x in CONFIGS],
)
def parallel_server(request, demo_model, logs_dir):
    engine, tp, pp, eager = request.param
    port = free_port()
    if engine == "vllm":
        cmd = vllm_serve_cmd(
            demo_model,
            port,
            "--served-model-name",
            "demo",
            *VLLM_LIMITS,
            "--tensor-parallel-size",
            str(tp),
            "--pipeline-parallel-size",
            str(pp),
            *(["--enforce-eager"] if eager else []),
            "--additional-config",
            '{"maia_profile": "maia100"}',
        )
        env = {
            **(ENGINE_ENV if eager else {"MAIA_SERVING_LOG_INTERVAL_S": "1"}),
            "VLLM_CPU_OMP_THREADS_BIND": _bind(tp * pp),
        }
    else:
        cmd = sglang_serve_cmd(
            demo_model,
            port,
            "--served-model-name",
            "demo",
            *SGLANG_LIMITS,
            "--enable-metrics",
            "--tp-size",
            str(tp),
            "--pp-size",
            str(pp),
        )
        env = {**SGLANG_ENV, "SGLANG_CPU_OMP_THREADS_BIND": _bind(tp * pp)}
    name = f"collectives-{request.node.callspec.id if hasattr(request.node, 'callspec') else engine}.log"
    with Server(cmd, port, logs_dir / name, env=env) as server:
        yield engine, server, Parallel(tp=tp, pp=pp)


def _client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)


def _settled(url: str, name: str, at_least: float) -> dict[str, float]:
    """/metrics once ``name`` reaches ``at_least`` (the figures reach the API server a moment after the reply)."""
    return settled_scrape(url, lambda samples: metric(samples, name) >= at_least)


def _delta(before: dict[str, float], after: dict[str, float], name: str, **labels: str) -> float:
    return metric(after, name, **labels) - metric(before, name, **labels)


def test_parallel_ranks_compute_what_the_checkpoint_does(parallel_server, demo_model):
    """Each greedy token is transformers' best on the checkpoint, up to a tie (tests/utils/greedy_reference.py)."""
    _, server, _ = parallel_server
    assert_computes_the_checkpoint(served_greedy(server), demo_model)


def test_each_step_charges_the_collectives_the_engine_performed(parallel_server, demo_model):
    _, server, parallel = parallel_server
    model = shape_from_config(json.loads((demo_model / "config.json").read_text()))
    cost = CostModel(load_profile("maia100"), model, parallel)
    hidden = model.hidden_size * 2  # bf16 activations
    if parallel.tp > 1:  # (2 layers + the embedding) all-reduces and the logits' all-gather, per step
        count = len(STEPS) * (2 * model.num_layers + 2)
        nbytes = sum((2 * model.num_layers + 1) * t * hidden + s * model.vocab_size * 2 for t, s in STEPS)
    else:  # the first stage sends the hidden states and the residual to the last
        count, nbytes = len(STEPS), sum(2 * t * hidden for t, _ in STEPS)

    before = scrape(server.url)
    out = _client(server).completions.create(
        model="demo", prompt=PROMPT, max_tokens=4, temperature=0, extra_body={"ignore_eos": True}
    )
    assert out.usage.completion_tokens == 4
    after = _settled(server.url, "maia:emulated_tokens_total", metric(before, "maia:emulated_tokens_total") + 40)
    delta = functools.partial(_delta, before, after)
    assert delta("maia:emulated_tokens_total") == 40
    assert delta("maia:emulated_collectives_total") == count
    assert delta("maia:emulated_collective_bytes_total") == nbytes
    want = sum(cost.comm_s(t, s) for t, s in STEPS)
    assert want > 0
    assert delta("maia:emulated_time_by_part_seconds_total", part="communication") == pytest.approx(want, rel=1e-6)
    busy = sum(cost.cost_of((t,), (t if t > 1 else 37 + i,)).total_s for i, (t, _) in enumerate(STEPS))
    assert delta("maia:emulated_busy_seconds_total") == pytest.approx(busy, rel=1e-6)


def test_overlapping_requests_are_each_charged_as_their_own(parallel_server):
    """Requests that arrive while others decode: with pipeline parallelism they run in other micro-batches than
    the first, whose results come back in between. Every request gets its first token and its finish on the
    emulated clock, and every token of every step is charged once, with no charging error."""
    _, server, _ = parallel_server
    client = _client(server)
    lengths = (24, 16, 20, 12)

    def ask(i: int) -> int:
        time.sleep(0.4 * i)
        prompt = [100 + 40 * i + j for j in range(20 + i)]  # no two share a first token: no prefix cache hits
        out = client.completions.create(
            model="demo", prompt=prompt, max_tokens=lengths[i], temperature=0, extra_body={"ignore_eos": True}
        )
        return out.usage.completion_tokens

    before = scrape(server.url)
    with ThreadPoolExecutor(len(lengths)) as pool:
        assert list(pool.map(ask, range(len(lengths)))) == list(lengths)
    # Each request's prompt, then one token for each output but the last (which leaves no new token to compute).
    tokens = sum(20 + i + n - 1 for i, n in enumerate(lengths))
    after = _settled(server.url, "maia:emulated_tokens_total", metric(before, "maia:emulated_tokens_total") + tokens)
    delta = functools.partial(_delta, before, after)
    assert delta("maia:emulated_tokens_total") == tokens
    assert delta("maia:emulated_time_to_first_token_seconds_count") == len(lengths)
    assert delta("maia:emulated_e2e_request_latency_seconds_count") == len(lengths)
    assert delta("maia:emulation_errors_total") == 0
