"""No single request stops the server: extreme values, bad input shapes and failures in one row.

Each test here failed on the main branch before the hardening change (issue: hardening).
"""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.server.conftest import shared_client

CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}
FUZZ = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
OK_OR_CLIENT_ERROR = {200, 400, 404}


@pytest.fixture(scope="module")
def module_client(tiny_base_dir, tiny_adapter_sources, tmp_path_factory):
    """One app for the fuzz tests (hypothesis runs many cases against the same engine)."""
    with shared_client(
        tmp_path_factory,
        tiny_base_dir,
        tiny_adapter_sources,
        "hardening",
        max_loaded_adapters=8,
        max_pending=16,
    ) as client:
        yield client


def greedy_text(client, **extra) -> str:
    r = client.post("/v1/chat/completions", json={**CHAT, "temperature": 0, "max_tokens": 6, **extra})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def assert_openai_error(r, status: int, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    if param is not None:
        assert error["param"] == param, error
    assert "Traceback" not in error["message"] and "/tmp" not in error["message"]
    return error


def assert_still_serving(client, reference: str) -> None:
    assert client.get("/ready").status_code == 200
    assert greedy_text(client) == reference


# ------------------------------------------------------------------ sampling parameters


def test_a_vanishing_temperature_is_greedy_and_the_server_survives(module_client):
    reference = greedy_text(module_client)
    r = module_client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 6, "temperature": 1e-300})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == reference  # below the floor: greedy
    assert_still_serving(module_client, reference)


floats = st.floats(allow_nan=False, allow_infinity=False, allow_subnormal=True)
sampling = st.fixed_dictionaries(
    {},
    optional={
        "temperature": st.one_of(st.floats(0, 2), st.sampled_from([0.0, 5e-324, 1e-300, 1e-8, 2.0]), floats),
        "top_p": st.one_of(st.floats(0, 1), st.sampled_from([5e-324, 1e-300, 1.0]), floats),
        "top_k": st.one_of(st.integers(-2, 10), st.sampled_from([1, 10**6, 2**40])),
        "presence_penalty": st.one_of(st.floats(-2, 2), floats),
        "frequency_penalty": st.one_of(st.floats(-2, 2), floats),
        "seed": st.one_of(st.integers(-(2**63), 2**64 - 1), st.integers(-(2**80), 2**80)),
        "n": st.integers(0, 4),
        "max_tokens": st.integers(-1, 4),
        "stop": st.one_of(st.just(["\n"]), st.lists(st.text(max_size=3), max_size=5)),
    },
)


@FUZZ
@given(params=sampling)
def test_fuzz_sampling_parameters_end_in_a_response_or_a_4xx(module_client, params):
    r = module_client.post("/v1/chat/completions", json={**CHAT, **params})
    assert r.status_code in OK_OR_CLIENT_ERROR, (params, r.status_code, r.text)
    if r.status_code != 200:
        assert_openai_error(r, r.status_code)
        assert r.json()["error"]["param"], (params, r.text)  # every refusal names the field
    assert module_client.get("/ready").status_code == 200


# ------------------------------------------------------------------ merge weights


merge_weight = st.one_of(
    st.floats(0, 2), st.sampled_from([0.0, 5e-324, 1e-300, 99.0, 100.0, 101.0, 1e30, 1e308]), floats
)


