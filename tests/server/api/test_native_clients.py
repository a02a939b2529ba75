"""The real ``lorax`` and ``text_generation`` clients against a real server on the tiny model: greedy
output through the native routes equals ``/v1/completions`` for the same prompt and adapter."""

from __future__ import annotations

import httpx
import lorax
import pytest
import text_generation
from lorax.types import MergedAdapters

from tests.server.conftest import tiny_settings
from tests.server.live_server import live_server
from tests.tiny_models import save_random_adapter

PROMPT = "the quick brown fox"
MAX_NEW_TOKENS = 8
MERGE = {"ids": ["twin-a", "twin-b"], "weights": [0.7, 0.3], "merge_strategy": "linear", "density": 0.0}


@pytest.fixture(scope="module")
def server_url(tiny_base_dir, tmp_path_factory):
    """Two LoRA adapters of equal rank (LoRAX's merge strategies need it), served once for the module."""
    root = tmp_path_factory.mktemp("native-clients")
    store = root / "adapters"
    for seed, name in enumerate(("twin-a", "twin-b"), start=1):
        save_random_adapter(tiny_base_dir, store / name, rank=4, alpha=8, seed=seed)
    with live_server(tiny_settings(tiny_base_dir, store, root)) as url:
        yield url


def completion(url: str, **fields) -> str:
    """The reference: greedy ``/v1/completions`` on the same prompt."""
    body = {"prompt": PROMPT, "max_tokens": MAX_NEW_TOKENS, "temperature": 0, **fields}
    r = httpx.post(url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


@pytest.mark.parametrize(
    "adapter", [{}, {"adapter_id": "twin-a"}, {"merged_adapters": MergedAdapters(**MERGE)}], ids=str
)
def test_lorax_client_generate_equals_completions(server_url, adapter):
    client = lorax.Client(server_url, timeout=60)
    # details=False: lorax-client's token model needs a float logprob, which the engine does not report
    response = client.generate(PROMPT, max_new_tokens=MAX_NEW_TOKENS, details=False, **adapter)
    reference = {"adapter": adapter["adapter_id"]} if "adapter_id" in adapter else {}
    if "merged_adapters" in adapter:
        reference = {"merged_adapters": MERGE}
    assert response.generated_text == completion(server_url, **reference)


def test_adapters_change_the_output(server_url):
    """Otherwise the equalities above would prove nothing about adapter routing."""
    outputs = {completion(server_url), completion(server_url, adapter="twin-a")}
    outputs.add(completion(server_url, merged_adapters=MERGE))
    assert len(outputs) == 3


def test_text_generation_client_generate_and_stream(server_url):
    client = text_generation.Client(server_url, timeout=60)
    expected = completion(server_url)
    response = client.generate(PROMPT, max_new_tokens=MAX_NEW_TOKENS)
    assert response.generated_text == expected
    assert response.details.finish_reason.value in ("length", "eos_token")
    assert response.details.generated_tokens == len(response.details.tokens)
    assert all(token.logprob <= 0 for token in response.details.tokens)  # real logprobs
    events = list(client.generate_stream(PROMPT, max_new_tokens=MAX_NEW_TOKENS))
    assert [e.token.id for e in events] == [t.id for t in response.details.tokens]
    assert events[-1].generated_text == expected
    assert "".join(e.token.text for e in events if not e.token.special) == expected
    assert events[-1].details.generated_tokens == len(events)


def test_lorax_client_errors_are_its_own_exceptions(server_url):
    client = lorax.Client(server_url, timeout=60)
    with pytest.raises(lorax.errors.NotFoundError, match="missing"):
        client.generate(PROMPT, adapter_id="missing", details=False)
    with pytest.raises(lorax.errors.ValidationError, match="adapter_source"):
        client.generate(PROMPT, adapter_id="twin-a", adapter_source="hub", details=False)
    with pytest.raises(lorax.errors.ValidationError, match="repetition_penalty"):
        client.generate(PROMPT, repetition_penalty=1.3, details=False)


@pytest.mark.parametrize("call", ["generate_stream", "generate_with_details"])
def test_lorax_client_token_events_carry_real_logprobs(server_url, call):
    client = lorax.Client(server_url, timeout=60)
    if call == "generate_stream":
        events = list(client.generate_stream(PROMPT, max_new_tokens=MAX_NEW_TOKENS, adapter_id="twin-a"))
        assert events[-1].generated_text == completion(server_url, adapter="twin-a")
        assert all(isinstance(e.token.logprob, float) and e.token.logprob <= 0 for e in events)
    else:
        response = client.generate(PROMPT, max_new_tokens=MAX_NEW_TOKENS)
        assert response.generated_text == completion(server_url)
        assert all(t.logprob <= 0 for t in response.details.tokens)
