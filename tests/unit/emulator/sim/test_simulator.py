"""The discrete-event simulator: its clock on hand-summed steps, the live cost model in the loop, the fit
check, the workloads (Poisson arrivals, JSONL traces) and the report."""

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest

from maia_serving.emulator import NotEnoughMemory, ServingConfig, load_model_shape, require_fit
from maia_serving.emulator.cost.layout import Parallel
from maia_serving.emulator.cost.model import CostModel
from maia_serving.emulator.hardware import NO_FRONT_END, FrontEnd
from maia_serving.emulator.sim.report import SLO, Latency, SimReport, chrome_trace, kv_series, refused, summarize
from maia_serving.emulator.sim.scheduler import SchedulerConfig
from maia_serving.emulator.sim.simulate import _StepPrices, simulate, simulate_device
from maia_serving.emulator.sim.workload import Request, arrival_times, parse_trace_line, read_trace, synthetic


class DyadicCosts:
    """A stand-in cost model: 1/8 s a step plus 1/64 s a token, so every sum below is exact in binary."""

    parallel = Parallel()

    def __init__(self):
        self.steps = []

    def cost_of(self, new_tokens, context_lens):
        self.steps.append((new_tokens, context_lens))
        return SimpleNamespace(total_s=1 / 8 + sum(new_tokens) / 64, comm_s=0.0, stages=(), hops=())


def config(**overrides) -> SchedulerConfig:
    return SchedulerConfig(**{"num_blocks": 100, "block_size": 4, "enable_prefix_caching": False, **overrides})


def test_arrivals_while_busy_wait_for_the_step_and_an_idle_device_jumps_to_the_next():
    requests = [Request(0.0, 4, 2), Request(0.0625, 4, 2), Request(2.0, 4, 1)]
    costs = DyadicCosts()
    sim = simulate(requests, costs, config())
    # a's prefill (0 -> 0.1875); b arrived during it and is prefilled beside a's decode (-> 0.390625);
    # b decodes (-> 0.53125); idle until c arrives at 2.0; c's prefill is its only token.
    assert costs.steps == [((4,), (4,)), ((1, 4), (5, 4)), ((1,), (5,))]  # c's prefill has a's price
    assert (sim.steps.num_tokens, sim.steps.num_seqs) == ((4, 5, 1, 4), (1, 2, 1, 1))
    assert sim.steps.start_s == (0.0, 0.1875, 0.390625, 2.0)
    assert sim.steps.step_s == (0.1875, 0.203125, 0.140625, 0.1875)
    a, b, c = sim.timings
    assert (a.ttft_s, a.tpot_s, a.e2e_s) == (0.1875, 0.203125, 0.390625)
    assert (b.ttft_s, b.tpot_s, b.e2e_s) == (0.390625 - 0.0625, 0.140625, 0.53125 - 0.0625)
    assert (c.ttft_s, c.tpot_s, c.e2e_s, c.num_output_tokens) == (0.1875, None, 0.1875, 1)


def test_a_request_arriving_exactly_at_a_step_end_joins_the_next_step():
    sim = simulate([Request(0.0, 4, 2), Request(0.1875, 4, 1)], DyadicCosts(), config())
    assert sim.steps.num_seqs == (1, 2)


def test_unsorted_requests_are_refused():
    with pytest.raises(ValueError, match="sorted by arrival"):
        simulate([Request(1.0, 4, 1), Request(0.0, 4, 1)], DyadicCosts(), config())


def test_one_client_sends_each_request_when_the_last_ends():
    """--max-concurrency 1 at an infinite rate: a closed loop of one client. a's prefill (0 -> 0.1875) and
    decode (-> 0.328125); b is sent then and runs alone the same way; each TTFT is one prefill step, not the
    wait behind a."""
    requests = [Request(0.0, 4, 2), Request(0.0, 4, 2)]
    costs = DyadicCosts()
    sim = simulate(requests, costs, config(), max_concurrency=1)
    assert sim.steps.num_seqs == (1, 1, 1, 1)
    assert sim.steps.start_s == (0.0, 0.1875, 0.328125, 0.515625)
    a, b = sim.timings
    assert b.arrival_s == a.last_token_s == 0.328125
    assert a.ttft_s == b.ttft_s == 0.1875 and a.e2e_s == b.e2e_s == 0.328125
    unlimited = simulate(requests, DyadicCosts(), config()).timings
    assert unlimited[1].arrival_s == 0.0 and unlimited[1].ttft_s == 0.1875 + 1 / 16  # prefilled beside a


