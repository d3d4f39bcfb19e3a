"""Profiles load from data files, with units converted and sources kept."""

import pytest
import yaml

from maia_serving.emulator import UnknownProfileError, load_profile, profile_names
from maia_serving.emulator.hardware import HostProfileMissing, profile_from_dict
from maia_serving.serving.profiles import load_profile as serving_load_profile


def test_builtin_profiles_and_their_figures():
    assert {"maia100", "maia200", "h100-sxm", "h200", "host"} <= set(profile_names())
    m100 = load_profile("maia100")
    assert m100.hbm_capacity_bytes == 64 * 2**30  # HBM "GB" are binary
    assert m100.hbm_bandwidth_bytes_per_s == pytest.approx(1.8e12)
    assert m100.peak_flops("bf16") == pytest.approx(0.8e15)
    assert (m100.peak_flops("mx9"), m100.peak_flops("mx6")) == (pytest.approx(1.5e15), pytest.approx(3e15))
    # 9 of the 12 x 400 GbE ports run the in-server mesh (3 to each peer); 3 go to the scale-out switches.
    assert m100.scale_up.bandwidth_bytes_per_s == pytest.approx(450e9)
    assert m100.scale_out.bandwidth_bytes_per_s == pytest.approx(150e9)
    assert m100.scale_up.chips == 4 and m100.scale_up.topology == "full_mesh"
    m200 = load_profile("maia200")
    assert m200.hbm_capacity_bytes == 216 * 2**30 and m200.hbm_bandwidth_bytes_per_s == pytest.approx(7e12)
    assert m200.peak_flops("fp8") == pytest.approx(5e15)
    assert "peak_compute.bf16" in m200.estimates  # not published: must say so
    h100 = load_profile("h100-sxm")
    assert h100.peak_flops("bf16") == pytest.approx(989e12)
    # "80 GB" and "141 GB" of HBM are binary gigabytes; CUDA reports 81,559 and 143,771 MiB of them.
    assert h100.hbm_capacity_bytes == 81_559 * 2**20 < 80 * 2**30
    assert load_profile("h200").hbm_capacity_bytes == 143_771 * 2**20 < 141 * 2**30


@pytest.mark.parametrize("name", [n for n in profile_names() if n != "host"])
def test_every_figure_has_a_source(name):
    profile = load_profile(name)
    assert all(profile.sources.values())
    assert "hbm_capacity" in profile.sources and "scale_up.bandwidth" in profile.sources
    assert "scale_out.bandwidth" in profile.sources


def test_a_variant_is_the_same_chip_wired_otherwise():
    """h100-sxm@pcie keeps the SXM GPU's compute and HBM, its GPUs talk over PCIe Gen5 x16; @no-nvls is NVSwitch
    without in-switch reduction."""
    sxm, pcie, no_nvls = (load_profile(n) for n in ("h100-sxm", "h100-sxm@pcie", "h100-sxm@no-nvls"))
    assert pcie.name == "h100-sxm@pcie" and pcie.hbm_capacity_bytes == sxm.hbm_capacity_bytes
    assert (pcie.scale_up.topology, pcie.scale_up.bandwidth_bytes_per_s) == ("pcie", 64e9)
    assert sxm.scale_up.in_network_reduction and not no_nvls.scale_up.in_network_reduction
    assert pcie.scale_out == sxm.scale_out
    with pytest.raises(UnknownProfileError, match="no variant 'nvl72'; its variants: no-nvls, pcie"):
        load_profile("h100-sxm@nvl72")


def test_unknown_profile_lists_the_known_ones():
    with pytest.raises(UnknownProfileError, match="known profiles: .*maia100"):
        load_profile("maia300")


def test_figure_without_source_or_unit_is_refused():
    raw = yaml.safe_load(open(load_profile.__globals__["_builtin_dir"]() / "maia100.yaml"))
    raw["hbm_capacity"] = {"value": 64, "unit": "GB"}
    with pytest.raises(ValueError, match="needs value, unit and source"):
        profile_from_dict(raw)
    raw["hbm_capacity"] = {"value": 64, "unit": "gigs", "source": "x"}
    with pytest.raises(ValueError, match="unknown unit"):
        profile_from_dict(raw)


def test_host_profile_is_measured_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("MAIA_SERVING_CACHE_DIR", str(tmp_path))
    with pytest.raises(HostProfileMissing, match="maia-serving calibrate-host"):
        load_profile("host")  # the emulator measures nothing: it imports no torch
    host = serving_load_profile("host")
    assert (tmp_path / "host.yaml").exists()
    assert host.peak_flops("fp32") > 1e9 and host.hbm_bandwidth_bytes_per_s > 1e8
    assert host.hbm_capacity_bytes > 1e9
    # Prefill attention at the serving host attention's measured rate, below the matmul's, with its source.
    assert 0 < host.attention_compute_efficiency < 1
    assert "prefill attention" in host.sources["attention_compute_efficiency"]