@FUZZ
@given(
    weights=st.lists(merge_weight, min_size=2, max_size=2),
    method=st.sampled_from(["linear", "cat", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune"]),
    density=st.one_of(st.none(), st.floats(0, 1), st.sampled_from([5e-324, 1e-300, 1e-4, 1e-3, 1.0])),
)
def test_fuzz_merge_weights_end_in_a_response_or_a_4xx(module_client, weights, method, density):
    spec = {"merge": [{"name": "attn-r4", "weight": weights[0]}, {"name": "mlp-r2", "weight": weights[1]}]}
    spec["method"] = method
    if density is not None:
        spec["density"] = density
    r = module_client.post("/v1/chat/completions", json={**CHAT, "temperature": 0, "adapter": spec})
    assert r.status_code in OK_OR_CLIENT_ERROR, (spec, r.status_code, r.text)
    if r.status_code != 200:
        assert_openai_error(r, r.status_code)
    assert module_client.get("/ready").status_code == 200


# ------------------------------------------------------------------ adapter configs


def _upload(client, name: str, config: dict | str, weights: bytes) -> object:
    body = config if isinstance(config, str) else json.dumps(config)
    return client.put(
        f"/v1/adapters/{name}?overwrite=true",
        files={"adapter_config": ("adapter_config.json", body), "adapter_model": ("w.safetensors", weights)},
    )


@pytest.fixture(scope="module")
def source_adapter(tiny_adapter_sources) -> tuple[dict, bytes]:
    folder = tiny_adapter_sources["attn-r4"]
    config = json.loads((folder / "adapter_config.json").read_text())
    return config, (folder / "adapter_model.safetensors").read_bytes()


config_number = st.one_of(
    st.integers(-5, 70),
    st.sampled_from([0, 1, 4, 2**31, 2**63, 1e-300, 1e30, 1e308, -1e308, 4.0, True]),
    floats,
    st.text(max_size=4),
    st.none(),
)


@FUZZ
@given(
    r=config_number,
    alpha=config_number,
    rank_pattern=st.one_of(
        st.none(),
        st.text(max_size=8),
        st.dictionaries(st.sampled_from(["q_proj", "v_proj", "(", "x" * 300]), config_number, max_size=2),
    ),
    alpha_pattern=st.one_of(
        st.none(), st.lists(st.integers(), max_size=2), st.dictionaries(st.just("q_proj"), config_number)
    ),
    use_rslora=st.one_of(st.booleans(), st.just("yes")),
)
def test_fuzz_adapter_config_numbers_end_in_a_load_or_a_400(
    module_client, source_adapter, r, alpha, rank_pattern, alpha_pattern, use_rslora
):
    config, weights = source_adapter
    fuzzed = {**config, "r": r, "lora_alpha": alpha, "rank_pattern": rank_pattern}
    fuzzed.update(alpha_pattern=alpha_pattern, use_rslora=use_rslora)
    try:
        json.dumps(fuzzed, allow_nan=False)
    except ValueError:
        return  # not JSON: the client cannot even send it
    up = _upload(module_client, "fuzzed", fuzzed, weights)
    assert up.status_code in (201, 400), (fuzzed, up.status_code, up.text)
    if up.status_code == 400:
        assert assert_openai_error(up, 400)["code"] == "adapter_invalid"
        return
    out = module_client.post("/v1/chat/completions", json={**CHAT, "temperature": 0, "adapter": "fuzzed"})
    assert out.status_code == 200, out.text
    assert module_client.get("/ready").status_code == 200


def test_extreme_but_finite_adapters_are_refused_with_the_bound_named(module_client, source_adapter):
    config, weights = source_adapter
    for field, value, reason in (
        ("lora_alpha", 1e30, "scaling"),
        ("r", 2**63, "maximum rank"),
        ("rank_pattern", "q_proj", "rank_pattern must be an object"),
        ("alpha_pattern", {"q_proj": 1e300}, "scaling"),
        ("rank_pattern", {"(": 4}, "regular expression"),
    ):
        r = _upload(module_client, "extreme", {**config, field: value}, weights)
        error = assert_openai_error(r, 400, "adapter")
        assert error["code"] == "adapter_invalid" and reason in error["message"], (field, error)


def test_deep_and_huge_configs_are_refused_not_500(module_client, source_adapter):
    _, weights = source_adapter
    deep = '{"a": ' * 100_000 + "1" + "}" * 100_000
    r = _upload(module_client, "deep", deep, weights)
    error = assert_openai_error(r, 400, "adapter")
    assert "nested more than" in error["message"]
    huge = json.dumps({"peft_type": "LORA", "pad": "x" * (50 << 20)})
    r = _upload(module_client, "huge", huge, weights)
    error = assert_openai_error(r, 413, "adapter_config")
    assert str(1 << 20) in error["message"]


def test_a_symlinked_file_in_an_adapter_folder_is_not_followed(client, adapter_store_dir, tmp_path):
    outside = tmp_path / "outside.json"
    folder = adapter_store_dir / "attn-r4"
    outside.write_text((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").unlink()
    (folder / "adapter_config.json").symlink_to(outside)
    r = client.post("/v1/chat/completions", json={**CHAT, "adapter": "attn-r4"})
    error = assert_openai_error(r, 400, "adapter")
    assert "symbolic link" in error["message"] and str(tmp_path) not in error["message"]


# ------------------------------------------------------------------ requests that can never succeed


def test_requests_that_can_never_fit_are_400_not_429(module_client):
    prompts = ["p"] * 17  # --max-pending is 16 here
    r = module_client.post("/v1/completions", json={"prompt": prompts, "max_tokens": 1})
    error = assert_openai_error(r, 400, "prompt")
    assert error["code"] == "too_many_sequences" and "--max-pending" in error["message"]
    r = module_client.post("/v1/completions", json={"prompt": ["a", "b", "c"], "max_tokens": 1, "n": 6})
    assert assert_openai_error(r, 400, "n")["code"] == "too_many_sequences"


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"seed": 2**70}, "seed"),
        ({"seed": -(2**70)}, "seed"),
        ({"adapter": "bad\ud800name"}, "adapter"),
        ({"model": "\ud800"}, "model"),
        ({"logit_bias": {"999999": 10}}, "logit_bias"),
        ({"logit_bias": {"4": 1000}}, "logit_bias"),
        ({"logit_bias": {"x": 1}}, "logit_bias"),
        ({"best_of": 3}, "best_of"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"response_format": {"type": "yaml"}}, "response_format.type"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"store": True}, "store"),
        ({"repetition_penalty": 1.2}, "repetition_penalty"),
    ],
)
def test_bad_or_unsupported_values_are_400_naming_the_field(module_client, extra, param):
    body = json.dumps({**CHAT, **extra}, ensure_ascii=True)  # a lone surrogate travels as \ud800
    r = module_client.post("/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
    assert_openai_error(r, 400, param)


@pytest.mark.parametrize(
    "extra", [{"response_format": {"type": "text"}}, {"logit_bias": {}}, {"best_of": 1}, {"seed": 2**64 - 1}]
)
def test_no_op_values_of_unsupported_parameters_are_accepted(module_client, extra):
    assert module_client.post("/v1/chat/completions", json={**CHAT, **extra}).status_code == 200


def test_seeds_at_the_64_bit_edge_repeat_with_n(module_client):
    body = {**CHAT, "temperature": 1.0, "seed": 2**64 - 1, "n": 2, "max_tokens": 5}
    first = module_client.post("/v1/chat/completions", json=body)
    second = module_client.post("/v1/chat/completions", json=body)
    assert first.status_code == 200, first.text
    texts = [[c["message"]["content"] for c in r.json()["choices"]] for r in (first, second)]
    assert texts[0] == texts[1]


def test_the_engine_floor_is_safe_for_every_finite_temperature():
    """The sampler alone: any accepted temperature gives a token, never an exception."""
    import torch

    from server.engine.sampling import sample_row
    from server.engine.types import SamplingParams

    logits = torch.randn(50) * 30
    generator = torch.Generator().manual_seed(0)
    for t in (5e-324, 1e-300, 1e-6, 1e-5, 1e-3, 2.0):
        for top_p in (5e-324, 1e-9, 1.0):
            token = sample_row(logits, [1, 2], SamplingParams(temperature=t, top_p=top_p, top_k=1), generator)
            assert 0 <= token < 50
    assert math.isfinite(float(logits.max()))
