"""POST /v1/embeddings: OpenAI's shape on the real MiniLM, through a real uvicorn server and the `openai`
client; the worker's queue bound and batching with a fake embedder."""

from __future__ import annotations

import base64
import shutil
import threading

import httpx
import numpy as np
import pytest

from server.api.embeddings.worker import EmbeddingQueueFull, EmbeddingWorker
from server.api.errors import error_response
from tests.server.conftest import tiny_settings
from tests.server.live_server import live_server

MODEL, ALIAS = "all-MiniLM-L6-v2", "text-embedding-3-small"
TEXTS = ["The cat sat on the mat.", "Quarterly revenue grew by 12 percent.", "Bonjour le monde"]


@pytest.fixture(scope="module")
def server_url(tiny_base_dir, tiny_adapter_sources, tmp_path_factory):
    """A uvicorn server on the tiny generation model and the real embedder, once for the module."""
    root = tmp_path_factory.mktemp("embeddings")
    store = root / "adapters"
    store.mkdir()
    shutil.copytree(tiny_adapter_sources["attn-r4"], store / "attn-r4")
    settings = tiny_settings(tiny_base_dir, store, root, embedding_aliases={ALIAS: MODEL})
    with live_server(settings) as url:
        yield url


@pytest.fixture(scope="module")
def http(server_url):
    with httpx.Client(base_url=server_url, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def sentence_transformer():
    """The reference: sentence-transformers itself on the packaged model."""
    from sentence_transformers import SentenceTransformer

    from rag.embedder import default_model_path

    return SentenceTransformer(str(default_model_path()), device="cpu", local_files_only=True)


def embed(http, **body) -> httpx.Response:
    return http.post("/v1/embeddings", json={"model": MODEL, **body})


def vectors_of(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    assert [d["index"] for d in data] == list(range(len(data)))
    assert all(d["object"] == "embedding" for d in data)
    return np.array([d["embedding"] for d in data], dtype=np.float32)  # (N, 384)


def assert_error(response: httpx.Response, status: int, code: str | None, param: str | None) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert (error["code"], error["param"]) == (code, param)
    return error["message"]


@pytest.mark.slow
def test_vectors_equal_sentence_transformers_encode(http, sentence_transformer):
    response = embed(http, input=TEXTS)
    body = response.json()
    assert body["object"] == "list" and body["model"] == MODEL
    got = vectors_of(response)
    expected = sentence_transformer.encode(TEXTS, normalize_embeddings=True, convert_to_numpy=True)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)  # unit vectors, as OpenAI's
    tokens = sum(len(sentence_transformer.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in TEXTS)
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}


@pytest.mark.slow
def test_a_single_string_equals_its_row_in_a_list(http):
    one = vectors_of(embed(http, input=TEXTS[1]))
    np.testing.assert_allclose(one[0], vectors_of(embed(http, input=TEXTS))[1], atol=1e-6)


@pytest.mark.slow
def test_token_id_inputs_embed_their_decoded_text(http, sentence_transformer):
    ids = [sentence_transformer.tokenizer(t, add_special_tokens=False)["input_ids"] for t in TEXTS[:2]]
    by_text = vectors_of(embed(http, input=["the cat sat on the mat.", TEXTS[1].lower()]))
    by_ids = embed(http, input=ids)
    np.testing.assert_allclose(vectors_of(by_ids), by_text, atol=1e-6)  # MiniLM is uncased
    assert by_ids.json()["usage"]["prompt_tokens"] == sum(len(i) for i in ids)
    np.testing.assert_allclose(vectors_of(embed(http, input=ids[0]))[0], by_text[0], atol=1e-6)


@pytest.mark.slow
def test_base64_decodes_to_the_float_vectors(http):
    floats = vectors_of(embed(http, input=TEXTS))
    data = embed(http, input=TEXTS, encoding_format="base64").json()["data"]
    decoded = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in data])
    np.testing.assert_array_equal(decoded, floats)


@pytest.mark.slow
def test_alias_names_the_same_model(http):
    by_alias = http.post("/v1/embeddings", json={"model": ALIAS, "input": TEXTS})
    np.testing.assert_array_equal(vectors_of(by_alias), vectors_of(embed(http, input=TEXTS)))
    assert by_alias.json()["model"] == MODEL


@pytest.mark.slow
def test_dimensions_other_than_the_models_are_refused(http):
    message = assert_error(embed(http, input="hi", dimensions=128), 400, "invalid_value", "dimensions")
    assert "384" in message and "Matryoshka" in message
    same = embed(http, input="hi", dimensions=384)
    np.testing.assert_array_equal(vectors_of(same), vectors_of(embed(http, input="hi")))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("body", "status", "code", "param"),
    [
        ({"model": "text-embedding-ada-002", "input": "hi"}, 404, "model_not_found", "model"),
        ({"model": "attn-r4", "input": "hi"}, 404, "model_not_found", "model"),
        ({"input": ""}, 400, "invalid_value", "input"),
        ({"input": []}, 400, "invalid_value", "input"),
        ({"input": ["ok", ""]}, 400, "invalid_value", "input"),
        ({"input": [[]]}, 400, "invalid_value", "input"),
        ({"input": [30522]}, 400, "invalid_value", "input"),
        ({"input": [[101, -1]]}, 400, "invalid_value", "input"),
        ({"input": ["a", 1]}, 400, "invalid_request", "input"),
        ({"input": "hi", "encoding_format": "int8"}, 400, "invalid_request", "encoding_format"),
        ({"input": "hi", "truncate_prompt_tokens": 8}, 400, "invalid_request", "truncate_prompt_tokens"),
        ({"input": "word " * 300}, 400, "context_length_exceeded", "input"),
        ({"input": ["a"] * 2049}, 400, "too_many_inputs", "input"),
        ({"input": ["word " * 250] * 263}, 400, "too_many_tokens", "input"),
    ],
)
def test_invalid_requests(http, body, status, code, param):
    message = assert_error(http.post("/v1/embeddings", json={"model": MODEL, **body}), status, code, param)
    assert "Traceback" not in message and "/tmp" not in message


