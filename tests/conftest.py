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


def _family_model(family: str) -> Path:
    """A demo-model sibling of another family (maia_serving.models.demo.FAMILIES), built once per checkout."""
    from maia_serving.models.demo import build_demo_model

    path = ROOT / "models" / f"demo-{family}"
    if not (path / "model.safetensors").exists():
        build_demo_model(path, family=family, overwrite=True)
    return path


@pytest.fixture(scope="session")
def sliding_window_model() -> Path:
    """The demo shape as a Mistral whose every layer attends over its last 16 keys."""
    return _family_model("sliding-window")


@pytest.fixture(scope="session")
def moe_model() -> Path:
    """The demo shape as a Mixtral: 4 experts, 2 per token."""
    return _family_model("moe")


@pytest.fixture(scope="session")
def hybrid_window_model() -> Path:
    """The demo shape as an Olmo-3: layer 0 attends over its last 16 keys, layer 1 over all."""
    return _family_model("hybrid-window")
