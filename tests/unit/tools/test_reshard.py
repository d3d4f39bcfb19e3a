"""reshard/merge: vLLM's per-rank state dicts cut right, merged back byte for byte, bad input refused by name.

The checkpoints are tiny random Hugging Face models written by transformers itself, so the
tensor names are the library's; the expected rank tensors are computed here from the whole
tensors (padding, chunking, repeating heads), independently of the module's slice plan.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from maia_serving.cli.main import main
from maia_serving.tools.checkpoints import reshard as rs
from maia_serving.tools.checkpoints.reshard import ReshardError, merge, reshard

# vocab 100 pads to 128 (TP 4: 32 rows a rank, the last rank 4 real rows and 28 zero rows).
BASE = dict(
    vocab_size=100,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    head_dim=16,
    max_position_embeddings=128,
)
VARIANTS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=4, tie_word_embeddings=False)),
    "gqa": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=2, tie_word_embeddings=False)),
    "tied": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "mqa-qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_key_value_heads=1, tie_word_embeddings=True)),
    "moe": (
        "MixtralConfig",
        "MixtralForCausalLM",
        dict(num_key_value_heads=2, tie_word_embeddings=False, num_local_experts=4, num_experts_per_tok=2),
    ),
}


def _build(out: Path, variant: str) -> Path:
    import transformers

    config_name, model_name, extra = VARIANTS[variant]
    config = getattr(transformers, config_name)(**BASE, **extra, torch_dtype="bfloat16")
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(config).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    (out / "tokenizer_config.json").write_text('{"model_max_length": 128}\n')
    return out


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {v: _build(root / v, v) for v in VARIANTS}


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _copy_with(src: Path, dst: Path, change) -> Path:
    """A copy of a checkpoint whose tensors ``change(tensors)`` edits in place."""
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    change(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (4, 1), (2, 2), (1, 3)])
def test_merge_of_reshard_is_the_source_byte_for_byte(checkpoints, tmp_path, variant, tp, pp):
    src = checkpoints[variant]
    manifest = reshard(src, tmp_path / "sharded", tp, pp)
    assert merge(tmp_path / "sharded", tmp_path / "merged") == ["model.safetensors"]
    assert _digests(tmp_path / "merged") == _digests(src)
    assert len(manifest["files"]) == tp * pp


def test_an_index_names_the_weight_files(checkpoints, tmp_path):
    """Split over two files with an index, beside a file the index does not name (Mistral's consolidated)."""
    src = shutil.copytree(checkpoints["gqa"], tmp_path / "src")
    tensors = load_file(src / "model.safetensors")
    (src / "model.safetensors").unlink()
    names = sorted(tensors)
    parts = {"model-00001-of-00002.safetensors": names[:20], "model-00002-of-00002.safetensors": names[20:]}
    for file, part in parts.items():
        save_file({n: tensors[n] for n in part}, src / file, metadata={"format": "pt"})
    (src / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {n: f for f, part in parts.items() for n in part}}, indent=2)
    )
    save_file({"layers.0.attention.wq.weight": torch.zeros(2)}, src / "consolidated.safetensors")
    manifest = reshard(src, tmp_path / "sharded", 2)
    assert manifest["source"]["left_out"] == ["consolidated.safetensors"]
    assert merge(tmp_path / "sharded", tmp_path / "merged") == sorted(parts)
    assert _digests(tmp_path / "merged") == {k: v for k, v in _digests(src).items() if k != "consolidated.safetensors"}


def test_tensors_vllm_drops_are_kept_aside_for_merge(checkpoints, tmp_path):
    inv_freq = {f"model.layers.{i}.self_attn.rotary_emb.inv_freq": torch.rand(8) for i in range(3)}  # float32
    src = _copy_with(checkpoints["gqa"], tmp_path / "src", lambda t: t.update(inv_freq))
    reshard(src, tmp_path / "sharded", 2)
    assert sorted(load_file(tmp_path / "sharded" / "maia-reshard-unused.safetensors")) == sorted(inv_freq)
    assert not any("rotary" in n for n in load_file(tmp_path / "sharded" / "model-rank-0-part-0.safetensors"))
    merge(tmp_path / "sharded", tmp_path / "merged")
    assert _digests(tmp_path / "merged") == _digests(src)


