"""The `remote` reward against loopback HTTP servers: batching, retries with backoff, timeouts."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from rl_rewards import RemoteRewardModel, RewardHub, build_reward


class _RewardServer:
    """Loopback server scoring each item as len(response); `failures_first` requests answer 503, `hang` stalls."""

    def __init__(self, *, failures_first: int = 0, hang_s: float = 0.0, status: int = 200) -> None:
        self.batches: list[list[dict]] = []
        self.request_times: list[float] = []
        self.failures_first = failures_first
        self.hang_s = hang_s
        self.status = status
        self.release = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.request_times.append(time.monotonic())
                if len(server.request_times) <= server.failures_first:
                    self._send(503, {"error": "warming up"})
                    return
                if server.hang_s:
                    server.release.wait(timeout=server.hang_s)
                if server.status != 200:
                    self._send(server.status, {"error": "bad request"})
                    return
                server.batches.append(body["items"])
                self._send(200, {"rewards": [float(len(item["response"])) for item in body["items"]]})

            def _send(self, status: int, payload: dict) -> None:
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:  # the client gave up on a hanging request
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/score"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> "_RewardServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


def _items(count: int) -> list[dict]:
    return [{"prompt": "p", "response": "x" * i, "label": None, "metadata": {"i": i}} for i in range(count)]


def test_rewards_remote_posts_batches_and_returns_rewards_in_order() -> None:
    with _RewardServer() as server:
        hub = build_reward("remote", None, rm_url=server.url, grader_options={"batch_size": 4}, concurrency=64)
        assert hub.score_batch_sync(_items(10)) == [float(i) for i in range(10)]
        assert sorted(len(batch) for batch in server.batches) == [2, 4, 4]
        batches = sorted([item["metadata"]["i"] for item in batch] for batch in server.batches)
        assert batches == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
        assert hub.stats == {"scored": 10, "errors": 0, "timeouts": 0}


def test_rewards_remote_retries_a_failing_server_with_exponential_backoff() -> None:
    with _RewardServer(failures_first=2) as server:
        model = RemoteRewardModel(url=server.url, batch_size=8, backoff_s=0.1, max_retries=3)
        hub = RewardHub(model)
        assert hub.score_batch_sync(_items(3)) == [0.0, 1.0, 2.0]
        assert model.stats == {"requests": 3, "retries": 2, "failures": 0}
        gaps = [later - earlier for earlier, later in zip(server.request_times, server.request_times[1:])]
        assert 0.1 <= gaps[0] < 0.18 and 0.2 <= gaps[1] < 0.3


def test_rewards_remote_gives_up_after_its_retries_and_the_hub_counts_errors() -> None:
    with _RewardServer(failures_first=100) as server:
        hub = build_reward(
            "remote", None, rm_url=server.url, grader_options={"backoff_s": 0.01, "max_retries": 2}, error_reward=-1.0
        )
        assert hub.score_batch_sync(_items(2)) == [-1.0, -1.0]
        assert hub.stats["errors"] == 2 and len(server.request_times) == 3
        assert "gave up after 3 attempts" in hub.last_errors[0] and "503" in hub.last_errors[0]


def test_rewards_remote_times_out_a_hanging_server() -> None:
    with _RewardServer(hang_s=10.0) as server:
        model = RemoteRewardModel(url=server.url, timeout_s=0.3, max_retries=1, backoff_s=0.01)
        hub = RewardHub(model, timeout_s=5.0)
        started = time.monotonic()
        assert hub.score_batch_sync(_items(2)) == [0.0, 0.0]
        assert time.monotonic() - started < 3.0
        assert hub.stats["errors"] == 2 and model.stats["retries"] == 1
        assert "timed out" in hub.last_errors[0]


def test_rewards_remote_does_not_retry_a_client_error() -> None:
    with _RewardServer(status=400) as server:
        model = RemoteRewardModel(url=server.url, backoff_s=0.01)
        hub = RewardHub(model)
        assert hub.score_batch_sync(_items(1)) == [0.0]
        assert len(server.request_times) == 1 and "HTTP 400" in hub.last_errors[0]


def test_rewards_remote_reports_an_unreachable_endpoint() -> None:
    with _RewardServer() as server:
        url = server.url
    model = RemoteRewardModel(url=url, max_retries=1, backoff_s=0.01, timeout_s=1.0)
    hub = RewardHub(model)
    assert hub.score_batch_sync(_items(1)) == [0.0]
    assert "gave up after 2 attempts" in hub.last_errors[0]


@pytest.mark.parametrize(
    ("rm_type", "url", "message"),
    [("remote", None, "url"), ("math", "http://127.0.0.1:1/", "only used with --rm-type remote")],
)
def test_rewards_remote_needs_its_url_and_only_it_takes_one(rm_type: str, url, message: str) -> None:
    with pytest.raises((ValueError, TypeError), match=message):
        build_reward(rm_type, None, rm_url=url)


def test_rewards_remote_rejects_a_url_without_a_scheme() -> None:
    with pytest.raises(ValueError, match="http://"):
        RemoteRewardModel(url="127.0.0.1:8000/score")
