"""Every setting is parsed by name: a bad value says which variable, what it was and what is
allowed; the README lists every user-facing one."""

from pathlib import Path

import pytest

from maia_serving import envs

README = Path(__file__).resolve().parents[2] / "README.md"

BAD = [
    ("MAIA_SERVING_LOG_INTERVAL_S", "often", "not a number"),
    ("MAIA_SERVING_LOG_INTERVAL_S", "-1", "out of range"),
    ("MAIA_SERVING_LOG_INTERVAL_S", "nan", "out of range"),
    ("MAIA_SERVING_HOST_KV_GIB", "inf", "out of range"),
    ("MAIA_SERVING_HOST_KV_GIB", "-1", "out of range"),
    ("MAIA_SERVING_HOST_KV_GIB", "1e30", "out of range"),
    ("VLLM_CPU_KVCACHE_SPACE", "1.5", "not an integer"),
    ("VLLM_CPU_KVCACHE_SPACE", "0", "out of range"),
    ("MAIA_SERVING_ATTENTION", "flash", "not one of 'maia', 'vllm-cpu'"),
    ("MAIA_SERVING_KV_SCALES", "per_channel", "not one of"),
    ("MAIA_SERVING_KERNELS", "cuda", "not one of"),
    ("MAIA_SERVING_DEVICE", "tpu", "not one of 'maia'"),
    ("MAIA_SERVING_STATS_ADDR", "tcp://0.0.0.0:5555", "not an ipc:// address"),
    ("MAIA_SERVING_STATS_ADDR", "ipc:///tmp/stats.sock", "not private"),
]


@pytest.mark.parametrize("name,value,why", BAD)
def test_a_bad_value_names_the_variable_the_value_and_what_is_allowed(monkeypatch, name, value, why):
    monkeypatch.setenv(name, value)
    with pytest.raises(envs.SettingError) as err:
        envs.get(name)
    msg = str(err.value)
    assert f"{name}={value!r}" in msg and why in msg and envs.SETTINGS[name].allowed in msg


@pytest.mark.parametrize(
    "name,value,parsed",
    [
        ("MAIA_SERVING_LOG_INTERVAL_S", " 2.5 ", 2.5),
        ("MAIA_SERVING_HOST_KV_GIB", "0.5", 0.5),
        ("VLLM_CPU_KVCACHE_SPACE", "4", 4),
        ("MAIA_SERVING_ATTENTION", "VLLM-CPU", "vllm-cpu"),
        ("MAIA_SERVING_PROFILE", "", envs.DEFAULT_PROFILE),
        ("MAIA_SERVING_LOG_INTERVAL_S", "", 10.0),
        ("MAIA_SERVING_LOG_INTERVAL_S", "0", 0.0),
    ],
)
def test_good_values_and_defaults(monkeypatch, name, value, parsed):
    monkeypatch.setenv(name, value)
    assert envs.get(name) == parsed


def test_check_all_names_every_bad_variable_of_the_engine(monkeypatch):
    monkeypatch.setenv("MAIA_SERVING_LOG_INTERVAL_S", "soon")
    monkeypatch.setenv("MAIA_SERVING_HOST_KV_GIB", "inf")
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "lots")
    with pytest.raises(envs.SettingError) as err:
        envs.check_all("sglang")
    assert "MAIA_SERVING_LOG_INTERVAL_S" in str(err.value) and "MAIA_SERVING_HOST_KV_GIB" in str(err.value)
    assert "VLLM_CPU_KVCACHE_SPACE" not in str(err.value)  # vLLM's knob, not SGLang's
    with pytest.raises(envs.SettingError, match="VLLM_CPU_KVCACHE_SPACE"):
        envs.check_all("vllm")


def test_a_private_stats_folder_is_accepted(tmp_path, monkeypatch):
    folder = tmp_path / "private"
    folder.mkdir(mode=0o700)
    monkeypatch.setenv("MAIA_SERVING_STATS_ADDR", f"ipc://{folder}/stats.sock")
    assert envs.get("MAIA_SERVING_STATS_ADDR") == f"ipc://{folder}/stats.sock"


def test_no_module_reads_our_variables_but_envs():
    root = Path(envs.__file__).parent
    offenders = [
        str(p.relative_to(root))
        for p in root.rglob("*.py")
        if p.name != "envs.py" and any(f'"{n}"' in p.read_text() for n in envs.SETTINGS)
    ]
    assert offenders == []


def test_the_readme_lists_every_user_facing_setting():
    text = README.read_text()
    missing = [s.name for s in envs.user_facing() if f"`{s.name}`" not in text]
    assert missing == []


def test_the_readme_settings_table_is_generated_from_the_table():
    text = README.read_text()
    block = text.split("<!-- settings:start -->\n", 1)[1].split("\n<!-- settings:end -->", 1)[0]
    assert block == envs.markdown_table(), (
        "regenerate it: python -c 'from maia_serving import envs; print(envs.markdown_table())'"
    )
