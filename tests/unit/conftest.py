"""Shared by every unit test folder: pytest puts this file's folder on ``sys.path`` when it loads
it (rootdir "prepend" import mode, no ``__init__.py``), so tests in the subfolders (kernels/,
sglang/, vllm/) import the helper modules that live here: ``fp8_spec_table`` (FP8 codes worked
out from the OCP spec) and ``attention_float64`` (the float64 attention reference and its
bf16 tolerance)."""
