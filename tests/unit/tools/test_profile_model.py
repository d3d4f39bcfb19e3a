"""`maia-serving profile`: a model run once on maia, priced on each profile; what a user reads and what a
script reads (--json), and the errors a user meets."""

import json
from dataclasses import replace

import pytest
import torch

from maia_serving.cli.main import main
from maia_serving.emulator.hardware import load_profile

KEYS = {
    "profile",
    "fits",
    "error",
    "latency_ms",
    "throughput_per_s",
    "peak_memory_bytes",
    "hbm_bytes",
    "flops",
    "bytes",
    "top_ops",
    "where",
    "fp8_error",
}


def _profile(capsys, *argv: str) -> tuple[int, str, str]:
    status = main(["profile", *argv])
    out = capsys.readouterr()
    return status, out.out, out.err


def test_json_one_object_per_profile_priced_on_each(capsys):
    status, out, _ = _profile(
        capsys, "--model", "llama-tiny", "--input-shape", "16", "--profile", "maia100", "h100-sxm", "--json"
    )
    assert status == 0
    reports = json.loads(out)
    assert [r["profile"] for r in reports] == ["maia100", "h100-sxm"]
    for r in reports:
        assert set(r) == KEYS
        assert r["fits"] and r["error"] is None
        assert r["throughput_per_s"] == pytest.approx(1 / (r["latency_ms"] / 1e3))
        assert set(r["top_ops"][0]) == {"op", "calls", "time_ms", "share", "bound"}
        assert sum(t["share"] for t in r["top_ops"]) <= 1 + 1e-9
        lead = r["top_ops"][0]
        assert r["where"].startswith(f"{lead['op'].removeprefix('aten::').partition('.')[0]} {lead['share']:.0%} (")
    # One run, so the same operators, shapes and memory; the prices are each profile's own.
    maia, h100 = reports
    assert maia["flops"] == h100["flops"] > 0 and maia["peak_memory_bytes"] == h100["peak_memory_bytes"] > 0
    assert maia["latency_ms"] != h100["latency_ms"]


def test_the_table_says_where_the_time_goes(capsys):
    status, out, err = _profile(capsys, "--model", "yolov8n", "--input-shape", "64", "--profile", "maia200")
    assert status == 0
    assert "building yolov8n" in err and "running it once on maia" in err
    assert "yolov8n, batch 1 (images), bf16, one forward:" in out
    assert "aten::convolution" in out and "216.00 GiB" in out


def test_a_training_step_holds_gradients_and_optimizer_state(capsys):
    _, forward, _ = _profile(capsys, "--model", "llama-tiny", "--input-shape", "16", "--profile", "maia100", "--json")
    _, train, _ = _profile(
        capsys, "--model", "llama-tiny", "--input-shape", "16", "--profile", "maia100", "--json", "--train"
    )
    forward, train = json.loads(forward)[0], json.loads(train)[0]
    # AdamW's two moments and the gradients: four copies of the weights, at least, at the peak.
    assert train["peak_memory_bytes"] > 3 * forward["peak_memory_bytes"]
    assert train["flops"] > 2.5 * forward["flops"]  # backward is about twice the forward


def test_a_model_that_does_not_fit_says_what_it_needs_and_what_to_try():
    """Priced on a Maia 100 whose chip holds 1 MiB: the peak is larger; a smaller batch is the advice."""
    from maia_serving.tools import profile_model as tool
    from maia_serving.zoo import builtin

    tiny = replace(load_profile("maia100"), hbm_capacity_bytes=float(2**20))
    with tool.measuring_node(load_profile("maia100")):
        measured = tool.measure(builtin("vit-tiny-16").build(8, 32), torch.float32)
    report = tool.report(measured, tiny, "fp32")
    assert not report.fits
    assert "needs" in report.error and "1.00 MiB" in report.error
    assert "the weights alone do not fit" in report.error and "--dtype bf16" in report.error


def test_a_callable_that_raises_is_a_clear_error_and_nothing_is_written(capsys, tmp_path, monkeypatch):
    (tmp_path / "broken_model.py").write_text("def build():\n    raise RuntimeError('no weights here')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    trace = tmp_path / "trace.json"
    status, out, err = _profile(capsys, "--model", "broken_model:build", "--trace", str(trace))
    assert status == 2
    assert "build() raised RuntimeError: no weights here" in err
    assert not trace.exists() and out == ""


def test_a_callable_that_returns_something_else_is_named(capsys, tmp_path, monkeypatch):
    (tmp_path / "odd_model.py").write_text("def build():\n    return 42\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    status, _, err = _profile(capsys, "--model", "odd_model:build")
    assert status == 2 and "must return (nn.Module, example input), not int" in err


def test_a_module_callable_is_run_as_given(capsys, tmp_path, monkeypatch):
    (tmp_path / "my_mlp.py").write_text(
        "import torch\n"
        "def build():\n"
        "    return torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 8)), "
        "torch.randn(4, 64)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    status, out, _ = _profile(capsys, "--model", "my_mlp:build", "--profile", "maia100", "--json")
    assert status == 0
    report = json.loads(out)[0]
    ops = {t["op"] for t in report["top_ops"]}
    assert "aten::addmm.out" in ops
    # Two GEMMs: 2 * 4 * (64 * 256 + 256 * 8) FLOPs.
    assert report["flops"] == 2 * 4 * (64 * 256 + 256 * 8)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--model", "yolov9"], "unknown model 'yolov9'"),
        (["--model", "yolov8n", "--batch-size", "0"], "--batch-size 0: at least 1"),
        (["--model", "yolov8n", "--profile", "maia300"], "maia300"),
        (["--model", "no_such_module:build"], "cannot import 'build' from 'no_such_module'"),
    ],
)
def test_bad_input_is_exit_2_with_what_was_wrong(capsys, argv, message):
    status, out, err = _profile(capsys, *argv)
    assert status == 2 and message in err and out == ""


def test_the_help_names_every_built_in_model(capsys, monkeypatch):
    """--help lists the built-ins without importing torch (the CLI starts in a fraction of a second)."""
    from maia_serving import zoo

    monkeypatch.setenv("COLUMNS", "400")  # argparse would wrap a name at its hyphen
    with pytest.raises(SystemExit):
        main(["profile", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert all(name in text for name in zoo.names()), zoo.names()
