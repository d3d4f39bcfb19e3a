"""Re-sharding a Hugging Face checkpoint into vLLM's ``sharded_state`` layout, and back.

vLLM's ``ShardedStateLoader`` (``load_format="sharded_state"``) builds the model for its
rank and copies each tensor of ``model-rank-{tp}-part-{part}.safetensors`` (with pipeline
parallelism ``model-pp-{pp}-tp-{tp}-part-{part}.safetensors``) into the parameter of the
same name, with no weight loader in between: the files must already hold the vLLM model's
own per-rank state dict. So q/k/v are fused into ``qkv_proj`` (this rank's query heads,
then its KV heads, a KV head repeated on ``tp / kv_heads`` ranks when there are fewer KV
heads than ranks), gate/up into ``gate_up_proj``, o/down are split along their input,
the vocabulary is padded to a multiple of 64 and split in equal row blocks (the padding
rows are zero, as vLLM's embedding loader leaves them), each attention layer carries its
four float32 KV-quantization scales (1.0 without quantization), and tied embeddings are
saved once, as ``lm_head.weight`` (vLLM drops the larger key of two tensors sharing memory).
A pipeline stage holds its layers only (vLLM's default split, ``get_pp_indices``); the
first stage holds ``model.embed_tokens``, the last ``model.norm`` and ``lm_head``. A Mixtral's
experts become vLLM's fused MoE parameters, under ``experts.routed_experts`` as vLLM 0.32 nests
them: ``w13_weight`` ``[experts, 2 * width / tp, hidden]`` (each expert's slice of w1, the gate, then
of w3) and ``w2_weight`` ``[experts, hidden, width / tp]``; its router (``gate``) is whole on every rank.

With ``weight_dtype="fp8"`` the linear layers (fused QKV, o, fused gate-up, down) are stored in FP8 E4M3
with one float32 scale per output channel (``weight_scale`` ``[rows, 1]``: the row's largest magnitude over
448, E4M3's largest finite value, taken over the whole row, so every rank of a row-parallel layer holds the
same scales), and ``config.json`` gains the compressed-tensors ``quantization_config`` that vLLM builds such
layers from (weight-only FP8, channel strategy; embeddings, norms and head stay in the source dtype). Its
attention layers then carry that scheme's KV scales and zero points too, at their defaults (1 and 0). FP8
is lossy, so merge rebuilds only unquantized re-shards.

Everything streams: each output tensor is cut from the source slices it needs and written
at once into a file whose header was computed up front, so memory stays near the largest
tensor. The manifest records the source files' hashes and headers and where every slice
came from, so that ``merge`` rebuilds the source files byte for byte and checks it. Tensors
vLLM drops when loading (the rotary caches of some older checkpoints) go whole into a side
file the loader's pattern does not match, so merge has them too.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import shutil
import struct
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from maia_serving.emulator.cost.layout import stage_layers
from maia_serving.ops.fp8 import FP8_FORMATS
from maia_serving.tools.outdir import output_dir

MANIFEST = "maia-reshard.json"
FORMAT = "maia-serving reshard 1"
INDEX = "model.safetensors.index.json"
VOCAB_PADDING = 64  # vLLM's DEFAULT_VOCAB_PADDING_SIZE
ATTN_SCALES = ("_k_scale", "_v_scale", "_q_scale", "_prob_scale")
# Tensors some checkpoints carry and vLLM drops when loading (AutoWeightsLoader's list): kept aside for merge.
UNUSED_BY_VLLM = ("rotary_pos_emb.inv_freq", "rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")
UNUSED_FILE = "maia-reshard-unused.safetensors"  # outside the loader's file pattern
ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "MixtralForCausalLM")
DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}  # a source's
E4M3 = FP8_FORMATS["e4m3"]
STORED = {**DTYPES, "F8_E4M3": E4M3.torch_dtype}  # what a shard may hold
WEIGHT_DTYPES = ("auto", "fp8")  # auto: the source's dtype
# vLLM's compressed-tensors scheme for FP8 weights with per-channel scales and BF16 activations (W8A16-FP8).
FP8_QUANTIZATION_CONFIG = {
    "quant_method": "compressed-tensors",
    "format": "float-quantized",
    "quantization_status": "compressed",
    "ignore": ["lm_head"],
    "config_groups": {
        "group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True, "dynamic": False},
        }
    },
}
# The attention layers' extra parameters under compressed-tensors (vLLM's CompressedTensorsKVCacheMethod) and
# their values when the checkpoint has none.
CT_ATTN_PARAMS = (
    ("k_scale", "F32", 1.0),
    ("v_scale", "F32", 1.0),
    ("q_scale", "F32", 1.0),
    ("k_zero_point", None, 0.0),
    ("v_zero_point", None, 0.0),
    ("q_zero_point", None, 0.0),
)


class ReshardError(ValueError):
    """A checkpoint or layout that cannot be re-sharded, with the tensor or setting to blame."""


@dataclass(frozen=True)
class Arch:
    """The shape facts of a Llama-family config that decide how each tensor is split."""

    layers: int
    hidden: int
    intermediate: int
    vocab: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    experts: int = 0  # a Mixtral's routed experts per layer, each a gated MLP of ``intermediate``; 0: dense


@dataclass(frozen=True)
class Piece:
    """A slice ``[start, stop)`` along ``dim`` of a source tensor, placed at row ``at`` of an output tensor
    (its leading dimensions flattened: row ``e * R + r`` of an ``[E, R, C]`` tensor is row ``r`` of expert ``e``)."""

    source: str
    dim: int
    start: int
    stop: int
    at: int


@dataclass(frozen=True)
class OutTensor:
    """One tensor of a rank's file: its pieces stacked along dim 0, then ``pad_rows`` zero rows."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    split: str
    pieces: tuple[Piece, ...] = ()
    pad_rows: int = 0
    fp8: str = ""  # "weight": the pieces quantized to E4M3; "scale": their per-row scales; "": as stored
    fill: float = 1.0  # the value of a tensor with no pieces (an attention scale or zero point)


