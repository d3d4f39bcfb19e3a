"""Peak memory of `maia-serving reshard` and `merge` on a generated checkpoint of a few GB.

The claim under test: both stream a tensor at a time, so the peak RSS above an idle
interpreter stays near the largest tensor, not the model size. Each command runs in a
fresh process; its peak RSS while working (Linux's VmHWM, reset after the imports) is
compared with its RSS after the imports. The checkpoint is a random Llama of about 1.1 B parameters
(2.2 GB in BF16) in one safetensors file per layer, as large checkpoints are sharded.
Result: benchmarks/out/reshard_memory.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from common import OUT

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 32000,
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}
IMPORTS = "import torch, safetensors, maia_serving.tools.checkpoints.reshard"


def write_checkpoint(out: Path, config: dict) -> tuple[int, int]:
    """A random checkpoint, one file per layer plus one for the ends; returns (total, largest) bytes."""
    import torch
    from safetensors.torch import save_file

    from maia_serving.tools.checkpoints.reshard import hf_tensors, read_arch

    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(config))
    shapes = hf_tensors(read_arch(config))
    groups: dict[str, dict] = {}
    for name, shape in shapes.items():
        part = name.split(".")[2] if name.startswith("model.layers.") else "ends"
        groups.setdefault(part, {})[name] = shape
    total = largest = 0
    gen = torch.Generator().manual_seed(0)
    weight_map = {}
    for part, names in groups.items():
        tensors = {n: torch.randn(s, generator=gen).to(torch.bfloat16) for n, s in names.items()}
        file = f"model-{part}.safetensors"
        save_file(tensors, out / file, metadata={"format": "pt"})
        sizes = [t.numel() * 2 for t in tensors.values()]
        total, largest = total + sum(sizes), max(largest, *sizes)
        weight_map.update(dict.fromkeys(names, file))
        del tensors
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    return total, largest


def _status_kib(field: str) -> str:
    return f"int(next(l for l in open('/proc/self/status') if l.startswith('{field}:')).split()[1])"


def peak_rss(work: str) -> tuple[int, int, float]:
    """RSS after the imports, peak RSS while ``work`` runs (bytes) and its wall seconds, in a fresh interpreter.

    The peak is Linux's VmHWM, reset after the imports (``clear_refs`` 5) so that it covers the work only.
    """
    code = (
        f"{IMPORTS}; from pathlib import Path; import time; open('/proc/self/clear_refs', 'w').write('5'); "
        f"rss = {_status_kib('VmRSS')}; t = time.perf_counter(); {work}; "
        f"print(rss, {_status_kib('VmHWM')}, time.perf_counter() - t)"
    )
    done = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    rss, peak, seconds = done.stdout.split()[-3:]
    return int(rss) * 1024, int(peak) * 1024, float(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tensor-parallel-size", type=int, default=2)
    parser.add_argument("--workdir", default=None, help="where the 3 copies of the checkpoint go (default: a temp dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        root = Path(tmp)
        total, largest = write_checkpoint(root / "src", CONFIG)
        base, reshard_peak, reshard_s = peak_rss(
            f"maia_serving.tools.checkpoints.reshard.reshard(Path('{root / 'src'}'), Path('{root / 'sharded'}'), "
            f"{args.tensor_parallel_size})"
        )
        merge_base, merge_peak, merge_s = peak_rss(
            f"maia_serving.tools.checkpoints.reshard.merge(Path('{root / 'sharded'}'), Path('{root / 'merged'}'))"
        )
    mib = 2**20
    result = {
        "model_bytes": total,
        "largest_tensor_bytes": largest,
        "tensor_parallel_size": args.tensor_parallel_size,
        "reshard_rss_after_imports_bytes": base,
        "reshard_peak_rss_bytes": reshard_peak,
        "reshard_s": reshard_s,
        "merge_rss_after_imports_bytes": merge_base,
        "merge_peak_rss_bytes": merge_peak,
        "merge_s": merge_s,
    }
    print(
        f"model {total / mib:.0f} MiB, largest tensor {largest / mib:.0f} MiB; "
        f"reshard TP {args.tensor_parallel_size}: "
        f"peak RSS {reshard_peak / mib:.0f} MiB, {(reshard_peak - base) / mib:.0f} MiB above the imports, "
        f"{reshard_s:.0f} s; merge: peak {merge_peak / mib:.0f} MiB, {(merge_peak - merge_base) / mib:.0f} MiB "
        f"above, {merge_s:.0f} s"
    )
    OUT.mkdir(exist_ok=True)
    (OUT / "reshard_memory.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
