"""The serving front end: fitted by `calibrate-host --server`, loaded with the profile, refused with a reason."""

import json

import pytest

from maia_serving.cli.main import main
from maia_serving.emulator.hardware import FrontEnd, load_profile, profile_from_dict
from maia_serving.tools.calibrate_host import FrontEndSample, FrontEndTiming, fit_front_end, with_front_end


def test_the_fit_is_the_median_sample_per_length_less_the_first_tokens_way_back():
    """Lone requests of 16 and 416 prompt tokens whose median front-end times are 6.3 and 10.3 ms, with 0.2 ms a
    step and 0.1 ms a token out: 6.0 and 10.0 ms in, so 10 us a prompt token (4 ms / 400) and 5.84 ms fixed
    (6.0 - 16 x 0.01); a faster and a slower sample of each length and the engine's own time do not move it."""
    samples = (
        FrontEndSample(16, 0.0263, 0.020),
        FrontEndSample(16, 0.0213, 0.020),
        FrontEndSample(16, 0.0400, 0.020),
        FrontEndSample(416, 0.0603, 0.050),
        FrontEndSample(416, 0.0503, 0.050),
        FrontEndSample(416, 0.0703, 0.050),
    )
    front = fit_front_end(FrontEndTiming(samples, 1e-4, 2e-4))
    assert front.per_input_token_s == pytest.approx(10e-6, rel=1e-9)
    assert front.fixed_s == pytest.approx(5.84e-3, rel=1e-9)
    assert (front.per_output_token_s, front.per_step_s) == (1e-4, 2e-4)
    assert front.of(100) == pytest.approx(6.84e-3, rel=1e-9)


def test_the_fit_has_no_negative_term_and_needs_two_lengths():
    shrinking = (FrontEndSample(16, 0.030, 0.020), FrontEndSample(416, 0.055, 0.050))  # 10 ms, then 5 ms
    front = fit_front_end(FrontEndTiming(shrinking, None))
    assert front.per_input_token_s == 0.0 and front.fixed_s > 0
    with pytest.raises(ValueError, match="at least two prompt lengths"):
        fit_front_end(FrontEndTiming(shrinking[:1], None))


def test_the_measured_figures_load_into_the_host_profile(host_raw):
    front = FrontEnd(4e-3, 7e-6, 1.1e-4, 9.9e-4)
    profile = profile_from_dict(with_front_end(host_raw, front, "measured"))
    assert profile.front_end.fixed_s == pytest.approx(4e-3)
    assert profile.front_end.per_input_token_s == pytest.approx(7e-6)
    assert profile.front_end.per_output_token_s == pytest.approx(1.1e-4)
    assert profile.front_end.per_step_s == pytest.approx(9.9e-4)
    assert profile.sources["request_overhead"] == "measured"
    assert profile_from_dict(host_raw).front_end == FrontEnd()


def test_the_built_in_profiles_carry_blis_published_front_end():
    """3.70 ms + 3.51 us a prompt token (BLIS's median H100 fit), with its source, on every built-in profile;
    the Maia ones marked as our estimate (the same vLLM front end assumed)."""
    for name in ("h100-sxm", "h200", "maia100", "maia200"):
        profile = load_profile(name)
        front = profile.front_end
        assert (front.fixed_s, front.per_input_token_s) == pytest.approx((3.70e-3, 3.51e-6), rel=1e-12)
        assert (front.per_output_token_s, front.per_step_s) == (0.0, 0.0)
        assert "inference-sim" in profile.sources["request_overhead"]
        assert ("request_overhead" in profile.estimates) is name.startswith("maia")


def test_calibrate_host_against_no_server_says_so_and_leaves_the_profile(tmp_path, capsys):
    out = tmp_path / "host.yaml"
    out.write_text("kept: true\n")
    assert main(["calibrate-host", "--out", str(out), "--server", "http://127.0.0.1:9", "--served-model", "m"]) == 2
    err = capsys.readouterr().err
    assert "--server http://127.0.0.1:9" in err and "was not changed" in err
    assert out.read_text() == "kept: true\n"


def test_simulate_front_end_host_without_measured_figures_says_how_to_measure(host_raw, tmp_path, monkeypatch, capsys):
    from maia_serving.tools.calibrate_host import write_profile

    monkeypatch.setenv("MAIA_SERVING_CACHE_DIR", str(tmp_path))
    write_profile(tmp_path / "host.yaml", host_raw)
    argv = ["simulate", "--model", "llama-3-8b", "--device", "maia100", "--front-end", "host", "--json"]
    assert main(argv) == 2
    assert "calibrate-host --server URL" in capsys.readouterr().err
    write_profile(tmp_path / "host.yaml", with_front_end(host_raw, FrontEnd(0.05, 0.0), "measured"))
    assert main(argv) == 0
    (row,) = json.loads(capsys.readouterr().out)
    # 8 requests sent at once through one worker of 50 ms each: 50, 100, ... 400 ms in, a mean of 225 ms
    assert row["ttft_front_end_ms"]["mean"] == pytest.approx(225.0, rel=1e-9)


def test_simulate_replays_tensorrt_llms_admission(capsys):
    """Sixteen requests of 2,000 + 2,000 tokens on a KV cache cut to 5% of memory: vLLM's policy admits more of
    them at once than TensorRT-LLM's, which reserves each one's 4,000 tokens up front, and preempts; the latter
    never does."""
    base = ["simulate", "--model", "llama-3-8b", "--device", "h100-sxm", "--num-prompts", "16", "--json"]
    base += ["--input-len", "2000", "--output-len", "2000", "--gpu-memory-utilization", "0.26"]
    assert main([*base, "--scheduler-policy", "trtllm-no-evict"]) == 0
    (trt,) = json.loads(capsys.readouterr().out)
    assert main(base) == 0
    (vllm,) = json.loads(capsys.readouterr().out)
    assert trt["num_preemptions"] == 0
    assert trt["ttft_ms"]["mean"] > vllm["ttft_ms"]["mean"]
