"""The one conversion from a wire request to engine requests, shared by every generating feature:
the adapter choice (name, merge spec or ``model``; visibility), sampling parameters, the chat
template, and one :class:`GenerationRequest` per prompt × ``n``."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, replace

from adapters.errors import AdapterNotFound
from adapters.lease import AdapterChoice
from adapters.merging import MergeSpec, merged_name
from adapters.peft_types import PREFIX_TUNING, PROMPT_TUNING, adapter_type
from adapters.store import MERGED_PREFIX, check_adapter_name
from server.api.auth import Principal
from server.api.deps import ServingState
from server.api.errors import APIError
from server.api.request_context import request_id_var
from server.api.sampling_protocol import SamplingFields
from server.engine.types import ContextLengthExceeded, GenerationRequest, SamplingParams

SEED_MODULUS = 1 << 64  # torch generators take 64-bit seeds; choice i of n runs on seed + i (mod 2⁶⁴)


@dataclass
class PreparedRequest:
    """A validated request: its id, adapter choice, and one GenerationRequest per choice (``n``)."""

    request_id: str
    choice: AdapterChoice  # what the generations run on; leased when they are submitted
    model_name: str
    generations: list[GenerationRequest]  # prompt p, choice i at index p * n + i
    n: int = 1

    @property
    def adapter(self) -> str | None:
        """The resident name: a stored adapter or merge-<hash> (None: the base model)."""
        return self.choice.name


def resolve_adapter(state: ServingState, body: SamplingFields, principal: Principal) -> AdapterChoice:
    """Which adapter a request names: the ``adapter`` field (a name or a merge spec), LoRAX's
    ``merged_adapters``, or ``model`` set to an adapter's name.

    A name outside the caller's allow-list gets the same 404 as a missing one (no existence oracle).
    """
    spec = _merge_spec(state, body)
    if spec is not None:
        for i, (name, _) in enumerate(spec.parts):
            _check_visible(state, name, principal, f"adapter.merge[{i}].name")
        return AdapterChoice(merged_name(spec), spec)
    model, adapter = body.model, body.adapter
    base_id = state.model_id
    if adapter is not None:
        if model not in (None, "", base_id, adapter):
            raise APIError(
                400,
                f"'model' ({model}) and 'adapter' ({adapter}) name different models; send one of them.",
                code="model_adapter_conflict",
                param="adapter",
            )
        name, param = adapter, "adapter"
    elif model and model != base_id:
        name, param = model, "model"
    else:
        return AdapterChoice(None)
    if name.startswith(MERGED_PREFIX):
        return _cached_merge(state, name, principal, param)
    _check_visible(state, name, principal, param)
    return AdapterChoice(name)


def virtual_token_count(state: ServingState, choice: AdapterChoice) -> int:
    """Positions a prompt- or prefix-tuning adapter adds before each prompt (0 for every other type
    and for merges, which are LoRA-family only): they take room in the context window like prompt
    tokens. A resident adapter's own count, else its stored config's (no load needed); the engine
    checks again with the loaded adapter."""
    if choice.name is None or choice.spec is not None:
        return 0
    resident = state.registry.get(choice.name)
    if resident is not None:  # the common case: no file read per request
        return resident.weights.num_virtual_tokens
    try:
        config = state.registry.store.read_config(choice.name)
    except (LookupError, ValueError, OSError):
        return 0  # not stored (or unreadable): the registry's own error comes when it is leased
    if adapter_type(config) not in (PROMPT_TUNING, PREFIX_TUNING):
        return 0
    count = config.get("num_virtual_tokens")
    return count if isinstance(count, int) and count > 0 else 0


def _cached_merge(state: ServingState, name: str, principal: Principal, param: str) -> AdapterChoice:
    """A merge named by its ``merge-<hash>`` name: visible only while cached and if every part is."""
    resident = state.registry.get(name)
    if resident is None or resident.origin != "merge" or not resident.parts:
        raise _not_found(name, param)
    if not all(principal.may_use_adapter(part) for part in resident.parts):
        raise _not_found(name, param)
    return AdapterChoice(name, MergeSpec.from_request(resident.spec))


def _merge_spec(state: ServingState, body: SamplingFields) -> MergeSpec | None:
    max_parts = state.settings.max_merge_parts
    if body.merged_adapters is not None:
        if body.adapter is not None:
            message = "send either 'adapter' or 'merged_adapters', not both"
            raise APIError(400, message, param="merged_adapters")
        return MergeSpec.from_lorax(body.merged_adapters, max_parts=max_parts)
    if isinstance(body.adapter, dict):
        return MergeSpec.from_request(body.adapter, max_parts=max_parts)
    return None


def _check_visible(state: ServingState, name: str, principal: Principal, param: str) -> None:
    try:
        check_adapter_name(name)
    except ValueError:
        # An impossible name is simply not a model we have: same answer as a missing one.
        raise _not_found(name, param) from None
    if not principal.may_use_adapter(name):
        raise _not_found(name, param)
    if not state.store.exists(name) and not state.registry.is_loaded(name):
        raise _not_found(name, param)


def _not_found(name: str, param: str) -> AdapterNotFound:
    err = AdapterNotFound(name)
    err.param = param
    return err


def sampling_params(
    state: ServingState, body: SamplingFields, max_tokens: int | None, max_tokens_field: str = "max_tokens"
) -> SamplingParams:
    """The engine's sampling parameters; ``max_tokens_field`` is the request's name for ``max_tokens``."""
    n_max = state.settings.max_n
    if body.n > n_max:
        raise APIError(400, f"n must be at most {n_max}", code="invalid_value", param="n")
    limit = state.settings.max_tokens_limit
    if max_tokens is not None and max_tokens > limit:
        message = f"{max_tokens_field} must be at most {limit}"
        raise APIError(400, message, code="invalid_value", param=max_tokens_field)
    logprobs, prompt_logprobs = body.logprob_options()
    return SamplingParams(
        max_tokens=state.settings.default_max_tokens if max_tokens is None else max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=max(body.top_k, 0),
        seed=body.seed,
        stop=tuple(body.stop or ()),
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        ignore_eos=body.ignore_eos,
        logit_bias=_logit_bias(state, body),
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        grammar=_compiled_grammar(state, body),
    )


def _compiled_grammar(state: ServingState, body: SamplingFields):
    """The request's output constraint compiled once per (spec, tokenizer), or None (free text)."""
    spec = body.output_constraint()
    return None if spec is None else state.grammars.compile(spec)


