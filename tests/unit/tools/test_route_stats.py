"""``maia-serving route-stats``: the experts a MoE checkpoint's routers choose, counted on text, as the
``--expert-load`` file ``simulate`` prices; checked against the router's own choices."""

import json
import shutil

import pytest
import torch

from maia_serving.cli.main import main
from maia_serving.emulator import load_model_shape
from maia_serving.emulator.model_shape import with_expert_load
from maia_serving.tools.checkpoints.route_stats import route_counts
from maia_serving.tools.training.tokenizer import stdlib_files


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    """Two stdlib sources as the text to route (every machine has them)."""
    folder = tmp_path_factory.mktemp("route-text")
    files = []
    for src in sorted(stdlib_files())[:2]:
        files.append(folder / src.name)
        shutil.copyfile(src, files[-1])
    return files


def _routers_own_choices(model_dir, data, tokens):
    """What transformers' Mixtral router modules return as their chosen experts, per layer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from maia_serving.tools.training.qat import data_stream

    stream = data_stream(AutoTokenizer.from_pretrained(model_dir), data)[:tokens]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    routers = [m for m in model.modules() if type(m).__name__ == "MixtralTopKRouter"]
    counts = [torch.zeros(model.config.num_local_experts, dtype=torch.long) for _ in routers]

    def count(i, module, args, out):  # out: (logits, weights, indices); returning None keeps the output
        counts[i].add_(torch.bincount(out[2].flatten(), minlength=len(counts[i])))

    hooks = [r.register_forward_hook(lambda *a, i=i: count(i, *a)) for i, r in enumerate(routers)]
    with torch.no_grad():
        for start in range(0, len(stream), 256):
            model(input_ids=stream[None, start : start + 256], use_cache=False)
    for h in hooks:
        h.remove()
    return [c.tolist() for c in counts]


def test_the_counts_are_the_routers_own_choices(moe_model, text):
    counts = route_counts(moe_model, text, max_tokens=1000, progress=False)
    assert counts["tokens"] == 1000 and counts["top_k"] == 2 and len(counts["layers"]) == 2
    assert all(sum(layer) == 2 * 1000 for layer in counts["layers"])  # every token's two experts
    assert counts["layers"] == _routers_own_choices(moe_model, text, 1000)


def test_route_stats_writes_a_file_simulate_prices(moe_model, text, tmp_path, capsys):
    out = tmp_path / "load.json"
    args = [
        "route-stats",
        "--model",
        str(moe_model),
        "--data",
        *map(str, text),
        "--max-tokens",
        "512",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    assert "--expert-load" in capsys.readouterr().out
    model = with_expert_load(load_model_shape(moe_model), out)
    assert len(model.moe.load.shares) == 2 and model.moe.load.source.startswith("maia-serving route-stats: ")
    assert main(args) == 2  # an existing file is kept
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert json.loads(out.read_text())["tokens"] == 512


def test_route_stats_refuses_what_it_cannot_count(moe_model, demo_model, tmp_path, text):
    with pytest.raises(ValueError, match="has no routed experts"):
        route_counts(demo_model, text, progress=False)
    grouped = tmp_path / "grouped"
    grouped.mkdir()
    config = json.loads((moe_model / "config.json").read_text())
    (grouped / "config.json").write_text(json.dumps({**config, "n_group": 8, "topk_group": 4}))
    with pytest.raises(ValueError, match="chooses by more than its top-k logits"):
        route_counts(grouped, text, progress=False)


def test_the_stream_stops_reading_files_once_it_has_its_tokens(tmp_path):
    """route-stats keeps --max-tokens of --data: the files past them are not tokenized (the default data is a
    million tokens of stdlib sources), and the tokens kept are the full stream's first ones."""
    from maia_serving.tools.training.qat import data_stream

    seen = []

    class Words:
        bos_token_id = 0

        def __call__(self, text, add_special_tokens=False):
            seen.append(text)
            return {"input_ids": [len(w) for w in text.split()]}

    files = [tmp_path / f"{i}.txt" for i in range(3)]
    files[0].write_text("a bb ccc dddd")
    files[1].write_text("ee f")
    files[2].write_text("")  # never read: the empty file is not refused
    assert data_stream(Words(), files, max_tokens=6).tolist() == [0, 1, 2, 3, 4, 0]
    assert seen == ["a bb ccc dddd", "ee f"]
    with pytest.raises(ValueError, match="is empty"):
        data_stream(Words(), files)
