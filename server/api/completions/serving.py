"""Text completions: prompts (text or token ids) → the engine → OpenAI's ``text_completion``."""

from __future__ import annotations

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from server.api.auth import Principal
from server.api.completions.protocol import CompletionRequest
from server.api.deps import ServingState
from server.api.engine_request import PreparedRequest, prepare, text_prompt_ids
from server.api.errors import APIError
from server.api.generation_serving import Choice, GenerationServing
from server.engine.types import GenerationOutput


class CompletionServing(GenerationServing):
    object_name = "text_completion"
    chunk_object_name = "text_completion"
    id_prefix = "cmpl-"

    def __init__(self, state: ServingState, prepared: PreparedRequest, echo: bool):
        super().__init__(state, prepared)
        self.echo = echo

    @property
    def wants_logprobs(self) -> bool:
        return self.prepared.generations[0].sampling.logprobs is not None

    def _prompt(self, index: int) -> tuple[list[int], str]:
        ids = self.prepared.generations[index].prompt_token_ids
        return ids, self.state.base.tokenizer.decode(ids)

    def _prompt_items(self, index: int, choice_prompt_logprobs: list | None) -> list:
        ids, _ = self._prompt(index)
        return [ids[0], *(choice_prompt_logprobs or [])]  # the first prompt token has no logprob

    def choice_body(self, index: int, choice: Choice) -> dict:
        prefix = self._prompt(index)[1] if self.echo else ""
        logprobs = None
        if self.wants_logprobs:
            items = (self._prompt_items(index, choice.prompt_logprobs) if self.echo else []) + choice.logprobs
            logprobs = self.logprob_format.completion(items)
        return {
            "index": index,
            "text": prefix + choice.text,
            "logprobs": logprobs,
            "finish_reason": choice.finish_reason,
        }

    def chunk_choice(
        self, index: int, text: str | None, finish_reason: str | None, first: bool, logprobs: list
    ) -> dict:
        wire_logprobs = self.logprob_format.completion(logprobs) if self.wants_logprobs and logprobs else None
        return {"index": index, "text": text or "", "logprobs": wire_logprobs, "finish_reason": finish_reason}

    def first_output_chunk(self, index: int, output: GenerationOutput) -> dict | None:
        """With ``echo``, the prompt (and its logprobs) is the first text of every choice."""
        if not self.echo:
            return None
        _, text = self._prompt(index)
        logprobs = None
        if self.wants_logprobs:
            logprobs = self.logprob_format.completion(self._prompt_items(index, output.prompt_logprobs))
        choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": None}
        return {**self.base, "object": self.chunk_object_name, "choices": [choice]}


def completion_prompts(state: ServingState, body: CompletionRequest) -> list[list[int]]:
    """The request's prompts as token ids: a string, a list of strings, a list of token ids, or a list
    of token-id lists (ids outside the vocabulary are a 400)."""
    tokenizer = state.base.tokenizer
    prompt = body.prompt
    if isinstance(prompt, str):
        return [text_prompt_ids(state, prompt)]
    if all(isinstance(p, str) for p in prompt):
        return [text_prompt_ids(state, p) for p in prompt]
    prompts = [list(prompt)] if all(isinstance(p, int) for p in prompt) else [list(p) for p in prompt]
    vocab = len(tokenizer)
    for i, ids in enumerate(prompts):
        bad = next((t for t in ids if t >= vocab), None)
        if bad is not None:
            where = "prompt" if len(prompts) == 1 and isinstance(prompt[0], int) else f"prompt[{i}]"
            raise APIError(400, f"token id {bad} is outside the vocabulary [0, {vocab})", param=where)
    return prompts


async def create_completion(
    state: ServingState, body: CompletionRequest, request: Request, principal: Principal
):
    prompts = completion_prompts(state, body)
    # off the event loop: compiling an output grammar may take a while (bounded by its time limit)
    prepared = await run_in_threadpool(prepare, state, body, prompts, body.max_tokens, principal)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    serving = CompletionServing(state, prepared, echo=body.echo)
    return await serving.respond(request, principal, body.stream, include_usage)
