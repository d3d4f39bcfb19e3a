"""The maia-serving CLI: exit codes and what it prints."""

import json

import pytest

from maia_serving.cli.main import main
from maia_serving.emulator import NotEnoughMemory, ServingConfig, load_model_shape, load_profile, require_fit
from maia_serving.emulator.cost.model import CostModel


def test_profiles_table(capsys):
    assert main(["profiles"]) == 0
    out = capsys.readouterr().out
    for name in ("maia100", "maia200", "h100-sxm", "h200"):
        assert name in out


def test_profiles_show_sources(capsys):
    assert main(["profiles", "--show", "maia100"]) == 0
    assert "Hot Chips 2024" in capsys.readouterr().out


def test_fit_70b_on_one_maia100_fails_and_tp4_fits(capsys):
    assert main(["fit", "--model", "llama-3-70b", "--profile", "maia100"]) == 1
    out = capsys.readouterr().out
    assert "DOES NOT FIT: short by 78.85 GiB" in out and "--tensor-parallel-size 4" in out
    assert main(["fit", "--model", "llama-3-70b", "--device", "maia100", "--tensor-parallel-size", "4"]) == 0
    assert "FITS" in capsys.readouterr().out


def test_fit_json(capsys):
    assert main(["fit", "--model", "llama-3-8b", "--profile", "maia200", "--kv-cache-dtype", "fp8", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["fits"] and data["kv_bytes_per_token"] == 2 * 32 * 8 * 128


def test_fit_stores_the_weights_in_the_weight_dtype(capsys):
    """Llama-3-8B's 6,979,321,856 linear weights in FP8; norms, embeddings and LM head stay BF16."""
    assert main(["fit", "--model", "llama-3-8b", "--profile", "maia100", "--weight-dtype", "fp8", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["weight_bytes"] == 6_979_321_856 + (8_030_261_248 - 6_979_321_856) * 2
    assert data["config"]["weight_dtype"] == "fp8"
    assert main(["fit", "--model", "llama-3-8b", "--profile", "maia100", "--weight-dtype", "int4"]) == 0
    assert "8.03 B parameters, bfloat16, weights in int4) on 1 x maia100" in capsys.readouterr().out
    assert main(["fit", "--model", "llama-3-8b", "--profile", "maia100", "--weight-dtype", "fp7"]) == 2
    assert "unknown dtype 'fp7'" in capsys.readouterr().err


def test_fit_reads_a_model_directory(tmp_path, capsys):
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "hidden_size": 64,
                "num_attention_heads": 2,
                "num_hidden_layers": 1,
                "intermediate_size": 128,
                "vocab_size": 100,
                "torch_dtype": "float32",
            }
        )
    )
    assert main(["fit", "--model", str(tmp_path), "--profile", "maia100"]) == 0


def test_bad_input_gets_a_clear_error(capsys):
    assert main(["fit", "--model", "llama-3-8b", "--profile", "maia300"]) == 2
    assert "unknown device profile 'maia300'" in capsys.readouterr().err
    assert main(["fit", "--model", "no-such-model", "--profile", "maia100"]) == 2
    assert "built-in shapes" in capsys.readouterr().err


SIMULATE = ["simulate", "--model", "llama-3-8b", "--num-prompts", "4", "--input-len", "128", "--output-len", "16"]


def test_simulate_json_has_one_row_per_device_with_the_latency_figures(capsys):
    assert main([*SIMULATE, "--device", "maia100", "maia200", "h100-sxm", "--request-rate", "20", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["device"] for r in rows] == ["maia100", "maia200", "h100-sxm"]
    for r in rows:
        assert (r["fits"], r["error"], r["num_requests"]) == (True, None, 4)
        assert r["output_throughput_tok_s"] > 0
        for key in ("ttft_ms", "tpot_ms", "e2e_ms"):
            assert set(r[key]) == {"mean", "p50", "p90", "p99"}
            assert 0 < r[key]["p50"] <= r[key]["p90"] <= r[key]["p99"]
    tpot = {r["device"]: r["tpot_ms"]["mean"] for r in rows}
    assert tpot["maia200"] < tpot["h100-sxm"] < tpot["maia100"]  # decode reads the weights: HBM bandwidth


def test_simulate_gives_a_device_that_does_not_fit_a_row_with_the_message_of_fit(capsys):
    assert main(["fit", "--model", "llama-3-70b", "--profile", "maia100"]) == 1
    fit_out = capsys.readouterr().out
    assert main([*SIMULATE, "--model", "llama-3-70b", "--profile", "maia100", "maia200", "--json"]) == 1
    refused, served = json.loads(capsys.readouterr().out)
    with pytest.raises(NotEnoughMemory) as fit:
        require_fit(load_model_shape("llama-3-70b"), load_profile("maia100"), ServingConfig())
    assert (refused["device"], refused["fits"], refused["error"]) == ("maia100", False, str(fit.value))
    assert refused["ttft_ms"] is None
    for words in ("short by 78.85 GiB", "--tensor-parallel-size 4 (up to 4 chips per node)"):
        assert words in fit_out and words in refused["error"]
    assert (served["device"], served["fits"], served["error"]) == ("maia200", True, None)
    assert served["ttft_ms"]["mean"] > 0


def test_simulate_prints_a_table_and_kv_use_over_time(capsys):
    assert main([*SIMULATE, "--device", "maia200", "--ttft-slo-ms", "1000", "--tpot-slo-ms", "100"]) == 0
    out = capsys.readouterr().out
    assert "4 x (128 in, 16 out), all at once" in out and "goodput req/s" in out
    assert "maia200: KV use over" in out


def test_simulate_takes_vllm_benchs_max_concurrency(capsys):
    """One client: every request runs alone, its TTFT the front end's time (the profile's 3.70 ms + 3.51 us a
    prompt token: 4.149 ms for 128 tokens, reported apart) and one 128-token prefill, and the run four requests
    long; with --front-end none the prefill alone."""
    assert main([*SIMULATE, "--device", "maia100", "--max-concurrency", "1", "--json"]) == 0
    (alone,) = json.loads(capsys.readouterr().out)
    prefill = CostModel(load_profile("maia100"), load_model_shape("llama-3-8b")).cost_of((128,), (128,)).total_s
    assert alone["ttft_ms"]["p50"] == pytest.approx(alone["ttft_ms"]["p99"], rel=1e-9)
    assert alone["ttft_front_end_ms"]["mean"] == pytest.approx(3.70 + 128 * 3.51e-3, rel=1e-9)
    assert alone["ttft_ms"]["p50"] == pytest.approx(3.70 + 128 * 3.51e-3 + prefill * 1e3, rel=1e-9)
    assert alone["duration_s"] == pytest.approx(4 * alone["e2e_ms"]["mean"] / 1e3, rel=1e-9)
    assert main([*SIMULATE, "--device", "maia100", "--max-concurrency", "1", "--front-end", "none", "--json"]) == 0
    (bare,) = json.loads(capsys.readouterr().out)
    assert bare["ttft_ms"]["p50"] == pytest.approx(prefill * 1e3, rel=1e-9)
    assert bare["ttft_front_end_ms"]["mean"] == 0.0
    assert main([*SIMULATE, "--device", "maia100", "--max-concurrency", "2"]) == 0
    assert "4 x (128 in, 16 out), all at once, at most 2 in flight" in capsys.readouterr().out


def test_simulate_replays_a_trace(tmp_path, capsys):
    trace = tmp_path / "trace.jsonl"
    trace.write_text(
        '{"arrival_s": 0, "input_len": 64, "output_len": 4}\n{"arrival_s": 5, "input_len": 64, "output_len": 4}\n'
    )
    assert main(["simulate", "--model", "llama-3-8b", "--device", "maia200", "--trace", str(trace), "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["num_requests"] == 2 and row["duration_s"] > 5
    assert (
        main(["simulate", "--model", "llama-3-8b", "--device", "maia200", "--trace", str(trace), "--input-len", "8"])
        == 2
    )
    assert "--input-len describe synthetic requests" in capsys.readouterr().err
    trace.write_text('{"arrival_s": 0, "input_len": 64}\n')
    assert main(["simulate", "--model", "llama-3-8b", "--device", "maia200", "--trace", str(trace)]) == 2
    assert "trace.jsonl, line 1: missing output_len" in capsys.readouterr().err


def test_simulate_writes_a_chrome_trace(tmp_path, capsys):
    trace = tmp_path / "run.json"
    assert main([*SIMULATE, "--device", "maia100", "maia200", "--chrome-trace", str(trace)]) == 0
    events = json.loads(trace.read_text())["traceEvents"]
    assert {e["args"]["name"] for e in events if e["ph"] == "M"} == {"maia100", "maia200"}


def test_simulate_plots(tmp_path, capsys):
    pytest.importorskip("matplotlib")  # the bench extra: in .venv-vllm, not .venv-sglang
    plot = tmp_path / "run.png"
    assert main([*SIMULATE, "--device", "maia100", "maia200", "--plot", str(plot)]) == 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_simulate_stores_the_weights_in_the_weight_dtype(capsys):
    tpot = {}
    for dtype in ("auto", "fp8"):
        assert main([*SIMULATE, "--device", "maia200", "--weight-dtype", dtype, "--json"]) == 0
        tpot[dtype] = json.loads(capsys.readouterr().out)[0]["tpot_ms"]["mean"]
    assert tpot["fp8"] < tpot["auto"]  # decode reads half the weight bytes
    assert main([*SIMULATE, "--device", "maia200", "--weight-dtype", "fp7"]) == 2
    assert "unknown dtype 'fp7'" in capsys.readouterr().err


def test_device_is_kept_as_the_old_spelling_of_profile(capsys):
    assert main(["fit", "--model", "llama-3-8b", "--device", "maia200", "--json"]) == 0
    assert '"profile": "maia200"' in capsys.readouterr().out


FIT_MXFP4 = ["fit", "--model", "llama-3-8b", "--profile", "maia100", "--kv-cache-dtype", "mxfp4"]


def test_fit_shows_an_mxfp4_cache_at_its_stored_size_and_against_bf16(capsys):
    """K and V x 32 layers x 8 heads x 68 bytes (four blocks of 32 E2M1 values and their E8M0 scales) = 34,816
    bytes a token; Maia 100's 43,810,178,662.4-byte KV budget holds 78,645 blocks of 16 of them: 3.76x BF16's."""
    assert main(FIT_MXFP4) == 0
    out = capsys.readouterr().out
    assert "KV per token (mxfp4, 4.25 bits a value)  34.00 KiB" in out
    assert (
        "KV cache: 78645 blocks of 16 = 1258320 tokens (3.76x the 334240 tokens of a bfloat16 cache); "
        "153 concurrent sequences of 8192 tokens."
    ) in out
    assert main([*FIT_MXFP4, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["kv_bytes_per_token"], data["kv_tokens"]) == (2 * 32 * 8 * 68, 1_258_320)
    assert main(["fit", "--model", "llama-3-8b", "--profile", "maia100"]) == 0
    out = capsys.readouterr().out  # the model's own dtype: nothing to compare with
    assert "KV per token (auto, 16 bits a value)" in out and "KV cache: 20890 blocks of 16 = 334240 tokens; " in out


def test_simulate_serves_an_mxfp4_cache_and_shows_its_capacity(capsys):
    assert main([*SIMULATE, "--device", "maia100", "--kv-cache-dtype", "mxfp4", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert (row["kv_cache_blocks"], row["kv_cache_tokens"], row["kv_bytes_per_token"]) == (78_645, 1_258_320, 34_816)
    assert main([*SIMULATE, "--device", "maia100", "--kv-cache-dtype", "mxfp4"]) == 0
    out = capsys.readouterr().out
    assert "kv=mxfp4" in out and "maia100: KV cache of 1258320 tokens at 34.00 KiB per token (mxfp4)" in out
    tpot = {}
    for kv in ("auto", "mxfp4"):
        assert main([*SIMULATE, "--device", "maia100", "--kv-cache-dtype", kv, "--json"]) == 0
        tpot[kv] = json.loads(capsys.readouterr().out)[0]["tpot_ms"]["mean"]
    assert tpot["mxfp4"] < tpot["auto"]  # decode reads a quarter of the KV bytes


@pytest.mark.parametrize("command", ["fit", "simulate"])
@pytest.mark.parametrize("kv", ["mxfp5", "mx4", "int4"])
def test_an_unknown_kv_format_lists_the_choices(capsys, command, kv):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--model", "llama-3-8b", "--profile", "maia100", "--kv-cache-dtype", kv])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"argument --kv-cache-dtype: invalid choice: '{kv}' (choose from 'auto', 'fp32', " in err
    assert "'fp8_e5m2', 'e5m2', 'float8_e5m2', 'mxfp8', 'mxfp6', 'mxfp6_e2m3', 'mxfp4', 'nvfp4')" in err


def test_simulate_prices_the_collectives_in_the_comm_dtype(capsys):
    """--comm-dtype fp8 on a tensor-parallel layout: the same run, less time in communication."""
    args = [
        "simulate",
        "--model",
        "llama-3-8b",
        "--profile",
        "maia100",
        "-tp",
        "4",
        "--num-prompts",
        "8",
        "--input-len",
        "256",
        "--output-len",
        "16",
        "--json",
    ]
    runs = {}
    for comm in ("auto", "fp8"):
        assert main([*args, "--comm-dtype", comm]) == 0
        runs[comm] = json.loads(capsys.readouterr().out)[0]
    assert runs["fp8"]["output_throughput_tok_s"] > runs["auto"]["output_throughput_tok_s"]
    assert main([*args, "--comm-dtype", "fp9"]) != 0
