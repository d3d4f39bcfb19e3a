"""A model that recalls what it was taught: the demo model's shape and tokenizer, trained until it continues each
of a set of prompts with a passage of the Python stdlib that follows the prompt there.

For parity tests (tests/e2e/test_parity.py): greedy decoding is compared token for token between the engines
and transformers, which needs logits whose best token leads by far at every step. A random model's logits are
flat (every rounding difference picks another token); a briefly trained language model leads by little at one
step in seven (models/trained: 52 of 384 steps within 0.15 nats). A model that recalls its passages leads by
nats at every step, and any error in attention, positions or the KV cache breaks the recall. Built in under a
minute, where models/trained takes six on two free cores (it stays the model for accuracy: kv_accuracy.py).
"""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

from maia_serving.tools.training.tokenizer import stdlib_files

# What test_parity asks: method heads, imports, control flow, mid-line continuations.
PROMPTS = [f"def {name}(self" for name in ("run", "close", "read", "write", "add", "copy", "get", "set")] + [
    "import os\n",
    "class Parser:\n    def",
    "for line in",
    "if __name__ ==",
    "return self.",
    "    raise",
    "from collections import",
    "with open(",
]
CONTINUATION_TOKENS = 40  # past every test's max_tokens: the recall must cover all of its greedy steps
STEPS = 500
STOP_LOSS = 0.05


def passages(prompts: list[str], chars: int = 400) -> list[str]:
    """For each prompt, the ``chars`` characters that follow its first occurrence in the sorted stdlib files (or,
    for a prompt the stdlib does not hold, the first occurrence of its last line)."""
    keys = {p: p if any(p in t for t in _texts()) else p.splitlines()[-1].strip() for p in prompts}
    found: dict[str, str] = {}
    for text in _texts():
        for prompt, key in keys.items():
            at = text.find(key)
            if prompt not in found and at >= 0 and len(text) >= at + len(key) + chars:
                found[prompt] = text[at + len(key) : at + len(key) + chars]
        if len(found) == len(prompts):
            break
    missing = [p for p in prompts if p not in found]
    if missing:
        raise ValueError(f"no stdlib passage follows {missing}")
    return [found[p] for p in prompts]


@functools.cache
def _texts() -> list[str]:
    return [p.read_text(encoding="utf-8", errors="replace") for p in stdlib_files()]


def build_recall_model(demo: Path, out: Path, prompts: list[str] = PROMPTS) -> Path:
    """``demo``'s checkpoint, trained on each prompt's ids followed by its passage's first CONTINUATION_TOKENS ids,
    tokenized apart (the engines see the prompt's own ids: no BOS, as the tokenizer adds none)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    work = out.with_name(out.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(demo, work)
    tokenizer = AutoTokenizer.from_pretrained(work)
    rows = []
    for prompt, passage in zip(prompts, passages(prompts), strict=True):
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        rows.append(prompt_ids + tokenizer(passage, add_special_tokens=False)["input_ids"][:CONTINUATION_TOKENS])
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])
    labels = torch.tensor([r + [-100] * (width - len(r)) for r in rows])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(work, dtype=torch.float32).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    steps, loss = 0, float("inf")
    while loss >= STOP_LOSS:
        if steps == STEPS:
            raise RuntimeError(f"the recall model did not learn its passages in {STEPS} steps (loss {loss:.3f})")
        batch_loss = model(ids, labels=labels).loss
        batch_loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        steps, loss = steps + 1, batch_loss.item()
    (work / "recall.json").write_text(json.dumps({"steps": steps, "loss": loss, "prompts": prompts}))
    model.to(torch.bfloat16).save_pretrained(work, safe_serialization=True)
    work.rename(out)
    return out
