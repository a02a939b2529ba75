"""The engine: one dedicated thread owns the model and steps the running batch.

The API talks to it through :meth:`LLMEngine.submit` (with a thread-safe sink for outputs),
:meth:`LLMEngine.cancel` and :meth:`LLMEngine.health`. No model call ever runs on the event loop.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from adapters.registry import AdapterRegistry
from server.engine.runner import ModelRunner
from server.engine.sampling import make_generator, sample_row
from server.engine.scheduler import Scheduler, Sequence
from server.engine.types import (
    ContextLengthExceeded,
    EngineUnavailable,
    GenerationFailed,
    GenerationOutput,
    GenerationRequest,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    max_running: int = 64
    max_prefills_per_step: int = 4
    context_length: int = 2048


@dataclass
class EngineHealth:
    alive: bool
    seconds_since_step: float
    running: int
    waiting: int


@dataclass
class EngineStats:
    steps: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    finished: int = 0


class LLMEngine:
    """Continuous batching over one model shared by every adapter.

    Args:
        runner: forward passes and the batch KV cache.
        registry: resident adapters; its lock is held around every forward pass.
        tokenizer: the base model's tokenizer (detokenization, EOS ids).
        config: batch limits and the context window.
        eos_token_ids: tokens that end a sequence.
    """

    def __init__(
        self,
        runner: ModelRunner,
        registry: AdapterRegistry,
        tokenizer,
        config: EngineConfig,
        eos_token_ids: set[int],
    ):
        self.runner = runner
        self.registry = registry
        self.tokenizer = tokenizer
        self.config = config
        self.eos_token_ids = eos_token_ids
        self.scheduler = Scheduler(config.max_running, config.max_prefills_per_step)
        self.stats = EngineStats()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._by_id: dict[str, Sequence] = {}
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._last_beat = time.monotonic()
        self._error: BaseException | None = None
        self.on_fatal: Callable[[], None] | None = None

    # ------------------------------------------------------------------ public interface
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="loraplex-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._inbox.put(None)
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, request: GenerationRequest, emit: Callable[[GenerationOutput], None]) -> None:
        """Queues a request; ``emit`` is called from the engine thread with each update."""
        if self._thread is None or not self._thread.is_alive() or self._stop.is_set():
            raise EngineUnavailable("The generation engine is not running.")
        prompt_tokens = len(request.prompt_token_ids)
        if prompt_tokens + request.sampling.max_tokens > self.config.context_length:
            raise ContextLengthExceeded(
                prompt_tokens, request.sampling.max_tokens, self.config.context_length
            )
        seq = Sequence(request, emit, make_generator(request.sampling, self.runner.device))
        self._inbox.put(("submit", seq))

    def cancel(self, request_id: str) -> None:
        """Stops a request (a client went away); its batch row is freed at the next step."""
        self._inbox.put(("cancel", request_id))

    @property
    def failed(self) -> bool:
        return self._error is not None

    def health(self) -> EngineHealth:
        alive = self._thread is not None and self._thread.is_alive() and self._error is None
        return EngineHealth(
            alive=alive,
            seconds_since_step=time.monotonic() - self._last_beat,
            running=len(self.scheduler.running),
            waiting=len(self.scheduler.waiting),
        )

    # ------------------------------------------------------------------ the loop
    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                self._last_beat = time.monotonic()
                self._drain_inbox(block=not self.scheduler.has_work())
                if self.scheduler.has_work():
                    # Inference mode for the whole step: the KV buffers are (re)allocated and edited
                    # in place both inside forward passes and between them.
                    with self.registry.lock, torch.inference_mode():
                        self._step()
        except BaseException as e:  # a fatal error: fail everyone, mark the engine dead
            self._error = e
            logger.critical("engine loop died: %r", e, exc_info=e)
            for seq in list(self._by_id.values()):
                self._finish(seq, "error", error=GenerationFailed("The generation engine failed."))
            if self.on_fatal is not None:
                self.on_fatal()

    def _drain_inbox(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while item is not None:
            kind, payload = item
            if kind == "submit":
                self._by_id[payload.request_id] = payload
                self.scheduler.add(payload)
            elif kind == "cancel":
                seq = self._by_id.get(payload)
                if seq is not None:
                    seq.cancelled = True
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break

    def _step(self) -> None:
        for seq in self.scheduler.drop_cancelled_waiting():
            self._finish(seq, "cancelled")
        for seq in [s for s in self.scheduler.running if s.cancelled]:
            self._finish(seq, "cancelled")
        for seq in self.scheduler.next_prefills():
            self._prefill(seq)
        if not self.scheduler.running:  # finished sequences have already left the batch
            return
        last_tokens = [s.output_ids[-1] for s in self.scheduler.running]
        slots = [s.request.adapter_slot for s in self.scheduler.running]
        try:
            logits = self.runner.decode(last_tokens, slots)  # (B, V)
        except Exception as e:  # noqa: BLE001 - one bad step fails this batch, not the server
            logger.exception("decode step failed for %d sequences", len(slots))
            for seq in list(self.scheduler.running):
                self._finish(seq, "error", error=GenerationFailed(f"generation failed: {type(e).__name__}"))
            return
        self.stats.steps += 1
        # Rows move when a sequence leaves (swap-remove), so pair each sequence with its row first.
        for row, seq in enumerate(list(self.scheduler.running)):
            token = sample_row(logits[row], seq.output_ids, seq.request.sampling, seq.generator)
            self._on_token(seq, token)

    def _prefill(self, seq: Sequence) -> None:
        req = seq.request
        try:
            logits, row = self.runner.prefill(req.prompt_token_ids, req.adapter_slot)
        except Exception as e:  # noqa: BLE001 - fail this request only
            logger.exception("prefill failed for request %s", req.request_id)
            self._finish(seq, "error", error=GenerationFailed(f"generation failed: {type(e).__name__}"))
            return
        self.scheduler.join(seq, row)
        self.stats.prompt_tokens += len(req.prompt_token_ids)
        token = sample_row(logits, seq.output_ids, req.sampling, seq.generator)
        seq.first_token_time = time.perf_counter()
        self._on_token(seq, token)

    # ------------------------------------------------------------------ tokens → text
    def _on_token(self, seq: Sequence, token: int) -> None:
        params = seq.request.sampling
        self.stats.generated_tokens += 1
        if token in self.eos_token_ids and not params.ignore_eos:
            self._finish(seq, "stop", completion_tokens=len(seq.output_ids) + 1)
            return
        seq.output_ids.append(token)
        text = self.tokenizer.decode(seq.output_ids, skip_special_tokens=True)
        stop_at = _find_stop(text, params.stop, len(seq.text_sent))
        if stop_at is not None:
            self._finish(seq, "stop", final_text=text[:stop_at])
        elif len(seq.output_ids) >= params.max_tokens:
            self._finish(seq, "length", final_text=text)
        else:
            safe_end = len(text) - _holdback(text, params.stop)
            if safe_end > len(seq.text_sent):
                delta = text[len(seq.text_sent) : safe_end]
                seq.text_sent = text[:safe_end]
                self._emit(seq, GenerationOutput(seq.request_id, text_delta=delta, token_ids=[token]))

    def _finish(
        self,
        seq: Sequence,
        reason: str,
        final_text: str | None = None,
        completion_tokens: int | None = None,
        error: BaseException | None = None,
    ) -> None:
        if seq.finished:
            return
        seq.finished = True
        if seq.row is not None:
            moved_from = self.runner.remove_row(seq.row)
            self.scheduler.leave(seq, moved_from)
        elif seq in self.scheduler.waiting:
            self.scheduler.waiting.remove(seq)
        if final_text is None:
            final_text = seq.text_sent
        delta = final_text[len(seq.text_sent) :] if final_text.startswith(seq.text_sent) else ""
        seq.text_sent = final_text
        self._by_id.pop(seq.request_id, None)
        if seq.request.adapter:
            self.registry.release(seq.request.adapter)
        self.stats.finished += 1
        self._emit(
            seq,
            GenerationOutput(
                seq.request_id,
                text_delta=delta,
                finished=True,
                finish_reason=reason,
                prompt_tokens=len(seq.request.prompt_token_ids),
                completion_tokens=completion_tokens if completion_tokens is not None else len(seq.output_ids),
                error=error,
            ),
        )

    def _emit(self, seq: Sequence, output: GenerationOutput) -> None:
        try:
            seq.emit(output)
        except Exception:  # noqa: BLE001 - the receiver is gone (closed event loop): stop generating
            logger.debug("receiver of %s is gone; cancelling", seq.request_id)
            seq.cancelled = True


def _find_stop(text: str, stops: tuple[str, ...], sent_len: int) -> int | None:
    """The earliest index of a stop string that ends in the not-yet-sent part of ``text``."""
    best = None
    for stop in stops:
        idx = text.find(stop, max(0, sent_len - len(stop) + 1))
        if idx != -1 and (best is None or idx < best):
            best = idx
    return best


def _holdback(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters to hold back: a partial stop string or an incomplete UTF-8 char."""
    hold = 1 if text.endswith("\ufffd") else 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                hold = max(hold, k)
                break
    return hold


def eos_ids_for(tokenizer, model) -> set[int]:
    """Every token id that ends generation: the tokenizer's EOS and the generation config's."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(gen_eos, int):
        ids.add(gen_eos)
    elif isinstance(gen_eos, (list, tuple)):
        ids.update(int(i) for i in gen_eos)
    return ids