def _logit_bias(state: ServingState, body: SamplingFields) -> tuple[tuple[int, float], ...]:
    """``logit_bias`` as (token id, bias) pairs; ids outside the model's vocabulary are a 400."""
    vocab = state.base.model.config.get_text_config().vocab_size
    pairs = tuple(sorted((int(token), float(bias)) for token, bias in (body.logit_bias or {}).items()))
    bad = [token for token, _ in pairs if token >= vocab]
    if bad:
        raise APIError(400, f"token id {bad[0]} is outside the vocabulary [0, {vocab})", param="logit_bias")
    return pairs


def text_prompt_ids(state: ServingState, text: str) -> list[int]:
    """A plain-text prompt's token ids, as every text-prompt route tokenizes it (no special tokens)."""
    return state.base.tokenizer(text, add_special_tokens=False)["input_ids"]


def render_chat(state: ServingState, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
    """Renders messages with the tokenizer's chat template, exactly as training does, and tokenizes."""
    tokenizer = state.base.tokenizer
    try:
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception as e:  # noqa: BLE001 - template errors (e.g. role order) are the caller's input
        raise APIError(400, f"messages cannot be rendered by the chat template: {e}", param="messages") from e
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def prepare(
    state: ServingState,
    body: SamplingFields,
    prompts: list[list[int]],
    max_tokens: int | None,
    principal: Principal,
    max_tokens_field: str = "max_tokens",
) -> PreparedRequest:
    """Builds the engine requests for each prompt × ``n`` choices, after every check that can fail.

    Args:
        state: the serving state.
        body: the request's sampling and adapter fields.
        prompts: each prompt's token ids.
        max_tokens: the completion's token budget (None: the server's default).
        principal: the caller, whose allow-list limits the adapters it may name.
        max_tokens_field: the request's own name for ``max_tokens``, for error messages.
    """
    params = sampling_params(state, body, max_tokens, max_tokens_field)
    for ids in prompts:
        if not ids:
            raise APIError(400, "the prompt is empty", param="prompt")
        if len(ids) > state.settings.max_prompt_tokens:
            raise APIError(
                400,
                f"the prompt has {len(ids)} tokens; the limit is {state.settings.max_prompt_tokens}",
                code="prompt_too_long",
                param="prompt",
            )
    selected = resolve_adapter(state, body, principal)
    virtual = virtual_token_count(state, selected)
    for ids in prompts:
        if len(ids) + virtual + params.max_tokens > state.context_length:
            raise ContextLengthExceeded(len(ids) + virtual, params.max_tokens, state.context_length, virtual)
    # The HTTP request id leads the engine's ids, so engine log lines can be traced to the request.
    http_id = request_id_var.get()
    request_id = f"{http_id}.{uuid.uuid4().hex[:8]}" if http_id != "-" else uuid.uuid4().hex[:24]
    generations = []
    for p, ids in enumerate(prompts):
        for i in range(body.n):
            choice = p * body.n + i
            seeded = (
                params if params.seed is None else _with_seed(params, (params.seed + choice) % SEED_MODULUS)
            )
            generations.append(
                GenerationRequest(f"{request_id}-{choice}", list(ids), seeded, cache_salt=principal.name)
            )
    return PreparedRequest(request_id, selected, selected.name or state.model_id, generations, body.n)


def _with_seed(params: SamplingParams, seed: int) -> SamplingParams:
    return replace(params, seed=seed)
