"""FP8 KV-cache scale calibration: ``maia-serving calibrate-kv``.

Runs calibration text through the Hugging Face model and records, per layer and per KV
head, ``max |x|`` of what an engine writes into the KV cache: the keys *after* the rotary
embedding and the values. In transformers 5.x every attention layer hands exactly those
tensors, ``[batch, kv_heads, seq, head_dim]``, to ``past_key_values.update(key, value,
layer_idx)`` (see ``LlamaAttention.forward``), so a ``DynamicCache`` subclass sees them.

Scales follow the engines' convention: quantize ``q = clamp(x / scale)``, dequantize
``x = q * scale``, so ``scale = absmax / fp8_max`` maps the largest value seen onto the
format's largest finite number (448 for E4M3, 57344 for E5M2).

The output is a copy of the model that stock vLLM 0.32 loads:

- ``model.layers.{i}.self_attn.k_scale`` / ``.v_scale`` (float32, shape ``[1]``) beside the
  weights: vLLM maps them to ``...self_attn.attn.k_scale`` and keeps them in
  ``layer._k_scale`` / ``layer._k_scale_float``;
- a compressed-tensors ``quantization_config`` in config.json whose ``kv_cache_scheme``
  says "8-bit float, one static symmetric scale per tensor", with no ``config_groups``
  (the weights stay unquantized); for ``--format e5m2`` the scheme is null, since vLLM
  refuses an E5M2 cache for a checkpoint that declares one (``write_calibrated_model``);
- ``maia_kv_scales.json``: the per-KV-head scales that stock vLLM cannot load (its
  per-tensor path takes one scale per layer) for the maia attention backends;
- ``kv_cache_scales.json`` (E4M3 only): SGLang's ``--quantization-param-path`` file, one
  scale per layer for K and V alike (the larger of the two), for tensor parallel size 1.

Imports no engine: torch, transformers and safetensors only.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import DynamicCache

from maia_serving.ops import get_fp8_format, kv_absmax
from maia_serving.tools.outdir import output_dir

SIDECAR = "maia_kv_scales.json"  # the name maia_serving.serving.kv_scales reads
SGLANG_SCALES = "kv_cache_scales.json"
SAFETENSORS_INDEX = "model.safetensors.index.json"
SCALES_SHARD = "model-kv-scales.safetensors"  # only for sharded checkpoints
MAX_DEFAULT_SEQ_LEN = 2048


def kv_cache_quantization_config() -> dict:
    """config.json's ``quantization_config`` for "FP8 KV cache, per-tensor static scales".

    The layout vLLM 0.32 reads (``CompressedTensorsConfig.from_config``): ``quant_method``
    selects compressed-tensors, ``kv_cache_scheme`` is validated by
    ``CompressedTensorsKVCacheMethod.validate_kv_cache_scheme`` (type float, 8 bits,
    strategy tensor or attn_head, symmetric) and makes every ``Attention`` layer create
    ``k_scale``/``v_scale`` parameters; empty ``config_groups`` and ``ignore`` leave every
    linear layer unquantized; ``format`` "dense" is what compressed-tensors calls
    uncompressed weights. Note: with this present, vLLM turns ``kv_cache_dtype="auto"`` into
    "fp8" (e4m3) and refuses ``"fp8_e5m2"`` (see ``write_calibrated_model``).
    """
    return {
        "quant_method": "compressed-tensors",
        "format": "dense",
        "quantization_status": "compressed",
        "config_groups": {},
        "ignore": [],
        "kv_cache_scheme": {
            "num_bits": 8,
            "type": "float",
            "strategy": "tensor",
            "dynamic": False,
            "symmetric": True,
        },
    }


class AbsmaxCache(DynamicCache):
    """A ``DynamicCache`` that also folds every K/V it stores into per-KV-head maxima.

    ``update`` receives post-RoPE keys ``[batch, kv_heads, seq, head_dim]``; the running
    maxima (float32 ``[kv_heads]``) go to the dicts passed in, keyed by layer index, so one
    pair of dicts collects across many forward passes (a fresh cache for each).
    """

    def __init__(self, config, k_absmax: dict[int, torch.Tensor], v_absmax: dict[int, torch.Tensor]):
        super().__init__(config=config)
        self.k_absmax, self.v_absmax = k_absmax, v_absmax

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        for store, x in ((self.k_absmax, key_states), (self.v_absmax, value_states)):
            # [batch, kv_heads, seq, head_dim] -> [tokens, kv_heads, head_dim]
            m = kv_absmax(x.detach().transpose(1, 2).reshape(-1, x.shape[1], x.shape[3]))
            store[layer_idx] = torch.maximum(store[layer_idx], m) if layer_idx in store else m
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


@dataclass
class KvCalibration:
    """Per-layer, per-KV-head absmax of K (post-RoPE) and V, and the scales they give."""

    fmt: str
    num_tokens: int
    k_absmax: list[torch.Tensor]  # per layer: float32 [num_kv_heads]
    v_absmax: list[torch.Tensor]

    def _scales(self, absmax: list[torch.Tensor]) -> list[torch.Tensor]:
        return [absmax_to_scale(a, self.fmt) for a in absmax]

    @property
    def k_scale(self) -> list[torch.Tensor]:
        return self._scales(self.k_absmax)

    @property
    def v_scale(self) -> list[torch.Tensor]:
        return self._scales(self.v_absmax)

    def per_tensor(self) -> list[tuple[float, float]]:
        """(k_scale, v_scale) per layer: the max over heads (what covers every head)."""
        return [(k.max().item(), v.max().item()) for k, v in zip(self.k_scale, self.v_scale)]

    def sidecar(self) -> dict:
        """The ``maia_kv_scales.json`` document."""
        return {
            "format": self.fmt,
            "strategy": "per_head",
            "num_tokens": self.num_tokens,
            "layers": {
                str(i): {"k": k.tolist(), "v": v.tolist()} for i, (k, v) in enumerate(zip(self.k_scale, self.v_scale))
            },
            "per_tensor": {str(i): {"k": k, "v": v} for i, (k, v) in enumerate(self.per_tensor())},
        }


def absmax_to_scale(absmax: torch.Tensor, fmt: str) -> torch.Tensor:
    """``absmax / fp8_max`` as float32; an all-zero channel gets 1.0 (any scale is exact)."""
    f = get_fp8_format(fmt)
    absmax = absmax.float()
    if not torch.isfinite(absmax).all():
        raise ValueError(f"the model produced non-finite K/V values (absmax {absmax.tolist()}); cannot calibrate")
    return torch.where(absmax > 0, absmax / f.max_value, torch.ones_like(absmax))


def _check_model_dir(model_dir: Path) -> None:
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"{model_dir} is not a model directory: no config.json there (pass a Hugging Face "
            "model folder with config.json and *.safetensors)"
        )
    if not list(model_dir.glob("*.safetensors")):
        raise FileNotFoundError(f"{model_dir} has no *.safetensors weights")


def calibration_token_ids(tokenizer, data: list[Path], max_tokens: int) -> list[int]:
    """The data files' tokens, in order, at most ``max_tokens``."""
    missing = [str(p) for p in data if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"calibration data file(s) not found: {', '.join(missing)}")
    ids: list[int] = []
    for path in data:
        ids += tokenizer(path.read_text(encoding="utf-8", errors="replace"), add_special_tokens=False)["input_ids"]
        if len(ids) >= max_tokens:
            break
    if len(ids) < 2:
        raise ValueError(f"the calibration data {[str(p) for p in data]} holds fewer than 2 tokens")
    return ids[:max_tokens]


