"""ModelShape: the numbers of a decoder-only transformer the emulator needs.

Read from a Hugging Face ``config.json`` (or a directory holding one), so the capacity and
cost models work from a shape alone, without weights or an engine. The families read:

- dense: llama, mistral, qwen2, qwen3;
- Gemma: gemma, gemma2 (explicit head_dim, embeddings tied by default, gemma2's four norms
  per layer and soft-capped attention and final logits);
- sliding-window attention: mistral, gemma2 and gpt-oss (alternate layers), qwen2/qwen3
  when ``use_sliding_window`` is set;
- MoE: mixtral, qwen2_moe (a gated shared expert), qwen3_moe, deepseek_v2/v3 (shared experts,
  dense first layers), gpt_oss (biased experts and router);
- MLA: deepseek_v2/v3 (a latent KV cache).

Any other ``model_type`` is an error naming it; a config without one is read as a dense
decoder only if it has none of the keys those families add. A missing key is named, never
guessed around.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any

from maia_serving.emulator.cost.routing import ExpertLoad, load_expert_load
from maia_serving.formats import precision, quantization
from maia_serving.formats.precision import Precision, WeightQuant

# `--kv-cache-dtype` values the emulator accepts (the block-scaled MX/NVFP4 formats too); "auto" stores
# the KV cache in the model's dtype.
KV_CACHE_DTYPES = precision.kv_cache_spellings(precision.KV_CACHE_FORMATS)


def dtype_bytes(name: str) -> float:
    """Element size of ``name`` (e.g. "bfloat16", "fp8_e4m3"), block scales included."""
    return precision.dtype(name).bytes_per_element


@dataclass(frozen=True)
class MoE:
    """Routed experts: each token runs ``top_k`` of ``num_experts`` gated MLPs of ``intermediate_size``,
    plus the always-on shared experts, in every layer but the first ``num_dense_layers`` (a dense MLP)."""

    num_experts: int
    top_k: int
    intermediate_size: int
    shared_intermediate_size: int = 0  # all shared experts together
    num_dense_layers: int = 0
    expert_bias: bool = False  # gpt-oss
    router_bias: bool = False  # gpt-oss
    shared_expert_gate: bool = False  # Qwen2-MoE: one sigmoid output gating the shared expert
    num_groups: int = 1  # DeepSeek's n_group: runs of consecutive experts, which vLLM's EPLB keeps whole on a node
    load: ExpertLoad | None = None  # measured routing (routing.py); None: each expert alike

    def experts_touched(self, tokens: float) -> float:
        """Expected distinct experts of a layer that ``tokens`` tokens route to, each to ``top_k`` of
        ``num_experts`` chosen uniformly: E (1 - (1 - k/E)^T), or as ``load`` measured them. What a
        step reads of the expert weights."""
        if self.load is not None:
            return self.load.experts_touched(tokens)
        # float ** float is Any to the checker (a negative base gives a complex); this base is in [0, 1).
        touched: float = self.num_experts * (1.0 - (1.0 - self.top_k / self.num_experts) ** tokens)
        return touched


@dataclass(frozen=True)
class MLA:
    """Multi-head latent attention (DeepSeek-V2/V3): per token and layer the KV cache holds one
    ``kv_lora_rank`` latent and one ``qk_rope_head_dim`` key shared by all heads."""

    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    q_lora_rank: int = 0  # 0: queries are projected straight from the hidden state

    @property
    def latent_size(self) -> int:
        return self.kv_lora_rank + self.qk_rope_head_dim


@dataclass(frozen=True)
class Linear:
    """One kind of weight matrix ``[in_features, out_features]``: one per layer in ``layers`` layers
    (``experts`` per layer for routed experts). ``split`` is how tensor parallelism shards it:
    "column" (its outputs), "row" (its inputs) or "none" (replicated on every chip)."""

    name: str
    group: str  # precision.LINEAR_GROUPS: what a quantization scheme stores it in
    in_features: int
    out_features: int
    layers: int
    split: str
    bias: bool = False
    experts: int = 1

    @property
    def weight_params(self) -> int:
        return self.layers * self.experts * self.in_features * self.out_features

    @property
    def bias_params(self) -> int:
        return self.layers * self.experts * self.out_features if self.bias else 0


@dataclass(frozen=True)
class ModelShape:
    """Dimensions of a decoder: gated MLP or MoE, GQA or MLA attention, optionally windowed."""

    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    dtype: str
    max_position_embeddings: int
    architecture: str = "llama"
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over each query and key head
    norms_per_layer: int = 2
    sliding_window: int | None = None
    num_sliding_layers: int = 0  # layers that attend to the last ``sliding_window`` tokens only
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    moe: MoE | None = None
    mla: MLA | None = None
    quantization: WeightQuant | None = None  # the linear layers' storage; None: the model dtype
    comm_dtype: str | None = None  # the tensor/pipeline collectives' payload; None: the model dtype

    @property
    def dtype_bytes(self) -> float:
        return dtype_bytes(self.dtype)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        """K and V widths of one token and layer before the cache (MLA: the latent)."""
        return self.mla.latent_size if self.mla else self.num_kv_heads * self.head_dim

    def require_moe(self) -> MoE:
        """``moe``, for code that prices routed experts; ValueError for a dense model."""
        if self.moe is None:
            raise ValueError(f"{self.name} has no routed experts (a dense model)")
        return self.moe

    @property
    def num_moe_layers(self) -> int:
        return self.num_layers - self.moe.num_dense_layers if self.moe else 0

    def kv_elements_per_token_layer(self, tp: int) -> int:
        """KV elements one token stores in one layer on one chip: K and V of this chip's heads (with more
        ranks than KV heads each keeps a replica of one), or MLA's latent, which every rank holds whole."""
        if self.mla:
            return self.mla.latent_size
        return 2 * math.ceil(self.num_kv_heads / tp) * self.head_dim

    def kv_bytes_per_token_layer(self, tp: int, kv_cache: precision.DType) -> float:
        """KV bytes one token stores in one layer on one chip in ``kv_cache``: each K and V head row (or
        MLA's latent) stored whole, block-scaled formats with their scales and a short last block padded
        (``DType.row_bytes``): Llama-3-8B's 128-wide heads take 68 bytes each in MXFP4, 256 in BF16."""
        if self.mla:
            return kv_cache.row_bytes(self.mla.latent_size)
        return 2 * math.ceil(self.num_kv_heads / tp) * kv_cache.row_bytes(self.head_dim)

    def _attention_linears(self) -> list[Linear]:
        h, layers, mla = self.hidden_size, self.num_layers, self.mla
        if mla is None:
            return [
                Linear("qkv_proj", "attention", h, self.q_size + 2 * self.kv_size, layers, "column", self.qkv_bias),
                Linear("o_proj", "attention", self.q_size, h, layers, "row", self.o_bias),
            ]
        q_out = self.num_heads * (mla.qk_nope_head_dim + mla.qk_rope_head_dim)
        q = (
            [
                Linear("q_a_proj", "attention", h, mla.q_lora_rank, layers, "none"),
                Linear("q_b_proj", "attention", mla.q_lora_rank, q_out, layers, "column"),
            ]
            if mla.q_lora_rank
            else [Linear("q_proj", "attention", h, q_out, layers, "column")]
        )
        return q + [
            Linear("kv_a_proj", "attention", h, mla.latent_size, layers, "none"),
            Linear(
                "kv_b_proj",
                "attention",
                mla.kv_lora_rank,
                self.num_heads * (mla.qk_nope_head_dim + mla.v_head_dim),
                layers,
                "column",
            ),
            Linear("o_proj", "attention", self.num_heads * mla.v_head_dim, h, layers, "row"),
        ]

    def _mlp_linears(self) -> list[Linear]:
        h, moe = self.hidden_size, self.moe
        dense = self.num_layers - self.num_moe_layers
        out = []
        if dense:
            out += [
                Linear("gate_up_proj", "mlp", h, 2 * self.intermediate_size, dense, "column"),
                Linear("down_proj", "mlp", self.intermediate_size, h, dense, "row"),
            ]
        if moe:
            layers, inter, shared = self.num_moe_layers, moe.intermediate_size, moe.shared_intermediate_size
            out += [
                Linear(
                    "router", "router", h, moe.num_experts + moe.shared_expert_gate, layers, "none", moe.router_bias
                ),
                Linear(
                    "experts.gate_up_proj", "experts", h, 2 * inter, layers, "column", moe.expert_bias, moe.num_experts
                ),
                Linear("experts.down_proj", "experts", inter, h, layers, "row", moe.expert_bias, moe.num_experts),
            ]
            if shared:
                out += [
                    Linear("shared_experts.gate_up_proj", "mlp", h, 2 * shared, layers, "column"),
                    Linear("shared_experts.down_proj", "mlp", shared, h, layers, "row"),
                ]
        return out

    def linears(self) -> tuple[Linear, ...]:
        """Every weight matrix of the decoder layers (the LM head is with the embeddings)."""
        return tuple(self._attention_linears() + self._mlp_linears())

    def norm_params(self) -> int:
        """Norm weights of all decoder layers: per layer ``norms_per_layer`` over the hidden state, Qwen3's
        query and key norms, MLA's norms of its latents."""
        per_layer = self.norms_per_layer * self.hidden_size + (2 * self.head_dim if self.qk_norm else 0)
        if self.mla:
            per_layer += self.mla.kv_lora_rank + self.mla.q_lora_rank
        return self.num_layers * per_layer

    def embedding_params(self) -> int:
        """Input embedding plus LM head (counted once when tied) plus the final norm."""
        embed = self.vocab_size * self.hidden_size
        return embed * (1 if self.tie_word_embeddings else 2) + self.hidden_size

    def decoder_params(self) -> int:
        return sum(lin.weight_params + lin.bias_params for lin in self.linears()) + self.norm_params()

    def num_params(self) -> int:
        return self.decoder_params() + self.embedding_params()

    def active_params(self) -> int:
        """Parameters one token's forward pass uses: all but the routed experts it is not sent to (the
        embedding table counted whole, as Mistral and Qwen count their active parameters)."""
        if self.moe is None:
            return self.num_params()
        experts = sum(lin.weight_params + lin.bias_params for lin in self.linears() if lin.group == "experts")
        return self.num_params() - experts * (self.moe.num_experts - self.moe.top_k) // self.moe.num_experts

    def precision(self, kv_cache_dtype: str = "auto") -> Precision:
        model = precision.dtype(self.dtype)
        comm = precision.dtype(self.comm_dtype) if self.comm_dtype else model
        return Precision(
            model=model, kv_cache=precision.kv_cache_dtype(kv_cache_dtype, model), comm=comm, quant=self.quantization
        )

    def linear_bytes(self, lin: Linear, prec: Precision) -> float:
        """Stored bytes of ``lin``: weights in its group's dtype with their scales, biases in the model's."""
        return (
            lin.weight_params * prec.weight(lin.group).bytes_per_element
            + lin.bias_params * prec.model.bytes_per_element
        )

    def weight_bytes(self) -> float:
        prec = self.precision()
        linear = sum(self.linear_bytes(lin, prec) for lin in self.linears())
        return linear + (self.norm_params() + self.embedding_params()) * prec.model.bytes_per_element

    def with_weights(self, weight_dtype: str | None, activation_dtype: str | None = None) -> ModelShape:
        """This model with its linear layers stored in ``weight_dtype`` (``--weight-dtype``) and their GEMMs
        fed ``activation_dtype``; with neither, as the checkpoint stores it."""
        if weight_dtype:
            return replace(self, quantization=quantization.override(weight_dtype, activation_dtype))
        if activation_dtype:
            if self.quantization is None:
                raise ValueError(
                    f"an activation dtype ({activation_dtype}) needs quantized weights: give a weight "
                    f"dtype too, or a quantized checkpoint"
                )
            return replace(self, quantization=replace(self.quantization, activation=precision.dtype(activation_dtype)))
        return self

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "num_params": self.num_params()}


