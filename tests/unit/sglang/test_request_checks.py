"""The SGLang request checks: token ids outside the vocabulary, texts that cannot fit the
context (refused before tokenizing) and unknown model names, each as SGLang's HTTP layer
turns into a 4xx."""

import asyncio
from types import SimpleNamespace

import pytest

from maia_serving.sglang.patch import request_checks as rc


def _manager(vocab=1000, context=512, tokenizer=None, truncate=False):
    return SimpleNamespace(
        model_config=SimpleNamespace(vocab_size=vocab),
        context_len=context,
        tokenizer=tokenizer,
        allow_auto_truncate=truncate,
        served_model_name="demo",
        server_args=SimpleNamespace(model_path="/models/demo"),
    )


@pytest.mark.parametrize("ids,bad", [([1, 2, 1000], 1000), ([1, -1, 2], -1), ([10**9], 10**9)])
def test_token_ids_outside_the_vocabulary_are_refused(ids, bad):
    with pytest.raises(ValueError, match=f"token id {bad}, outside the model's vocabulary \\[0, 1000\\)"):
        rc.check_token_ids(_manager(), SimpleNamespace(input_ids=ids), ids)


def test_token_ids_inside_the_vocabulary_and_text_prompts_pass():
    rc.check_token_ids(_manager(), SimpleNamespace(input_ids=[0, 999]), [0, 999])
    # A text prompt's ids come from the tokenizer: nothing to check.
    rc.check_token_ids(_manager(vocab=10), SimpleNamespace(input_ids=None), [50, 60])


class _Tokenizer:
    def __init__(self, longest: int):
        self.vocab = {"a": 0, "x" * longest: 1}
        self.calls = 0

    def get_vocab(self):
        self.calls += 1
        return self.vocab


def test_a_text_that_cannot_fit_is_refused_before_tokenizing():
    tok = _Tokenizer(longest=8)
    manager = _manager(context=512, tokenizer=tok)
    limit = 512 * 8 * 4  # context x longest token x slack for normalization
    rc.check_text_length(manager, SimpleNamespace(text="a" * limit, input_ids=None))
    with pytest.raises(ValueError, match="longer than the model's context length \\(512 tokens\\)"):
        rc.check_text_length(manager, SimpleNamespace(text="a" * (limit + 1), input_ids=None))
    assert tok.calls == 1  # the vocabulary is scanned once


def test_the_length_check_leaves_truncation_and_token_prompts_to_sglang():
    manager = _manager(context=4, tokenizer=_Tokenizer(longest=1), truncate=True)
    rc.check_text_length(manager, SimpleNamespace(text="a" * 10**6, input_ids=None))
    manager = _manager(context=4, tokenizer=_Tokenizer(longest=1))
    rc.check_text_length(manager, SimpleNamespace(text=None, input_ids=[1] * 10))


def test_no_token_of_a_real_tokenizer_is_longer_than_its_vocabulary_entry(demo_model):
    """The bound the pre-check rests on, on the demo model's byte-level BPE."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo_model)
    longest = rc.max_chars_per_token(tok)
    text = "def main():\n    return {'a': [1, 2, 3]}  # café ünïcode \u2014 tabs\t\there\n" * 20
    assert len(text) <= len(tok(text, add_special_tokens=False)["input_ids"]) * longest


@pytest.mark.parametrize(
    "name,known",
    [
        ("demo", True),
        ("/models/demo", True),
        ("default", True),
        ("demo:my-lora", True),
        ("gpt-4", False),
        ("demox", False),
        ("", True),
    ],
)
def test_model_names(name, known):
    assert rc.known_model("demo", "/models/demo", name) is known


def test_an_unknown_model_gets_a_404_and_a_known_one_goes_through():
    calls = []

    async def original(handler, request, raw):
        calls.append(request.model)
        return "served"

    handler = SimpleNamespace(tokenizer_manager=_manager(), create_error_response=lambda **kw: kw)
    out = asyncio.run(rc.check_model(original, handler, SimpleNamespace(model="gpt-4"), None))
    assert out["status_code"] == 404 and "`gpt-4` does not exist" in out["message"] and "`demo`" in out["message"]
    assert asyncio.run(rc.check_model(original, handler, SimpleNamespace(model="demo"), None)) == "served"
    assert calls == ["demo"]