def test_a_client_limit_caps_the_batch_and_a_slot_opens_when_a_request_ends():
    """Six requests, three clients: the first three prefill together; the fourth is sent when the first of
    them (the shortest) ends, and TTFT counts from then. No step ever holds more than three."""
    requests = [Request(0.0, 4, n) for n in (1, 3, 3, 2, 2, 2)]
    sim = simulate(requests, DyadicCosts(), config(), max_concurrency=3)
    assert max(sim.steps.num_seqs) == 3 and sim.steps.num_seqs[0] == 3
    first, _, _, fourth, _, _ = sim.timings
    assert fourth.arrival_s == first.last_token_s == sim.steps.start_s[1]
    assert all(t.num_output_tokens == r.output_len for t, r in zip(sim.timings, requests, strict=True))


def test_a_limit_as_large_as_the_workload_changes_nothing():
    requests = [Request(0.0, 4, 2), Request(0.0625, 4, 2), Request(2.0, 4, 1)]
    free = simulate(requests, DyadicCosts(), config())
    limited = simulate(requests, DyadicCosts(), config(), max_concurrency=3)
    assert free.timings == limited.timings and free.steps == limited.steps


def test_a_paced_request_held_back_is_sent_when_a_slot_opens_not_when_it_arrived():
    """b arrives at 0.0625 while a holds the only slot; it is sent at a's end (0.328125), not at its arrival."""
    sim = simulate([Request(0.0, 4, 2), Request(0.0625, 4, 2)], DyadicCosts(), config(), max_concurrency=1)
    assert sim.timings[1].arrival_s == 0.328125 and sim.requests[1].arrival_s == 0.0625


@pytest.mark.parametrize("limit,dp,message", [(0, 1, "must be >= 1"), (1, 2, "below --data-parallel-size 2")])
def test_a_bad_client_limit_is_refused(llama8b, maia100, limit, dp, message):
    with pytest.raises(ValueError, match=message):
        simulate_device(
            maia100, llama8b, ServingConfig(data_parallel_size=dp), synthetic(2, 16, 2), max_concurrency=limit
        )


def test_ttft_and_tpot_are_the_sums_of_the_live_cost_models_steps(llama8b, maia100):
    """A's 3000-token prompt in chunks of the 2048-token budget; b's 1000 fit beside a's second chunk; both
    decode; b finishes after one decode and a after two."""
    costs = CostModel(maia100, llama8b)
    sim = simulate(
        [Request(0.0, 3000, 3), Request(0.0, 1000, 2)],
        costs,
        config(num_blocks=1000, block_size=16, max_num_batched_tokens=2048),
    )
    c1, c2, c3, c4 = (
        costs.cost_of(q, n).total_s
        for q, n in [((2048,), (2048,)), ((952, 1000), (3000, 1000)), ((1, 1), (3001, 1001)), ((1,), (3002,))]
    )
    a, b = sim.timings
    assert a.ttft_s == b.ttft_s == pytest.approx(c1 + c2, rel=1e-12)
    assert a.tpot_s == pytest.approx((c3 + c4) / 2, rel=1e-12)
    assert b.tpot_s == pytest.approx(c3, rel=1e-12)
    assert a.e2e_s == pytest.approx(c1 + c2 + c3 + c4, rel=1e-12)
    assert sim.steps.step_s == pytest.approx((c1, c2, c3, c4), rel=1e-12)


