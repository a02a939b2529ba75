"""Measuring an adapter against the base model: greedy generations scored against reference replies.

Scoring is pure (:func:`score`); generation is any callable ``generate(conversations, adapter,
max_tokens) -> replies`` (:data:`GenerateFn`), so the same runner works in-process with the server's
engine, against a running server over HTTP (:class:`HTTPGenerator`), or offline with PEFT
(:class:`PeftGreedyGenerator`, also used by tests).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from training.data import Dataset

logger = logging.getLogger(__name__)

GenerateFn = Callable[[list[list[dict]], "str | None", int], list[str]]
_WORD_RE = re.compile(r"\w+", re.UNICODE)


class ServerError(RuntimeError):
    """The server refused a generation request (the message carries its error body)."""


@dataclass(frozen=True)
class EvalExample:
    prompt: list[dict]  # the conversation up to the reference reply
    reference: str


@dataclass
class Scores:
    """Mean scores over a set of predictions (each in [0, 1])."""

    exact_match: float
    contains: float
    token_f1: float
    n: int

    def as_dict(self) -> dict:
        return {
            "exact_match": self.exact_match,
            "contains": self.contains,
            "token_f1": self.token_f1,
            "n": self.n,
        }


@dataclass
class EvalRun:
    """One model's (base or adapter) predictions and their scores."""

    adapter: str | None
    predictions: list[str]
    scores: Scores


@dataclass
class Comparison:
    """Base and adapter runs over the same examples, for a side-by-side report."""

    examples: list[EvalExample]
    runs: list[EvalRun] = field(default_factory=list)


def normalize(text: str) -> str:
    """Whitespace-trimmed and collapsed: the form compared by exact and contains matching."""
    return " ".join(text.split())


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD-style F1 over lower-cased word tokens (``\\w+``), counting repeated tokens."""
    pred, ref = _WORD_RE.findall(prediction.lower()), _WORD_RE.findall(reference.lower())
    if not pred or not ref:
        return float(pred == ref)
    remaining: dict[str, int] = {}
    for token in ref:
        remaining[token] = remaining.get(token, 0) + 1
    common = 0
    for token in pred:
        if remaining.get(token, 0) > 0:
            remaining[token] -= 1
            common += 1
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def score(predictions: Sequence[str], references: Sequence[str]) -> Scores:
    """Exact match, contains-match (the reference appears in the prediction) and mean token F1."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    n = len(references)
    if n == 0:
        return Scores(0.0, 0.0, 0.0, 0)
    exact = sum(normalize(p) == normalize(r) for p, r in zip(predictions, references))
    contains = sum(normalize(r) in normalize(p) for p, r in zip(predictions, references))
    f1 = sum(token_f1(p, r) for p, r in zip(predictions, references))
    return Scores(exact / n, contains / n, f1 / n, n)


def examples_from(dataset: Dataset, limit: int | None = None) -> list[EvalExample]:
    """Each row's last assistant turn is the reference; the conversation before it is the prompt."""
    rows = dataset.examples[:limit] if limit else dataset.examples
    return [EvalExample(*row.prompt_and_reference()) for row in rows]


def run_eval(
    examples: list[EvalExample],
    generate: GenerateFn,
    adapter: str | None,
    max_tokens: int,
    batch_size: int = 16,
) -> EvalRun:
    """Generates a reply for every example (greedy, through ``generate``) and scores it."""
    predictions: list[str] = []
    for start in range(0, len(examples), batch_size):
        batch = examples[start : start + batch_size]
        replies = generate([e.prompt for e in batch], adapter, max_tokens)
        if len(replies) != len(batch):
            raise RuntimeError(f"generate returned {len(replies)} replies for {len(batch)} prompts")
        predictions.extend(replies)
        logger.info("%s: %d/%d generated", adapter or "base", len(predictions), len(examples))
    return EvalRun(adapter, predictions, score(predictions, [e.reference for e in examples]))


def compare(
    examples: list[EvalExample],
    generate: GenerateFn,
    adapter: str | None,
    max_tokens: int,
    batch_size: int = 16,
    include_base: bool = True,
) -> Comparison:
    """Runs the base model and (if given) the adapter over the same examples."""
    comparison = Comparison(examples)
    if include_base or adapter is None:
        comparison.runs.append(run_eval(examples, generate, None, max_tokens, batch_size))
    if adapter is not None:
        comparison.runs.append(run_eval(examples, generate, adapter, max_tokens, batch_size))
    return comparison


