"""Every SGLang surface in the ledger resolves in the installed SGLang (runs in .venv-sglang)."""

import pytest

from maia_serving.serving.ledger import resolve
from maia_serving.sglang.ledger import SURFACES, require_hooks_applied
from maia_serving.sglang.plugin import STEP_HOOKS


@pytest.mark.parametrize("surface", SURFACES, ids=[s.target for s in SURFACES])
def test_surface_resolves_in_the_installed_sglang(surface):
    resolve(surface)
    assert surface.why and surface.until and surface.kind


def test_every_step_hook_is_in_the_ledger():
    assert set(STEP_HOOKS) <= {s.target for s in SURFACES}


def test_a_hook_that_did_not_apply_stops_the_scheduler(monkeypatch):
    from sglang.srt.plugins.hook_registry import HookRegistry

    monkeypatch.setattr(HookRegistry, "_patched", set(STEP_HOOKS[:-1]))
    with pytest.raises(RuntimeError, match="could not hook SGLang's .*abort_request"):
        require_hooks_applied(STEP_HOOKS)
    monkeypatch.setattr(HookRegistry, "_patched", set(STEP_HOOKS))
    require_hooks_applied(STEP_HOOKS)
