"""The maia-serving CLI: exit codes and what it prints."""

import json

from maia_serving.cli.main import main


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
    assert "DOES NOT FIT: short by 88.91 GB" in out and "--tensor-parallel-size 4" in out
    assert main(["fit", "--model", "llama-3-70b", "--device", "maia100", "--tensor-parallel-size", "4"]) == 0
    assert "FITS" in capsys.readouterr().out


def test_fit_json(capsys):
    assert main(["fit", "--model", "llama-3-8b", "--profile", "maia200", "--kv-cache-dtype", "fp8", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["fits"] and data["kv_bytes_per_token"] == 2 * 32 * 8 * 128


def test_fit_reads_a_model_directory(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({
        "hidden_size": 64, "num_attention_heads": 2, "num_hidden_layers": 1,
        "intermediate_size": 128, "vocab_size": 100, "torch_dtype": "float32"}))
    assert main(["fit", "--model", str(tmp_path), "--profile", "maia100"]) == 0


def test_bad_input_gets_a_clear_error(capsys):
    assert main(["fit", "--model", "llama-3-8b", "--profile", "maia300"]) == 2
    assert "unknown device profile 'maia300'" in capsys.readouterr().err
    assert main(["fit", "--model", "no-such-model", "--profile", "maia100"]) == 2
    assert "built-in shapes" in capsys.readouterr().err


def test_simulate_orders_devices_by_bandwidth_for_decode(capsys):
    assert main(["simulate", "--model", "llama-3-8b", "--device", "maia100", "maia200", "h100-sxm",
                 "--num-seqs", "1", "--prompt-len", "128", "--output-len", "16", "--json"]) == 0
    res = {r["profile"]: r for r in json.loads(capsys.readouterr().out)}
    assert res["maia200"]["tpot_s"] < res["h100-sxm"]["tpot_s"] < res["maia100"]["tpot_s"]
    assert res["maia100"]["decode_bound"] == "memory"


def test_device_is_kept_as_the_old_spelling_of_profile(capsys):
    assert main(["fit", "--model", "llama-3-8b", "--device", "maia200", "--json"]) == 0
    assert '"profile": "maia200"' in capsys.readouterr().out
