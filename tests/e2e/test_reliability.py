"""Both servers on --device maia survive what real clients do: give up mid-stream, time out,
send hostile bodies. After each, the server answers, and after a soak nothing is left
running, waiting or holding KV blocks."""

import json
import urllib.error
import urllib.request

import pytest

from tests.utils.launch import metric, settled_scrape
from tests.utils.loadgen import Load, run_load

# Each engine's own gauges of requests in flight.
IN_FLIGHT = {
    "vllm": ("vllm:num_requests_running", "vllm:num_requests_waiting"),
    "sglang": ("sglang:num_running_reqs", "sglang:num_queue_reqs"),
}


def _answers(served) -> None:
    out = served.client.completions.create(model="demo", prompt="still there?", max_tokens=4, temperature=0)
    assert out.usage.completion_tokens == 4


def _settled(served, timeout_s: float = 60.0) -> dict[str, float]:
    """/metrics once nothing runs or waits (the gauges lag the last step by a little)."""
    return settled_scrape(
        served.server.url,
        lambda samples: sum(metric(samples, name) for name in IN_FLIGHT[served.engine]) == 0,
        prefix="",
        timeout_s=timeout_s,
        poll_s=0.5,
    )


def test_soak_with_clients_that_disconnect_and_time_out(served, logs_dir):
    """A few hundred mixed requests at high concurrency, some cancelled by their clients."""
    _answers(served)
    rss_before = served.server.rss_bytes()
    load = Load(num_requests=300, concurrency=48, seed=1)
    report = run_load(served.server.url, "demo", load)
    samples = _settled(served)
    rss_after = served.server.rss_bytes()
    figures = {
        "engine": served.engine,
        "requests": load.num_requests,
        "concurrency": load.concurrency,
        **report.to_dict(),
        "rss_before_mib": rss_before / 2**20,
        "rss_after_mib": rss_after / 2**20,
    }
    logs_dir.mkdir(parents=True, exist_ok=True)
    (logs_dir / f"soak-{served.engine}.json").write_text(json.dumps(figures, indent=2) + "\n")
    print(figures)
    assert report.failed == 0, report.failures[:5]
    assert report.cancelled >= 20  # the clients really did give up
    assert served.server.proc.poll() is None
    for name in IN_FLIGHT[served.engine]:
        assert metric(samples, name) == 0, name
    assert metric(samples, "maia:kv_cache_blocks_used") == 0
    assert metric(samples, "maia:emulation_errors_total") == 0
    _answers(served)


# (name, path, body): each must get a 4xx with an error message, on both engines.
_C, _CH = "/v1/completions", "/v1/chat/completions"
_OK_CHAT = [{"role": "user", "content": "hi"}]
BAD_REQUESTS = [
    ("not json", _C, b"{not json"),
    ("empty body", _C, b""),
    ("array body", _C, b"[1, 2, 3]"),
    ("invalid utf-8", _C, b'{"model": "demo", "prompt": "\xff\xfe\xfa", "max_tokens": 4}'),
    ("unknown model", _C, {"model": "nope", "prompt": "x", "max_tokens": 4}),
    ("no prompt", _C, {"model": "demo", "max_tokens": 4}),
    ("prompt of wrong type", _C, {"model": "demo", "prompt": {"a": 1}, "max_tokens": 4}),
    ("empty token list", _C, {"model": "demo", "prompt": [], "max_tokens": 4}),
    ("token id beyond the vocabulary", _C, {"model": "demo", "prompt": [1, 2, 1000000000], "max_tokens": 4}),
    ("negative token id", _C, {"model": "demo", "prompt": [1, -1, 2], "max_tokens": 4}),
    ("prompt longer than the context", _C, {"model": "demo", "prompt": "word " * 2000, "max_tokens": 4}),
    ("10 MB prompt", _C, {"model": "demo", "prompt": "a" * 10_000_000, "max_tokens": 4}),
    ("max_tokens of wrong type", _C, {"model": "demo", "prompt": "x", "max_tokens": "many"}),
    ("negative max_tokens", _C, {"model": "demo", "prompt": "x", "max_tokens": -3}),
    ("max_tokens beyond the context", _C, {"model": "demo", "prompt": "x", "max_tokens": 100000}),
    ("negative temperature", _C, {"model": "demo", "prompt": "x", "max_tokens": 4, "temperature": -1}),
    ("temperature of wrong type", _C, {"model": "demo", "prompt": "x", "max_tokens": 4, "temperature": "hot"}),
    ("top_p above 1", _C, {"model": "demo", "prompt": "x", "max_tokens": 4, "top_p": 1.5}),
    ("negative top_k", _C, {"model": "demo", "prompt": "x", "max_tokens": 4, "top_k": -5}),
    ("n of 0", _C, {"model": "demo", "prompt": "x", "max_tokens": 4, "n": 0}),
    ("presence_penalty out of range", _C, {"model": "demo", "prompt": "x", "max_tokens": 4, "presence_penalty": 5}),
    ("frequency_penalty out of range", _C, {"model": "demo", "prompt": "x", "max_tokens": 4, "frequency_penalty": -3}),
    ("stop of wrong type", _C, {"model": "demo", "prompt": "x", "max_tokens": 4, "stop": 42}),
    ("seed of wrong type", _C, {"model": "demo", "prompt": "x", "max_tokens": 4, "seed": "abc"}),
    ("stream of wrong type", _C, {"model": "demo", "prompt": "x", "max_tokens": 4, "stream": {"on": 1}}),
    ("chat without messages", _CH, {"model": "demo", "max_tokens": 4}),
    ("chat with messages of wrong type", _CH, {"model": "demo", "messages": "hi", "max_tokens": 4}),
    ("chat message without a role", _CH, {"model": "demo", "messages": [{"content": "hi"}], "max_tokens": 4}),
    (
        "chat content of wrong type",
        _CH,
        {"model": "demo", "messages": [{"role": "user", "content": 42}], "max_tokens": 4},
    ),
    (
        "chat with an unknown response_format",
        _CH,
        {"model": "demo", "messages": _OK_CHAT, "max_tokens": 4, "response_format": {"type": "telepathy"}},
    ),
    ("chat with a negative max_tokens", _CH, {"model": "demo", "messages": _OK_CHAT, "max_tokens": -1}),
]


@pytest.mark.parametrize("name,path,body", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_request_is_4xx_with_a_message_and_the_server_serves_on(served, name, path, body):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(served.server.url + path, data=data, headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=60)
    assert 400 <= err.value.code < 500, (err.value.code, err.value.read()[:300])
    assert err.value.read().strip(), "a 4xx without a message"
    _answers(served)
