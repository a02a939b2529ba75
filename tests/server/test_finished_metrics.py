"""``loraplex_finished_requests_total{reason}`` over real HTTP: a client that hangs up mid-stream is
counted as ``cancelled`` (its row is freed long before its ``max_tokens``), the others by their reason."""

from __future__ import annotations

import re
import time

import httpx

from tests.server.conftest import tiny_settings
from tests.server.live_server import live_server

SAMPLE = re.compile(r'^loraplex_finished_requests_total\{reason="(\w+)"\} (\S+)$', re.M)


def finished(client: httpx.Client) -> dict[str, float]:
    return {reason: float(value) for reason, value in SAMPLE.findall(client.get("/metrics").text)}


def test_finish_reasons_are_counted_and_a_hang_up_cancels(tiny_base_dir, adapter_store_dir, tmp_path):
    settings = tiny_settings(tiny_base_dir, adapter_store_dir, tmp_path, max_model_len=512)
    with live_server(settings) as url, httpx.Client(base_url=url, timeout=60) as client:
        assert finished(client) == {}
        short = {"prompt": "count", "max_tokens": 3, "ignore_eos": True, "temperature": 0}
        assert client.post("/v1/completions", json=short).json()["choices"][0]["finish_reason"] == "length"
        assert finished(client) == {"length": 1}

        long = {**short, "max_tokens": 480, "stream": True}
        with client.stream("POST", "/v1/completions", json=long) as response:
            events = [line for line, _ in zip(response.iter_lines(), range(3))]  # 3 lines, then hang up
        assert any(line.startswith("data: ") for line in events)
        deadline = time.monotonic() + 30
        while finished(client).get("cancelled") != 1:
            assert time.monotonic() < deadline, finished(client)
            time.sleep(0.05)
        assert finished(client) == {"length": 1, "cancelled": 1}  # not run to its 480 tokens
