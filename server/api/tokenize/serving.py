"""Tokenizing and detokenizing with the generation model's tokenizer and chat template.

Chat messages go through :func:`server.api.engine_request.render_chat`, the very function chat
completions use, so ``count`` is the ``usage.prompt_tokens`` a chat completion of the same messages reports.
"""

from __future__ import annotations

from server.api.auth import Principal
from server.api.chat.serving import chat_messages
from server.api.deps import ServingState
from server.api.engine_request import render_chat
from server.api.errors import APIError
from server.api.models.serving import adapter_visible, model_not_found
from server.api.tokenize.protocol import DetokenizeRequest, TokenizeRequest


def check_model(state: ServingState, caller: Principal, model: str | None) -> None:
    """Accepts no model, the base model, or an adapter the caller may use (they share one tokenizer)."""
    if model in (None, "", state.model_id):
        return
    if not adapter_visible(state, caller, model):
        raise model_not_found(model)


def tokenize(state: ServingState, caller: Principal, body: TokenizeRequest) -> dict:
    check_model(state, caller, body.model)
    if body.messages is not None:
        messages = chat_messages(body)
        add_generation_prompt = True if body.add_generation_prompt is None else body.add_generation_prompt
        tokens = render_chat(state, messages, add_generation_prompt=add_generation_prompt)
    else:
        add_special_tokens = bool(body.add_special_tokens)
        tokens = state.base.tokenizer(body.prompt, add_special_tokens=add_special_tokens)["input_ids"]
    return {"tokens": list(tokens), "count": len(tokens), "max_model_len": state.context_length}


def detokenize(state: ServingState, caller: Principal, body: DetokenizeRequest) -> dict:
    check_model(state, caller, body.model)
    tokenizer = state.base.tokenizer
    vocab = len(tokenizer)
    bad = next((t for t in body.tokens if not 0 <= t < vocab), None)
    if bad is not None:
        message = f"token id {bad} is outside the vocabulary [0, {vocab})"
        raise APIError(400, message, code="invalid_value", param="tokens")
    return {"prompt": tokenizer.decode(body.tokens)}