@dataclass(frozen=True)
class _Family:
    """How one ``model_type`` spells the features the emulator prices."""

    required: tuple[str, ...] = ()
    tie_default: bool = False  # tie_word_embeddings when config.json omits it (the config class default)
    bias_key: str | None = None  # key that turns on q/k/v/o biases
    qkv_bias: bool = False
    qk_norm: bool = False
    norms_per_layer: int = 2
    softcap: bool = False
    sliding: str = "none"  # "none", "all" layers, "alternate" (even layers), "qwen" (use_sliding_window)
    moe: str | None = None
    mla: bool = False


_COMMON = ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size", "vocab_size")
# Keyed by _Family.moe, which is None for a dense family (no keys).
_MOE_KEYS: dict[str | None, tuple[str, ...]] = {
    "mixtral": ("num_local_experts", "num_experts_per_tok"),
    "qwen": ("num_experts", "num_experts_per_tok", "moe_intermediate_size"),
    "qwen2_moe": ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size"),
    "deepseek": ("n_routed_experts", "num_experts_per_tok", "moe_intermediate_size"),
    "gpt_oss": ("num_local_experts", "num_experts_per_tok"),
}
_MLA_KEYS = ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")

FAMILIES: dict[str, _Family] = {
    "llama": _Family(bias_key="attention_bias"),
    "mistral": _Family(sliding="all"),
    "qwen2": _Family(qkv_bias=True, sliding="qwen"),
    "qwen3": _Family(bias_key="attention_bias", qk_norm=True, sliding="qwen"),
    "gemma": _Family(required=("head_dim",), tie_default=True),
    "gemma2": _Family(required=("head_dim",), tie_default=True, norms_per_layer=4, softcap=True, sliding="alternate"),
    "mixtral": _Family(sliding="all", moe="mixtral"),
    "qwen2_moe": _Family(qkv_bias=True, sliding="qwen", moe="qwen2_moe"),
    "qwen3_moe": _Family(bias_key="attention_bias", qk_norm=True, sliding="qwen", moe="qwen"),
    "deepseek_v2": _Family(moe="deepseek", mla=True),
    "deepseek_v3": _Family(moe="deepseek", mla=True),
    "gpt_oss": _Family(bias_key="attention_bias", sliding="alternate", moe="gpt_oss"),
    # Olmo-3 names its sliding and full layers in layer_types; its q/k norms span all heads, not one
    # (a few thousand parameters more than qk_norm counts: negligible for pricing).
    "olmo3": _Family(bias_key="attention_bias", qk_norm=True, sliding="all"),
}

