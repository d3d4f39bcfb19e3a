"""`settled_scrape` against a real HTTP /metrics on 127.0.0.1 whose figures land one metric at a time, as
SGLang's per-kind metric files do: a scrape that counts the last step in the step histogram but not yet in
the busy counter is torn, and is not the one returned (CI once compared such a scrape with `simulate`)."""

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.utils.launch import metric, scrape, settled_scrape

STEP_S = 1.25e-4


def _text(steps: int, busy_steps: int, tpots: int) -> str:
    return (
        f"maia:emulated_step_seconds_count {steps}.0\n"
        f"maia:emulated_step_seconds_sum {steps * STEP_S!r}\n"
        f"maia:emulated_busy_seconds_total {busy_steps * STEP_S!r}\n"
        f"maia:emulated_time_per_output_token_seconds_count {tpots}.0\n"
        "vllm:num_requests_running 0.0\n"
    )


@pytest.fixture
def metrics_server():
    """Serves the texts of ``server.pages`` in turn, then the last one for good."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            pages = self.server.pages
            body = (pages.pop(0) if len(pages) > 1 else pages[0]).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    server.url = f"http://127.0.0.1:{server.server_port}"
    yield server
    server.shutdown()
    server.server_close()


def _tpot_done(samples: dict[str, float]) -> bool:
    return metric(samples, "maia:emulated_time_per_output_token_seconds_count") >= 1


def test_a_torn_scrape_is_read_again(metrics_server):
    """Eight steps in the histogram and the TPOT in, seven in the busy counter: what a plain poll took."""
    torn, whole = _text(8, 7, 1), _text(8, 8, 1)
    metrics_server.pages = [torn, torn, torn, whole]
    assert _tpot_done(scrape(metrics_server.url))  # a poll on `ready` alone stops at the torn scrape
    samples = settled_scrape(metrics_server.url, _tpot_done, poll_s=0.01)
    assert metric(samples, "maia:emulated_busy_seconds_total") == pytest.approx(8 * STEP_S, rel=1e-12)


def test_figures_still_moving_are_waited_for(metrics_server):
    metrics_server.pages = [_text(7, 7, 0), _text(8, 8, 1), _text(9, 9, 1), _text(10, 10, 1)]
    samples = settled_scrape(metrics_server.url, _tpot_done, poll_s=0.01)
    assert metric(samples, "maia:emulated_step_seconds_count") == 10


def test_other_prefixes_may_move_meanwhile(metrics_server):
    """With prefix="" the engine's own samples (CPU seconds and the like) move all the time; only the
    emulated ones must agree."""
    metrics_server.pages = [_text(8, 8, 1) + f"process_cpu_seconds_total {i}.0\n" for i in range(50)]
    samples = settled_scrape(metrics_server.url, _tpot_done, prefix="", poll_s=0.01)
    assert metric(samples, "process_cpu_seconds_total") < 5  # returned at once, not after 50 pages


def test_a_scrape_that_never_settles_is_returned_at_the_timeout(metrics_server):
    metrics_server.pages = [_text(8, 7, 1)]
    samples = settled_scrape(metrics_server.url, _tpot_done, timeout_s=0.3, poll_s=0.01)
    assert metric(samples, "maia:emulated_busy_seconds_total") == pytest.approx(7 * STEP_S)