def read_arch(config: dict) -> Arch:
    """The split-relevant fields of a Llama, Mistral, Qwen2 or Mixtral ``config.json``."""
    archs = config.get("architectures") or []
    if not any(a in ARCHITECTURES for a in archs):
        raise ReshardError(f"architectures {archs} not supported; reshard knows {', '.join(ARCHITECTURES)}")
    qwen2 = "Qwen2ForCausalLM" in archs
    heads = config["num_attention_heads"]
    attention_bias = bool(config.get("attention_bias", False))
    return Arch(
        layers=config["num_hidden_layers"],
        hidden=config["hidden_size"],
        intermediate=config["intermediate_size"],
        vocab=config["vocab_size"],
        heads=heads,
        kv_heads=config.get("num_key_value_heads") or heads,
        head_dim=config.get("head_dim") or config["hidden_size"] // heads,
        tied=bool(config.get("tie_word_embeddings", False)),
        qkv_bias=qwen2 or attention_bias,
        o_bias=not qwen2 and attention_bias,
        mlp_bias=bool(config.get("mlp_bias", False)),
        experts=config["num_local_experts"] if "MixtralForCausalLM" in archs else 0,
    )


def padded_vocab(arch: Arch) -> int:
    return -(-arch.vocab // VOCAB_PADDING) * VOCAB_PADDING


def check_layout(arch: Arch, tp: int, pp: int) -> None:
    """Refuse a layout vLLM would refuse (its asserts), naming the rule."""
    if tp < 1 or pp < 1:
        raise ReshardError(f"tensor and pipeline parallel sizes must be >= 1, got {tp} and {pp}")
    if arch.heads % tp:
        raise ReshardError(f"num_attention_heads {arch.heads} is not divisible by --tensor-parallel-size {tp}")
    if arch.kv_heads % tp and tp % arch.kv_heads:
        raise ReshardError(
            f"num_key_value_heads {arch.kv_heads} and --tensor-parallel-size {tp}: neither divides the other"
        )
    if arch.intermediate % tp:
        raise ReshardError(f"intermediate_size {arch.intermediate} is not divisible by --tensor-parallel-size {tp}")
    if padded_vocab(arch) % tp:
        raise ReshardError(f"vocabulary padded to {padded_vocab(arch)} is not divisible by --tensor-parallel-size {tp}")
    if pp > arch.layers:
        raise ReshardError(f"--pipeline-parallel-size {pp} exceeds num_hidden_layers {arch.layers}")


def pp_layers(layers: int, pp: int) -> list[tuple[int, int]]:
    """Each stage's ``[start, end)`` layers as vLLM's ``get_pp_indices`` splits them by default: the split the
    cost model prices (``stage_layers``), as ranges."""
    bounds = list(itertools.accumulate(stage_layers(layers, pp), initial=0))
    return list(zip(bounds, bounds[1:]))


def hf_tensors(arch: Arch) -> dict[str, tuple[int, ...]]:
    """Every tensor name and shape a Hugging Face checkpoint of this config holds."""
    q, kv = arch.heads * arch.head_dim, arch.kv_heads * arch.head_dim
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (arch.vocab, arch.hidden),
        "model.norm.weight": (arch.hidden,),
    }
    if not arch.tied:
        shapes["lm_head.weight"] = (arch.vocab, arch.hidden)
    for i in range(arch.layers):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "input_layernorm.weight": (arch.hidden,),
                p + "post_attention_layernorm.weight": (arch.hidden,),
                p + "self_attn.q_proj.weight": (q, arch.hidden),
                p + "self_attn.k_proj.weight": (kv, arch.hidden),
                p + "self_attn.v_proj.weight": (kv, arch.hidden),
                p + "self_attn.o_proj.weight": (arch.hidden, q),
            }
        )
        shapes.update(_hf_mlp(arch, p))
        if arch.qkv_bias:
            shapes.update(
                {
                    p + "self_attn.q_proj.bias": (q,),
                    p + "self_attn.k_proj.bias": (kv,),
                    p + "self_attn.v_proj.bias": (kv,),
                }
            )
        if arch.o_bias:
            shapes[p + "self_attn.o_proj.bias"] = (arch.hidden,)
        if arch.mlp_bias:
            shapes.update(
                {
                    p + "mlp.gate_proj.bias": (arch.intermediate,),
                    p + "mlp.up_proj.bias": (arch.intermediate,),
                    p + "mlp.down_proj.bias": (arch.hidden,),
                }
            )
    return shapes


