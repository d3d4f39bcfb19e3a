"""A small *trained* Llama for accuracy measurements (FP8 KV cache vs BF16).

The demo model has random weights: fine for plumbing, useless for accuracy, since a
random model's logits barely depend on what the KV cache holds. This one is trained for a
few minutes on two CPU cores on the Python stdlib's sources, so its perplexity on held-out
stdlib files is far below the vocabulary size and KV-cache errors show up in it.

Deterministic: sorted files, a fixed split (every ``heldout_every``-th file is held out),
one seeded generator for the batches, ``torch.use_deterministic_algorithms`` and a fixed
thread count. The same seed, steps, Python and torch give the same weights.

The output directory holds a servable checkpoint (bf16 safetensors, config.json with
``dtype: bfloat16``, tokenizer with the chat template, generation_config.json) plus
``heldout.txt`` (held-out text for perplexity), ``calibration.txt`` (training-split text
for ``maia-serving calibrate-kv``) and ``training.json`` (the losses below).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from maia_serving.tools.outdir import output_dir
from maia_serving.tools.training import LlamaShape
from maia_serving.tools.training.tokenizer import stdlib_files, train_tokenizer

HELDOUT_FILE = "heldout.txt"
CALIBRATION_FILE = "calibration.txt"
REPORT_FILE = "training.json"
NUM_THREADS = 2


TRAIN_SHAPE = LlamaShape(
    vocab_size=4096,
    hidden_size=256,
    intermediate_size=688,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    max_position_embeddings=256,  # the training context
)


@dataclass(frozen=True)
class TrainConfig:
    """Defaults fit about 6 minutes on two free cores (about 0.7 s per step). Small batches and
    a high peak rate learn the most in a budget this short: 400 x 8 beat 200 x 16 at 2e-3
    (held-out perplexity 173 vs 213) and 400 x 8 at 5e-3 (behind at mid-run)."""

    steps: int = 400
    batch_size: int = 8
    lr: float = 3e-3
    warmup_steps: int = 40
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    heldout_every: int = 10  # file i is held out when i % heldout_every == heldout_every - 1
    heldout_bytes: int = 150_000
    calibration_bytes: int = 100_000
    eval_windows: int = 64  # windows for the train-split loss at the end


def eval_window(shape: LlamaShape = TRAIN_SHAPE) -> int:
    """Tokens per evaluation window: the context less one, since vLLM refuses a prompt as long
    as max_model_len when it must generate (prompt_logprobs needs max_tokens >= 1)."""
    return shape.max_position_embeddings - 1


def text_windows(token_ids: list[int], window: int) -> list[list[int]]:
    """Non-overlapping windows of ``window`` tokens; the remainder is dropped."""
    return [token_ids[i : i + window] for i in range(0, len(token_ids) - window + 1, window)]


def split_files(files: list[Path], every: int) -> tuple[list[Path], list[Path]]:
    """(train, heldout): every ``every``-th file of the sorted list is held out."""
    heldout = [f for i, f in enumerate(files) if i % every == every - 1]
    return [f for f in files if f not in heldout], heldout


def _capped_text(files: list[Path], max_bytes: int) -> str:
    """The files' texts joined, cut at the last line end within ``max_bytes`` UTF-8 bytes."""
    parts, size = [], 0
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace") + "\n"
        parts.append(text)
        size += len(text.encode())
        if size >= max_bytes:
            break
    joined = "".join(parts).encode()[:max_bytes].decode("utf-8", errors="ignore")
    return joined[: joined.rfind("\n") + 1]


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio`` of the peak."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def mean_nll(model, windows: list[list[int]], batch_size: int = 16) -> float:
    """Mean next-token negative log-likelihood over the windows (first token of each unscored)."""
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(windows), batch_size):
            ids = torch.tensor(windows[i : i + batch_size])
            logits = model(input_ids=ids[:, :-1], use_cache=False).logits.float()
            nll = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
            )
            total += nll.item()
            count += ids[:, 1:].numel()
    return total / count


