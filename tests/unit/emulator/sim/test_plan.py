"""maia-serving plan: the layouts of N chips, their rejections, and a ranking that is the simulator's."""

import dataclasses
import json

import pytest

from maia_serving.cli.main import main
from maia_serving.emulator import NotEnoughMemory, ServingConfig, load_model_shape, load_profile, require_fit
from maia_serving.emulator.sim.plan import layout_error, layouts, plan
from maia_serving.emulator.sim.report import SLO, summarize
from maia_serving.emulator.sim.simulate import simulate_device
from maia_serving.emulator.sim.workload import synthetic

REQUESTS = synthetic(16, 256, 16)


def test_the_layouts_of_n_chips():
    assert [(x.tp, x.pp, x.dp, x.ep) for x in layouts(8)] == [
        (8, 1, 1, False),
        (4, 2, 1, False),
        (2, 4, 1, False),
        (1, 8, 1, False),
    ]
    assert [(x.tp, x.pp) for x in layouts(6)] == [(6, 1), (3, 2), (2, 3), (1, 6)]
    with pytest.raises(ValueError, match="at least 1"):
        layouts(0)


def test_the_divisibility_rules_name_what_breaks():
    """Qwen2.5-7B: 28 query heads, 4 KV heads, 28 layers. vLLM replicates KV heads when tp is a multiple of them."""
    qwen = load_model_shape("qwen2.5-7b")
    assert layout_error(qwen, 8, 1) == "28 attention heads are not divisible by tp=8"
    assert layout_error(qwen, 7, 1) == "4 KV heads: neither divisible by tp=7 nor dividing it"
    assert layout_error(qwen, 1, 29) == "pp=29 stages for 28 layers: each stage needs a layer"
    assert layout_error(qwen, 4, 7) is None  # uneven stages are vLLM's to split, and priced as split
    assert layout_error(load_model_shape("llama-3-8b"), 16, 1) is None  # 8 KV heads, each on 2 chips


def test_rejections_say_why_and_the_rest_rank_by_what_the_simulator_serves():
    """Llama-3-70B on 2 chips: 141 GB of weights do not fit 2 Maia 100 either way; on 2 Maia 200 both layouts fit.
    Each served row carries the figures the simulator gives that layout, and the ranks follow the goodput."""
    model, m100, m200 = load_model_shape("llama-3-70b"), load_profile("maia100"), load_profile("maia200")
    config = ServingConfig(max_model_len=4096)
    rows = plan([m100, m200], model, 2, config, REQUESTS)
    assert [(r.device, r.tp, r.pp, r.fits) for r in rows[2:]] == [("maia100", 2, 1, False), ("maia100", 1, 2, False)]
    for row in rows[2:]:
        with pytest.raises(NotEnoughMemory) as fit:
            require_fit(
                model,
                m100,
                ServingConfig(tensor_parallel_size=row.tp, pipeline_parallel_size=row.pp, max_model_len=4096),
            )
        assert row.reason == str(fit.value) and row.rank is None
    assert [r.rank for r in rows[:2]] == [1, 2] and rows[0].goodput_tok_s >= rows[1].goodput_tok_s
    for row in rows[:2]:
        layout = ServingConfig(tensor_parallel_size=row.tp, pipeline_parallel_size=row.pp, max_model_len=4096)
        sim = simulate_device(m200, model, layout, REQUESTS)
        report = summarize(sim)
        assert row.output_throughput_tok_s == report.output_throughput_tok_s == row.goodput_tok_s
        assert (row.ttft_ms, row.tpot_ms) == (report.ttft_ms.mean, report.tpot_ms.mean)
        assert row.comm_share == sum(sim.steps.comm_s) / sum(sim.steps.work_s)
        assert 0 < row.comm_share < 1
        assert row.topology == "full_mesh of 4"


