"""``loraplex ray serve`` on a local Ray instance: two 1-CPU engine replicas over the tiny model, and
the one RAG deployment both reach the collections through."""

from __future__ import annotations

import random
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.config import Settings
from tests.conftest import copy_adapter_store
from tests.server.conftest import tiny_settings
from tests.server.live_server import _free_port
from tests.tiny_models import save_random_adapter

ray = pytest.importorskip("ray")

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(300)]

ADAPTERS = [f"tenant-{i}" for i in range(8)]
PROMPTS = [f"question {i}: what is {i} + {i}?" for i in range(8)]
READY_SECONDS = 120
REPLICA = "x-loraplex-replica"


def chat(adapter: str | None, prompt: str, max_tokens: int = 8) -> dict:
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0}
    return {**body, "model": adapter} if adapter else body


def wait_until(predicate, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def ready(url: str) -> bool:
    try:
        return httpx.get(url + "/ready", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def sources(tiny_base_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("ray-adapters")
    return {
        name: save_random_adapter(tiny_base_dir, root / name, rank=4, seed=100 + i)
        for i, name in enumerate(ADAPTERS)
    }


@pytest.fixture(scope="module")
def settings(tiny_base_dir, sources, tmp_path_factory) -> Settings:
    tmp = tmp_path_factory.mktemp("ray-serve")
    store = copy_adapter_store(tmp / "adapters", sources)
    return tiny_settings(
        tiny_base_dir,
        store,
        tmp,
        max_loaded_adapters=8,
        max_model_len=512,
        max_upload_bytes=4 << 20,
        port=_free_port(),
    )


@pytest.fixture(scope="module")
def reference(settings) -> dict:
    """Greedy outputs of the single (in-process) server for every adapter × prompt (and the base)."""
    with TestClient(create_app(settings)) as client:
        return {
            (adapter, prompt): client.post("/v1/chat/completions", json=chat(adapter, prompt)).json()[
                "choices"
            ][0]["message"]["content"]
            for adapter in [None, *ADAPTERS]
            for prompt in PROMPTS
        }


@pytest.fixture(scope="module")
def ray_url(settings, reference):
    from server.ray.app import RayOptions
    from server.ray.launch import start, stop

    local = start(settings, RayOptions(replicas=2, cpus_per_replica=1))
    url = f"http://{settings.host}:{settings.port}"
    try:
        wait_until(lambda: ready(url), READY_SECONDS, "both replicas ready")
        yield url
    finally:
        stop(local)


def post_all(url: str, bodies: list[dict], workers: int = 8) -> list[httpx.Response]:
    with httpx.Client(base_url=url, timeout=120) as client, ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda body: client.post("/v1/chat/completions", json=body), bodies))


def test_adapter_affinity_and_outputs_equal_the_single_server(ray_url, reference):
    jobs = [(adapter, prompt) for adapter in ADAPTERS for prompt in PROMPTS]  # 64 requests
    random.Random(0).shuffle(jobs)
    responses = post_all(ray_url, [chat(adapter, prompt) for adapter, prompt in jobs])
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
    for (adapter, prompt), response in zip(jobs, responses):
        assert response.json()["choices"][0]["message"]["content"] == reference[adapter, prompt]
    by_adapter: dict[str, list[str]] = {}
    for (adapter, _), response in zip(jobs, responses):
        by_adapter.setdefault(adapter, []).append(response.headers[REPLICA])
    shares = {a: max(map(ids.count, ids)) / len(ids) for a, ids in by_adapter.items()}
    print("share of each adapter's requests on its main replica:", shares)
    assert all(share >= 0.9 for share in shares.values()), shares
    assert len({replica for ids in by_adapter.values() for replica in ids}) == 2  # both replicas serve
    base = post_all(ray_url, [chat(None, prompt) for prompt in PROMPTS])
    assert [r.json()["choices"][0]["message"]["content"] for r in base] == [
        reference[None, p] for p in PROMPTS
    ]


def test_openai_client_streams_through_the_ingress(ray_url, reference):
    import openai

    client = openai.OpenAI(base_url=ray_url + "/v1", api_key="unused")
    stream = client.chat.completions.create(**chat(ADAPTERS[0], PROMPTS[0]), stream=True)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == reference[ADAPTERS[0], PROMPTS[0]]
    raw = client.chat.completions.with_raw_response.create(**chat(ADAPTERS[1], PROMPTS[1]))
    assert raw.headers[REPLICA] and raw.parse().model == ADAPTERS[1]
    assert {m.id for m in client.models.list()} >= set(ADAPTERS)
    health = httpx.get(ray_url + "/health")
    assert health.status_code == 200 and health.headers[REPLICA].startswith("ingress-")


def merge_of(name: str, weight: float) -> dict:
    body = chat(None, PROMPTS[0])
    return {**body, "adapter": {"merge": [{"name": name, "weight": weight}], "method": "linear"}}


def test_uploaded_adapter_serves_on_every_replica_and_deleted_is_404_everywhere(ray_url, sources):
    src = sources[ADAPTERS[0]]
    files = {
        "adapter_config": ("adapter_config.json", (src / "adapter_config.json").read_bytes()),
        "adapter_model": ("adapter_model.safetensors", (src / "adapter_model.safetensors").read_bytes()),
    }
    assert httpx.put(ray_url + "/v1/adapters/uploaded", files=files, timeout=60).status_code == 201
    # Each merge of it is a new multiplexed id, placed on the replica with fewer: both replicas end up
    # reading "uploaded" from the shared store.
    merges = [merge_of("uploaded", 0.5 + i / 16) for i in range(8)]
    served = post_all(ray_url, [chat("uploaded", PROMPTS[0]), *merges], workers=1)
    assert all(r.status_code == 200 for r in served), [r.text for r in served]
    assert len({r.headers[REPLICA] for r in served}) == 2

    assert httpx.delete(ray_url + "/v1/adapters/uploaded", timeout=60).status_code == 200
    gone = post_all(ray_url, [chat("uploaded", PROMPTS[0]), *merges], workers=1)
    assert [r.status_code for r in gone] == [404] * len(gone), [r.text for r in gone]
    assert len({r.headers[REPLICA] for r in gone}) == 2  # the 404 came from both replicas


HANDBOOK = [
    {"id": "leave", "text": "Employees get 25 days of paid leave per year at Acme.", "source": "handbook.md"},
    {"id": "lunch", "text": "The canteen serves lunch from noon until two o'clock.", "source": "canteen.md"},
    {"id": "bikes", "text": "Bicycles must be parked in the courtyard racks.", "source": "campus.md"},
] + [{"id": f"room-{i}", "text": f"Meeting room {i} is on floor {i} of the north wing."} for i in range(9)]
LEAVE_QUESTION = "How many days of paid leave do employees get?"


def rag_chat(adapter: str) -> dict:
    return {**chat(adapter, LEAVE_QUESTION, max_tokens=4), "rag": {"collection": "handbook", "top_k": 2}}


def assert_error(response: httpx.Response, status: int, code: str, param: str | None) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert (error["code"], error["param"]) == (code, param) and set(error) == {
        "message",
        "type",
        "param",
        "code",
    }


def test_one_rag_deployment_holds_the_collections_every_replica_writes_and_reads(ray_url):
    from ray import serve

    with httpx.Client(base_url=ray_url, timeout=120) as client:
        assert client.get("/ready").json()["rag"] == "HEALTHY"
        rag = serve.status().applications["loraplex"].deployments["RagCollections"]
        assert rag.replica_states == {"RUNNING": 1}  # the one writer
        assert client.post("/v1/rag/collections", json={"name": "handbook"}).status_code == 200
        # Ingests into one collection from both replicas at once: its one writer loses none of them.
        with ThreadPoolExecutor(6) as pool:
            ingested = list(
                pool.map(
                    lambda doc: client.post("/v1/rag/collections/handbook/documents", json=doc), HANDBOOK
                )
            )
        assert [r.status_code for r in ingested] == [200] * len(HANDBOOK), [r.text for r in ingested]
        assert len({r.headers[REPLICA] for r in ingested}) == 2
        info = client.get("/v1/rag/collections/handbook").json()
        assert info["document_count"] == len(HANDBOOK) and info["vector_count"] == info["chunk_count"]

        # RAG chat on adapters placed on both replicas: each retrieves from what any replica wrote.
        answers = post_all(ray_url, [rag_chat(adapter) for adapter in ADAPTERS])
        assert [r.status_code for r in answers] == [200] * len(ADAPTERS), [r.text for r in answers]
        assert len({r.headers[REPLICA] for r in answers}) == 2
        assert all(r.json()["sources"][0]["document_id"] == "leave" for r in answers)

        # The RAG library's errors come back through Ray as under `loraplex serve`.
        assert_error(
            client.post("/v1/rag/collections", json={"name": "handbook"}), 409, "collection_exists", "name"
        )
        assert_error(
            client.post("/v1/rag/collections", json={"name": "c", "chunk_size": 4}),
            400,
            "invalid_collection_settings",
            "chunk_size",
        )
        search = {"query": "leave", "filter": {"not a key": 1}}
        assert_error(
            client.post("/v1/rag/collections/handbook/search", json=search), 400, "invalid_search", "filter"
        )
        missing = client.post("/v1/rag/collections/nope/search", json={"query": "leave"})
        assert_error(missing, 404, "collection_not_found", "collection")

        assert client.delete("/v1/rag/collections/handbook").status_code == 200
    gone = post_all(ray_url, [rag_chat(adapter) for adapter in ADAPTERS])
    for response in gone:
        assert_error(response, 404, "collection_not_found", "collection")
    assert len({r.headers[REPLICA] for r in gone}) == 2  # the deletion is seen by both replicas


def test_oversized_bodies_are_refused_by_the_ingress_before_a_replica_sees_them(ray_url, settings):
    json_body = b"[" + b" " * settings.max_body_bytes + b"]"
    upload = {"files": ("big.txt", b"x" * (settings.max_upload_bytes + 1), "text/plain")}
    with httpx.Client(base_url=ray_url, timeout=60) as client:
        refused = [
            client.post("/v1/chat/completions", content=json_body),
            client.post(
                "/v1/chat/completions", content=iter([json_body[:1000], json_body[1000:]])
            ),  # chunked
            client.post("/v1/rag/collections/any/documents", files=upload),
        ]
    for response in refused:
        assert_error(response, 413, "body_too_large", None)
        assert response.headers[REPLICA].startswith("ingress-")


def replica_metrics(url: str, replicas: set[str] | None = None, seconds: float = 30.0) -> dict[str, dict]:
    """Each replica's samples (labelled ones under their full name) from ``/metrics`` (the ingress
    forwards it to one replica at a time): scraped until every one of ``replicas`` (default: every
    replica) has answered."""
    found: dict[str, dict] = {}
    deadline = time.monotonic() + seconds
    with httpx.Client(base_url=url, timeout=10) as client:
        while replicas is None and len(found) < 2 or replicas is not None and not replicas <= set(found):
            assert time.monotonic() < deadline, f"/metrics answered only by {sorted(found)}"
            response = client.get("/metrics")
            samples = {}
            for line in response.text.splitlines():
                if line and not line.startswith("#"):
                    name, value = line.rsplit(" ", 1)
                    samples[name] = float(value)
            found[response.headers[REPLICA]] = samples
    return found


def first_events(url: str, body: dict, count: int) -> tuple[str, list[str]]:
    """Opens a streamed chat completion, reads ``count`` SSE events and hangs up. Returns the replica
    that served it and the events."""
    events: list[str] = []
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(line)
            if len(events) == count:
                return response.headers[REPLICA], events
    raise AssertionError(f"the stream ended after {len(events)} events")


def test_abandoned_stream_is_cancelled_on_its_replica(ray_url):
    """The client hangs up after 3 events: the replica's engine finishes the row as ``cancelled`` (its
    ``loraplex_finished_requests_total``), not by running it to ``max_tokens``, and frees it."""
    before = replica_metrics(ray_url)
    body = {**chat(None, PROMPTS[0], max_tokens=440), "stream": True, "ignore_eos": True}
    replica, events = first_events(ray_url, body, 3)
    assert "[DONE]" not in events[-1]
    key = 'loraplex_finished_requests_total{reason="%s"}'
    deadline = time.monotonic() + 30
    while True:
        samples = replica_metrics(ray_url, {replica})[replica]
        was = before[replica]
        counts = {r: samples.get(key % r, 0) - was.get(key % r, 0) for r in ("cancelled", "length")}
        if counts["cancelled"] or counts["length"]:
            break
        assert time.monotonic() < deadline, "the abandoned stream still holds its row"
        time.sleep(0.1)
    assert counts == {"cancelled": 1, "length": 0}, counts
    running = "loraplex_running_batch_size"
    wait_until(lambda: replica_metrics(ray_url, {replica})[replica][running] == 0, 10, "its row freed")


# Last: it replaces a replica, which moves adapters.
def engine_replica_actors() -> list:
    named = ray.util.list_named_actors(all_namespaces=True)
    return [ray.get_actor(a["name"], namespace=a["namespace"]) for a in named if "EngineReplica" in a["name"]]


def test_killed_replica_is_replaced_and_requests_go_to_the_other(ray_url, reference):
    before = {r.headers[REPLICA] for r in post_all(ray_url, [chat(a, PROMPTS[0]) for a in ADAPTERS])}
    assert len(before) == 2
    victim = engine_replica_actors()[0]
    jobs = [chat(ADAPTERS[i % 8], PROMPTS[i % 8], max_tokens=32) for i in range(16)]
    with ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(post_all, ray_url, jobs, 4)
        time.sleep(0.5)  # let the burst start: the kill lands mid-run
        ray.kill(victim, no_restart=True)
        assert not ready(ray_url)  # one replica short
        during = in_flight.result(timeout=120)  # nothing hangs
    assert {r.status_code for r in during} <= {200, 503}
    after = post_all(ray_url, [chat(a, p) for a in ADAPTERS[:4] for p in PROMPTS[:2]])
    assert [r.status_code for r in after] == [200] * len(after), [r.text for r in after]
    assert all(
        r.json()["choices"][0]["message"]["content"] == reference[a, p]
        for r, (a, p) in zip(after, [(a, p) for a in ADAPTERS[:4] for p in PROMPTS[:2]])
    )
    wait_until(
        lambda: len(engine_replica_actors()) == 2 and ready(ray_url),
        READY_SECONDS,
        "the killed replica to be replaced",
    )
    # A new adapter id goes to the replica with the fewest adapters: the replacement, with none yet.
    [new] = post_all(ray_url, [merge_of(ADAPTERS[0], 0.25)])
    assert new.status_code == 200 and new.headers[REPLICA] not in before