def test_a_static_batch_matches_the_old_lockstep_simulation_where_the_policies_coincide(llama8b, maia100):
    """The old `simulate` prefilled the whole batch, then decoded it in lockstep. vLLM's policy does the same
    when every prompt fits one step's budget (8 x 1024 = 8192) and max_num_seqs holds the batch: one prefill
    step, then output_len - 1 decode steps at contexts 1025, 1026, ... Every request then has the old
    figures: TTFT the prefill step, TPOT the mean decode step, throughput num_seqs * output_len / e2e."""
    num_seqs, prompt_len, output_len = 8, 1024, 16
    costs = CostModel(maia100, llama8b)
    prefill = costs.cost_of((prompt_len,) * num_seqs, (prompt_len,) * num_seqs).total_s
    decode = sum(costs.cost_of((1,) * num_seqs, (prompt_len + i,) * num_seqs).total_s for i in range(1, output_len))
    old = {
        "ttft_s": prefill,
        "tpot_s": decode / (output_len - 1),
        "e2e_s": prefill + decode,
        "output_tokens_per_s": num_seqs * output_len / (prefill + decode),
    }

    requests = synthetic(num_seqs, prompt_len, output_len)
    sim = simulate_device(maia100, llama8b, ServingConfig(), requests, front_end=NO_FRONT_END)
    report = summarize(sim)
    assert report.num_steps == output_len
    for t in sim.timings:
        assert (t.ttft_s, t.tpot_s, t.e2e_s) == pytest.approx((old["ttft_s"], old["tpot_s"], old["e2e_s"]), rel=1e-12)
    assert report.output_throughput_tok_s == pytest.approx(old["output_tokens_per_s"], rel=1e-12)


def test_the_front_end_delays_each_request_by_its_time_and_counts_in_ttft_not_tpot(llama8b, maia100):
    """A front end of 4 ms + 10 us a prompt token (hand-worked: 4 + 10 * 100 / 1000 = 5 ms for 100 tokens, 4.5 ms
    for 50): a lone request reaches the scheduler 5 ms after it was sent and its TTFT is that plus its prefill;
    a second one sent 1 ms later waits for the one worker, busy until 5 ms, and reaches the scheduler at
    5 + 4.5 = 9.5 ms: 8.5 ms of its TTFT, which counts from its own send, are the front end's. TPOT is the
    device's alone (no work per output token); the report keeps the front end's share apart."""
    front = FrontEnd(4e-3, 10e-6)
    costs = CostModel(maia100, llama8b)
    lone = simulate_device(maia100, llama8b, ServingConfig(), synthetic(1, 100, 3), front_end=front)
    prefill = costs.cost_of((100,), (100,)).total_s
    decode = [costs.cost_of((1,), (100 + i,)).total_s for i in (1, 2)]
    (t,) = lone.timings
    assert t.front_end_s == pytest.approx(5e-3, rel=1e-12)
    assert t.ttft_s == pytest.approx(5e-3 + prefill, rel=1e-12)
    assert t.tpot_s == pytest.approx(sum(decode) / 2, rel=1e-12)
    assert lone.steps.start_s[0] == pytest.approx(5e-3, rel=1e-12)
    report = summarize(lone)
    assert report.ttft_front_end_ms.mean == pytest.approx(5.0, rel=1e-12)
    assert report.ttft_ms.mean == pytest.approx(5.0 + prefill * 1e3, rel=1e-12)

    two = [Request(0.0, 100, 2), Request(1e-3, 50, 2)]
    sim = simulate_device(maia100, llama8b, ServingConfig(), two, front_end=front)
    a, b = sim.timings
    assert (a.arrival_s, b.arrival_s) == (0.0, 1e-3)
    assert (a.front_end_s, b.front_end_s) == pytest.approx((5e-3, 8.5e-3), rel=1e-12)
    assert sim.steps.start_s[0] == pytest.approx(5e-3, rel=1e-12)  # the first reached the scheduler alone
    assert b.first_token_s > a.first_token_s  # the second is scheduled after it
    none = simulate_device(maia100, llama8b, ServingConfig(), synthetic(1, 100, 3), front_end=NO_FRONT_END)
    assert none.timings[0].ttft_s == pytest.approx(prefill, rel=1e-12)
    assert summarize(none).ttft_front_end_ms.mean == 0.0


