"""Shared fixtures: the demo model, built once per checkout under models/demo."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def demo_model() -> Path:
    from maia_serving.models.demo import build_demo_model

    path = ROOT / "models" / "demo"
    if not (path / "model.safetensors").exists():
        build_demo_model(path)
    return path
