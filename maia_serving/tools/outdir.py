"""Writing a model directory all at once or not at all.

Every command that writes a model directory (demo-model, train-model, calibrate-kv)
refuses a non-empty ``--out`` unless told to overwrite it, and writes into a temporary
sibling folder that is renamed into place only when everything is written: a run that
fails or is interrupted leaves nothing half-written, and an overwritten directory is
replaced whole, never merged.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def output_dir(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh folder to write into; on success it becomes ``out``."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file, not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(
            f"--out {out} is not empty; choose another directory or pass --overwrite to replace it whole"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield work
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            out.rename(old / out.name)
            work.rename(out)
            shutil.rmtree(old)
        else:
            work.rename(out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
