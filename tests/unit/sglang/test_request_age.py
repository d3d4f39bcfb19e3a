"""A request's age reaches SGLang's scheduler (patch/request_age.py), for the paced clock's arrival stamps."""

import pickle
import time
from types import SimpleNamespace

import pytest
from sglang.srt.observability.req_time_stats import APIServerReqTimeStats

from maia_serving.sglang.patch import request_age


@pytest.fixture
def patched(monkeypatch):
    monkeypatch.setattr(APIServerReqTimeStats, "__getstate__", APIServerReqTimeStats.__getstate__)
    request_age.register()
    request_age.register()  # twice, as every SGLang process may: one wrapper


def _created(seconds_ago: float) -> APIServerReqTimeStats:
    stats = APIServerReqTimeStats()
    stats.set_created_time(time.perf_counter() - seconds_ago)
    return stats


def test_sglang_still_drops_the_creation_time_on_its_way_to_the_scheduler():
    """What the patch is for: when this fails, SGLang sends created_time itself and the patch can go."""
    assert pickle.loads(pickle.dumps(_created(1.0))).created_time == 0.0


def test_with_the_patch_the_scheduler_gets_the_requests_age(patched):
    stats = pickle.loads(pickle.dumps(_created(0.25)))  # as SGLang's pickle IPC carries it
    assert not hasattr(APIServerReqTimeStats.__getstate__, "__wrapped__")
    assert APIServerReqTimeStats.__getstate__.maia_request_age
    age = request_age.request_age_s(SimpleNamespace(time_stats=stats))
    assert age == pytest.approx(0.25, abs=0.05)


def test_a_request_without_the_time_has_no_age():
    assert request_age.request_age_s(SimpleNamespace(time_stats=None)) == 0.0
    assert request_age.request_age_s(SimpleNamespace()) == 0.0
    assert request_age.request_age_s(SimpleNamespace(time_stats=APIServerReqTimeStats())) == 0.0
    future = SimpleNamespace(time_stats=SimpleNamespace(created_time=110.0))
    assert request_age.request_age_s(future, now=100.0) == 0.0  # never negative