def test_the_front_end_streams_each_token_after_the_work_before_it(llama8b, maia100):
    """0.5 ms of front-end work per step and 1 ms per output token (no input work): two requests at once sample
    their first tokens in the same step; the worker takes the step in, then streams the first request's token at
    step end + 1.5 ms and the second's at + 2.5 ms, so their front-end shares are 1.5 and 2.5 ms. A third request,
    sent a second later while the first two still stream, queues its input behind nothing (the worker is idle by
    then) and its own tokens likewise; a lone request's TPOT is the device's."""
    front = FrontEnd(0.0, 0.0, 1e-3, 0.5e-3)
    requests = [Request(0.0, 64, 3), Request(0.0, 64, 3), Request(1.0, 64, 3)]
    sim = simulate_device(maia100, llama8b, ServingConfig(), requests, front_end=front)
    a, b, c = sim.timings
    end = sim.steps.start_s[0] + sim.steps.step_s[0]
    assert (a.first_token_s, b.first_token_s) == pytest.approx((end + 1.5e-3, end + 2.5e-3), rel=1e-12)
    assert (a.front_end_s, b.front_end_s, c.front_end_s) == pytest.approx((1.5e-3, 2.5e-3, 1.5e-3), rel=1e-12)
    assert c.arrival_s == 1.0
    lone = simulate_device(maia100, llama8b, ServingConfig(), synthetic(1, 64, 3), front_end=front)
    bare = simulate_device(maia100, llama8b, ServingConfig(), synthetic(1, 64, 3), front_end=NO_FRONT_END)
    assert lone.timings[0].tpot_s == pytest.approx(bare.timings[0].tpot_s, rel=1e-12)
    assert lone.timings[0].ttft_s == pytest.approx(bare.timings[0].ttft_s + 1.5e-3, rel=1e-12)
    only_tokens = FrontEnd(0.0, 0.0, 1e-3)
    tokens_only = simulate_device(maia100, llama8b, ServingConfig(), synthetic(1, 64, 3), front_end=only_tokens)
    assert tokens_only.timings[0].ttft_s == pytest.approx(bare.timings[0].ttft_s + 1e-3, rel=1e-12)


def test_under_a_client_limit_the_next_request_is_sent_when_one_ends_and_pays_the_front_end(llama8b, maia100):
    """One client (--max-concurrency 1), two requests: the second is sent when the first's last token arrives,
    and reaches the scheduler the front end's time later."""
    front = FrontEnd(2e-3, 0.0)
    sim = simulate_device(maia100, llama8b, ServingConfig(), synthetic(2, 64, 2), max_concurrency=1, front_end=front)
    a, b = sim.timings
    assert b.arrival_s == pytest.approx(a.last_token_s, rel=1e-12)
    assert sim.steps.start_s[2] == pytest.approx(a.last_token_s + 2e-3, rel=1e-12)
    assert b.ttft_s == pytest.approx(2e-3 + sim.steps.step_s[2], rel=1e-12)


def test_a_model_that_does_not_fit_is_refused_with_the_message_of_fit(maia100):
    llama70b = load_model_shape("llama-3-70b")
    with pytest.raises(NotEnoughMemory) as refusal:
        simulate_device(maia100, llama70b, ServingConfig(), synthetic(1, 16, 1))
    with pytest.raises(NotEnoughMemory) as fit:
        require_fit(llama70b, maia100, ServingConfig())
    assert str(refusal.value) == str(fit.value)
    assert "short by 78.85 GiB" in str(refusal.value) and "--tensor-parallel-size 4" in str(refusal.value)


def test_a_request_longer_than_max_model_len_is_refused(llama8b, maia100):
    with pytest.raises(ValueError, match="1025 tokens .* exceeds max_model_len=1024"):
        simulate_device(maia100, llama8b, ServingConfig(max_model_len=1024), synthetic(1, 1000, 25))


@pytest.mark.parametrize("block_size, blocks_used", [(16, 7), (32, 4)])
def test_the_kv_cache_is_the_memory_plans(llama8b, maia100, block_size, blocks_used):
    serving = ServingConfig(block_size=block_size)
    sim = simulate_device(maia100, llama8b, serving, synthetic(1, 100, 1))
    assert sim.kv_cache_blocks == require_fit(llama8b, maia100, serving).num_blocks
    assert sim.steps.kv_blocks_used == (blocks_used,)  # 100 tokens