def heldout_perplexity(model_dir: Path, dtype: str, attn_implementation: str | None = None) -> tuple[float, int]:
    """(perplexity, tokens scored) of the saved checkpoint on its ``heldout.txt`` with
    transformers, computed in ``dtype``; ``attn_implementation`` (default: the config's) lets
    ``maia-serving qat-kv`` score with a fake-quantized KV cache."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=getattr(torch, dtype), attn_implementation=attn_implementation
    ).eval()
    ids = tokenizer((model_dir / HELDOUT_FILE).read_text(), add_special_tokens=False)["input_ids"]
    windows = text_windows(ids, model.config.max_position_embeddings - 1)
    return math.exp(mean_nll(model, windows)), len(windows) * (len(windows[0]) - 1)


def setup_determinism(seed: int) -> None:
    """Fixed threads, deterministic kernels and a seeded global generator: same inputs, same weights."""
    import torch

    torch.set_num_threads(NUM_THREADS)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(seed)


def train_model(
    out: Path, cfg: TrainConfig = TrainConfig(), shape: LlamaShape = TRAIN_SHAPE, overwrite: bool = False
) -> dict:
    """Train, save the checkpoint and its texts to ``out``; return the report (also in training.json)."""
    if shape.head_dim % 32:
        raise ValueError(f"head_dim must be a multiple of 32 (vLLM's CPU attention), got {shape.head_dim}")
    with output_dir(out, overwrite) as work:
        return _train(work, cfg, shape)


def _train(out: Path, cfg: TrainConfig, shape: LlamaShape) -> dict:
    import torch
    from tqdm import tqdm
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    start = time.perf_counter()
    setup_determinism(cfg.seed)

    train_files, heldout_files = split_files(stdlib_files(), cfg.heldout_every)
    tokenizer = train_tokenizer(shape.vocab_size, train_files)  # never sees the held-out files
    heldout_text = _capped_text(heldout_files, cfg.heldout_bytes)
    (out / HELDOUT_FILE).write_text(heldout_text)
    (out / CALIBRATION_FILE).write_text(_capped_text(train_files, cfg.calibration_bytes))

    encoded = tokenizer(
        [p.read_text(encoding="utf-8", errors="replace") for p in train_files], add_special_tokens=False
    )["input_ids"]
    stream = torch.tensor([t for ids in encoded for t in [tokenizer.bos_token_id, *ids]], dtype=torch.long)
    ctx = shape.max_position_embeddings
    train_windows = [
        stream[s : s + eval_window(shape)].tolist()
        for s in torch.linspace(0, len(stream) - ctx - 1, cfg.eval_windows).long().tolist()
    ]

    config = LlamaConfig(
        **asdict(shape),
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="bfloat16",
    )
    model = LlamaForCausalLM(config).float().train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
    )
    gen = torch.Generator().manual_seed(cfg.seed)
    offsets = torch.arange(ctx + 1)

    recent: list[float] = []
    bar = tqdm(range(cfg.steps), desc="train", unit="step")
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        starts = torch.randint(0, len(stream) - ctx - 1, (cfg.batch_size,), generator=gen)
        batch = stream[starts[:, None] + offsets]
        logits = model(input_ids=batch[:, :-1], use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        recent = (recent + [loss.item()])[-20:]
        bar.set_postfix(loss=f"{sum(recent) / len(recent):.3f}", lr=f"{lr_at(step, cfg):.1e}")
    train_s = time.perf_counter() - start

    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    train_loss = mean_nll(model.float().eval(), train_windows)  # the saved (bf16-rounded) weights
    GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    ).save_pretrained(out)
    tokenizer.save_pretrained(out)

    ppl_fp32, heldout_tokens = heldout_perplexity(out, "float32")
    ppl_bf16, _ = heldout_perplexity(out, "bfloat16")
    report = {
        "config": asdict(cfg),
        "shape": asdict(shape),
        "num_params": sum(p.numel() for p in model.parameters()),
        "train_tokens": len(stream),
        "tokens_seen": cfg.steps * cfg.batch_size * ctx,
        "heldout_tokens_scored": heldout_tokens,
        "train_loss": train_loss,
        "heldout_loss": math.log(ppl_fp32),
        "heldout_ppl_hf_fp32": ppl_fp32,
        "heldout_ppl_hf_bf16": ppl_bf16,
        "last20_batch_loss": sum(recent) / len(recent),
        "train_s": train_s,
        "total_s": time.perf_counter() - start,
    }
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return report
