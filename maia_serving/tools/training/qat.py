"""KV-cache quantization-aware training: ``maia-serving qat-kv``.

Post-training KV quantization (PTQ) to a 4-bit format costs perplexity; a short fine-tune with the
KV cache fake-quantized in the loop teaches the weights to live with it. Every attention layer
quantizes and dequantizes exactly what a serving KV cache stores, the keys *after* the rotary
embedding and the values, with the ``maia_serving.ops`` references that define the serving
numerics, then attends over the dequantized values. The backward pass is the straight-through
estimator (STE): ``y = x + (dequant(quant(x)) - x).detach()``, done as an autograd function so the
forward is exactly ``dequant(quant(x))``. The gradient is passed through unmasked: every scale
below is recomputed from the data's own absmax, so no value is ever clipped as an outlier (an MX
block's largest element can round down to the element's max normal, but it is the block's most
important value, not one to silence).

Objective (``OBJECTIVES``): by default distillation, the KL divergence from the source model with an
unquantized cache (a frozen copy in memory: twice the weights) to the fake-quantized model, per
token, which targets the source's predictions rather than the text; ``lm`` is plain next-token
cross-entropy on the data.

Data: ``--data`` files, by default ``training_split_files()``: the stdlib sources ``train-model``
trained on, its held-out files excluded (1.2M tokens). The trained model's ``calibration.txt``
(29k tokens of the same split) also runs, but recovers much less (``QatConfig``).

Scales (nothing is learned; QAT trains the weights only):

- MX formats (mxfp8, mxfp6, mxfp6_e2m3, mxfp4): the E8M0 block scales are computed per block of 32
  on the fly, as the cache write does (OCP MX 6.3); MX formats take no per-tensor scale.
- ``nvfp4``: the E4M3 block scales per block of 16 on the fly, and the per-tensor float32 scale is
  calibrated from the current tensor (one layer's K or V for the whole batch, all KV heads):
  ``t = amax / (448 * 6)``, so the largest block's scale ``amax / (6 t)`` lands on E4M3's 448.
- ``fp8_e4m3``: per-tensor ``scale = amax / 448`` of the current tensor, the convention of
  ``maia_serving.tools.calibrate_kv`` (``absmax / fp8_max``) applied to the batch instead of a
  calibration set.

The hook is an attention function registered in transformers' ``AttentionInterface`` (and the
sdpa mask in ``AttentionMaskInterface``) under ``maia_kv_qat_<format>``; it fake-quantizes
``key``/``value`` (``[batch, kv_heads, seq, head_dim]``) and calls the sdpa implementation.

Weights written (``QatConfig.ema_decay``): the exponential moving average of the weights over the
steps (decay 0.99 a step, so about the last hundred steps count), not the last step's. Why: each
step's gradient comes from 8 windows, so the last step's weights carry that noise, and on the trained
model the noise is as large as what QAT wins back (0.43 of perplexity 170); the bf16 arithmetic of a
serving engine then lands the noisy weights anywhere in that range. Averaging keeps the fine-tune's
drift and drops its noise.

Deterministic (``train.setup_determinism``, one seeded generator for the batches): the same model,
data, format and settings give the same weights. Resumable: every ``save_every`` steps the model
and optimizer states, the step and the generators go to ``<out>.qat-state/checkpoint.pt``;
rerunning the same command resumes from there (a checkpoint of a different run is refused), and
the folder is removed once ``--out`` is written.

``--out`` is a servable checkpoint: bf16 safetensors, config.json with the source's attention
implementation (nothing QAT-specific), tokenizer, generation_config.json, the source's
``heldout.txt``/``calibration.txt`` when present, and ``qat.json`` (see ``QatReport``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch

from maia_serving.ops.fp8 import dequantize_fp8_ref, kv_absmax_ref, quantize_fp8_ref
from maia_serving.ops.mx import MX_FORMATS, dequantize_mx_ref, quantize_mx_ref
from maia_serving.tools.outdir import output_dir
from maia_serving.tools.training.train import (
    CALIBRATION_FILE,
    HELDOUT_FILE,
    TrainConfig,
    heldout_perplexity,
    lr_at,
    mean_nll,
    setup_determinism,
)

FP8_FORMAT = "fp8_e4m3"
QAT_FORMATS = (*MX_FORMATS, FP8_FORMAT)
E4M3_MAX, E2M1_MAX = 448.0, 6.0
ATTN_PREFIX = "maia_kv_qat_"
# "distill": KL divergence from the source model with an unquantized cache (a frozen teacher) to the
# fake-quantized student, per token; "lm": next-token cross-entropy on the data. Distillation is the
# default because it asks for exactly what QAT is for, the unquantized model's predictions, and a
# small data set cannot pull the weights far elsewhere: "lm" on the trained model's calibration.txt
# (29k tokens, ten passes in 150 steps, peak rate 3e-4) cut its loss from 4.96 to 3.95 and raised
# held-out perplexity from 170 to 211, where "distill" at that rate kept it at 170.07.
OBJECTIVES = ("distill", "lm")
REPORT_FILE = "qat.json"
STATE_DIR_SUFFIX = ".qat-state"
STATE_FILE = "checkpoint.pt"


@dataclass(frozen=True)
class QatConfig:
    """Defaults sized for two shared CPU cores and the trained model (about 7 minutes). The peak rate
    is small: the model is trained and only adapts to the quantized cache. Tuned on the trained
    model, mxfp4, held-out perplexity recovered from PTQ (of a 0.43 gap, 170.06 vs 169.63 bf16):
    on its calibration.txt 23% at 1e-4, 31% at 3e-5, 34% at 1e-5 (29k tokens: too few, the weights
    drift); on 1.5 MB of the stdlib training split 76% at 1e-4, 39% at 3e-5; on the whole training
    split (the default data) at 1e-4, 33% in 150 steps, 48% in 300, 57% in 400 (the default: held-out
    169.82 against PTQ's 170.06, 5 minutes) and 26% in 800: more text helps; past 400 steps the
    weights drift as much as they gain (the gap itself, 0.25% of perplexity, is small).

    Those last-step weights won back 57% in float32 but 38% scored in bf16 and 40% through vLLM,
    25% (float32) and 42% (bf16) with seed 1. Their moving average (``ema_decay`` 0.99, the default)
    wins back, seed 0: 58% float32, 61% bf16, 65% through vLLM, 57% through SGLang; seed 1: 32%,
    50%, 54% through vLLM; seed 2: 45%, 65% (all 167 held-out windows). Also tried, seed 1: 16
    windows a step, 39% (float32) and 45% (bf16) in twice the time; only the attention projections
    trainable, 2%."""

    fmt: str = "mxfp4"
    objective: str = "distill"  # see OBJECTIVES
    steps: int = 400
    batch_size: int = 8
    lr: float = 1e-4
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seq_len: int = 256  # tokens per training window, at most the model's max_position_embeddings
    seed: int = 0
    ema_decay: float = 0.99  # write the moving average of the weights (module doc); 0: the last step's
    save_every: int = 25
    eval_windows: int = 32  # training-data windows for the loss before and after


@dataclass(frozen=True)
class QatReport:
    """What ``qat.json`` holds. Perplexities are on the source's ``heldout.txt`` (None without
    one), computed in float32 on the bf16 checkpoints: ``bf16`` the source with an unquantized
    cache, ``ptq`` the source with the fake-quantized cache, ``qat`` the output with it,
    ``qat_unquantized`` the output without it. ``recovered`` is (ptq - qat) / (ptq - bf16)."""

    format: str
    config: dict
    model: str
    data: list[str]
    data_tokens: int
    loss_before: float  # fake-quantized KV, mean NLL on evenly spaced training-data windows
    loss_after: float
    heldout_ppl: dict[str, float] | None
    heldout_tokens_scored: int | None
    recovered: float | None
    resumed_from_step: int
    train_s: float
    total_s: float


def check_format(fmt: str) -> None:
    if fmt not in QAT_FORMATS:
        raise ValueError(f"unknown KV format {fmt!r} for qat-kv; choose one of: {', '.join(QAT_FORMATS)}")


def _calibrated_scale(x: torch.Tensor, full_scale: float) -> torch.Tensor:
    """Per-tensor ``amax / full_scale`` of ``x [..., heads, head_dim]`` (1.0 for an all-zero tensor)."""
    amax = kv_absmax_ref(x.reshape(-1, *x.shape[-2:])).max()
    return torch.where(amax > 0, amax / full_scale, torch.ones_like(amax)).reshape(1)


def fake_quantize_rows(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """``dequant(quant(x))`` in float32 for rows ``[..., num_kv_heads, head_dim]`` (module doc: scales)."""
    if fmt == FP8_FORMAT:
        scale = _calibrated_scale(x, E4M3_MAX)
        return dequantize_fp8_ref(quantize_fp8_ref(x, scale, "e4m3"), scale, "e4m3")
    scale = _calibrated_scale(x, E4M3_MAX * E2M1_MAX) if MX_FORMATS[fmt].scale == "e4m3" else None
    return dequantize_mx_ref(quantize_mx_ref(x, fmt, scale), fmt, x.shape[-1], scale)


class _StraightThrough(torch.autograd.Function):
    """Forward: the fake-quantized values exactly; backward: the gradient unchanged."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, fmt: str) -> torch.Tensor:
        # HF's [batch, kv_heads, seq, head_dim] -> the ops' [..., num_kv_heads, head_dim] rows and back.
        return fake_quantize_rows(x.transpose(1, 2), fmt).transpose(1, 2).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def fake_quantize_kv(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """STE fake-quantization of K or V as attention receives them: ``[batch, kv_heads, seq, head_dim]``."""
    return _StraightThrough.apply(x, fmt)


def _qat_attention(module, query, key, value, attention_mask, *args, fmt: str, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(
        module, query, fake_quantize_kv(key, fmt), fake_quantize_kv(value, fmt), attention_mask, *args, **kwargs
    )


def register_qat_attention(fmt: str) -> str:
    """Register (idempotent) the fake-quantizing attention for ``fmt``; return its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    check_format(fmt)
    name = ATTN_PREFIX + fmt
    AttentionInterface.register(name, partial(_qat_attention, fmt=fmt))
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, sdpa_mask)
    return name


def _check_model(model_dir: Path) -> None:
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"{model_dir} is not a model directory: no config.json there (pass a Hugging Face "
            "model folder with config.json and *.safetensors)"
        )


def _check_attention(model, model_dir: Path) -> None:
    """The hook needs a model whose attention goes through transformers' AttentionInterface and
    hands it K/V rows of a known head_dim."""
    if not model._can_set_attn_implementation():
        raise ValueError(
            f"{model_dir}: {type(model).__name__} does not dispatch attention through transformers' "
            "AttentionInterface, so its K/V cannot be fake-quantized; use a Llama-style model"
        )
    config = model.config
    if getattr(config, "head_dim", None) is None and config.hidden_size % config.num_attention_heads:
        raise ValueError(
            f"{model_dir}: head_dim is not set and hidden_size {config.hidden_size} is not a multiple "
            f"of num_attention_heads {config.num_attention_heads}; set head_dim in config.json"
        )


def training_split_files() -> list[Path]:
    """The stdlib files ``train-model`` trains on (its held-out split excluded): QAT's default data."""
    from maia_serving.tools.training.tokenizer import stdlib_files
    from maia_serving.tools.training.train import split_files

    return split_files(stdlib_files(), TrainConfig().heldout_every)[0]


def data_stream(tokenizer, data: list[Path], max_tokens: int | None = None) -> torch.Tensor:
    """The data files' tokens, each file after a BOS (as ``train-model`` builds its stream); with ``max_tokens``
    the first that many, and the files after them are not read (nor checked for being empty)."""
    if not data:
        raise ValueError("no --data files given; pass text file(s) to fine-tune on, e.g. the model's calibration.txt")
    missing = [str(p) for p in data if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"--data file(s) not found: {', '.join(missing)}")
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    ids: list[int] = []
    for path in data:
        if max_tokens is not None and len(ids) >= max_tokens:
            break
        file_ids = tokenizer(path.read_text(encoding="utf-8", errors="replace"), add_special_tokens=False)["input_ids"]
        if not file_ids:
            raise ValueError(f"--data file {path} is empty (no tokens); pass a file with text in it")
        ids += bos + file_ids
    return torch.tensor(ids[:max_tokens], dtype=torch.long)


def state_dir(out: Path) -> Path:
    """Where the resumable checkpoint lives: beside ``--out``, not inside it (``--out`` is written whole)."""
    return out.parent / (out.name + STATE_DIR_SUFFIX)


def _fingerprint(model_dir: Path, data: list[Path], cfg: QatConfig) -> str:
    """Identifies a run, so that a checkpoint is only resumed by the run that wrote it."""
    h = hashlib.sha256(json.dumps(asdict(cfg), sort_keys=True).encode())
    h.update((model_dir / "config.json").read_bytes())
    for weights in sorted(model_dir.glob("*.safetensors")):
        stat = weights.stat()
        h.update(f"{weights.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    for path in data:
        h.update(path.read_bytes())
    return h.hexdigest()


def _save_state(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # a run killed while saving keeps the previous checkpoint


def _load_state(path: Path, fingerprint: str) -> dict | None:
    if not path.is_file():
        return None
    state = torch.load(path, weights_only=True)
    if state["fingerprint"] != fingerprint:
        raise ValueError(
            f"{path} holds the checkpoint of a different qat-kv run (other model, data, format or "
            "settings); rerun with that run's arguments to resume it, or delete "
            f"{path.parent} to start over"
        )
    return state


def qat_kv(
    model_dir: Path,
    data: list[Path],
    out: Path,
    cfg: QatConfig = QatConfig(),
    overwrite: bool = False,
    progress: bool = True,
) -> QatReport:
    """Fine-tune ``model_dir`` with its KV cache fake-quantized to ``cfg.fmt``; write ``out``."""
    model_dir, out, data = Path(model_dir), Path(out), [Path(p) for p in data]
    check_format(cfg.fmt)
    if cfg.objective not in OBJECTIVES:
        raise ValueError(f"unknown QAT objective {cfg.objective!r}; choose one of: {', '.join(OBJECTIVES)}")
    _check_model(model_dir)
    if cfg.steps < 1 or cfg.save_every < 1 or cfg.batch_size < 1:
        raise ValueError("--steps, --batch-size and --save-every must be at least 1")
    if not 0.0 <= cfg.ema_decay < 1.0:
        raise ValueError(f"--ema-decay must be in [0, 1) (0: no average), got {cfg.ema_decay}")
    with output_dir(out, overwrite) as work:
        report = _qat(model_dir, data, work, state_dir(out) / STATE_FILE, cfg, progress)
    shutil.rmtree(state_dir(out), ignore_errors=True)
    return report


def _qat(model_dir: Path, data: list[Path], out: Path, state_path: Path, cfg: QatConfig, progress: bool) -> QatReport:
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    setup_determinism(cfg.seed)
    attn = register_qat_attention(cfg.fmt)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    stream = data_stream(tokenizer, data)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    _check_attention(model, model_dir)
    source_attn = model.config._attn_implementation
    seq = min(cfg.seq_len, model.config.max_position_embeddings)
    if len(stream) < seq + 2:
        raise ValueError(
            f"the --data files hold {len(stream)} tokens; a training window needs {seq + 2}: pass more text"
        )
    eval_windows = [
        stream[s : s + seq].tolist() for s in torch.linspace(0, len(stream) - seq, cfg.eval_windows).long().tolist()
    ]
    teacher = None
    if cfg.objective == "distill":
        teacher = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval().requires_grad_(False)
    model.set_attn_implementation(attn)
    loss_before = mean_nll(model.eval(), eval_windows)

    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    schedule = TrainConfig(steps=cfg.steps, lr=cfg.lr, warmup_steps=cfg.warmup_steps, min_lr_ratio=cfg.min_lr_ratio)
    gen = torch.Generator().manual_seed(cfg.seed)
    fingerprint = _fingerprint(model_dir, data, cfg)
    first, recent = 0, []
    state = _load_state(state_path, fingerprint)
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        first, recent = state["step"], state["recent"]
    params = list(model.parameters())
    ema = None
    if cfg.ema_decay:
        ema = state["ema"] if state is not None else [p.detach().clone() for p in params]

    model.train()
    offsets = torch.arange(seq + 1)
    train_start = time.perf_counter()
    bar = tqdm(
        range(first, cfg.steps),
        initial=first,
        total=cfg.steps,
        desc=f"qat-kv {cfg.fmt}",
        unit="step",
        disable=not progress,
    )
    for step in bar:
        lr = lr_at(step, schedule)
        for group in opt.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, len(stream) - seq - 1, (cfg.batch_size,), generator=gen)
        loss = train_step(model, opt, stream[starts[:, None] + offsets], cfg.grad_clip, teacher)
        if ema is not None:
            with torch.no_grad():
                for average, param in zip(ema, params):
                    average.lerp_(param, 1.0 - cfg.ema_decay)
        recent = (recent + [loss])[-20:]
        bar.set_postfix(loss=f"{sum(recent) / len(recent):.3f}", lr=f"{lr:.1e}")
        if (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
            _save_state(
                state_path,
                {
                    "fingerprint": fingerprint,
                    "step": step + 1,
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "generator": gen.get_state(),
                    "torch_rng": torch.get_rng_state(),
                    "recent": recent,
                    "ema": ema,
                },
            )
    train_s = time.perf_counter() - train_start
    if ema is not None:  # the average is what is written
        with torch.no_grad():
            for param, average in zip(params, ema):
                param.copy_(average)

    model.set_attn_implementation(source_attn)
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    for name in (HELDOUT_FILE, CALIBRATION_FILE):
        if (model_dir / name).is_file():
            shutil.copyfile(model_dir / name, out / name)
    model.float().eval().set_attn_implementation(attn)
    loss_after = mean_nll(model, eval_windows)  # the saved (bf16-rounded) weights

    ppl, scored, recovered = None, None, None
    if (model_dir / HELDOUT_FILE).is_file():
        ppl = {}
        ppl["bf16"], scored = heldout_perplexity(model_dir, "float32")
        ppl["ptq"], _ = heldout_perplexity(model_dir, "float32", attn)
        ppl["qat"], _ = heldout_perplexity(out, "float32", attn)
        ppl["qat_unquantized"], _ = heldout_perplexity(out, "float32")
        gap = ppl["ptq"] - ppl["bf16"]
        recovered = (ppl["ptq"] - ppl["qat"]) / gap if gap > 0 else None
    report = QatReport(
        format=cfg.fmt,
        config=asdict(cfg),
        model=str(model_dir),
        data=[str(p) for p in data],
        data_tokens=len(stream),
        loss_before=loss_before,
        loss_after=loss_after,
        heldout_ppl=ppl,
        heldout_tokens_scored=scored,
        recovered=recovered,
        resumed_from_step=first,
        train_s=train_s,
        total_s=time.perf_counter() - start,
    )
    (out / REPORT_FILE).write_text(json.dumps(asdict(report), indent=2) + "\n")
    return report


def train_step(model, opt: torch.optim.Optimizer, batch: torch.Tensor, grad_clip: float, teacher=None) -> float:
    """One optimizer step on ``batch [batch, seq + 1]``; returns the loss: the KL divergence from
    ``teacher`` per token, or without one the next-token cross-entropy (``OBJECTIVES``)."""
    logits = model(input_ids=batch[:, :-1], use_cache=False).logits
    logits = logits.reshape(-1, logits.shape[-1])
    if teacher is None:
        loss = torch.nn.functional.cross_entropy(logits, batch[:, 1:].reshape(-1))
    else:
        with torch.no_grad():
            target = teacher(input_ids=batch[:, :-1], use_cache=False).logits.reshape(logits.shape)
        loss = torch.nn.functional.kl_div(
            logits.log_softmax(-1), target.log_softmax(-1), log_target=True, reduction="batchmean"
        )
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    return loss.item()
