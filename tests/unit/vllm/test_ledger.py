"""Every vLLM surface in the ledger resolves in the installed vLLM: an upgrade that renames
one fails here, not silently in a server."""

import pytest

from maia_serving.serving.ledger import MissingSurface, Surface, require_all, resolve
from maia_serving.vllm.ledger import SURFACES, WORKER_SURFACES


@pytest.mark.parametrize("surface", SURFACES + WORKER_SURFACES, ids=[s.target for s in SURFACES + WORKER_SURFACES])
def test_surface_resolves_in_the_installed_vllm(surface):
    resolve(surface)
    assert surface.why and surface.until and surface.kind


@pytest.mark.parametrize(
    "target",
    [
        "vllm.v1.core.sched.scheduler.Scheduler.renamed_method",
        "vllm.v1.core.block_pool.BlockPool#no_such_attribute",
        "vllm.not_a_module.Thing",
        "dist:no-such-distribution",
    ],
)
def test_a_missing_surface_is_named_with_why(target):
    surface = Surface(target, "private attribute", "why we need it", "when")
    with pytest.raises(MissingSurface, match="why we need it"):
        resolve(surface)
    with pytest.raises(MissingSurface, match="Install the vLLM version pinned"):
        require_all((SURFACES[0], surface), "vLLM")
