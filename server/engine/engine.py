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
from server.engine.runner import ModelRunner, Prefilled
from server.engine.sampling import make_generator, sample_row
from server.engine.scheduler import Scheduler, Sequence
from server.engine.threads import limit_threads
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
    prefill_worker: bool = False  # prefill in a second thread while the engine thread decodes
    cpu_threads: int | None = None  # compute threads of each engine thread (None: leave as they are)


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
    prefill_forwards: int = 0
    prefill_seconds: float = 0.0  # engine time in prefill forward passes
    decode_seconds: float = 0.0  # engine time in decode forward passes
    decode_rows: int = 0  # summed batch size of the decode steps (÷ steps = mean batch)


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
        runner.kv.reserve_rows(min(config.max_running, 32))  # 32 rows × 64 columns: ~47 MB in bf16
        self.stats = EngineStats()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._by_id: dict[str, Sequence] = {}
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._last_beat = time.monotonic()
        self._error: BaseException | None = None
        self.on_fatal: Callable[[], None] | None = None
        # The prefill worker takes packed batches from the waiting queue as fast as it can prefill
        # them; results come back through the inbox. ``_waiting`` guards the queue and the count of
        # sequences in the worker's hands (the engine thread and the worker both touch them).
        self._waiting = threading.Condition(threading.Lock())
        self._prefill_thread: threading.Thread | None = None
        self._in_prefill = 0
        self._prefilled: list[tuple[list[Sequence], list[Prefilled] | None, BaseException | None, float]] = []

    # ------------------------------------------------------------------ public interface
    def start(self) -> None:
        with self.registry.lock.shared():
            self.runner.warm_up()
        self._thread = threading.Thread(target=self._loop, name="loraplex-engine", daemon=True)
        self._thread.start()
        if self.config.prefill_worker:
            self._prefill_thread = threading.Thread(
                target=self._prefill_loop, name="loraplex-prefill", daemon=True
            )
            self._prefill_thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._inbox.put(None)
        with self._waiting:
            self._waiting.notify_all()
        for thread in (self._thread, self._prefill_thread):
            if thread is not None:
                thread.join(timeout)

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
        if self._prefill_thread is not None:  # straight to the worker: no wait for the decode step
            self._by_id[request.request_id] = seq
            with self._waiting:
                self.scheduler.add(seq)
                self._waiting.notify()
        else:
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
            waiting=len(self.scheduler.waiting) + self._in_prefill,
        )

    # ------------------------------------------------------------------ the loop
    def _loop(self) -> None:
        if self.config.cpu_threads:
            limit_threads(self.config.cpu_threads)
        try:
            while not self._stop.is_set():
                self._last_beat = time.monotonic()
                self._drain_inbox(block=not self._can_step())
                if self._can_step():
                    # Inference mode for the whole step: the KV buffers are (re)allocated and edited
                    # in place both inside forward passes and between them.
                    with self.registry.lock.shared(), torch.inference_mode():
                        self._step()
        except BaseException as e:  # a fatal error: fail everyone, mark the engine dead
            self._error = e
            logger.critical("engine loop died: %r", e, exc_info=e)
            for seq in list(self._by_id.values()):
                self._finish(seq, "error", error=GenerationFailed("The generation engine failed."))
            if self.on_fatal is not None:
                self.on_fatal()

    def _can_step(self) -> bool:
        if self.scheduler.running or self._prefilled:
            return True
        return self._prefill_thread is None and bool(self.scheduler.waiting)

    def _prefill_loop(self) -> None:
        """The prefill worker: runs packed prefill forward passes while the engine thread decodes."""
        if self.config.cpu_threads:
            limit_threads(self.config.cpu_threads)
        while True:
            with self._waiting:
                while not self._stop.is_set():
                    room = self.scheduler.max_running - len(self.scheduler.running) - self._in_prefill
                    if self.scheduler.waiting and room > 0:
                        break
                    self._waiting.wait(0.02)  # rows free up without a notification: poll
                if self._stop.is_set():
                    return
                seqs = self.scheduler.next_prefills(room)
                self._in_prefill += len(seqs)
            try:
                with self.registry.lock.shared():
                    result = self._prefill_forward(seqs)
            except BaseException as e:  # the worker cannot go on: the engine thread fails everyone
                self._inbox.put(("fatal", e))
                raise
            self._inbox.put(("prefilled", (seqs, *result)))

    def _drain_inbox(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while item is not None:
            kind, payload = item
            if kind == "submit":
                self._by_id[payload.request_id] = payload
                with self._waiting:
                    self.scheduler.add(payload)
                    self._waiting.notify()
            elif kind == "prefilled":
                self._prefilled.append(payload)
            elif kind == "fatal":  # the prefill worker died
                raise RuntimeError("the prefill worker died") from payload
            elif kind == "cancel":
                seq = self._by_id.get(payload)
                if seq is not None:
                    seq.cancelled = True
                    with self._waiting:
                        queued = seq in self.scheduler.waiting
                    if queued:  # not yet prefilled: done now (the worker skips nothing it takes)
                        self._finish(seq, "cancelled")
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break

    def _step(self) -> None:
        for seq in [s for s in self.scheduler.running if s.cancelled]:
            self._finish(seq, "cancelled")
        prefilled, self._prefilled = self._prefilled, []
        for seqs, done, error, seconds in prefilled:
            with self._waiting:
                self._in_prefill -= len(seqs)
                self._waiting.notify()
            self._prefill_returned(seqs, done, error, seconds)
        if self._prefill_thread is None:
            prefills = self.scheduler.next_prefills(self.scheduler.max_running - len(self.scheduler.running))
            if prefills:
                self._prefill(prefills)
        if not self.scheduler.running:  # finished sequences have already left the batch
            return
        last_tokens = [s.output_ids[-1] for s in self.scheduler.running]
        slots = [s.request.adapter_slot for s in self.scheduler.running]
        started = time.perf_counter()
        try:
            logits = self.runner.decode(last_tokens, slots)  # (B, V)
        except Exception as e:  # noqa: BLE001 - one bad step fails this batch, not the server
            logger.exception("decode step failed for %d sequences", len(slots))
            for seq in list(self.scheduler.running):
                self._finish(seq, "error", error=GenerationFailed(f"generation failed: {type(e).__name__}"))
            return
        self.stats.steps += 1
        self.stats.decode_seconds += time.perf_counter() - started
        self.stats.decode_rows += len(slots)
        # Rows move when a sequence leaves (swap-remove), so pair each sequence with its row first.
        for row, seq in enumerate(list(self.scheduler.running)):
            token = sample_row(logits[row], seq.output_ids, seq.request.sampling, seq.generator)
            self._on_token(seq, token)

    def _prefill(self, seqs: list[Sequence]) -> None:
        """Prefills ``seqs`` packed in one forward pass in this thread; they join the batch."""
        self._prefill_returned(seqs, *self._prefill_forward(seqs))

    def _prefill_forward(
        self, seqs: list[Sequence]
    ) -> tuple[list[Prefilled] | None, Exception | None, float]:
        """The packed forward pass of ``seqs`` (either thread): its results or its error, and its time."""
        started = time.perf_counter()
        done, error = None, None
        try:
            done = self.runner.prefill_forward(
                [(s.request.prompt_token_ids, s.request.adapter_slot) for s in seqs]
            )
        except Exception as e:  # noqa: BLE001 - the engine thread fails the request at fault only
            error = e
        return done, error, time.perf_counter() - started

    def _prefill_returned(
        self, seqs: list[Sequence], done: list[Prefilled] | None, error: BaseException | None, seconds: float
    ) -> None:
        """Admits a prefilled batch into the running batch, or fails the request at fault."""
        if error is not None:
            if len(seqs) > 1:  # find the one at fault: the others are prefilled alone, here
                logger.warning("packed prefill of %d prompts failed (%r); one at a time", len(seqs), error)
                for seq in seqs:
                    self._prefill([seq])
                return
            logger.error("prefill failed for request %s", seqs[0].request_id, exc_info=error)
            self._finish(
                seqs[0], "error", error=GenerationFailed(f"generation failed: {type(error).__name__}")
            )
            return
        assert done is not None
        self.stats.prefill_forwards += 1
        self.stats.prefill_seconds += seconds
        live = []
        for seq, item in zip(seqs, done):
            if seq.cancelled and not seq.finished:
                self._finish(seq, "cancelled")
            elif not seq.finished:
                live.append((seq, item))
        try:
            results = self.runner.add_rows([item for _, item in live])
        except Exception as e:  # noqa: BLE001 - the batch is left as it was
            logger.error("adding %d prefilled rows failed", len(live), exc_info=e)
            for seq, _ in live:
                self._finish(seq, "error", error=GenerationFailed(f"generation failed: {type(e).__name__}"))
            return
        # Every row joins before any token is handled: a sequence finishing at once swap-removes its
        # row with the batch's last one, which must already belong to a joined sequence.
        for (seq, _), (_, row) in zip(live, results):
            self.scheduler.join(seq, row)
            self.stats.prompt_tokens += len(seq.request.prompt_token_ids)
        now = time.perf_counter()
        for (seq, _), (logits, _) in zip(live, results):
            token = sample_row(logits, seq.output_ids, seq.request.sampling, seq.generator)
            seq.first_token_time = now
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
        else:
            with self._waiting:
                if seq in self.scheduler.waiting:
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
