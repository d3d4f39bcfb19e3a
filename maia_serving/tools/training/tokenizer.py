"""A byte-level BPE tokenizer trained, deterministically, on the Python stdlib's sources.

Every machine with Python has the same text; sorting the files and training on one
thread makes the vocabulary the same on each of them for a given Python version.
"""

from __future__ import annotations

import sysconfig
from collections.abc import Iterator
from pathlib import Path

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]

# Renders OpenAI-style messages; the assistant turn ends with <|end|>.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def stdlib_files(limit: int | None = None) -> list[Path]:
    """The stdlib's top-level ``*.py`` files, sorted; tests and site-packages excluded."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if p.is_file())
    return files[:limit] if limit else files


def iter_text(files: list[Path]) -> Iterator[str]:
    for path in files:
        yield path.read_text(encoding="utf-8", errors="replace")


def train_tokenizer(vocab_size: int, files: list[Path]):
    """Train the BPE and wrap it as a transformers fast tokenizer."""
    import os

    os.environ.setdefault("RAYON_NUM_THREADS", "1")  # one thread: a deterministic merge order
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(iter_text(files), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="<|end|>",
        unk_token="<unk>",
        pad_token="</s>",
        chat_template=CHAT_TEMPLATE,
    )
