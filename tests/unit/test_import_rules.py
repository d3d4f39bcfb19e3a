"""The house's import rules, read from the source (every import, a function's lazy ones included) and checked in a
fresh interpreter: which room may import which, so that "the emulator imports no torch and no engine" holds by
construction rather than by accident, and no two modules import each other round a cycle."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "maia_serving"
ENGINES = ("vllm", "sglang")
TORCH = ("torch", "triton", "transformers", "safetensors")

# Of our own rooms, what each may import (besides itself): the floors of the README's map, each importing only
# the floors below it. The adapters reach the emulator through its public names (no ``_private`` one) and never
# each other.
FLOORS = ("formats", "envs", "emulator", "ops", "tools", "serving")
ALLOWED = {name: set(FLOORS[:i]) for i, name in enumerate(FLOORS)} | {
    "vllm": set(FLOORS),
    "sglang": set(FLOORS),
    "cli": set(FLOORS) | {"vllm"},  # calibrate-host times vLLM's engine (vllm/step_timing.py)
    "torch": {"formats", "envs", "emulator"},  # the torch device: a third way into the one cost model
    "torch_autoload": {"envs", "torch"},  # PyTorch's entry point into it
    "zoo": set(),  # the built-in models of `profile`: their libraries' classes, nothing of ours
    "onnx_import": set(),  # ONNX graphs as torch modules: onnx and torch, nothing of ours
}
ALLOWED["tools"] |= {"torch", "zoo", "onnx_import"}  # `profile` runs a model on the torch device
# Third-party imports a room may never make, even lazily.
FORBIDDEN = {
    "formats": ENGINES + TORCH + ("numpy", "yaml"),
    "emulator": ENGINES + TORCH,
    "ops": ENGINES,
    "serving": ENGINES,
    "tools": ENGINES,
    "torch": ENGINES,
    "torch_autoload": ENGINES + TORCH,  # runs inside `import torch`: nothing of it at the top
    "zoo": ENGINES,
    "onnx_import": ENGINES,
    "cli": ENGINES + TORCH,  # the verbs' modules load torch only when they run
}


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imports(path: Path, name: str, top_level_only: bool = False) -> list[tuple[str, str]]:
    """(module, imported name or "") for every import of ``path``; relative imports resolved."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    nodes = tree.body if top_level_only else ast.walk(tree)
    found = []
    for node in nodes:
        if isinstance(node, ast.Import):
            found += [(alias.name, "") for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            found += [(base, alias.name) for alias in node.names]
    return found


def room(module: str) -> str:
    return module.split(".")[1] if module.count(".") else ""


MODULES = modules()


def own_target(module: str, name: str) -> str:
    """The module an import of ``name`` from ``module`` loads: a submodule where there is one."""
    return f"{module}.{name}" if f"{module}.{name}" in MODULES else module


@pytest.mark.parametrize("name", [n for n in MODULES if room(n) in ALLOWED])
def test_each_room_imports_only_what_it_may(name):
    here = room(name)
    wrong = []
    for module, imported in imports(MODULES[name], name):
        top = module.split(".")[0]
        if top == "maia_serving":
            there = room(own_target(module, imported)) or room(module)
            if there and there != here and there not in ALLOWED[here]:
                wrong.append(f"{module} ({there}/ is not among {sorted(ALLOWED[here]) or 'none'})")
            if here in ENGINES and there == "emulator" and imported.startswith("_"):
                wrong.append(f"{module}.{imported} (the emulator's private name)")
        elif top in FORBIDDEN.get(here, ()):
            wrong.append(f"{module} ({here}/ may not import {top})")
    assert not wrong, f"{name} imports: {'; '.join(wrong)}"


def test_no_import_cycles():
    """Module-level imports only: a cycle held apart by a function's lazy import is still a design smell, but
    the rules above already forbid the arrows that made them (envs -> emulator, emulator -> ops)."""
    graph = {
        name: {own_target(m, i) for m, i in imports(path, name, top_level_only=True) if m.startswith("maia_serving")}
        & set(MODULES)
        for name, path in MODULES.items()
    }
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node] - {node}):
            if nxt.startswith(node + "."):  # a package importing its own submodule is no cycle
                continue
            if state.get(nxt) == 1 and not node.startswith(nxt + "."):
                return trail + [node, nxt]
            if nxt not in state and (cycle := visit(nxt, trail + [node])):
                return cycle
        state[node] = 2
        return None

    for name in MODULES:
        if name not in state and (cycle := visit(name, [])):
            pytest.fail(f"import cycle: {' -> '.join(cycle[cycle.index(cycle[-1]) :])}")


def _loaded_after(modules: list[str], watched: tuple[str, ...]) -> list[str]:
    code = (
        f"import sys\nfor m in {modules!r}: __import__(m)\nprint(','.join(w for w in {watched!r} if w in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return [w for w in out.stdout.strip().split(",") if w]


def test_the_emulator_loads_no_torch_and_no_engine():
    """In a fresh interpreter: every module of formats/ and emulator/ imported, and none of torch or the engines
    came with them (ours are pure Python with numpy and yaml)."""
    ours = [n for n in MODULES if room(n) in ("formats", "emulator")]
    assert _loaded_after(ours, ("torch", "triton", "vllm", "sglang", "transformers")) == []


def test_formats_is_a_leaf():
    ours = [n for n in MODULES if room(n) == "formats"]
    others = tuple(n for n in MODULES if room(n) not in ("formats", "")) + ("numpy", "yaml")
    assert _loaded_after(ours, others) == []


def test_the_cli_starts_without_torch():
    """``maia-serving fit`` answers in a fraction of a second: the verbs' modules load torch only when they run."""
    assert _loaded_after(["maia_serving.cli.main"], ("torch", "triton", "vllm", "sglang")) == []