@pytest.mark.slow
def test_the_openai_client(server_url, sentence_transformer):
    from openai import OpenAI

    client = OpenAI(base_url=server_url + "/v1", api_key="unused", max_retries=0)
    result = client.embeddings.create(model=ALIAS, input=TEXTS)  # the client asks for base64 itself
    got = np.array([d.embedding for d in result.data], dtype=np.float32)
    expected = sentence_transformer.encode(TEXTS, normalize_embeddings=True, convert_to_numpy=True)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert result.usage.prompt_tokens > 0
    floats = client.embeddings.create(model=MODEL, input="hi", encoding_format="float")
    assert len(floats.data[0].embedding) == 384
    assert client.models.retrieve(ALIAS).id == ALIAS
    assert client.models.retrieve("attn-r4").id == "attn-r4"
    ids = {m.id for m in client.models.list()}
    assert {MODEL, ALIAS, "attn-r4"} <= ids


@pytest.mark.slow
def test_concurrent_requests_each_get_their_own_vectors(http, server_url):
    expected = {text: vectors_of(embed(http, input=text))[0] for text in TEXTS}
    results: dict[str, np.ndarray] = {}

    def call(text: str) -> None:
        with httpx.Client(base_url=server_url, timeout=60) as own:
            results[text] = vectors_of(embed(own, input=text))[0]

    threads = [threading.Thread(target=call, args=(t,)) for t in TEXTS]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for text in TEXTS:
        np.testing.assert_allclose(results[text], expected[text], atol=1e-5)


class BlockingEmbedder:
    """Encodes to constant rows; blocks in ``encode`` until released; records each call and any overlap."""

    dimension = 4
    max_tokens = 254

    def __init__(self):
        self.release = threading.Event()
        self.entered = threading.Event()
        self.calls: list[list[str]] = []
        self.running = 0
        self.overlapped = False

    def encode(self, texts: list[str]) -> np.ndarray:
        self.running += 1
        self.overlapped |= self.running > 1
        self.calls.append(list(texts))
        self.entered.set()
        self.release.wait(30)
        self.running -= 1
        return np.array([[float(len(t))] * self.dimension for t in texts], dtype=np.float32)  # (N, 4)


def test_worker_refuses_at_once_when_the_queue_is_full_then_recovers():
    embedder = BlockingEmbedder()
    worker = EmbeddingWorker(lambda: embedder, max_queued_tokens=10)
    try:
        running = worker.submit(["aaaa"], tokens=8)
        assert embedder.entered.wait(10)
        with pytest.raises(EmbeddingQueueFull) as refused:
            worker.submit(["bb"], tokens=5)
        response = error_response(refused.value)
        assert response.status_code == 429 and response.headers["Retry-After"] == "1"
        embedder.release.set()
        assert running.result(10).tolist() == [[4.0] * 4]
        assert worker.submit(["bb"], tokens=5).result(10).tolist() == [[2.0] * 4]  # room again
    finally:
        embedder.release.set()
        worker.close()


def test_worker_encodes_waiting_requests_together_one_call_at_a_time():
    embedder = BlockingEmbedder()
    worker = EmbeddingWorker(lambda: embedder, max_queued_tokens=100)
    try:
        first = worker.submit(["a"], tokens=1)
        assert embedder.entered.wait(10)
        waiting = [worker.submit(["bb", "ccc"], tokens=2), worker.submit(["dddd"], tokens=1)]
        cancelled = worker.submit(["never"], tokens=1)
        assert cancelled.cancel()
        embedder.release.set()
        assert first.result(10).shape == (1, 4)
        assert [f.result(10)[:, 0].tolist() for f in waiting] == [[2.0, 3.0], [4.0]]
        assert embedder.calls == [["a"], ["bb", "ccc", "dddd"]]  # the cancelled request never ran
        assert not embedder.overlapped
    finally:
        embedder.release.set()
        worker.close()


@pytest.mark.parametrize(
    ("argv", "env", "aliases"),
    [
        (
            ["--embedding-alias", f"{ALIAS}={MODEL}", "--embedding-alias", f"ada={MODEL}"],
            None,
            {ALIAS: MODEL, "ada": MODEL},
        ),
        ([], f"{ALIAS}={MODEL}, ada={MODEL}", {ALIAS: MODEL, "ada": MODEL}),
        ([], None, {}),
    ],
)
def test_aliases_from_repeated_flags_or_a_comma_list(monkeypatch, argv, env, aliases):
    from server.cli import load_settings

    if env is not None:
        monkeypatch.setenv("LORAPLEX_EMBEDDING_ALIASES", env)
    assert load_settings(argv).embedding_aliases == aliases


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--embedding-alias", "no-equals-sign"], "--embedding-aliases"),
        (["--embedding-alias", f"{ALIAS}=some-other-model"], f"--embedding-alias {ALIAS}"),
        (["--max-embedding-tokens", "1000", "--max-embedding-queue-tokens", "999"], "--max-embedding-queue"),
    ],
)
def test_invalid_embedding_settings_fail_fast_naming_the_setting(argv, named):
    from server.cli import load_settings

    with pytest.raises(SystemExit) as info:
        load_settings(argv)
    assert named in str(info.value)