def test_remembered_step_prices_equal_the_cost_model(llama8b, maia100):
    costs = CostModel(maia100, llama8b)
    price = _StepPrices(costs)
    price.max_entries = 2
    shapes = [((1,), (n,)) for n in (5, 6, 7, 5)] + [((1,) * 9, tuple(range(10, 19)))]
    for new, ctx in shapes + shapes:
        assert price(new, ctx) == costs.cost_of(new, ctx)
    assert len(price._seen) <= 2


def test_poisson_arrivals_are_seeded_and_start_at_zero():
    times = arrival_times(2000, 4.0, seed=7)
    assert times == arrival_times(2000, 4.0, seed=7)
    assert times != arrival_times(2000, 4.0, seed=8)
    assert times[0] == 0.0 and all(b >= a for a, b in zip(times, times[1:]))
    gaps = np.diff(times)
    assert gaps.mean() == pytest.approx(1 / 4.0, rel=0.1)  # exponential gaps: mean 1/rate,
    assert gaps.std() == pytest.approx(1 / 4.0, rel=0.1)  # standard deviation 1/rate too
    assert arrival_times(3, math.inf) == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("rate", [0.0, -1.0, math.nan])
def test_a_bad_rate_is_refused(rate):
    with pytest.raises(ValueError, match="request rate must be > 0"):
        arrival_times(3, rate)


def test_a_trace_is_read_sorted_and_limited(tmp_path):
    path = tmp_path / "trace.jsonl"
    path.write_text(
        '{"arrival_s": 1.5, "input_len": 100, "output_len": 10}\n'
        "\n"
        '{"arrival_s": 0, "input_len": 64, "output_len": 1, "prefix_id": 7, "prefix_len": 32}\n'
        '{"arrival_s": 9, "input_len": 1, "output_len": 1}\n'
    )
    assert read_trace(path) == [Request(0.0, 64, 1, "7", 32), Request(1.5, 100, 10), Request(9.0, 1, 1)]
    assert read_trace(path, limit=2) == [Request(0.0, 64, 1, "7", 32), Request(1.5, 100, 10)]


@pytest.mark.parametrize(
    "line, error",
    [
        ("{arrival_s: 0}", "not JSON"),
        ("[0, 1, 2]", "expected a JSON object, got list"),
        ('{"arrival_s": 0, "input_len": 8}', "missing output_len"),
        ('{"arrival_s": 0, "input_len": 8, "output_len": 2, "outptu_len": 3}', "unknown field outptu_len"),
        ('{"arrival_s": "0", "input_len": 8, "output_len": 2}', 'arrival_s must be a number, got "0"'),
        ('{"arrival_s": 0, "input_len": 8.5, "output_len": 2}', "input_len must be an integer, got 8.5"),
        ('{"arrival_s": 0, "input_len": true, "output_len": 2}', "input_len must be an integer, got true"),
        ('{"arrival_s": -1, "input_len": 8, "output_len": 2}', "arrival_s must be a finite number >= 0"),
        ('{"arrival_s": 0, "input_len": 0, "output_len": 2}', "input_len and output_len must be >= 1"),
        (
            '{"arrival_s": 0, "input_len": 8, "output_len": 2, "prefix_id": "s", "prefix_len": 9}',
            "prefix_len must be in",
        ),
        ('{"arrival_s": 0, "input_len": 8, "output_len": 2, "prefix_len": 4}', "prefix_len needs a prefix_id"),
    ],
)
def test_a_bad_trace_line_is_named_by_its_number(tmp_path, line, error):
    with pytest.raises(ValueError, match=error):
        parse_trace_line(line)
    path = tmp_path / "trace.jsonl"
    path.write_text('{"arrival_s": 0, "input_len": 8, "output_len": 2}\n\n' + line + "\n")
    with pytest.raises(ValueError, match=f"trace.jsonl, line 3: {error}"):
        read_trace(path)


