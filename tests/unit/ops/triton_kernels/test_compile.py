"""Compile every kernel for an H100 (sm_90) without a GPU: catches what the interpreter lets
through (dtype rules, tl.dot shapes, constexpr misuse) in about a second per kernel.

The compiles run in a subprocess without TRITON_INTERPRET: once ``triton.language`` has been
imported in interpreter mode (as conftest.py does on a CPU host), its library functions
(``tl.max``, ``tl.sum``, ...) are interpreter objects and cannot be compiled.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

import pytest
import triton

from maia_serving.ops.mx import MX_FORMATS

try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError as exc:  # depends on the Triton version
    pytest.skip(
        f"Triton {triton.__version__} lacks ASTSource/GPUTarget: {exc}",
        allow_module_level=True,
    )

TARGET = GPUTarget("cuda", 90, 32)
RC = "maia_serving.ops.triton.reshape_and_cache"
PA = "maia_serving.ops.triton.paged_attention"
AB = "maia_serving.ops.triton.kv_absmax"
MX = "maia_serving.ops.triton.mx_cache"
_RC_POINTERS = {
    "key_ptr": "*bf16",
    "value_ptr": "*bf16",
    "slot_mapping_ptr": "*i64",
    "k_scale_ptr": "*fp32",
    "v_scale_ptr": "*fp32",
}
_PA_POINTERS = {
    "query_ptr": "*bf16",
    "out_ptr": "*bf16",
    "block_tables_ptr": "*i32",
    "seq_lens_ptr": "*i32",
    "query_start_loc_ptr": "*i32",
    "k_scale_ptr": "*fp32",
    "v_scale_ptr": "*fp32",
}


def _configs() -> dict[str, tuple[str, str, dict[str, str], dict]]:
    """id -> (module, kernel, pointer types, constexprs); tile sizes from the wrappers' helpers."""
    rc, pa, ab, mx = (importlib.import_module(m) for m in (RC, PA, AB, MX))
    block_h, block_d = rc._block_sizes(num_kv_heads=8, head_dim=80)
    rc_common = {"BLOCK_H": block_h, "BLOCK_D": block_d, "PER_HEAD_SCALE": True}
    u8, bf16 = (
        {"key_cache_ptr": "*u8", "value_cache_ptr": "*u8"},
        {"key_cache_ptr": "*bf16", "value_cache_ptr": "*bf16"},
    )
    pa_common = {
        "BLOCK_SIZE": 16,
        "FP8_E5M2": False,
        "CAUSAL": True,
        "HAS_WINDOW": False,
        **mx.attention_constexprs(None),
    }
    return {
        "reshape_and_cache-e4m3": (
            RC,
            "_reshape_and_cache_kernel",
            {**_RC_POINTERS, **u8},
            {**rc_common, "IS_FP8": True, "FP8_E5M2": False, "FP8_MAX": 448.0},
        ),
        "reshape_and_cache-e5m2": (
            RC,
            "_reshape_and_cache_kernel",
            {**_RC_POINTERS, **u8},
            {**rc_common, "IS_FP8": True, "FP8_E5M2": True, "FP8_MAX": 57344.0},
        ),
        "reshape_and_cache-bf16": (
            RC,
            "_reshape_and_cache_kernel",
            {**_RC_POINTERS, **bf16},
            {**rc_common, "IS_FP8": False, "FP8_E5M2": False, "FP8_MAX": 0.0},
        ),
        "paged_attention-fp8-decode-gqa4": (
            PA,
            "_paged_attention_kernel",
            {**_PA_POINTERS, **u8},
            {
                **pa_common,
                **pa._block_sizes(1, 4, 80),
                "QUERIES_PER_KV": 4,
                "IS_FP8": True,
                "PER_HEAD_SCALE": True,
            },
        ),
        "paged_attention-fp8-prefill": (
            PA,
            "_paged_attention_kernel",
            {**_PA_POINTERS, **u8},
            {
                **pa_common,
                **pa._block_sizes(512, 1, 80),
                "QUERIES_PER_KV": 1,
                "IS_FP8": True,
                "PER_HEAD_SCALE": False,
            },
        ),
        "paged_attention-bf16-gqa2": (
            PA,
            "_paged_attention_kernel",
            {**_PA_POINTERS, **bf16},
            {
                **pa_common,
                **pa._block_sizes(64, 2, 256),
                "QUERIES_PER_KV": 2,
                "IS_FP8": False,
                "PER_HEAD_SCALE": False,
            },
        ),
        "paged_attention-bf16-sliding-window": (
            PA,
            "_paged_attention_kernel",
            {**_PA_POINTERS, **bf16},
            {
                **pa_common,
                **pa._block_sizes(64, 2, 128),
                "QUERIES_PER_KV": 2,
                "IS_FP8": False,
                "PER_HEAD_SCALE": False,
                "HAS_WINDOW": True,
            },
        ),
        "kv_absmax": (
            AB,
            "_kv_absmax_kernel",
            {"x_ptr": "*bf16", "partial_ptr": "*fp32"},
            dict(zip(("BLOCK_T", "BLOCK_D"), ab._block_sizes(4096, 128))),
        ),
        **{
            f"reshape_and_cache_mx-{name}": (
                MX,
                "_reshape_and_cache_mx_kernel",
                {**_RC_POINTERS, **u8},
                {**mx.format_constexprs(fmt, 80), "PER_HEAD_SCALE": name == "nvfp4"},
            )
            for name, fmt in MX_FORMATS.items()
        },
        **{
            f"paged_attention-{name}-gqa4": (
                PA,
                "_paged_attention_kernel",
                {**_PA_POINTERS, **u8},
                {
                    **pa_common,
                    **pa._block_sizes(16, 4, 80),
                    **mx.attention_constexprs(fmt),
                    "QUERIES_PER_KV": 4,
                    "IS_FP8": False,
                    "PER_HEAD_SCALE": name == "nvfp4",
                },
            )
            for name, fmt in MX_FORMATS.items()
        },
    }


