"""Shared fixtures: the demo model, built once per checkout under models/demo."""

import fcntl
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.utils.e2e import SESSION_SERVER_FILES

ROOT = Path(__file__).resolve().parent.parent


# The slowest test files first (seconds each, summed over its tests, beside the other worker), the rest after
# them in their own order: `make test`'s pytest-xdist workers each take the next file when they run low (with
# --no-loadscope-reorder; xdist would otherwise start with the files of most tests, the unit tests), so the
# long files overlap instead of one worker finishing the longest alone. Only an order: a file missing here
# runs later, nothing is skipped.
SLOWEST_FIRST = (
    "e2e/test_sglang.py",  # 274 (2026-12-07, 040d9ce's fresh-clone .ci/run); with the other session-server
    # files (test_engine_tools 265, test_mx_serve 196, test_vllm_fp8 39, test_reliability 17, test_serve 5) one
    # scope of about 800 s, the longest: first
    "e2e/test_collectives.py",  # 315
    "e2e/test_families_serve.py",  # 233
    "e2e/test_reshard_serve.py",  # 214
    "e2e/test_vllm_offline.py",  # 141
    "e2e/test_parity.py",  # 115, models/recall built on the way
    "e2e/test_proxy.py",  # 83
    "e2e/test_errors.py",  # 68
)

# `--dist loadfile` takes the files that use the session-wide servers as one file (tests/utils/e2e.py says why).
SESSION_SERVERS = {"maia_server", "sglang_server", "served"}
SHARED = "session-servers"


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    """pytest-xdist's --dist loadfile with SESSION_SERVER_FILES as one file."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class SharedServersOnOneWorker(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            file = super()._split_scope(nodeid)
            return SHARED if file.removeprefix("tests/") in SESSION_SERVER_FILES else file

    return SharedServersOnOneWorker(config, log)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    tests = ROOT / "tests"
    files = {item: item.path.relative_to(tests).as_posix() for item in items}
    unlisted = {files[item] for item in items if SESSION_SERVERS & set(item.fixturenames)} - set(SESSION_SERVER_FILES)
    if unlisted:
        raise pytest.UsageError(f"{sorted(unlisted)} use a session-wide server: add them to SESSION_SERVER_FILES")
    group = {name: SHARED if name in SESSION_SERVER_FILES else name for name in files.values()}
    rank: dict[str, int] = {}
    for i, name in enumerate(SLOWEST_FIRST):
        rank.setdefault(group.get(name, name), i)
    items.sort(key=lambda item: rank.get(group[files[item]], len(rank)))


def built_once(path: Path, build: Callable[[Path], object]) -> Path:
    """``path``, built by ``build`` unless its weights are there. Under a file lock: `make test`'s two
    pytest-xdist workers may both ask for a model of a fresh clone, and only one may build it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (path / "model.safetensors").exists():
            build(path)
    return path


@pytest.fixture(scope="session")
def demo_model() -> Path:
    from maia_serving.tools.training.demo import build_demo_model

    return built_once(ROOT / "models" / "demo", build_demo_model)


@pytest.fixture(scope="session")
def recall_model(demo_model) -> Path:
    """models/recall: the demo model trained to continue each parity prompt with a stdlib passage (under a minute;
    tests/utils/recall_model.py says why parity needs it)."""
    from tests.utils.recall_model import build_recall_model

    return built_once(ROOT / "models" / "recall", lambda out: build_recall_model(demo_model, out))


def _family_model(family: str) -> Path:
    """A demo-model sibling of another family (maia_serving.tools.training.demo.FAMILIES), built once per checkout."""
    from maia_serving.tools.training.demo import build_demo_model

    return built_once(
        ROOT / "models" / f"demo-{family}", lambda path: build_demo_model(path, family=family, overwrite=True)
    )


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
