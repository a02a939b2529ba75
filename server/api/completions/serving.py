"""Text completions: prompts (text or token ids) → the engine → OpenAI's ``text_completion``."""

from __future__ import annotations

from fastapi import Request

from server.api.auth import Principal
from server.api.completions.protocol import CompletionRequest
from server.api.deps import ServingState
from server.api.engine_request import prepare, text_prompt_ids
from server.api.errors import APIError
from server.api.generation_serving import Choice, GenerationServing


class CompletionServing(GenerationServing):
    object_name = "text_completion"
    chunk_object_name = "text_completion"
    id_prefix = "cmpl-"

    def choice_body(self, index: int, choice: Choice) -> dict:
        return {"index": index, "text": choice.text, "logprobs": None, "finish_reason": choice.finish_reason}

    def chunk_choice(self, index: int, text: str | None, finish_reason: str | None, first: bool) -> dict:
        return {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish_reason}


def completion_prompts(state: ServingState, body: CompletionRequest) -> list[list[int]]:
    """The request's prompts as token ids: a string, a list of strings, or a list of token ids."""
    tokenizer = state.base.tokenizer
    prompt = body.prompt
    if isinstance(prompt, str):
        return [text_prompt_ids(state, prompt)]
    if all(isinstance(p, int) for p in prompt):
        vocab = len(tokenizer)
        if any(t < 0 or t >= vocab for t in prompt):
            raise APIError(400, f"token ids must be in [0, {vocab})", param="prompt")
        return [list(prompt)]
    return [text_prompt_ids(state, p) for p in prompt]


async def create_completion(
    state: ServingState, body: CompletionRequest, request: Request, principal: Principal
):
    prepared = prepare(state, body, completion_prompts(state, body), body.max_tokens, principal)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return await CompletionServing(state, prepared).respond(request, principal, body.stream, include_usage)
