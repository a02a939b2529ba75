"""The native routes' logic: TGI's body (``generated_text`` and ``details``) or TGI's token events.

Parameters go through the same conversion as the OpenAI routes (:func:`prepare`, so adapter choice,
tenancy, merges and limits are the same); the prompt is tokenized as ``/v1/completions`` tokenizes a
text prompt, so greedy output is the same on both. Every token's logprob comes from the engine (the
row's own distribution, before sampling transforms).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse

from server.api.auth import Principal
from server.api.deps import ServingState
from server.api.engine_bridge import EngineStream
from server.api.engine_request import PreparedRequest, prepare, text_prompt_ids
from server.api.generation_serving import Choice, EngineServing, sse
from server.api.native import errors
from server.api.native.protocol import GenerateRequest, NativeParameters
from server.api.native.token_text import TokenTexts
from server.api.sampling_protocol import MAX_STOP_SEQUENCES
from server.engine.types import GenerationFailed

logger = logging.getLogger(__name__)


def finish_reason(choice: Choice) -> str | None:
    """TGI's finish reason: ``length``, ``eos_token`` or ``stop_sequence``."""
    if choice.finish_reason == "stop":
        return "stop_sequence" if choice.stop_sequence is not None else "eos_token"
    return choice.finish_reason


class NativeServing(EngineServing):
    """One native generation; ``as_list`` answers ``[body]`` as TGI's ``POST /`` does."""

    def __init__(
        self,
        state: ServingState,
        prepared: PreparedRequest,
        body: GenerateRequest,
        as_list: bool = False,
    ):
        super().__init__(state, prepared)
        self.body = body
        self.as_list = as_list
        self.special_ids = set(state.base.tokenizer.all_special_ids)

    @property
    def params(self) -> NativeParameters:
        return self.body.parameters

    def generated_text(self, choice: Choice) -> str:
        return (self.body.inputs if self.params.return_full_text else "") + choice.text

    def token(self, token_id: int, texts: TokenTexts, logprob: float | None) -> dict:
        return {
            "id": token_id,
            "text": texts.add(token_id),
            "logprob": logprob,  # the row's own distribution, before sampling transforms
            "special": token_id in self.special_ids,
        }

    def stream_details(self, choice: Choice) -> dict:
        return {
            "finish_reason": finish_reason(choice),
            "prompt_tokens": len(self.prepared.generations[0].prompt_token_ids),
            "generated_tokens": choice.completion_tokens,
            "seed": self.prepared.generations[0].sampling.seed if self.params.samples else None,
        }

    def final_body(self, choices: list[Choice]) -> dict | list:
        (choice,) = choices
        body: dict = {"generated_text": self.generated_text(choice)}
        if self.params.details:
            texts = TokenTexts(self.state.base.tokenizer)
            logprobs = _logprobs_by_token(choice.token_ids, choice.logprobs, choice.eos_logprob)
            tokens = [self.token(t, texts, lp) for t, lp in zip(choice.token_ids, logprobs)]
            body["details"] = {**self.stream_details(choice), "prefill": [], "tokens": tokens}
        return [body] if self.as_list else body

    def error_response(self, exc: BaseException) -> JSONResponse:
        return errors.error_response(exc)

    async def stream_events(
        self, engine_stream: EngineStream, include_usage: bool, extra: dict
    ) -> AsyncIterator[str]:
        """One event per token; the last carries ``generated_text`` (and ``details`` if asked).

        A token is sent once the next output arrives, so that the last one can carry the end even
        when the engine's final output brings no new token. No ``[DONE]``: TGI's clients parse every
        ``data:`` line as an event.
        """
        choice, texts, held = Choice(), TokenTexts(self.state.base.tokenizer), None
        outputs = engine_stream.outputs()
        try:
            async for _, output in outputs:
                choice.add(output)
                if output.error is not None:
                    yield sse(errors.error_body(output.error))
                    return
                logprobs = _logprobs_by_token(output.token_ids, output.logprobs, output.eos_logprob)
                for token_id, logprob in zip(output.token_ids, logprobs):
                    if held is not None:
                        yield sse({"token": held, "generated_text": None, "details": None})
                    held = self.token(token_id, texts, logprob)
                if output.finished:
                    if held is None:
                        raise GenerationFailed("generation ended without producing a token")
                    details = self.stream_details(choice) if self.params.details else None
                    yield sse(
                        {"token": held, "generated_text": self.generated_text(choice), "details": details}
                    )
        except Exception as e:  # noqa: BLE001 - the stream has started: report in-band, then end it
            yield sse(errors.error_body(e))
        finally:
            await outputs.aclose()
            engine_stream.close()


def _logprobs_by_token(token_ids: list[int], logprobs: list, eos_logprob) -> list[float | None]:
    """Each token's logprob, in order (the engine reports every generated token's, the ending EOS's apart)."""
    values = [lp.logprob for lp in logprobs]
    if eos_logprob is not None:
        values.append(eos_logprob.logprob)
    return values + [None] * (len(token_ids) - len(values))


async def create_generation(
    state: ServingState,
    body: GenerateRequest,
    request: Request,
    principal: Principal,
    stream: bool,
    as_list: bool = False,
):
    """Runs ``body`` through the shared conversion path and answers natively."""
    params = body.parameters
    prompt_ids = text_prompt_ids(state, body.inputs)
    fields = params.to_sampling_fields()
    prepared = prepare(
        state, fields, [prompt_ids], params.max_new_tokens, principal, "parameters.max_new_tokens"
    )
    return await NativeServing(state, prepared, body, as_list).respond(request, principal, stream)


def server_info(state: ServingState, app_version: str) -> dict:
    """``GET /info``: TGI's fields that have a meaning here, and where adapters come from."""
    settings = state.settings
    dtype = next((p.dtype for p in state.base.model.parameters() if p.is_floating_point()), None)
    max_input = min(settings.max_prompt_tokens, state.context_length - 1)
    return {
        "model_id": state.model_id,
        "model_sha": None,
        "model_dtype": str(dtype).removeprefix("torch.") if dtype is not None else None,
        "model_device_type": state.base.device.type,
        "model_pipeline_tag": "text-generation",
        "max_concurrent_requests": settings.max_pending,
        "max_best_of": 1,
        "max_stop_sequences": MAX_STOP_SEQUENCES,
        "max_input_length": max_input,
        "max_input_tokens": max_input,
        "max_total_tokens": state.context_length,
        "max_batch_size": settings.max_batch_size,
        "router": "loraplex",
        "version": app_version,
        "sha": None,
        "docker_label": None,
        "adapter_source": "local",
        "max_loaded_adapters": settings.max_loaded_adapters,
    }