def _hf_mlp(arch: Arch, p: str) -> dict[str, tuple[int, ...]]:
    """One layer's MLP tensors: a gated MLP, or a Mixtral's router and experts."""
    ff, h = arch.intermediate, arch.hidden
    if not arch.experts:
        return {
            p + "mlp.gate_proj.weight": (ff, h),
            p + "mlp.up_proj.weight": (ff, h),
            p + "mlp.down_proj.weight": (h, ff),
        }
    moe = p + "block_sparse_moe."
    shapes = {moe + "gate.weight": (arch.experts, h)}
    for e in range(arch.experts):
        shapes.update(
            {
                f"{moe}experts.{e}.w1.weight": (ff, h),
                f"{moe}experts.{e}.w2.weight": (h, ff),
                f"{moe}experts.{e}.w3.weight": (ff, h),
            }
        )
    return shapes


def _expert_tensors(arch: Arch, p: str, tp: int, rank: int, dtype: str) -> list[OutTensor]:
    """A Mixtral layer's router, whole, and its experts as vLLM's FusedMoE holds them on TP rank ``rank``."""
    moe, ff, e_all = p + "block_sparse_moe.", arch.intermediate // tp, range(arch.experts)
    fused = moe + "experts.routed_experts."
    gate = OutTensor(
        moe + "gate.weight",
        (arch.experts, arch.hidden),
        dtype,
        "replicated",
        (Piece(moe + "gate.weight", 0, 0, arch.experts, 0),),
    )
    w13 = _stacked(
        fused + "w13_weight",
        "gate_up per expert",
        dtype,
        [(f"{moe}experts.{e}.{w}.weight", rank * ff, (rank + 1) * ff) for e in e_all for w in ("w1", "w3")],
        (arch.hidden,),
    )
    w2 = tuple(Piece(f"{moe}experts.{e}.w2.weight", 1, rank * ff, (rank + 1) * ff, e * arch.hidden) for e in e_all)
    return [
        gate,
        replace(w13, shape=(arch.experts, 2 * ff, arch.hidden)),
        OutTensor(fused + "w2_weight", (arch.experts, arch.hidden, ff), dtype, "row per expert", w2),
    ]


def _stacked(name: str, split: str, dtype: str, parts: list[tuple[str, int, int]], tail: tuple[int, ...]) -> OutTensor:
    """An output tensor made of source row ranges ``(source, start, stop)`` stacked along dim 0."""
    pieces, at = [], 0
    for source, start, stop in parts:
        pieces.append(Piece(source, 0, start, stop, at))
        at += stop - start
    return OutTensor(name, (at, *tail), dtype, split, tuple(pieces))


def _fp8_pair(t: OutTensor) -> list[OutTensor]:
    """A linear layer's weight as E4M3 and, next to it, its rows' scales (compressed-tensors' ``weight_scale``)."""
    return [
        replace(t, dtype="F8_E4M3", fp8="weight"),
        replace(
            t, name=t.name + "_scale", shape=(t.shape[0], 1), dtype="F32", split=t.split + " (row scales)", fp8="scale"
        ),
    ]