# Keys of the features above: a config without a model_type that has any of them is not a plain dense decoder.
_FEATURE_KEYS = (
    "num_local_experts",
    "num_experts",
    "n_routed_experts",
    "moe_intermediate_size",
    "kv_lora_rank",
    "q_lora_rank",
    "sliding_window",
    "layer_types",
    "attn_logit_softcapping",
    "final_logit_softcapping",
)


def _family(text: dict[str, Any], name: str) -> tuple[str, _Family]:
    model_type = text.get("model_type")
    if model_type is None:
        unknown = [k for k in _FEATURE_KEYS if text.get(k) not in (None, [], False)]
        if unknown:
            raise ValueError(
                f"config.json of {name!r} has no model_type but keys a dense decoder does not have: "
                f"{', '.join(unknown)}; give its model_type (known: {', '.join(FAMILIES)})"
            )
        return "llama", FAMILIES["llama"]
    if model_type not in FAMILIES:
        raise ValueError(
            f"config.json of {name!r} is a {model_type!r}, an architecture the emulator does not "
            f"model; known: {', '.join(FAMILIES)}"
        )
    return model_type, FAMILIES[model_type]


def _sliding(text: dict[str, Any], family: _Family, layers: int) -> tuple[int | None, int]:
    """The attention window and how many layers use it; ``layer_types``, where config.json has it, says which."""
    window = text.get("sliding_window")
    if family.sliding == "qwen" and not text.get("use_sliding_window"):
        window = None
    if family.sliding == "none" or not window:
        return None, 0
    types = text.get("layer_types")
    if types is None:
        if family.sliding == "qwen":
            start = int(text.get("max_window_layers", 0))
            types = ["sliding_attention" if i >= start else "full_attention" for i in range(layers)]
        else:
            types = [
                "sliding_attention" if family.sliding == "all" or i % 2 == 0 else "full_attention"
                for i in range(layers)
            ]
    unknown = sorted(set(types) - {"sliding_attention", "full_attention"})
    if unknown or len(types) != layers:
        raise ValueError(
            f"layer_types must give one of sliding_attention, full_attention per layer; got "
            f"{len(types)} entries for {layers} layers{', with ' + ', '.join(unknown) if unknown else ''}"
        )
    return int(window), types.count("sliding_attention")