def _signature(fn, pointers: dict[str, str], constexprs: dict) -> dict[str, str]:
    """Argument types: pointers as given, strides i64, the softmax scale fp32, others i32."""

    def kind(name: str) -> str:
        if name in constexprs:
            return "constexpr"
        if name.endswith("_ptr"):
            return pointers[name]
        if "stride" in name:
            return "i64"
        return "fp32" if name == "softmax_scale" else "i32"

    return {name: kind(name) for name in fn.arg_names}


def compile_all() -> dict[str, dict]:
    """Compile each config; id -> {"error": text or None, "div_rn": IEEE division in PTX}."""
    results = {}
    for config_id, (module, name, pointers, constexprs) in _configs().items():
        fn = getattr(importlib.import_module(module), name)
        try:
            src = ASTSource(fn, _signature(fn, pointers, constexprs), constexprs)
            ptx = triton.compile(src, target=TARGET).asm["ptx"]
            results[config_id] = {"error": None, "div_rn": "div.rn.f32" in ptx}
        except Exception as exc:  # noqa: BLE001 - reported by the test of this config
            results[config_id] = {
                "error": f"{type(exc).__name__}: {exc}",
                "div_rn": False,
            }
    return results


@pytest.fixture(scope="module")
def compiled() -> dict[str, dict]:
    if "nvidia" not in triton.backends.backends:
        pytest.skip("this Triton has no NVIDIA backend to compile for")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # 3.9's default, set to silence its warning
    proc = subprocess.run(
        [sys.executable, __file__],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.splitlines()[-1])


@pytest.mark.parametrize("config_id", list(_configs()))
def test_kernel_compiles_for_sm90(config_id, compiled):
    assert compiled[config_id]["error"] is None, compiled[config_id]["error"]
    if config_id.startswith("reshape_and_cache-e") or config_id == "reshape_and_cache_mx-nvfp4":
        assert compiled[config_id]["div_rn"], "FP8 and NVFP4 quantization must divide as IEEE (div.rn)"


if __name__ == "__main__":
    print(json.dumps(compile_all()))
