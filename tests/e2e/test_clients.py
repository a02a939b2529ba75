"""Framework clients end to end against a real `loraplex serve` on the default model: instructor,
LangChain (langchain-openai), LlamaIndex and litellm, each through its own OpenAI integration.

A 135M model's answers may be silly; what is asserted is what the client relies on: the call
succeeds, the output parses into the client's types, structured outputs validate. Greedy decoding
(temperature 0) keeps each run the same. The pydantic models forbid extra fields, so their JSON
schemas say ``additionalProperties: false`` and the grammar closes the object (without it the server
lets the model add properties until ``max_tokens``, as README's "Structured outputs" says), and
bound their values, so that even a random adapter's rambling ends within ``max_tokens``.
"""

from __future__ import annotations

import json
import os

import httpx
import jsonschema
import pytest
from pydantic import BaseModel, ConfigDict, Field

from tests.e2e.test_tool_calls import WEATHER

pytestmark = pytest.mark.slow

MODEL = "SmolLM2-135M-Instruct"
EXTRACT = "John is 30 years old. Extract the user."
JSON_PROMPT = 'Return a JSON object with the keys "name" and "age" for: John is 30 years old.'


class User(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(max_length=24)
    age: int = Field(ge=0, le=150)


@pytest.fixture(scope="module")
def base_url(server) -> str:
    return server["url"] + "/v1"


@pytest.fixture(scope="module")
def embedding_model(server) -> tuple[str, int]:
    """The embedder's id in /v1/models and its dimension (asked of the server with plain HTTP)."""
    models = httpx.get(server["url"] + "/v1/models", timeout=30).json()["data"]
    (model_id,) = [m["id"] for m in models if m.get("type") == "embedding"]
    body = {"model": model_id, "input": "dimension probe"}
    vector = httpx.post(server["url"] + "/v1/embeddings", json=body, timeout=60).json()["data"][0]
    return model_id, len(vector["embedding"])


# --- instructor ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def openai_client(base_url):
    from openai import OpenAI

    return OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120)


@pytest.mark.parametrize(
    ("mode", "adapter"),
    [("TOOLS", None), ("JSON_SCHEMA", None), ("TOOLS", "styleA"), ("JSON_SCHEMA", "styleA")],
)
def test_instructor_returns_a_validated_model(openai_client, mode, adapter):
    import instructor

    client = instructor.from_openai(openai_client, mode=getattr(instructor.Mode, mode))
    user = client.chat.completions.create(
        model=MODEL,
        response_model=User,
        messages=[{"role": "user", "content": EXTRACT}],
        max_tokens=60,
        temperature=0,
        max_retries=0,  # instructor's re-asking would hide a first answer that does not validate
        extra_body={"adapter": adapter} if adapter else None,
    )
    assert isinstance(user, User)


# --- LangChain -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_model(base_url):
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(
        base_url=base_url, api_key="unused", model=MODEL, max_tokens=60, temperature=0, max_retries=0
    )


def test_langchain_invoke_and_stream_agree(chat_model):
    from langchain_core.messages import AIMessage

    message = chat_model.invoke("Say hello.")
    assert isinstance(message, AIMessage) and message.content
    assert message.usage_metadata["output_tokens"] > 0
    chunks = list(chat_model.stream("Say hello."))
    assert "".join(c.content for c in chunks) == message.content  # greedy: the same text


@pytest.mark.parametrize("method", ["json_schema", "function_calling", "json_mode"])
def test_langchain_structured_output(chat_model, method):
    # json_mode constrains the output to some JSON object, not to the schema: the prompt asks for it
    prompt = JSON_PROMPT if method == "json_mode" else EXTRACT
    structured = chat_model.with_structured_output(User, method=method, include_raw=True)
    result = structured.invoke(prompt)
    assert result["parsing_error"] is None, result["raw"]
    assert isinstance(result["parsed"], User)


def test_langchain_bind_tools_with_a_forced_tool(chat_model):
    from langchain_core.tools import tool

    @tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        return "sunny"

    for tool_choice in ("get_weather", "any"):
        message = chat_model.bind_tools([get_weather], tool_choice=tool_choice, strict=True).invoke(
            "Weather in Paris?"
        )
        assert message.tool_calls, message
        call = message.tool_calls[0]
        assert call["name"] == "get_weather" and isinstance(call["args"]["city"], str) and call["id"]


def test_langchain_over_the_responses_api(base_url):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(
        base_url=base_url,
        api_key="unused",
        model=MODEL,
        max_tokens=60,
        temperature=0,
        max_retries=0,
        use_responses_api=True,  # /v1/responses: text.format and function tools
    )
    assert llm.invoke("Say hello.").text
    assert isinstance(llm.with_structured_output(User, method="json_schema").invoke(EXTRACT), User)
    tool = {"type": "function", **WEATHER["function"]}
    (call,) = llm.bind_tools([tool], tool_choice="get_weather").invoke("Weather in Paris?").tool_calls
    assert call["name"] == "get_weather" and call["args"]["city"] in ("Paris", "Rome")