def _moe(text: dict[str, Any], kind: str, layers: int) -> MoE:
    if kind in ("mixtral", "gpt_oss"):
        return MoE(
            int(text["num_local_experts"]),
            int(text["num_experts_per_tok"]),
            int(text["intermediate_size"]),
            expert_bias=kind == "gpt_oss",
            router_bias=kind == "gpt_oss",
        )
    experts_key = "n_routed_experts" if kind == "deepseek" else "num_experts"
    inter = int(text["moe_intermediate_size"])
    if kind == "deepseek":
        # DeepseekV2Config: layer i is MoE when i >= first_k_dense_replace and i % moe_layer_freq == 0.
        first, freq = int(text.get("first_k_dense_replace") or 0), int(text.get("moe_layer_freq") or 1)
        dense = sum(1 for i in range(layers) if i < first or i % freq)
        shared = int(text.get("n_shared_experts") or 0) * inter
        groups = int(text.get("n_group") or 1)
        if groups < 1 or int(text[experts_key]) % groups:
            raise ValueError(
                f"n_group ({groups}) must divide n_routed_experts ({text[experts_key]}) into groups "
                "of consecutive experts"
            )
    else:
        # Qwen2MoeConfig: layer i is sparse unless listed in mlp_only_layers or (i + 1) % decoder_sparse_step.
        step, only = int(text.get("decoder_sparse_step") or 1), set(text.get("mlp_only_layers") or ())
        dense = sum(1 for i in range(layers) if i in only or (i + 1) % step)
        shared, groups = int(text.get("shared_expert_intermediate_size") or 0), 1
    return MoE(
        int(text[experts_key]),
        int(text["num_experts_per_tok"]),
        inter,
        shared_intermediate_size=shared,
        num_dense_layers=dense,
        shared_expert_gate=kind == "qwen2_moe",
        num_groups=groups,
    )


