"""``vllm:lora_requests_info`` on plain ``loraplex serve``: what LoRA-affinity routers read."""

from __future__ import annotations

import re
import threading
import time

LINE = re.compile(r"^vllm:lora_requests_info\{(?P<labels>[^}]*)\} (?P<value>\S+)$", re.M)


def lora_info(client) -> tuple[dict[str, str], float]:
    match = LINE.search(client.get("/metrics").text)
    assert match, "no vllm:lora_requests_info sample"
    labels = dict(re.findall(r'(\w+)="([^"]*)"', match["labels"]))
    return labels, float(match["value"])


def test_lora_requests_info_names_the_adapters_of_running_requests(client):
    labels, stamp = lora_info(client)
    assert labels == {"max_lora": "2", "running_lora_adapters": "", "waiting_lora_adapters": ""}
    assert abs(stamp - time.time()) < 60  # vLLM's value: the time of the update
    body = {"prompt": "count", "adapter": "attn-r4", "max_tokens": 200, "ignore_eos": True, "temperature": 0}
    done = threading.Event()
    worker = threading.Thread(target=lambda: (client.post("/v1/completions", json=body), done.set()))
    worker.start()
    seen = set()
    deadline = time.monotonic() + 60
    while not done.is_set() and time.monotonic() < deadline:
        labels, _ = lora_info(client)
        seen.add((labels["running_lora_adapters"], labels["waiting_lora_adapters"]))
        time.sleep(0.02)  # leave the 2 cores to the engine between scrapes
    worker.join(60)
    assert ("attn-r4", "") in seen, seen  # it ran for 200 tokens: some scrape caught it running
    assert lora_info(client)[0]["running_lora_adapters"] == ""