def test_langchain_embeddings(base_url, embedding_model):
    from langchain_openai import OpenAIEmbeddings

    model_id, dimension = embedding_model
    # tiktoken ids mean nothing to the embedder: LangChain must send text (README, Embeddings)
    embeddings = OpenAIEmbeddings(
        base_url=base_url, api_key="unused", model=model_id, check_embedding_ctx_length=False, max_retries=0
    )
    assert len(embeddings.embed_query("hello")) == dimension
    assert [len(v) for v in embeddings.embed_documents(["a cat", "a dog"])] == [dimension, dimension]


# --- LlamaIndex ------------------------------------------------------------------------------------------


def llama_index_llm(base_url: str, **options):
    from llama_index.llms.openai_like import OpenAILike

    options = {"is_chat_model": True, "max_tokens": 60, "temperature": 0, **options}
    return OpenAILike(api_base=base_url, api_key="unused", model=MODEL, max_retries=0, **options)


def test_llama_index_chat_complete_and_stream(base_url):
    from llama_index.core.llms import ChatMessage

    llm = llama_index_llm(base_url, context_window=8192, max_tokens=40)
    reply = llm.chat([ChatMessage(role="user", content="Say hello.")])
    assert reply.message.content
    assert llm.complete("Say hello.").text == reply.message.content  # complete goes through chat
    streamed = "".join(r.delta for r in llm.stream_chat([ChatMessage(role="user", content="Say hello.")]))
    assert streamed == reply.message.content
    text_llm = llama_index_llm(base_url, is_chat_model=False, max_tokens=8)
    assert text_llm.complete("Once upon a time").text  # /v1/completions


def test_llama_index_structured_llm(base_url):
    llm = llama_index_llm(base_url, is_function_calling_model=True)
    assert isinstance(llm.as_structured_llm(User).complete(EXTRACT).raw, User)


def test_llama_index_embeddings_take_our_model_by_model_name(base_url, embedding_model):
    from llama_index.embeddings.openai import OpenAIEmbedding

    model_id, dimension = embedding_model
    # `model=` is checked against OpenAI's model names on the client; `model_name=` is sent as is
    embedding = OpenAIEmbedding(api_base=base_url, api_key="unused", model_name=model_id, max_retries=0)
    assert len(embedding.get_text_embedding("hello")) == dimension
    assert [len(v) for v in embedding.get_text_embedding_batch(["a", "b"])] == [dimension, dimension]


# --- litellm ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def litellm():
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no fetch of the price list
    import litellm

    return litellm


def test_litellm_completion_tools_stream_and_embedding(litellm, base_url, embedding_model):
    common = {"model": f"openai/{MODEL}", "api_base": base_url, "api_key": "unused", "temperature": 0}
    messages = [{"role": "user", "content": "Say hello."}]
    reply = litellm.completion(messages=messages, max_tokens=20, **common)
    text = reply.choices[0].message.content
    assert text and reply.usage.completion_tokens > 0
    chunks = litellm.completion(messages=messages, max_tokens=20, stream=True, **common)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    called = litellm.completion(
        messages=[{"role": "user", "content": "Weather in Paris?"}],
        max_tokens=60,
        tools=[WEATHER],
        tool_choice="required",
        parallel_tool_calls=False,
        **common,
    )
    (call,) = called.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and called.choices[0].finish_reason == "tool_calls"
    model_id, dimension = embedding_model
    vectors = litellm.embedding(
        model=f"openai/{model_id}", api_base=base_url, api_key="unused", input=["hello", "world"]
    )
    assert [len(item["embedding"]) for item in vectors.data] == [dimension, dimension]


# --- the openai client's Responses API --------------------------------------------------------------------


def test_openai_responses_parse_and_function_calls(openai_client):
    parsed = openai_client.responses.parse(
        model=MODEL, input=EXTRACT, text_format=User, max_output_tokens=60, temperature=0
    )
    assert isinstance(parsed.output_parsed, User)
    tool = {"type": "function", **WEATHER["function"]}  # the Responses API's flat tool shape
    response = openai_client.responses.create(
        model=MODEL,
        input="Weather in Paris?",
        tools=[tool],
        tool_choice="required",
        parallel_tool_calls=False,
        max_output_tokens=60,
        temperature=0,
    )
    (call,) = [item for item in response.output if item.type == "function_call"]
    assert call.name == "get_weather" and call.call_id and response.status == "completed"
    jsonschema.validate(json.loads(call.arguments), WEATHER["function"]["parameters"])
    follow_up = openai_client.responses.create(
        model=MODEL,
        input=[
            {"role": "user", "content": "Weather in Paris?"},
            call.model_dump(exclude_none=True),
            {"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 24 C"},
        ],
        tools=[tool],
        max_output_tokens=30,
        temperature=0,
    )
    assert follow_up.status in ("completed", "incomplete") and follow_up.output


def test_openai_responses_stream_function_call_events(openai_client):
    tool = {"type": "function", **WEATHER["function"]}
    stream = openai_client.responses.create(
        model=MODEL,
        input="Weather in Paris?",
        tools=[tool],
        tool_choice={"type": "function", "name": "get_weather"},
        max_output_tokens=60,
        temperature=0,
        stream=True,
    )
    events = list(stream)
    deltas = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    (done,) = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert deltas == done.arguments and events[-1].type == "response.completed"
    (call,) = [item for item in events[-1].response.output if item.type == "function_call"]
    assert call.arguments == done.arguments and call.name == "get_weather"
