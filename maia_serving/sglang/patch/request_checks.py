"""Patch: refuse out-of-vocabulary token ids, plainly over-long prompts before tokenizing, and
unknown model names.

Why: SGLang 0.5.23 passes a prompt of token ids straight to the model, so an id outside
``[0, vocab_size)`` (``{"prompt": [1, 2, 1000000000]}``, or -1) fails in the embedding
with an IndexError that takes the whole process tree down; vLLM answers 400. And a
10 MB text prompt is tokenized (about 18 s here) before its length is checked. Both
checks raise the ValueError SGLang's own request validation raises, which its HTTP
layer answers with a 400, in the tokenizer manager, before the request reaches the
scheduler.

The length pre-check is sound: no token of the vocabulary stands for more characters
than its longest entry, so a text longer than that many characters per token of
context cannot fit, whatever it tokenizes to. Shorter texts are tokenized and checked
as SGLang checks them.

SGLang serves whatever ``model`` a request names; vLLM and the OpenAI API answer 404
for a model the server does not serve, and a client that names the wrong model should
learn so. The served name, the model path and SGLang's customary ``default`` are
accepted, with or without a ``:adapter`` suffix (SGLang's LoRA syntax).

When it can go: when SGLang validates prompt token ids against the vocabulary (the
length pre-check may stay as a speed-up) and checks model names.
"""

from __future__ import annotations

VALIDATE = "sglang.srt.managers.tokenizer_manager.TokenizerManager._validate_one_request"
TOKENIZE = "sglang.srt.managers.tokenizer_manager.TokenizerManager._tokenize_one_request"
HANDLE = "sglang.srt.entrypoints.openai.serving_base.OpenAIServingBase.handle_request"
# Normalization can expand a text (NFKC: one ligature becomes two letters): leave room.
_SLACK = 4


def check_token_ids(manager, obj, input_ids, *args, **kwargs) -> None:
    """Before SGLang's own checks: every id of a token-id prompt is in the vocabulary."""
    if getattr(obj, "input_ids", None) is None or not input_ids:
        return
    vocab = manager.model_config.vocab_size
    low, high = min(input_ids), max(input_ids)
    if low < 0 or high >= vocab:
        bad = low if low < 0 else high
        raise ValueError(f"The prompt contains token id {bad}, outside the model's vocabulary [0, {vocab}).")


def max_chars_per_token(tokenizer) -> int:
    """An upper bound on the characters one token stands for: its longest vocabulary entry
    (byte-level and SentencePiece spellings are never shorter than the text they decode to)."""
    cached = getattr(tokenizer, "_maia_max_chars_per_token", None)
    if cached is None:
        cached = max((len(t) for t in tokenizer.get_vocab()), default=1)
        tokenizer._maia_max_chars_per_token = cached
    return cached


def check_text_length(manager, obj, *args, **kwargs) -> None:
    """Before tokenizing: a text that cannot fit the context is refused at once."""
    text = getattr(obj, "text", None)
    if (
        not isinstance(text, str)
        or getattr(obj, "input_ids", None) is not None
        or manager.tokenizer is None
        or getattr(manager, "allow_auto_truncate", False)
    ):
        return
    limit = manager.context_len * max_chars_per_token(manager.tokenizer) * _SLACK
    if len(text) > limit:
        raise ValueError(
            f"The input ({len(text)} characters, more than {manager.context_len} tokens whatever "
            f"its tokenization) is longer than the model's context length ({manager.context_len} "
            "tokens)."
        )


def known_model(served: str, model_path: str, requested: str | None) -> bool:
    if not requested:
        return True  # the request model's own validation speaks for a missing name
    names = {served, model_path, "default"}
    return requested in names or any(requested.startswith(f"{name}:") for name in names)


def check_model(original, handler, request, *args, **kwargs):
    """Around OpenAIServingBase.handle_request: a 404 for a model this server does not serve."""
    manager = handler.tokenizer_manager
    requested = getattr(request, "model", None)
    if isinstance(requested, str) and not known_model(
        manager.served_model_name, manager.server_args.model_path, requested
    ):

        async def not_found():
            return handler.create_error_response(
                message=f"The model `{requested}` does not exist; this server serves `{manager.served_model_name}`.",
                err_type="NotFoundError",
                status_code=404,
            )

        return not_found()
    return original(handler, request, *args, **kwargs)


def register() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(VALIDATE, check_token_ids, HookType.BEFORE)
    HookRegistry.register(TOKENIZE, check_text_length, HookType.BEFORE)
    HookRegistry.register(HANDLE, check_model, HookType.AROUND)