def _layer_tensors(arch: Arch, i: int, tp: int, rank: int, dtype: str, fp8: bool = False) -> list[OutTensor]:
    """One decoder layer's tensors on TP rank ``rank``, named and fused as vLLM's Llama has them; with ``fp8``
    its linear weights in E4M3 with their scales."""
    p = f"model.layers.{i}."
    attn, mlp = p + "self_attn.", p + "mlp."
    q_rows = arch.heads // tp * arch.head_dim
    kv_rows = max(1, arch.kv_heads // tp) * arch.head_dim
    kv_rank = rank // max(1, tp // arch.kv_heads)  # the KV head group this rank holds (replicated if tp > kv)
    ff = arch.intermediate // tp
    out = [
        OutTensor(p + n, (arch.hidden,), dtype, "replicated", (Piece(p + n, 0, 0, arch.hidden, 0),))
        for n in ("input_layernorm.weight", "post_attention_layernorm.weight")
    ]
    for kind in ("weight", "bias") if arch.qkv_bias else ("weight",):
        tail = (arch.hidden,) if kind == "weight" else ()
        out.append(
            _stacked(
                f"{attn}qkv_proj.{kind}",
                "qkv",
                dtype,
                [
                    (f"{attn}q_proj.{kind}", rank * q_rows, (rank + 1) * q_rows),
                    (f"{attn}k_proj.{kind}", kv_rank * kv_rows, (kv_rank + 1) * kv_rows),
                    (f"{attn}v_proj.{kind}", kv_rank * kv_rows, (kv_rank + 1) * kv_rows),
                ],
                tail,
            )
        )
    out.append(
        OutTensor(
            f"{attn}o_proj.weight",
            (arch.hidden, q_rows),
            dtype,
            "row",
            (Piece(f"{attn}o_proj.weight", 1, rank * q_rows, (rank + 1) * q_rows, 0),),
        )
    )
    if arch.o_bias:
        out.append(
            OutTensor(
                f"{attn}o_proj.bias",
                (arch.hidden,),
                dtype,
                "replicated",
                (Piece(f"{attn}o_proj.bias", 0, 0, arch.hidden, 0),),
            )
        )
    out += [OutTensor(f"{attn}attn.{s}", (), "F32", "attention scale (1.0)") for s in ATTN_SCALES]
    if fp8:
        out += [
            OutTensor(f"{attn}attn.{name}", (1,), kind or dtype, f"compressed-tensors default ({fill:g})", fill=fill)
            for name, kind, fill in CT_ATTN_PARAMS
        ]
    if arch.experts:
        return out + _expert_tensors(arch, p, tp, rank, dtype)
    for kind in ("weight", "bias") if arch.mlp_bias else ("weight",):
        tail = (arch.hidden,) if kind == "weight" else ()
        out.append(
            _stacked(
                f"{mlp}gate_up_proj.{kind}",
                "gate_up",
                dtype,
                [
                    (f"{mlp}gate_proj.{kind}", rank * ff, (rank + 1) * ff),
                    (f"{mlp}up_proj.{kind}", rank * ff, (rank + 1) * ff),
                ],
                tail,
            )
        )
    out.append(
        OutTensor(
            f"{mlp}down_proj.weight",
            (arch.hidden, ff),
            dtype,
            "row",
            (Piece(f"{mlp}down_proj.weight", 1, rank * ff, (rank + 1) * ff, 0),),
        )
    )
    if arch.mlp_bias:
        out.append(
            OutTensor(
                f"{mlp}down_proj.bias",
                (arch.hidden,),
                dtype,
                "replicated",
                (Piece(f"{mlp}down_proj.bias", 0, 0, arch.hidden, 0),),
            )
        )
    if fp8:
        return [q for t in out for q in (_fp8_pair(t) if t.name.endswith("_proj.weight") else [t])]
    return out


def _vocab_tensor(arch: Arch, name: str, source: str, tp: int, rank: int, dtype: str) -> OutTensor:
    """A vocabulary-parallel embedding or head: an equal block of the padded rows, zeros past the vocabulary."""
    per_rank = padded_vocab(arch) // tp
    start, stop = min(rank * per_rank, arch.vocab), min((rank + 1) * per_rank, arch.vocab)
    pieces = (Piece(source, 0, start, stop, 0),) if stop > start else ()
    return OutTensor(name, (per_rank, arch.hidden), dtype, "vocab", pieces, per_rank - (stop - start))


def rank_tensors(
    arch: Arch, tp: int, pp: int, tp_rank: int, pp_rank: int, dtype: str, fp8: bool = False
) -> list[OutTensor]:
    """The state dict vLLM's model holds on one rank, each tensor with where it comes from."""
    first, last = pp_rank == 0, pp_rank == pp - 1
    start, end = pp_layers(arch.layers, pp)[pp_rank]
    out: list[OutTensor] = []
    # Tied: on the last stage lm_head and embed_tokens share memory and vLLM keeps lm_head.weight only.
    if first and not (arch.tied and last):
        out.append(_vocab_tensor(arch, "model.embed_tokens.weight", "model.embed_tokens.weight", tp, tp_rank, dtype))
    for i in range(start, end):
        out += _layer_tensors(arch, i, tp, tp_rank, dtype, fp8)
    if last:
        out.append(
            OutTensor(
                "model.norm.weight",
                (arch.hidden,),
                dtype,
                "replicated",
                (Piece("model.norm.weight", 0, 0, arch.hidden, 0),),
            )
        )
        head_source = "model.embed_tokens.weight" if arch.tied else "lm_head.weight"
        out.append(_vocab_tensor(arch, "lm_head.weight", head_source, tp, tp_rank, dtype))
    return out


def rank_file(tp: int, pp: int, tp_rank: int, pp_rank: int) -> str:
    """vLLM's default shard file name for this rank (one part per rank)."""
    if pp > 1:
        return f"model-pp-{pp_rank}-tp-{tp_rank}-part-0.safetensors"
    return f"model-rank-{tp_rank}-part-0.safetensors"


# --- safetensors files, read and written a tensor at a time -------------------------------


def _raw_header(path: Path) -> str:
    """The JSON header of a safetensors file as stored (kept so merge can write it back verbatim)."""
    with path.open("rb") as f:
        size_bytes = f.read(8)
        if len(size_bytes) < 8:
            raise ReshardError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        (size,) = struct.unpack("<Q", size_bytes)
        if size > path.stat().st_size - 8:
            raise ReshardError(f"{path}: corrupt safetensors file (header of {size} bytes past the end)")
        return f.read(size).decode("utf-8", errors="strict")


def _scan(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Each tensor's dtype and shape; a file safetensors cannot open is reported by name."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as exc:
        raise ReshardError(f"{path}: corrupt or unreadable safetensors file: {exc}") from exc


def _read(path: Path, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
    """Only the rows (or columns) ``[start, stop)`` of one tensor: the file is mapped, not loaded."""
    with safe_open(str(path), framework="pt") as f:
        view = f.get_slice(name)
        index = [slice(None)] * len(view.get_shape())
        index[dim] = slice(start, stop)
        return view[tuple(index)]


def _read_rows(path: Path, name: str, start: int, stop: int) -> torch.Tensor:
    """Rows ``[start, stop)`` of a shard tensor with its leading dimensions flattened (``Piece.at``'s rows);
    in an ``[E, R, C]`` tensor they lie within one ``e``, as each piece is one expert's."""
    with safe_open(str(path), framework="pt") as f:
        view = f.get_slice(name)
        shape = view.get_shape()
        if len(shape) < 3:
            return view[start:stop]
        e, offset = divmod(start, shape[1])
        if offset + stop - start > shape[1]:
            raise ReshardError(f"{path}: rows {start}:{stop} of {name} span two experts (the manifest is not ours)")
        return view[e : e + 1, offset : offset + stop - start][0]


def _header_bytes(specs: list[tuple[str, str, tuple[int, ...]]]) -> bytes:
    """A safetensors header for tensors written in this order, padded so the data starts 8-aligned."""
    entries, offset = {}, 0
    for name, dtype, shape in specs:
        size = STORED[dtype].itemsize * int(torch.Size(shape).numel())
        entries[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps({"__metadata__": {"format": "pt"}, **entries}, separators=(",", ":")).encode()
    return text + b" " * (-len(text) % 8)


def _write_tensor(f, tensor: torch.Tensor) -> None:
    f.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


# --- reshard ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """A checkpoint's tensors: which file holds each, with its dtype and shape."""

    files: dict[str, Path]
    dtypes: dict[str, str]
    shapes: dict[str, tuple[int, ...]]


def weight_paths(src: Path) -> list[Path]:
    """The checkpoint's files: those its index names if it has one (as vLLM reads it), else every ``*.safetensors``.

    Mistral's repositories also hold ``consolidated.safetensors`` in Mistral's own format, outside the index.
    """
    index = src / INDEX
    if not index.is_file():
        paths = sorted(src.glob("*.safetensors"))
        if not paths:
            raise ReshardError(f"{src}: no *.safetensors files")
        return paths
    names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    for name in names:
        if not (src / name).is_file():
            raise ReshardError(f"{index} names {name}, which is not in {src}")
    return [src / name for name in names]


def scan_source(src: Path) -> Source:
    """Index every tensor of the checkpoint's files; a tensor in two files is an error."""
    paths = weight_paths(src)
    files, dtypes, shapes = {}, {}, {}
    for path in paths:
        for name, (dtype, shape) in _scan(path).items():
            if name in files:
                raise ReshardError(f"tensor {name} is in both {files[name].name} and {path.name}")
            files[name], dtypes[name], shapes[name] = path, dtype, shape
    return Source(files, dtypes, shapes)


def _unused(name: str) -> bool:
    return any(part in name for part in UNUSED_BY_VLLM)


def _names(names: list[str], shown: int = 3) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def check_source(arch: Arch, source: Source) -> str:
    """The checkpoint's one dtype, after checking its tensors are exactly those the config implies."""
    expected = hf_tensors(arch)
    if missing := sorted(expected.keys() - source.files.keys()):
        raise ReshardError(f"missing tensor {_names(missing)} (config.json implies it)")
    if extra := sorted(n for n in source.files.keys() - expected.keys() if not _unused(n)):
        raise ReshardError(
            f"unexpected tensor {_names(extra)} in {source.files[extra[0]].name} (config.json implies no such tensor)"
        )
    for name, shape in expected.items():
        if source.shapes[name] != shape:
            raise ReshardError(
                f"tensor {name} has shape {list(source.shapes[name])}, config.json implies {list(shape)}"
            )
    dtype, _ = Counter(source.dtypes[n] for n in expected).most_common(1)[0]
    for name in sorted(expected):
        if (other := source.dtypes[name]) != dtype:
            raise ReshardError(
                f"mixed dtypes: tensor {name} is {other}, the others {dtype}; "
                "vLLM loads every weight in the model's one dtype"
            )
    if dtype not in DTYPES:
        raise ReshardError(f"dtype {dtype} not supported; reshard takes {', '.join(DTYPES)}")
    return dtype


def channel_scales(rows: torch.Tensor) -> torch.Tensor:
    """One float32 scale per row: its largest magnitude over E4M3's largest finite value, so that it maps to
    that value; an all-zero row gets the smallest normal float32 (any scale keeps its zeros)."""
    return (rows.float().abs().amax(dim=1, keepdim=True) / E4M3.max_value).clamp_min(torch.finfo(torch.float32).tiny)


def quantize_fp8(block: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``block / scales`` in E4M3, rounded to nearest even; clamped first, as the cast does not saturate."""
    return (block.float() / scales).clamp(-E4M3.max_value, E4M3.max_value).to(E4M3.torch_dtype)


def _fp8(t: OutTensor, source: Source) -> torch.Tensor:
    """An FP8 weight's E4M3 values or its scales (``t.fp8``). Each row's scale is taken over the whole source
    row, so a row-parallel layer's ranks, which hold a slice of every row, share the scales."""
    parts = []
    for p in t.pieces:
        # Whole rows: the piece's own, or every row of the tensor when the piece is a slice of columns.
        rows = _read(
            source.files[p.source], p.source, 0, *((p.start, p.stop) if p.dim == 0 else (0, source.shapes[p.source][0]))
        )
        if not torch.isfinite(rows).all():
            raise ReshardError(
                f"tensor {p.source} holds non-finite values (inf or NaN): FP8 quantization needs finite weights"
            )
        scales = channel_scales(rows)
        block = rows if p.dim == 0 else rows[:, p.start : p.stop]
        parts.append(quantize_fp8(block, scales) if t.fp8 == "weight" else scales)
    return torch.cat(parts)


def _materialize(t: OutTensor, source: Source) -> torch.Tensor:
    """Cut one output tensor from its source slices."""
    if not t.pieces and not t.pad_rows:
        return torch.full(t.shape, t.fill, dtype=STORED[t.dtype])  # an attention scale or zero point
    if t.fp8:
        return _fp8(t, source)
    parts = [_read(source.files[p.source], p.source, p.dim, p.start, p.stop) for p in t.pieces]
    if t.pad_rows:
        parts.append(torch.zeros((t.pad_rows, *t.shape[1:]), dtype=DTYPES[t.dtype]))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _write_rank(path: Path, tensors: list[OutTensor], source: Source) -> None:
    header = _header_bytes([(t.name, t.dtype, t.shape) for t in tensors])
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        for t in tensors:
            _write_tensor(f, _materialize(t, source))


def unused_tensors(source: Source) -> list[OutTensor]:
    """The tensors vLLM would drop, each whole, for the side file merge reads them back from."""
    return [
        OutTensor(
            n,
            source.shapes[n],
            source.dtypes[n],
            "not loaded by vLLM (kept for merge)",
            (Piece(n, 0, 0, source.shapes[n][0], 0),),
        )
        for n in sorted(source.files)
        if _unused(n)
    ]


def _copy_side_files(src: Path, dst: Path) -> list[str]:
    """Copy config, tokenizer and the other plain files, byte for byte; no weights, no index."""
    copied = []
    for path in sorted(src.iterdir()):
        if path.is_file() and path.suffix != ".safetensors" and path.name != INDEX and not path.name.startswith("."):
            shutil.copy2(path, dst / path.name)
            copied.append(path.name)
    return copied


def _check_paths(src: Path, out: Path) -> None:
    if not (src / "config.json").is_file():
        raise ReshardError(f"{src}: no config.json")
    s, o = src.resolve(), out.resolve()
    if o == s or s in o.parents or o in s.parents:
        raise ReshardError(f"--out {out} overlaps the source {src}; the source is never written to")


def _check_weight_dtype(weight_dtype: str, arch: Arch, config: dict) -> bool:
    """Whether to store the linear layers in FP8, after refusing what reshard cannot quantize."""
    if weight_dtype not in WEIGHT_DTYPES:
        raise ReshardError(f"--weight-dtype {weight_dtype!r} not supported; reshard takes {', '.join(WEIGHT_DTYPES)}")
    if weight_dtype == "auto":
        return False
    if arch.experts:
        raise ReshardError(
            "--weight-dtype fp8 quantizes dense linear layers; a Mixtral's experts (vLLM's fused "
            "MoE parameters) are not quantized by reshard: re-shard it without --weight-dtype"
        )
    if "quantization_config" in config:
        raise ReshardError(
            f"config.json already has a quantization_config "
            f"({config['quantization_config'].get('quant_method', '?')}); --weight-dtype fp8 "
            "quantizes an unquantized checkpoint"
        )
    return True


def reshard(src: Path, out: Path, tp: int, pp: int = 1, overwrite: bool = False, weight_dtype: str = "auto") -> dict:
    """Write ``out`` in vLLM's sharded_state layout for TP ``tp`` x PP ``pp``, its linear layers in
    ``weight_dtype`` (``auto``: as the source stores them; ``fp8``: E4M3 with per-channel scales); return the
    manifest."""
    src, out = Path(src), Path(out)
    _check_paths(src, out)
    config = json.loads((src / "config.json").read_text())
    arch = read_arch(config)
    check_layout(arch, tp, pp)
    fp8 = _check_weight_dtype(weight_dtype, arch, config)
    source = scan_source(src)
    dtype = check_source(arch, source)
    weight_files = sorted({p.name for p in source.files.values()})
    with output_dir(out, overwrite) as work:
        files = {}
        for pp_rank in range(pp):
            for tp_rank in range(tp):
                tensors = rank_tensors(arch, tp, pp, tp_rank, pp_rank, dtype, fp8)
                name = rank_file(tp, pp, tp_rank, pp_rank)
                _write_rank(work / name, tensors, source)
                files[name] = {
                    "pp_rank": pp_rank,
                    "tp_rank": tp_rank,
                    "sha256": _sha256(work / name),
                    "tensors": [asdict(t) for t in tensors],
                }
        if unused := unused_tensors(source):
            _write_rank(work / UNUSED_FILE, unused, source)
            files[UNUSED_FILE] = {
                "pp_rank": None,
                "tp_rank": None,
                "sha256": _sha256(work / UNUSED_FILE),
                "tensors": [asdict(t) for t in unused],
            }
        copied = _copy_side_files(src, work)
        if fp8:  # the copy is replaced: vLLM builds the FP8 layers from the quantization config
            (work / "config.json").write_text(
                json.dumps({**config, "quantization_config": FP8_QUANTIZATION_CONFIG}, indent=2) + "\n"
            )
        index = src / INDEX
        manifest = {
            "format": FORMAT,
            "load_format": "sharded_state",
            "source": {
                "files": {n: {"sha256": _sha256(src / n), "header": _raw_header(src / n)} for n in weight_files},
                "index": index.read_text() if index.is_file() else None,
                "dtype": dtype,
                "copied": copied,
                "left_out": sorted({p.name for p in src.glob("*.safetensors")} - set(weight_files)),
            },
            "layout": {
                "tensor_parallel_size": tp,
                "pipeline_parallel_size": pp,
                "pp_layers": [list(r) for r in pp_layers(arch.layers, pp)],
                "vocab_padded": padded_vocab(arch),
                "kv_head_replicas": max(1, tp // arch.kv_heads),
                "tied_embeddings": arch.tied,
                "weight_dtype": weight_dtype,
            },
            "files": files,
        }
        (work / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


# --- merge --------------------------------------------------------------------------------


def _covering(manifest: dict, dst: Path) -> dict[str, list[tuple[Path, str, Piece]]]:
    """For each source tensor, every rank-file slice that holds part of it."""
    found: dict[str, list[tuple[Path, str, Piece]]] = {}
    for file_name, entry in manifest["files"].items():
        for t in entry["tensors"]:
            for p in t["pieces"]:
                found.setdefault(p["source"], []).append((dst / file_name, t["name"], Piece(**p)))
    return found


def _assemble(name: str, dtype: str, shape: tuple[int, ...], holders: list[tuple[Path, str, Piece]]) -> torch.Tensor:
    """Rebuild one source tensor from its slices, each range taken once (replicas are equal)."""
    full = torch.empty(shape, dtype=DTYPES[dtype])
    covered: set[tuple[int, int, int]] = set()
    for path, out_name, piece in holders:
        key = (piece.dim, piece.start, piece.stop)
        if key in covered:
            continue
        covered.add(key)
        rows = piece.stop - piece.start if piece.dim == 0 else shape[0]
        part = _read_rows(path, out_name, piece.at, piece.at + rows)
        full.narrow(piece.dim, piece.start, piece.stop - piece.start).copy_(part)
    extent = sum(stop - start for _, start, stop in covered)
    dims = {d for d, _, _ in covered}
    if len(dims) != 1 or extent != shape[dims.pop()]:
        raise ReshardError(f"the shards do not cover tensor {name} exactly once (manifest and files disagree)")
    return full


def _write_source_file(path: Path, header: str, found: dict[str, list[tuple[Path, str, Piece]]]) -> None:
    """Write a source file back: its original header, then each tensor at its original offset."""
    entries = {k: v for k, v in json.loads(header).items() if k != "__metadata__"}
    raw = header.encode()
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, e in sorted(entries.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            if name not in found:
                raise ReshardError(f"tensor {name} of {path.name} is in no shard")
            _write_tensor(f, _assemble(name, e["dtype"], tuple(e["shape"]), found[name]))


def merge(dst: Path, out: Path, overwrite: bool = False) -> list[str]:
    """Rebuild the Hugging Face checkpoint a reshard was made from; return the files checked equal."""
    dst, out = Path(dst), Path(out)
    manifest_path = dst / MANIFEST
    if not manifest_path.is_file():
        raise ReshardError(f"{dst}: no {MANIFEST}; not written by `maia-serving reshard`")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format") != FORMAT:
        raise ReshardError(f"{manifest_path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    _check_paths(dst, out)
    if (weight_dtype := manifest["layout"].get("weight_dtype", "auto")) != "auto":
        raise ReshardError(
            f"{dst} was re-sharded with --weight-dtype {weight_dtype}, which rounds the weights: merge "
            "rebuilds the source only from a re-shard without --weight-dtype"
        )
    for name, entry in manifest["files"].items():
        if not (dst / name).is_file() or _sha256(dst / name) != entry["sha256"]:
            raise ReshardError(f"{dst / name} is missing or differs from the sha256 in {MANIFEST}")
    found = _covering(manifest, dst)
    with output_dir(out, overwrite) as work:
        for name, entry in manifest["source"]["files"].items():
            _write_source_file(work / name, entry["header"], found)
            if _sha256(work / name) != entry["sha256"]:
                raise ReshardError(f"rebuilt {name} differs from the source's sha256 {entry['sha256']}")
        if manifest["source"]["index"] is not None:
            (work / INDEX).write_text(manifest["source"]["index"])
        for name in manifest["source"]["copied"]:
            shutil.copy2(dst / name, work / name)
    return sorted(manifest["source"]["files"])