def format_report(comparison: Comparison, samples: int = 3, width: int = 70) -> str:
    """A plain-text table of scores, side by side, followed by a few sample outputs."""
    names = [run.adapter or "base" for run in comparison.runs]
    lines = [f"{'metric':<14}" + "".join(f"{name:>20}" for name in names)]
    for metric in ("exact_match", "contains", "token_f1"):
        values = "".join(f"{getattr(run.scores, metric):>20.3f}" for run in comparison.runs)
        lines.append(f"{metric:<14}{values}")
    lines.append(f"{'examples':<14}" + "".join(f"{run.scores.n:>20}" for run in comparison.runs))
    for i, example in enumerate(comparison.examples[:samples]):
        lines.append("")
        lines.append(f"sample {i + 1}: {_clip(example.prompt[-1]['content'], width)}")
        lines.append(f"  {'reference':<12} {_clip(example.reference, width)}")
        for name, run in zip(names, comparison.runs):
            lines.append(f"  {name:<12} {_clip(run.predictions[i], width)}")
    return "\n".join(lines)


def _clip(text: str, width: int) -> str:
    text = normalize(text)
    return text if len(text) <= width else text[: width - 1] + "…"


class HTTPGenerator:
    """Greedy generation against a running server's ``/v1/chat/completions`` (``adapter`` field)."""

    def __init__(
        self,
        server_url: str,
        api_key: str | None = None,
        concurrency: int = 8,
        timeout_s: float = 300.0,
        transport=None,
    ):
        import httpx

        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(
            base_url=server_url.rstrip("/"), headers=headers, timeout=timeout_s, transport=transport
        )
        self.concurrency = concurrency

    def __call__(self, conversations: list[list[dict]], adapter: str | None, max_tokens: int) -> list[str]:
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:  # the server batches them together
            return list(pool.map(lambda messages: self._one(messages, adapter, max_tokens), conversations))

    def _one(self, messages: list[dict], adapter: str | None, max_tokens: int) -> str:
        # no "model": the server takes its base model by default and the adapter from "adapter"
        body: dict = {"messages": messages, "temperature": 0, "max_tokens": max_tokens}
        if adapter is not None:
            body["adapter"] = adapter
        response = self.client.post("/v1/chat/completions", json=body)
        if response.status_code != 200:
            raise ServerError(f"the server answered HTTP {response.status_code}: {response.text[:300]}")
        return response.json()["choices"][0]["message"]["content"] or ""


class PeftGreedyGenerator:
    """Offline greedy generation with PEFT on a loaded base model, adapters loaded from the store.

    Prompts are rendered and encoded exactly as the server does (chat template with the generation
    prompt, then ``tokenizer(text, add_special_tokens=False)``); a batch is left-padded.
    """

    def __init__(self, base, adapter_folders: Callable[[str], object]):
        """Args:
        base: an :class:`adapters.base_model.BaseModel`.
        adapter_folders: name -> adapter folder (e.g. ``AdapterStore.require``).
        """
        from training.lora_model import disable_cpu_4bit_repacking

        disable_cpu_4bit_repacking(base.model)  # PEFT layers injected over repacked weights misbehave
        self.base = base
        self.adapter_folders = adapter_folders
        self.model = base.model
        self.loaded: set[str] = set()

    def _activate(self, adapter: str | None):
        from peft import PeftModel

        if adapter is None:
            return self.model.disable_adapter() if isinstance(self.model, PeftModel) else _NoContext()
        if adapter not in self.loaded:
            folder = self.adapter_folders(adapter)
            if isinstance(self.model, PeftModel):
                self.model.load_adapter(folder, adapter_name=adapter)
            else:
                self.model = PeftModel.from_pretrained(self.model, folder, adapter_name=adapter)
            self.model.eval()
            self.loaded.add(adapter)
        self.model.set_adapter(adapter)
        return _NoContext()

    @torch.no_grad()
    def __call__(self, conversations: list[list[dict]], adapter: str | None, max_tokens: int) -> list[str]:
        tokenizer = self.base.tokenizer
        prompts = [
            tokenizer(
                tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                add_special_tokens=False,
            )["input_ids"]
            for messages in conversations
        ]
        width = max(len(p) for p in prompts)
        pad = tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])  # (B, T) left-padded
        attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])  # (B, T)
        with self._activate(adapter):
            output = self.model.generate(
                input_ids=input_ids.to(self.base.device),
                attention_mask=attention_mask.to(self.base.device),
                max_new_tokens=max_tokens,
                do_sample=False,
                pad_token_id=pad,
                eos_token_id=tokenizer.eos_token_id,
            )
        return [tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in output]


class _NoContext:
    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None