def test_goodput_counts_only_the_requests_within_the_slos():
    """A TPOT SLO under every layout's: no request meets it, so nothing is good; above every one: all are."""
    model, m200 = load_model_shape("llama-3-8b"), load_profile("maia200")
    rows = plan([m200], model, 2, ServingConfig(), REQUESTS)
    worst = max(r.tpot_p99_ms for r in rows)
    tight = plan([m200], model, 2, ServingConfig(), REQUESTS, SLO(tpot_ms=min(r.tpot_ms for r in rows) / 10))
    loose = plan([m200], model, 2, ServingConfig(), REQUESTS, SLO(tpot_ms=worst * 2))
    assert all(r.goodput_tok_s == 0 for r in tight)
    assert [r.goodput_tok_s for r in loose] == [r.output_throughput_tok_s for r in loose]


def test_chips_beyond_the_network_are_rejected_not_raised():
    """Maia 100 without its scale-out tier connects the 4 chips of a node: no layout of 8 is served."""
    alone = dataclasses.replace(load_profile("maia100"), scale_out=None)
    rows = plan([alone], load_model_shape("llama-3-8b"), 8, ServingConfig(), REQUESTS[:1])
    assert {r.reason for r in rows} == {"8 chips: the network of maia100 connects at most 4"}


def test_plan_json_has_the_fields_of_each_layout(capsys):
    code = main(
        [
            "plan",
            "--model",
            "llama-3-8b",
            "--device",
            "maia100",
            "h100-sxm@pcie",
            "--num-devices",
            "2",
            "--num-prompts",
            "4",
            "--input-len",
            "128",
            "--output-len",
            "4",
            "--tpot-slo-ms",
            "50",
            "--json",
        ]
    )
    rows = json.loads(capsys.readouterr().out)
    assert code == 0 and len(rows) == 4
    for row in rows:
        assert {
            "device",
            "tp",
            "pp",
            "fits",
            "reason",
            "output_throughput_tok_s",
            "ttft_ms",
            "tpot_ms",
            "comm_share",
            "goodput_tok_s",
            "rank",
            "topology",
        } <= row.keys()
        assert row["fits"] and row["reason"] is None and row["output_throughput_tok_s"] > 0
    assert sorted(r["rank"] for r in rows) == [1, 2, 3, 4]
    assert {r["device"] for r in rows} == {"maia100", "h100-sxm@pcie"}


def test_plan_runs_each_layout_under_the_clients_limit(capsys):
    """One client: every layout serves the four requests one by one, so its TTFT is one 128-token prefill
    (the layout's own), not a batch's."""
    argv = ["plan", "--model", "llama-3-8b", "--device", "maia100", "--num-devices", "2", "--num-prompts", "4"]
    argv += ["--input-len", "128", "--output-len", "4", "--json"]
    assert main(argv) == 0
    batched = {(r["tp"], r["pp"]): r for r in json.loads(capsys.readouterr().out)}
    assert main([*argv, "--max-concurrency", "1"]) == 0
    alone = {(r["tp"], r["pp"]): r for r in json.loads(capsys.readouterr().out)}
    assert alone.keys() == batched.keys()
    for key, row in alone.items():
        assert row["ttft_ms"] == pytest.approx(row["ttft_p99_ms"], rel=1e-9)
        assert row["ttft_ms"] < batched[key]["ttft_ms"]
        assert row["output_throughput_tok_s"] < batched[key]["output_throughput_tok_s"]
    assert main([*argv[:-1], "--max-concurrency", "2"]) == 0
    assert "at most 2 in flight" in capsys.readouterr().out


def test_plan_prints_a_table_with_the_rejections_and_writes_its_plots(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    code = main(
        [
            "plan",
            "--model",
            "qwen2.5-7b",
            "--device",
            "maia100",
            "--num-devices",
            "8",
            "--num-prompts",
            "4",
            "--input-len",
            "128",
            "--output-len",
            "4",
            "--plot",
            str(tmp_path),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "ranked by output throughput" in out and "rejected" in out
    assert "maia100 tp=8 pp=1: 28 attention heads are not divisible by tp=8" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["comm_share.png", "throughput_vs_tpot.png"]