def collect_absmax(
    model, token_ids: list[int], seq_len: int, fmt: str = "e4m3", progress: bool = True
) -> KvCalibration:
    """Run ``token_ids`` through ``model`` in chunks of ``seq_len`` and record K/V absmax."""
    from tqdm import tqdm

    num_layers = model.config.num_hidden_layers
    k_absmax: dict[int, torch.Tensor] = {}
    v_absmax: dict[int, torch.Tensor] = {}
    chunks = [token_ids[i : i + seq_len] for i in range(0, len(token_ids), seq_len)]
    with torch.no_grad():
        for chunk in tqdm(chunks, desc="calibrate-kv", unit="chunk", disable=not progress):
            cache = AbsmaxCache(model.config, k_absmax, v_absmax)
            model(input_ids=torch.tensor([chunk]), past_key_values=cache, use_cache=True, logits_to_keep=1)
    if sorted(k_absmax) != list(range(num_layers)):
        raise ValueError(
            f"recorded K/V for layers {sorted(k_absmax)} of {num_layers}: this model's attention does not "
            "pass its K/V through past_key_values.update(key, value, layer_idx)"
        )
    return KvCalibration(
        fmt, len(token_ids), [k_absmax[i] for i in range(num_layers)], [v_absmax[i] for i in range(num_layers)]
    )


def sglang_scales_file(result: KvCalibration, model_type: str) -> dict:
    """SGLang's scales schema (``QuantParamSchema``): ``scaling_factor[tp_rank][layer]``."""
    per_layer = {i: max(k, v) for i, (k, v) in enumerate(result.per_tensor())}
    return {"model_type": model_type, "kv_cache": {"dtype": "float8_e4m3fn", "scaling_factor": {0: per_layer}}}


