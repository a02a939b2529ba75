"""SIGTERM lets in-flight requests finish, then the process exits 0."""

from __future__ import annotations

import signal
import threading
import time

import httpx
import pytest

from tests.e2e.conftest import start_server

pytestmark = pytest.mark.slow


def test_sigterm_drains_in_flight_requests_and_exits_zero(tmp_path):
    proc, url = start_server(tmp_path, "--shutdown-grace-seconds", "60")
    result: dict = {}

    def long_request():
        body = {"messages": [{"role": "user", "content": "Count."}], "max_tokens": 40, "ignore_eos": True}
        result["response"] = httpx.post(url + "/v1/chat/completions", json=body, timeout=120)

    worker = threading.Thread(target=long_request)
    worker.start()
    deadline = time.monotonic() + 30
    while httpx.get(url + "/ready").json()["running"] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    worker.join(120)
    assert result["response"].status_code == 200
    assert result["response"].json()["usage"]["completion_tokens"] == 40
    assert proc.wait(timeout=60) == 0
