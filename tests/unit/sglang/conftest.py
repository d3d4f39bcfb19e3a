"""Unit tests of the SGLang adapter: they import SGLang, so they run in .venv-sglang
(`make test` runs them there); in the vLLM environment they are skipped."""

import pytest

# "sglang.srt", not "sglang": with tests/unit on sys.path, this very folder would pass for a
# namespace package named sglang.
pytest.importorskip("sglang.srt", reason="the SGLang adapter's unit tests run in .venv-sglang (make test)")
