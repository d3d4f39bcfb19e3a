"""Unit tests of the SGLang adapter: they import SGLang, so they run in .venv-sglang
(`make test` runs them there); in the vLLM environment they are skipped."""

import pytest

pytest.importorskip("sglang", reason="the SGLang adapter's unit tests run in .venv-sglang (make test)")
