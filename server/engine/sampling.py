"""Turning a batch of next-token logits into tokens, each row with its own parameters.

Numerically safe for every value the API accepts: scores are handled in float32; a row whose
scores are not all finite raises :class:`NonFiniteLogits` (the engine fails that request alone);
temperatures below :data:`MIN_TEMPERATURE` decode greedily; top-k and top-p always keep at least the
most likely token, so the sampling distribution is never empty.
"""

from __future__ import annotations

import torch

from server.engine.types import NonFiniteLogits, SamplingParams, TokenLogprob


def apply_penalties(logits: torch.Tensor, output_ids: list[int], params: SamplingParams) -> torch.Tensor:
    """OpenAI's presence/frequency penalties over the tokens generated so far (one row, (V,))."""
    if not output_ids or (params.presence_penalty == 0.0 and params.frequency_penalty == 0.0):
        return logits
    ids = torch.tensor(output_ids, device=logits.device)
    counts = torch.bincount(ids, minlength=logits.shape[-1])[: logits.shape[-1]].to(logits.dtype)
    return (
        logits - params.frequency_penalty * counts - params.presence_penalty * (counts > 0).to(logits.dtype)
    )


def apply_logit_bias(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """OpenAI's ``logit_bias``: adds each token's bias (−100…100) to its logit (one row, (V,))."""
    if not params.logit_bias:
        return logits
    ids = torch.tensor([t for t, _ in params.logit_bias], device=logits.device)
    bias = torch.tensor([b for _, b in params.logit_bias], dtype=logits.dtype, device=logits.device)
    return logits.index_add(0, ids, bias)


def token_logprob(logits: torch.Tensor, token: int, top: int) -> TokenLogprob:
    """``token``'s log-probability under one row's raw scores ``(V,)``, with the ``top`` best."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    best = ()
    if top > 0:
        values, ids = torch.topk(logprobs, min(top, logprobs.shape[-1]))
        best = tuple(zip(ids.tolist(), values.tolist()))
    return TokenLogprob(int(token), float(logprobs[token]), best)


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Masks out tokens outside the top-k and outside the top-p nucleus (one row, (V,))."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        remove = cumulative - torch.softmax(sorted_logits, dim=-1) >= top_p  # keep the token crossing top_p
        remove[0] = False  # the most likely token always stays (a top_p below float32's range is 0 here)
        logits = logits.masked_fill(remove.scatter(0, order, remove), float("-inf"))
    return logits


def row_scores(
    logits: torch.Tensor, output_ids: list[int], params: SamplingParams, adapter: str | None = None
) -> torch.Tensor:
    """One row's scores ``(V,)`` before its grammar mask: float32, penalties and bias applied.

    Raises:
        NonFiniteLogits: the row's logits hold NaN or infinity.
    """
    logits = logits.float()
    if not bool(torch.isfinite(logits).all()):
        raise NonFiniteLogits(adapter)
    return apply_logit_bias(apply_penalties(logits, output_ids, params), params)


def pick_token(
    scores: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None,
    adapter: str | None = None,
) -> int:
    """The next token from one row's (masked) scores ``(V,)``: greedy, or temperature / top-k / top-p.

    Raises:
        NonFiniteLogits: the sampling distribution is not finite or is empty.
    """
    if params.greedy:
        return int(torch.argmax(scores))
    scores = filter_top_k_top_p(scores / params.temperature, params.top_k, params.top_p)
    probs = torch.softmax(scores, dim=-1)
    if not bool(torch.isfinite(probs).all()) or not float(probs.sum()) > 0.0:
        raise NonFiniteLogits(adapter)
    return int(torch.multinomial(probs, 1, generator=generator))


def sample_row(
    logits: torch.Tensor,
    output_ids: list[int],
    params: SamplingParams,
    generator: torch.Generator | None,
    adapter: str | None = None,
    grammar=None,
) -> int:
    """Picks the next token for one sequence from its logits ``(V,)``; a ``grammar`` (the row's
    RowGrammar) masks what it does not allow, after penalties and bias, before temperature.

    The engine samples a step's rows with :class:`server.engine.step_sampler.StepSampler` (one mask
    fill and one apply for all constrained rows); this per-row form is the reference it must equal.

    Raises:
        NonFiniteLogits: the row's scores (or its sampling distribution) hold NaN or infinity.
    """
    scores = row_scores(logits, output_ids, params, adapter)
    if grammar is not None:
        if scores is logits:  # float32 and no penalty: mask a copy, the caller's logits stay raw (logprobs)
            scores = scores.clone()
        grammar.apply(scores)  # disallowed tokens to -inf (a complete grammar allows only EOS)
    return pick_token(scores, params, generator, adapter)


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """A per-request generator: seeded when the request gives a seed, so the same request repeats."""
    if params.greedy:
        return None
    generator = torch.Generator(device="cpu" if device.type != "cuda" else device)
    if params.seed is not None:
        generator.manual_seed(params.seed)
    else:
        generator.seed()
    return generator