def test_an_empty_trace_is_refused(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(ValueError, match="no requests"):
        read_trace(path)


def test_the_report_counts_throughput_goodput_and_kv_use_over_the_run():
    """a: TTFT 0.1875, TPOT 0.203125 (e2e 0.390625); b: TTFT 0.328125, TPOT 0.140625 (e2e 0.46875); c:
    TTFT 0.1875, no TPOT. The run spans 0 to 2.1875 s: 3 requests, 5 output and 12 input tokens."""
    requests = [Request(0.0, 4, 2), Request(0.0625, 4, 2), Request(2.0, 4, 1)]
    sim = simulate(requests, DyadicCosts(), config())
    report = summarize(sim, SLO(ttft_ms=200, tpot_ms=150))  # a misses the TPOT SLO, b the TTFT SLO
    assert report.duration_s == 2.1875
    assert report.request_throughput_req_s == 3 / 2.1875
    assert report.output_throughput_tok_s == 5 / 2.1875
    assert report.total_throughput_tok_s == 17 / 2.1875
    assert report.goodput_req_s == 1 / 2.1875
    assert summarize(sim, SLO(tpot_ms=250)).goodput_req_s == 3 / 2.1875
    assert summarize(sim).goodput_req_s is None
    later = [Request(r.arrival_s + 1, r.input_len, r.output_len) for r in requests]
    assert summarize(simulate(later, DyadicCosts(), config())).duration_s == 2.1875  # from the first arrival
    assert report.ttft_ms == Latency.of([0.1875, 0.328125, 0.1875])
    assert report.ttft_ms.mean == 234.375
    assert report.ttft_ms.p50 == 187.5 and report.ttft_ms.p90 == pytest.approx(187.5 + 0.8 * 140.625)
    assert report.tpot_ms == Latency.of([0.203125, 0.140625])
    # Blocks of 4: a 1 block, then a 2 and b 1, then b 2; idle; c 1. Peak 3 of 100.
    assert sim.steps.kv_blocks_used == (1, 3, 2, 1)
    assert report.kv_peak_usage == 0.03
    assert report.kv_mean_usage == pytest.approx((1 * 0.1875 + 3 * 0.203125 + 2 * 0.140625 + 1 * 0.1875) / 2.1875 / 100)
    assert report.kv_usage_over_time[0] == (0.0, 0.01)
    assert report.kv_usage_over_time[10][1] == 0.0  # idle at 1.15 s
    assert report.kv_usage_over_time[-1] == (2.1875, 0.0)  # the run has ended
    assert kv_series(sim) == ([0.0, 0.1875, 0.390625, 0.53125, 2.0, 2.1875], [1, 3, 2, 0, 1, 0])


def test_a_refused_row_has_the_keys_of_a_report():
    report = summarize(simulate([Request(0.0, 4, 1)], DyadicCosts(), config()))
    row = refused("maia100", "does not fit")
    assert set(row) == set(report.to_dict())
    assert (row["fits"], row["error"], row["ttft_ms"]) == (False, "does not fit", None)
    assert isinstance(report, SimReport) and (report.fits, report.error) == (True, None)
    json.dumps(report.to_dict())


def test_the_chrome_trace_has_every_step_and_request():
    requests = [Request(0.0, 4, 2), Request(0.0625, 4, 2), Request(2.0, 4, 1)]
    sim = simulate(requests, DyadicCosts(), config())
    events = json.loads(json.dumps(chrome_trace([sim, sim])))["traceEvents"]
    steps = [e for e in events if e["ph"] == "X"]
    assert [(e["pid"], e["name"], e["ts"], e["dur"]) for e in steps[:4]] == [
        (0, "prefill", 0.0, 187500.0),
        (0, "prefill", 187500.0, 203125.0),
        (0, "decode", 390625.0, 140625.0),
        (0, "prefill", 2e6, 187500.0),
    ]
    assert len(steps) == 8
    spans = [(e["id"], e["name"], e["ph"], e["ts"]) for e in events if e.get("cat") == "request" and e["pid"] == 0]
    assert spans[4:8] == [
        (1, "request", "b", 62500.0),
        (1, "ttft", "b", 62500.0),
        (1, "ttft", "e", 390625.0),
        (1, "request", "e", 531250.0),
    ]
    kv = [(e["ts"], e["args"]["blocks"]) for e in events if e["name"] == "KV blocks used" and e["pid"] == 1]
    assert kv == [(0.0, 1), (187500.0, 3), (390625.0, 2), (531250.0, 0), (2e6, 1), (2187500.0, 0)]
