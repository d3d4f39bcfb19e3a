"""Model directories are written all at once or not at all, and never merged into."""

import pytest

from maia_serving.cli.main import main
from maia_serving.tools.outdir import output_dir


def test_a_fresh_directory_appears_only_when_complete(tmp_path):
    out = tmp_path / "model"
    with output_dir(out) as work:
        (work / "config.json").write_text("{}")
        assert not out.exists()
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temporary folder left


def test_a_non_empty_directory_is_refused_and_left_alone(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "config.json").write_text("mine")
    with pytest.raises(FileExistsError, match="is not empty.*--overwrite"), output_dir(out):
        pass
    assert (out / "config.json").read_text() == "mine"


def test_overwrite_replaces_whole_never_merges(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "stale.bin").write_text("old")
    with output_dir(out, overwrite=True) as work:
        (work / "config.json").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_a_failed_run_leaves_nothing_half_written(tmp_path):
    out = tmp_path / "model"
    with pytest.raises(RuntimeError), output_dir(out) as work:
        (work / "model.safetensors").write_text("half")
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_an_empty_directory_is_fine(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    with output_dir(out) as work:
        (work / "a").write_text("x")
    assert (out / "a").exists()


def test_calibrate_kv_refuses_a_non_empty_out_before_any_work(tmp_path, capsys, demo_model):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("keep me")
    data = tmp_path / "data.txt"
    data.write_text("x = 1\n" * 50)
    code = main(["calibrate-kv", "--model", str(demo_model), "--data", str(data), "--out", str(out)])
    assert code == 2
    assert "is not empty" in capsys.readouterr().err
    assert (out / "config.json").read_text() == "keep me"
