"""The ledger of engine surfaces we depend on: each one resolvable, so an engine upgrade
that renames or removes one fails in tests and at startup, never silently.

A surface is a dotted name (``pkg.module.Class.method``), an instance attribute set by a
class or a module's functions (``pkg.module.Class#attr``, ``pkg.module#attr``: resolved on
the object or found in its source, since instances do not exist before the engine runs),
or an installed distribution (``dist:name``). Each says what kind of dependency it is, why we need it, and when it
can go. The engine adapters keep their own lists (``maia_serving.vllm.ledger``,
``maia_serving.sglang.ledger``). Imports no engine until resolving.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import pkgutil
import re
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Surface:
    target: str
    kind: str  # "subclass", "hook", "patch", "private attribute", "extension point", "install workaround"
    why: str
    until: str  # when it can go


class MissingSurface(RuntimeError):
    """The installed engine lacks a surface maia-serving depends on."""


def resolve(surface: Surface) -> object:
    """The object the surface names; MissingSurface if the installed engine lacks it."""
    target = surface.target
    try:
        if target.startswith("dist:"):
            return importlib.metadata.distribution(target.removeprefix("dist:"))
        name, _, attr = target.partition("#")
        obj = pkgutil.resolve_name(name)
        if attr and not hasattr(obj, attr) and not _assigned_in_source(obj, attr):
            raise AttributeError(f"{name} sets no attribute {attr!r}")
        return obj
    except (ImportError, AttributeError, ValueError, importlib.metadata.PackageNotFoundError) as exc:
        raise MissingSurface(
            f"{target} ({surface.kind}: {surface.why}) is missing from the installed engine: {exc}"
        ) from None


def _assigned_in_source(obj: Any, attr: str) -> bool:
    """Whether a class (or one of its bases) uses ``self.<attr>``, or a module ``<any>.<attr>``
    (set, perhaps by tuple unpacking, or read): a renamed attribute leaves no trace there.

    ``obj`` is whatever ``pkgutil.resolve_name`` found (typed Any there): inspect.getsource
    raises TypeError, caught below, for an object it has no source for."""
    prefix = r"self\." if inspect.isclass(obj) else r"\w\."
    pattern = re.compile(rf"{prefix}{re.escape(attr)}\b")
    for klass in inspect.getmro(obj) if inspect.isclass(obj) else (obj,):
        try:
            if pattern.search(inspect.getsource(klass)):
                return True
        except (OSError, TypeError):
            continue
    return False


def require_all(surfaces: tuple[Surface, ...], engine: str) -> None:
    """Stop with every missing surface named, and what to do about it."""
    missing = []
    for surface in surfaces:
        try:
            resolve(surface)
        except MissingSurface as exc:
            missing.append(str(exc))
    if missing:
        raise MissingSurface(
            f"maia-serving cannot run on this {engine} version:\n  "
            + "\n  ".join(missing)
            + f"\nInstall the {engine} version pinned in pyproject.toml."
        )
