"""Evaluation: pure scoring, the runner, the HTTP and offline PEFT generators, and the report."""

from __future__ import annotations

import json

import httpx
import pytest

from adapters.store import AdapterStore
from tests.training.toy_data import toy_rows, write_jsonl
from training.data import read_dataset
from training.evaluate import (
    EvalExample,
    HTTPGenerator,
    PeftGreedyGenerator,
    compare,
    examples_from,
    format_report,
    score,
    token_f1,
)


@pytest.mark.parametrize(
    ("prediction", "reference", "f1"),
    [
        ("a b c", "a b c", 1.0),
        ("", "a", 0.0),
        ("", "", 1.0),
        ("x y", "a b", 0.0),
        ("a b", "a b c d", 2 * (1.0 * 0.5) / 1.5),
        ("A, b!", "a b", 1.0),  # case and punctuation do not count
        ("a a a", "a", 2 * (1 / 3) / (1 / 3 + 1)),  # repeated tokens count once per reference token
    ],
)
def test_token_f1(prediction, reference, f1):
    assert token_f1(prediction, reference) == pytest.approx(f1)


def test_score_exact_contains_f1():
    scores = score(
        ["name=A|qty=1", "  name=B|qty=2 \n", "Sure! name=C|qty=3", "no"],
        ["name=A|qty=1", "name=B|qty=2", "name=C|qty=3", "name=D"],
    )
    assert (scores.exact_match, scores.contains, scores.n) == (0.5, 0.75, 4)
    with pytest.raises(ValueError):
        score(["a"], [])


def test_examples_take_the_last_assistant_turn_as_reference(tmp_path):
    row = {
        "messages": [
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"},
            {"role": "assistant", "content": "d"},
        ]
    }
    [example] = examples_from(read_dataset(write_jsonl(tmp_path / "t.jsonl", [row])))
    assert example.reference == "d" and [m["content"] for m in example.prompt] == ["a", "b", "c"]


def test_compare_runs_base_and_adapter_side_by_side():
    calls = []

    def generate(conversations, adapter, max_tokens):
        calls.append((len(conversations), adapter, max_tokens))
        return [m[-1]["content"].upper() if adapter else "?" for m in conversations]

    examples = [EvalExample([{"role": "user", "content": w}], w.upper()) for w in ("ab", "cd", "ef")]
    comparison = compare(examples, generate, "upper", max_tokens=5, batch_size=2)
    assert calls == [(2, None, 5), (1, None, 5), (2, "upper", 5), (1, "upper", 5)]
    base, adapter = comparison.runs
    assert (base.scores.exact_match, adapter.scores.exact_match) == (0.0, 1.0)
    report = format_report(comparison, samples=1)
    assert "exact_match" in report and "upper" in report and "reference    AB" in report


def test_http_generator_sends_greedy_requests_with_the_adapter():
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        seen.append((request.url.path, request.headers.get("authorization"), body))
        return httpx.Response(200, json={"choices": [{"message": {"role": "assistant", "content": "ok"}}]})

    generate = HTTPGenerator("http://server", api_key="k", transport=httpx.MockTransport(handler))
    assert generate([[{"role": "user", "content": "hi"}]], "orders", 7) == ["ok"]
    path, auth, body = seen[0]
    assert path == "/v1/chat/completions" and auth == "Bearer k"
    assert (body["temperature"], body["max_tokens"], body["adapter"]) == (0, 7, "orders")


def test_register_posts_to_the_admin_endpoint():
    from training.register import RegistrationError, register_adapter

    def ok(request):
        assert request.url.path == "/v1/adapters/orders/load" and request.method == "POST"
        return httpx.Response(200, json={"name": "orders", "loaded": True})

    assert register_adapter("http://s/", "orders", transport=httpx.MockTransport(ok))["loaded"] is True
    with pytest.raises(RegistrationError, match="HTTP 404"):
        register_adapter("http://s", "orders", transport=httpx.MockTransport(lambda r: httpx.Response(404)))


def test_offline_generator_base_versus_trained_adapter(tmp_path, tiny_base_dir):
    """The PEFT path: prompts encoded like the server, the adapter switched on and off per call."""
    from adapters.base_model import load_base_model
    from training.args import DataArgs, LoRAArgs, OptimArgs, OutputArgs, TrainConfig
    from training.finetune import train

    data = write_jsonl(tmp_path / "d.jsonl", toy_rows(40, seed=1))
    config = TrainConfig(
        data=DataArgs(data=data, eval_fraction=0.0),
        output=OutputArgs(name="upper", adapter_dir=tmp_path / "store", quantization="none", device="cpu"),
        lora=LoRAArgs(r=8, alpha=16, dropout=0.0),
        optim=OptimArgs(max_steps=30, lr=2e-2, batch_size=8, warmup_ratio=0.0, logging_steps=10),
    )
    train(config, base=load_base_model(tiny_base_dir, quantization="none", device="cpu"))

    base = load_base_model(tiny_base_dir, quantization="none", device="cpu")
    generate = PeftGreedyGenerator(base, AdapterStore(tmp_path / "store").require)
    examples = examples_from(read_dataset(data), limit=8)
    comparison = compare(examples, generate, "upper", max_tokens=6, batch_size=4)
    base_run, adapter_run = comparison.runs
    assert base_run.predictions != adapter_run.predictions
    assert adapter_run.scores.token_f1 >= base_run.scores.token_f1
    assert generate([examples[0].prompt], None, 6) == base_run.predictions[:1]  # base again after the adapter