def _expected_rank(
    full: dict[str, torch.Tensor], config: dict, tp: int, rank: int, layers: range, first: bool, last: bool
) -> dict[str, torch.Tensor]:
    """vLLM's state dict of one rank, from the whole tensors."""
    heads, kv, hd = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    tied = config["tie_word_embeddings"]

    def vocab(t: torch.Tensor) -> torch.Tensor:
        padded = torch.cat([t, t.new_zeros(-len(t) % 64, t.shape[1])])
        return padded.chunk(tp)[rank]

    def kv_part(t: torch.Tensor) -> torch.Tensor:  # heads repeated until there is one group per rank
        grouped = t.reshape(kv, hd, *t.shape[1:]).repeat_interleave(max(1, tp // kv), 0)
        return grouped.chunk(tp)[rank].reshape(-1, *t.shape[1:])

    out = {}
    if first and not (tied and last):
        out["model.embed_tokens.weight"] = vocab(full["model.embed_tokens.weight"])
    for i in layers:
        p = f"model.layers.{i}."
        a, m = p + "self_attn.", p + "mlp."
        for n in ("input_layernorm.weight", "post_attention_layernorm.weight"):
            out[p + n] = full[p + n]
        for kind in ("weight", "bias"):
            if a + f"q_proj.{kind}" in full:
                out[a + f"qkv_proj.{kind}"] = torch.cat(
                    [
                        full[a + f"q_proj.{kind}"].chunk(tp)[rank],
                        kv_part(full[a + f"k_proj.{kind}"]),
                        kv_part(full[a + f"v_proj.{kind}"]),
                    ]
                )
        assert heads % tp == 0
        out[a + "o_proj.weight"] = full[a + "o_proj.weight"].chunk(tp, dim=1)[rank]
        for s in ("_k_scale", "_v_scale", "_q_scale", "_prob_scale"):
            out[a + "attn." + s] = torch.tensor(1.0)
        if experts := config.get("num_local_experts"):  # vLLM's FusedMoE: [experts, rows, cols] per rank
            moe = p + "block_sparse_moe."
            out[moe + "gate.weight"] = full[moe + "gate.weight"]
            e = [f"{moe}experts.{j}." for j in range(experts)]
            out[moe + "experts.routed_experts.w13_weight"] = torch.stack(
                [torch.cat([full[x + "w1.weight"].chunk(tp)[rank], full[x + "w3.weight"].chunk(tp)[rank]]) for x in e]
            )
            out[moe + "experts.routed_experts.w2_weight"] = torch.stack(
                [full[x + "w2.weight"].chunk(tp, dim=1)[rank] for x in e]
            )
            continue
        out[m + "gate_up_proj.weight"] = torch.cat(
            [full[m + "gate_proj.weight"].chunk(tp)[rank], full[m + "up_proj.weight"].chunk(tp)[rank]]
        )
        out[m + "down_proj.weight"] = full[m + "down_proj.weight"].chunk(tp, dim=1)[rank]
    if last:
        out["model.norm.weight"] = full["model.norm.weight"]
        out["lm_head.weight"] = vocab(full["model.embed_tokens.weight" if tied else "lm_head.weight"])
    return out


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_each_rank_holds_the_slices_vllm_expects(checkpoints, tmp_path, variant, tp):
    src = checkpoints[variant]
    reshard(src, tmp_path / "sharded", tp)
    full = load_file(src / "model.safetensors")
    config = json.loads((src / "config.json").read_text())
    for rank in range(tp):
        got = load_file(tmp_path / "sharded" / f"model-rank-{rank}-part-0.safetensors")
        want = _expected_rank(full, config, tp, rank, range(3), first=True, last=True)
        assert sorted(got) == sorted(want)
        for name, tensor in want.items():
            assert got[name].dtype == tensor.dtype, name
            assert torch.equal(got[name], tensor), name


@pytest.mark.parametrize("variant", ["gqa", "tied"])
def test_pipeline_stages_hold_their_layers_and_ends(checkpoints, tmp_path, variant):
    src = checkpoints[variant]
    manifest = reshard(src, tmp_path / "sharded", 2, 2)
    assert manifest["layout"]["pp_layers"] == [[0, 2], [2, 3]]  # vLLM's split puts the odd layer early
    full = load_file(src / "model.safetensors")
    config = json.loads((src / "config.json").read_text())
    for pp_rank, layers in enumerate([range(0, 2), range(2, 3)]):
        for rank in range(2):
            got = load_file(tmp_path / "sharded" / f"model-pp-{pp_rank}-tp-{rank}-part-0.safetensors")
            want = _expected_rank(full, config, 2, rank, layers, first=pp_rank == 0, last=pp_rank == 1)
            assert sorted(got) == sorted(want)
            assert all(torch.equal(got[n], t) for n, t in want.items())


def test_stage_split_and_tied_key_are_vllms_own():
    pytest.importorskip("vllm")
    from vllm.distributed.utils import get_pp_indices
    from vllm.model_executor.model_loader.sharded_state_loader import ShardedStateLoader

    for layers, pp in [(3, 2), (32, 3), (80, 6), (7, 4), (2, 2)]:
        assert rs.pp_layers(layers, pp) == [get_pp_indices(layers, r, pp) for r in range(pp)]
    shared = torch.zeros(4, 2)
    kept = ShardedStateLoader._filter_subtensors({"model.embed_tokens.weight": shared, "lm_head.weight": shared})
    assert list(kept) == ["lm_head.weight"]


def test_manifest_says_how_each_tensor_was_split(checkpoints, tmp_path):
    manifest = reshard(checkpoints["gqa"], tmp_path / "sharded", 4)
    assert manifest["layout"]["kv_head_replicas"] == 2
    assert (
        manifest["source"]["files"]["model.safetensors"]["sha256"] == _digests(checkpoints["gqa"])["model.safetensors"]
    )
    assert sorted(manifest["source"]["copied"]) == ["config.json", "generation_config.json", "tokenizer_config.json"]
    tensors = {t["name"]: t for t in manifest["files"]["model-rank-3-part-0.safetensors"]["tensors"]}
    qkv = tensors["model.layers.0.self_attn.qkv_proj.weight"]
    assert qkv["split"] == "qkv"
    assert [(p["source"].rsplit(".", 2)[-2], p["start"], p["stop"]) for p in qkv["pieces"]] == [
        ("q_proj", 48, 64),
        ("k_proj", 16, 32),
        ("v_proj", 16, 32),
    ]
    assert tensors["lm_head.weight"]["pad_rows"] == 28


def _no_leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".partial-" in p.name or p.name == "out"]


BAD_INPUTS = {
    "missing": (
        lambda t: t.pop("model.layers.1.mlp.up_proj.weight"),
        "missing tensor model.layers.1.mlp.up_proj.weight",
    ),
    "extra": (
        lambda t: t.update({"model.layers.0.self_attn.q_norm.weight": torch.zeros(16, dtype=torch.bfloat16)}),
        "unexpected tensor model.layers.0.self_attn.q_norm.weight in model.safetensors",
    ),
    "shape": (
        lambda t: t.update({"model.layers.2.self_attn.k_proj.weight": torch.zeros(16, 64, dtype=torch.bfloat16)}),
        r"tensor model.layers.2.self_attn.k_proj.weight has shape \[16, 64\], config.json implies \[32, 64\]",
    ),
    "dtype": (
        lambda t: t.update({"model.norm.weight": t["model.norm.weight"].float()}),
        "mixed dtypes: tensor model.norm.weight is F32, the others BF16",
    ),
}


def test_a_mixtral_missing_an_expert_or_with_a_misshapen_one_is_refused_by_name(checkpoints, tmp_path):
    expert = "model.layers.2.block_sparse_moe.experts.3.w3.weight"
    src = _copy_with(checkpoints["moe"], tmp_path / "gone", lambda t: t.pop(expert))
    with pytest.raises(ReshardError, match=f"missing tensor {expert}"):
        reshard(src, tmp_path / "out", 2)
    src = _copy_with(
        checkpoints["moe"], tmp_path / "wide", lambda t: t.update({expert: torch.zeros(130, 64, dtype=torch.bfloat16)})
    )
    with pytest.raises(ReshardError, match=rf"tensor {expert} has shape \[130, 64\], config.json implies \[128, 64\]"):
        reshard(src, tmp_path / "out", 2)
    assert _no_leftovers(tmp_path) == []


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_checkpoint_is_refused_naming_the_tensor(checkpoints, tmp_path, case):
    change, message = BAD_INPUTS[case]
    src = _copy_with(checkpoints["gqa"], tmp_path / "src", change)
    before = _digests(src)
    with pytest.raises(ReshardError, match=message):
        reshard(src, tmp_path / "out", 2)
    assert _digests(src) == before
    assert _no_leftovers(tmp_path) == []


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_safetensors_is_refused_naming_the_file(checkpoints, tmp_path, damage):
    src = shutil.copytree(checkpoints["llama"], tmp_path / "src")
    weights = src / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x17" * 64)
    with pytest.raises(ReshardError, match="model.safetensors: corrupt"):
        reshard(src, tmp_path / "out", 2)
    assert _no_leftovers(tmp_path) == []


def test_layout_rules_are_vllms(checkpoints, tmp_path):
    with pytest.raises(ReshardError, match="num_attention_heads 4 is not divisible by --tensor-parallel-size 3"):
        reshard(checkpoints["llama"], tmp_path / "out", 3)
    with pytest.raises(ReshardError, match="num_attention_heads 4 is not divisible by --tensor-parallel-size 8"):
        reshard(checkpoints["llama"], tmp_path / "out", 8)
    with pytest.raises(ReshardError, match="--pipeline-parallel-size 4 exceeds num_hidden_layers 3"):
        reshard(checkpoints["llama"], tmp_path / "out", 1, 4)
    arch = rs.read_arch(
        {"architectures": ["LlamaForCausalLM"], **BASE, "num_attention_heads": 6, "num_key_value_heads": 4}
    )
    with pytest.raises(ReshardError, match="num_key_value_heads 4 and --tensor-parallel-size 3"):
        rs.check_layout(arch, 3, 1)
    with pytest.raises(
        ReshardError,
        match="architectures .*DeepseekV2ForCausalLM.* not supported; reshard knows "
        "LlamaForCausalLM, .*MixtralForCausalLM",
    ):
        rs.read_arch({"architectures": ["DeepseekV2ForCausalLM"]})


def test_existing_output_and_overlap_are_refused(checkpoints, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="is not empty"):
        reshard(checkpoints["llama"], out, 2)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    with pytest.raises(ReshardError, match="overlaps the source"):
        reshard(checkpoints["llama"], checkpoints["llama"] / "sharded", 2)


def test_a_run_failing_midway_leaves_nothing(checkpoints, tmp_path, monkeypatch):
    calls = []

    def fail_on_third(t, source):
        calls.append(t.name)
        if len(calls) == 3:
            raise OSError("disk full")
        return real(t, source)

    real = rs._materialize
    monkeypatch.setattr(rs, "_materialize", fail_on_third)
    with pytest.raises(OSError, match="disk full"):
        reshard(checkpoints["llama"], tmp_path / "out", 2)
    assert list(tmp_path.iterdir()) == []


def test_merge_refuses_a_tampered_shard_and_a_plain_checkpoint(checkpoints, tmp_path):
    reshard(checkpoints["llama"], tmp_path / "sharded", 2)
    shard = tmp_path / "sharded" / "model-rank-1-part-0.safetensors"
    tensors = load_file(shard)
    tensors["model.layers.0.mlp.down_proj.weight"][0, 0] += 1
    save_file(tensors, shard)
    with pytest.raises(ReshardError, match="model-rank-1-part-0.safetensors is missing or differs from the sha256"):
        merge(tmp_path / "sharded", tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    with pytest.raises(ReshardError, match="no maia-reshard.json; not written by `maia-serving reshard`"):
        merge(checkpoints["llama"], tmp_path / "merged")


def test_a_missing_tensor_list_names_the_first_few(checkpoints, tmp_path):
    def drop_layer_2(tensors):
        for name in [n for n in tensors if n.startswith("model.layers.2.")]:
            del tensors[name]

    src = _copy_with(checkpoints["llama"], tmp_path / "src", drop_layer_2)
    with pytest.raises(ReshardError, match=r"missing tensor model.layers.2.input_layernorm.weight, .* and 6 more"):
        reshard(src, tmp_path / "out", 1)


def test_cli_reports_the_tensor(checkpoints, tmp_path, capsys):
    src = _copy_with(checkpoints["llama"], tmp_path / "src", BAD_INPUTS["missing"][0])
    assert main(["reshard", "--model", str(src), "--out", str(tmp_path / "out"), "-tp", "2"]) == 2
    assert "missing tensor model.layers.1.mlp.up_proj.weight" in capsys.readouterr().err
    assert main(["reshard", "--model", str(checkpoints["tied"]), "--out", str(tmp_path / "s"), "-tp", "2"]) == 0
    assert main(["merge", "--model", str(tmp_path / "s"), "--out", str(tmp_path / "m")]) == 0
    assert _digests(tmp_path / "m") == _digests(checkpoints["tied"])


# --- FP8 weights ---------------------------------------------------------------------------

E4M3_STEP = 2.0**-4  # half an E4M3 mantissa step, relative: 3 mantissa bits
E4M3_SUBNORMAL_STEP = 2.0**-10  # half the smallest subnormal (2^-9), in units of the row's scale


def _dequantized(shard: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    return shard[name].float() * shard[name + "_scale"]


@pytest.mark.parametrize("variant,tp", [("gqa", 1), ("gqa", 2), ("gqa", 4), ("mqa-qwen2", 2)])
def test_fp8_ranks_hold_e4m3_weights_and_each_rows_scale(checkpoints, tmp_path, variant, tp):
    """Every linear weight of a rank is E4M3 with a float32 scale per row, the row's largest magnitude over 448
    taken over the whole source row (so the ranks of o_proj and down_proj share them), and dequantizes to the
    BF16 slice within E4M3's rounding; everything else is the unquantized re-shard's."""
    src = checkpoints[variant]
    reshard(src, tmp_path / "plain", tp)
    reshard(src, tmp_path / "fp8", tp, weight_dtype="fp8")
    full = load_file(src / "model.safetensors")
    for rank in range(tp):
        plain = load_file(tmp_path / "plain" / f"model-rank-{rank}-part-0.safetensors")
        fp8 = load_file(tmp_path / "fp8" / f"model-rank-{rank}-part-0.safetensors")
        linear = [n for n in plain if n.endswith("_proj.weight")]
        assert len(linear) == 4 * 3
        for name in linear:
            w, scale = plain[name].float(), fp8[name + "_scale"]
            assert fp8[name].dtype == torch.float8_e4m3fn and scale.dtype == torch.float32
            assert scale.shape == (w.shape[0], 1)
            error = (_dequantized(fp8, name) - w).abs()
            assert (error <= w.abs() * E4M3_STEP + scale * E4M3_SUBNORMAL_STEP).all(), name
            if name.endswith(("o_proj.weight", "down_proj.weight")):  # row-parallel: scales of whole rows
                source = full[name].float()
                assert torch.equal(scale, source.abs().amax(1, keepdim=True) / 448), name
                assert fp8[name].float().abs().amax() <= 448
            else:
                assert torch.equal(fp8[name].float().abs().amax(1), torch.full((w.shape[0],), 448.0)), name
        others = {n for n in fp8 if not n.endswith(("_proj.weight", "_proj.weight_scale"))}
        assert {n for n in plain if not n.endswith("_proj.weight")} <= others
        for name in others:
            if name in plain:
                assert torch.equal(fp8[name], plain[name]), name
            else:  # compressed-tensors' attention parameters, at their defaults
                assert name.rsplit(".", 1)[1] in (
                    "k_scale",
                    "v_scale",
                    "q_scale",
                    "k_zero_point",
                    "v_zero_point",
                    "q_zero_point",
                ), name
                assert fp8[name].tolist() == [0.0 if "zero_point" in name else 1.0], name
    config = json.loads((tmp_path / "fp8" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    assert config["quantization_config"]["config_groups"]["group_0"]["weights"]["strategy"] == "channel"
    manifest = json.loads((tmp_path / "fp8" / rs.MANIFEST).read_text())
    assert manifest["layout"]["weight_dtype"] == "fp8"


def test_fp8_scales_by_hand():
    """A row [448, -1, 0.3] has scale 1: 0.3 rounds to 0.3125 (E4M3 steps of 1/32 between 0.25 and 0.5); a row
    of zeros keeps its zeros; 1e6 saturates no E4M3 value once divided by its own scale."""
    rows = torch.tensor([[448.0, -1.0, 0.3], [0.0, 0.0, 0.0], [1e6, 5e5, -1e6]])
    scales = rs.channel_scales(rows)
    assert scales[0].item() == 1.0 and scales[1].item() > 0 and scales[2].item() == pytest.approx(1e6 / 448)
    q = rs.quantize_fp8(rows, scales).float()
    assert q[0].tolist() == [448.0, -1.0, 0.3125]
    assert q[1].tolist() == [0.0, 0.0, 0.0]
    assert q[2].tolist() == [448.0, 224.0, -448.0]


def test_fp8_refusals_name_what_to_do(checkpoints, tmp_path):
    reshard(checkpoints["gqa"], tmp_path / "fp8", 2, weight_dtype="fp8")
    with pytest.raises(ReshardError, match="re-sharded with --weight-dtype fp8, which rounds the weights"):
        merge(tmp_path / "fp8", tmp_path / "merged")
    with pytest.raises(ReshardError, match="--weight-dtype 'int4' not supported; reshard takes auto, fp8"):
        reshard(checkpoints["gqa"], tmp_path / "int4", 2, weight_dtype="int4")
    with pytest.raises(ReshardError, match="a Mixtral's experts .* re-shard it without --weight-dtype"):
        reshard(checkpoints["moe"], tmp_path / "moe", 2, weight_dtype="fp8")
    with pytest.raises(ReshardError, match="already has a quantization_config \\(compressed-tensors\\)"):
        reshard(tmp_path / "fp8", tmp_path / "twice", 1, weight_dtype="fp8")
    bad = "model.layers.1.self_attn.o_proj.weight"
    src = _copy_with(checkpoints["gqa"], tmp_path / "inf", lambda t: t[bad].__setitem__((3, 5), float("inf")))
    with pytest.raises(ReshardError, match=f"tensor {bad} holds non-finite values"):
        reshard(src, tmp_path / "out", 2, weight_dtype="fp8")
    assert _no_leftovers(tmp_path) == []
    assert not (tmp_path / "int4").exists() and not (tmp_path / "merged").exists()