def _mla(text: dict[str, Any]) -> MLA:
    return MLA(
        int(text["kv_lora_rank"]),
        int(text["qk_nope_head_dim"]),
        int(text["qk_rope_head_dim"]),
        int(text["v_head_dim"]),
        int(text.get("q_lora_rank") or 0),
    )


def _softcap(text: dict[str, Any], key: str, family: _Family) -> float | None:
    value = text.get(key) if family.softcap else None
    return float(value) if value else None


def shape_from_config(config: dict[str, Any], name: str = "model") -> ModelShape:
    """Build a ModelShape from a parsed HF ``config.json``; names every missing key, and the architecture
    when the emulator does not model it."""
    text = config.get("text_config", config)
    model_type, family = _family(text, name)
    required = _COMMON + family.required + _MOE_KEYS.get(family.moe, ()) + (_MLA_KEYS if family.mla else ())
    missing = [k for k in required if text.get(k) is None]
    if missing:
        raise ValueError(f"config.json of {name!r} ({model_type}) lacks {', '.join(map(repr, missing))}")
    if text.get("mlp_bias"):
        raise ValueError(f"config.json of {name!r} sets mlp_bias, which the emulator does not model")
    hidden, heads, layers = int(text["hidden_size"]), int(text["num_attention_heads"]), int(text["num_hidden_layers"])
    window, sliding_layers = _sliding(text, family, layers)
    mla = _mla(text) if family.mla else None
    bias = bool(text.get(family.bias_key)) if family.bias_key else False
    shape = ModelShape(
        name=name,
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=int(text.get("num_key_value_heads") or heads),
        head_dim=(mla.qk_nope_head_dim + mla.qk_rope_head_dim if mla else int(text.get("head_dim") or hidden // heads)),
        intermediate_size=int(text["intermediate_size"]),
        vocab_size=int(text["vocab_size"]),
        tie_word_embeddings=bool(
            config.get("tie_word_embeddings", text.get("tie_word_embeddings", family.tie_default))
        ),
        dtype=str(text.get("torch_dtype") or text.get("dtype") or "bfloat16"),
        max_position_embeddings=int(text.get("max_position_embeddings", 4096)),
        architecture=model_type,
        qkv_bias=family.qkv_bias or bias,
        o_bias=bias,
        qk_norm=family.qk_norm,
        norms_per_layer=family.norms_per_layer,
        sliding_window=window,
        num_sliding_layers=sliding_layers,
        attn_logit_softcap=_softcap(text, "attn_logit_softcapping", family),
        final_logit_softcap=_softcap(text, "final_logit_softcapping", family),
        moe=_moe(text, family.moe, layers) if family.moe else None,
        mla=mla,
        quantization=quantization.weight_quant(config),
    )
    precision.dtype(shape.dtype)
    return shape


def builtin_model_names() -> list[str]:
    folder = resources.files("maia_serving.emulator") / "shapes"
    return sorted(Path(str(p)).stem for p in folder.iterdir() if str(p).endswith(".json"))


def with_expert_load(model: ModelShape, path: str | Path) -> ModelShape:
    """``model`` priced with the routing measured in ``path`` (``routing.py``: the file's format)."""
    if model.moe is None:
        raise ValueError(f"--expert-load {path}: {model.name} has no routed experts (a dense model)")
    load = load_expert_load(path, model.moe.num_experts, model.moe.top_k, model.num_moe_layers)
    return replace(model, moe=replace(model.moe, load=load))


def load_model_shape(spec: str | Path) -> ModelShape:
    """A shape from a model directory, a ``config.json`` path, or a built-in name."""
    path = Path(spec)
    if path.is_dir():
        path = path / "config.json"
    if not path.exists():
        builtin = Path(str(resources.files("maia_serving.emulator") / "shapes" / f"{spec}.json"))
        if not builtin.exists():
            raise FileNotFoundError(
                f"no model config at {spec!r}: give a model directory, a config.json, or one of "
                f"the built-in shapes: {', '.join(builtin_model_names())}"
            )
        path = builtin
    name = path.parent.name if path.name == "config.json" else path.stem
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not a valid config.json ({exc})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} is not a valid config.json (a JSON object is expected)")
    try:
        return shape_from_config(config, name=name)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path}: {exc}") from None