def _scale_tensors(result: KvCalibration) -> dict[str, torch.Tensor]:
    tensors = {}
    for i, (k, v) in enumerate(result.per_tensor()):
        tensors[f"model.layers.{i}.self_attn.k_scale"] = torch.tensor([k], dtype=torch.float32)
        tensors[f"model.layers.{i}.self_attn.v_scale"] = torch.tensor([v], dtype=torch.float32)
    return tensors


def write_calibrated_model(model_dir: Path, out: Path, result: KvCalibration) -> None:
    """Copy the model to ``out`` with the per-tensor scales in its safetensors, the
    kv_cache_scheme in config.json and the per-head scales in the sidecar.

    E5M2: vLLM 0.32 raises "fp8_e5m2 kv-cache is not supported with fp8 checkpoints" for
    any checkpoint that declares a kv_cache_scheme (attention.py, ``_init_kv_cache_quant``),
    yet still loads k/v_scale tensors from a compressed-tensors checkpoint whose
    kv_cache_scheme is null. An e5m2 calibration therefore writes ``kv_cache_scheme: null``:
    serve it with ``kv_cache_dtype="fp8_e5m2"`` (with "auto" it stays unquantized).
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    for path in model_dir.iterdir():
        written_here = path.name in ("config.json", SIDECAR, SGLANG_SCALES) or path.name.endswith(".safetensors")
        if path.is_file() and not written_here:
            shutil.copy2(path, out / path.name)

    scales = _scale_tensors(result)
    index_path = model_dir / SAFETENSORS_INDEX
    if index_path.exists():  # sharded: keep the shards, add one for the scales
        for shard in model_dir.glob("*.safetensors"):
            shutil.copy2(shard, out / shard.name)
        index = json.loads(index_path.read_text())
        index["weight_map"].update({name: SCALES_SHARD for name in scales})
        (out / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        save_file(scales, out / SCALES_SHARD, metadata={"format": "pt"})
    else:
        src = model_dir / "model.safetensors"
        if not src.exists():
            raise FileNotFoundError(f"{model_dir} has neither model.safetensors nor {SAFETENSORS_INDEX}")
        with safe_open(src, framework="pt") as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}
            metadata = f.metadata() or {"format": "pt"}
        tensors = {n: t for n, t in tensors.items() if not n.endswith(("self_attn.k_scale", "self_attn.v_scale"))}
        save_file({**tensors, **scales}, out / "model.safetensors", metadata=metadata)

    config = json.loads((model_dir / "config.json").read_text())
    quant = kv_cache_quantization_config()
    if result.fmt == "e5m2":
        quant["kv_cache_scheme"] = None
    config["quantization_config"] = quant
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / SIDECAR).write_text(json.dumps(result.sidecar(), indent=2) + "\n")
    if result.fmt == "e4m3":
        document = sglang_scales_file(result, config.get("model_type", ""))
        (out / SGLANG_SCALES).write_text(json.dumps(document, indent=2) + "\n")


def calibrate_kv(
    model_dir: Path,
    data: list[Path],
    out: Path,
    max_tokens: int = 32768,
    seq_len: int | None = None,
    fmt: str = "e4m3",
    progress: bool = True,
    overwrite: bool = False,
) -> KvCalibration:
    """Calibrate ``model_dir`` on ``data`` and write the calibrated copy to ``out``.

    The forward passes run in float32 whatever the checkpoint's dtype: the scales only need
    the magnitudes, and float32 is the fast path on CPUs without bf16 matmul units.
    """
    get_fp8_format(fmt)  # a clear error for an unknown format before any work
    if max_tokens < 2:
        raise ValueError(f"--max-tokens must be at least 2, got {max_tokens}")
    _check_model_dir(model_dir)
    if out.resolve() == model_dir.resolve():
        raise ValueError(f"--out must differ from --model ({model_dir}): the model is copied, not edited")
    with output_dir(out, overwrite) as work:
        return _calibrate(model_dir, data, work, max_tokens, seq_len, fmt, progress)


def _calibrate(
    model_dir: Path, data: list[Path], out: Path, max_tokens: int, seq_len: int | None, fmt: str, progress: bool
) -> KvCalibration:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    token_ids = calibration_token_ids(tokenizer, data, max_tokens)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if seq_len is None:
        seq_len = min(getattr(model.config, "max_position_embeddings", MAX_DEFAULT_SEQ_LEN), MAX_DEFAULT_SEQ_LEN)
    if seq_len < 1:
        raise ValueError(f"--seq-len must be positive, got {seq_len}")
    result = collect_absmax(model, token_ids, seq_len, fmt, progress)
    write_calibrated_model(model_dir, out, result)
    return result
