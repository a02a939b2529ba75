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
from server.engine.sampling import make_generator, token_logprob
from server.engine.scheduler import Scheduler, Sequence
from server.engine.step_sampler import RowToSample, StepSampler
from server.engine.structured.row_grammar import GrammarRowFailed
from server.engine.threads import limit_threads
from server.engine.types import (
    ContextLengthExceeded,
    EngineHealth,
    EngineStats,
    EngineUnavailable,
    GenerationFailed,
    GenerationOutput,
    GenerationRequest,
    NonFiniteLogits,
    TokenLogprob,
)

logger = logging.getLogger(__name__)

MAX_FAILED_STEPS = 8  # consecutive failed steps after which the engine gives up (and /ready says so)


class _WorkerDied(RuntimeError):
    """The prefill worker thread is gone: no waiting request can start any more."""


@dataclass(frozen=True)
class EngineConfig:
    max_running: int = 64
    max_prefills_per_step: int = 4
    context_length: int = 2048
    prefill_worker: bool = False  # prefill in a second thread while the engine thread decodes
    cpu_threads: int | None = None  # compute threads of each engine thread (None: leave as they are)
    grammar_mask_threads: int | None = None  # llguidance mask-fill threads (None: a quarter of the CPUs)
    # the decode step's threads while the prefill worker has nothing to do (None: always cpu_threads);
    # a lone user's decode then uses every core instead of the half kept for prefills
    idle_prefill_decode_threads: int | None = None
    # chunked prefill: the most prompt tokens one prefill pass computes (None: no limit); a longer
    # prompt is prefilled over several passes, so no single pass holds the CPU (or, without the
    # worker, a decode step) for the whole prompt
    prefill_chunk_tokens: int | None = None


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
        self.sampler = StepSampler(config.max_running, config.grammar_mask_threads)
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
        self._in_hand: list[Sequence] = []  # out of the queue, not yet in the batch: blamed if a step fails
        self._decode_threads = config.cpu_threads  # what limit_threads last set in the engine thread

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
        """Queues one request; see :meth:`submit_all`."""
        self.submit_all([request], emit)

    def submit_all(self, requests: list[GenerationRequest], emit: Callable[[GenerationOutput], None]) -> None:
        """Queues every request or none; ``emit`` is called from the engine thread with each update.

        The engine owns each request's lease share from here on: it releases it when the sequence
        finishes, and at once (before raising) if the submission is refused.

        Raises:
            EngineUnavailable: the engine is not running.
            ContextLengthExceeded: a prompt plus its ``max_tokens`` does not fit the context window.
        """
        try:
            if self._thread is None or not self._thread.is_alive() or self._stop.is_set() or self.failed:
                raise EngineUnavailable("The generation engine is not running.")
            for request in requests:
                # prompt and prefix tuning take positions before the prompt: they count too
                virtual = self.runner.lora.virtual_token_count(request.adapter_slot)
                prompt_tokens = len(request.prompt_token_ids) + virtual
                if prompt_tokens + request.sampling.max_tokens > self.config.context_length:
                    raise ContextLengthExceeded(
                        prompt_tokens, request.sampling.max_tokens, self.config.context_length, virtual
                    )
            seqs = [Sequence(r, emit, make_generator(r.sampling, self.runner.device)) for r in requests]
            for seq in seqs:  # each constrained row gets its own matcher
                if seq.request.sampling.grammar is not None:
                    seq.grammar = seq.request.sampling.grammar.new_row()
        except BaseException:
            for request in requests:
                request.lease.release()
            raise
        if self._prefill_thread is not None:  # straight to the worker: no wait for the decode step
            with self._waiting:
                for seq in seqs:
                    self._by_id[seq.request_id] = seq
                    self.scheduler.add(seq)
                self._waiting.notify()
        else:
            for seq in seqs:
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
            running_adapters=_distinct_adapters(list(self.scheduler.running)),
            waiting_adapters=_distinct_adapters([*self.scheduler.waiting, *self._in_hand]),
        )

    # ------------------------------------------------------------------ the loop
    def _loop(self) -> None:
        """Steps until stopped. A failed step fails the requests it can be blamed on, rebuilds the
        batch and carries on; only :data:`MAX_FAILED_STEPS` failures in a row (or the prefill
        worker's death) are fatal."""
        if self.config.cpu_threads:
            limit_threads(self.config.cpu_threads)
        failed_in_a_row = 0
        while not self._stop.is_set():
            try:
                self._last_beat = time.monotonic()
                self._drain_inbox(block=not self._can_step())
                if self._can_step():
                    # Inference mode for the whole step: the KV buffers are (re)allocated and edited
                    # in place both inside forward passes and between them.
                    with self.registry.lock.shared(), torch.inference_mode():
                        self._step()
                    failed_in_a_row = 0  # only a step that completes resets the count
            except _WorkerDied as e:
                self._die(e)
                return
            except Exception as e:  # noqa: BLE001 - blame the step's requests, rebuild, go on
                failed_in_a_row += 1
                logger.exception("engine step failed (%d in a row); recovering", failed_in_a_row)
                self._recover(e)
                if failed_in_a_row >= MAX_FAILED_STEPS:
                    self._die(e)
                    return
            except BaseException as e:  # KeyboardInterrupt, SystemExit: nothing to recover
                self._die(e)
                raise

    def _recover(self, error: BaseException) -> None:
        """After a step failed midway: fails the sequences in the batch or in hand, empties the batch."""
        failure = GenerationFailed(f"generation failed: {type(error).__name__}")
        blamed = [*self.scheduler.running, *self._in_hand]
        self._in_hand = []
        for seq in blamed:
            seq.row = None  # the batch is rebuilt below, rows are not removed one by one
        self.scheduler.running.clear()
        self.runner.reset_batch()
        for seq in blamed:
            try:
                self._finish(seq, "error", error=failure)
            except Exception:  # noqa: BLE001 - one receiver failing must not stop the recovery
                logger.exception("failing request %s after a failed step", seq.request_id)

    def _die(self, error: BaseException) -> None:
        """The engine cannot go on: /ready reports it first, then everyone is failed."""
        self._error = error
        logger.critical("engine loop died: %r", error, exc_info=error)
        for seq in list(self._by_id.values()):
            try:
                self._finish(seq, "error", error=GenerationFailed("The generation engine failed."))
            except Exception:  # noqa: BLE001
                logger.exception("failing request %s", seq.request_id)
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
                seqs = self.scheduler.next_prefills(room, self.config.prefill_chunk_tokens)
                self._in_prefill += len(seqs)
            try:
                with self.registry.lock.shared():
                    done, error, seconds = self._prefill_forward(seqs)
            except BaseException as e:  # the worker cannot go on: the engine thread fails everyone
                self._inbox.put(("fatal", e))
                raise
            if done is not None:  # prompts with chunks to go wait for their next pass right here
                seqs, done = self._requeue_partials(seqs, done)
            if seqs:
                self._inbox.put(("prefilled", (seqs, done, error, seconds)))

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
            elif kind == "fatal":  # the prefill worker died: waiting requests can never start
                raise _WorkerDied("the prefill worker died") from payload
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
        with self._waiting:
            for seqs, *_ in prefilled:
                self._in_prefill -= len(seqs)
            self._waiting.notify()
        self._in_hand = [seq for seqs, *_ in prefilled for seq in seqs]  # blamed if the step fails
        for seqs, done, error, seconds in prefilled:
            self._prefill_returned(seqs, done, error, seconds)
        if self._prefill_thread is None:
            prefills = self.scheduler.next_prefills(
                self.scheduler.max_running - len(self.scheduler.running), self.config.prefill_chunk_tokens
            )
            if prefills:
                self._in_hand = prefills
                self._prefill(prefills)
        self._in_hand = []
        if not self.scheduler.running:  # finished sequences have already left the batch
            return
        last_tokens = [s.output_ids[-1] for s in self.scheduler.running]
        slots = [s.request.adapter_slot for s in self.scheduler.running]
        self._set_decode_threads()
        started = time.perf_counter()
        logits = self.runner.decode(last_tokens, slots)  # (B, V); a failure is the loop's to recover
        self.stats.steps += 1
        self.stats.decode_seconds += time.perf_counter() - started
        self.stats.decode_rows += len(slots)
        # Rows move when a sequence leaves (swap-remove), so pair each sequence with its row first.
        self._advance_all([(seq, logits[row]) for row, seq in enumerate(list(self.scheduler.running))])

    def _set_decode_threads(self) -> None:
        """Every core for the decode step while the prefill worker is idle, half while it may run.
        (A prefill starting during the step oversubscribes the cores for that one step at most.)"""
        alone = self.config.idle_prefill_decode_threads
        if alone is None or self._prefill_thread is None:
            return
        with self._waiting:
            idle = self._in_prefill == 0 and not self.scheduler.waiting
        threads = alone if idle else self.config.cpu_threads
        if threads and threads != self._decode_threads:
            limit_threads(threads)
            self._decode_threads = threads

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
                [(s.request.prompt_token_ids, s.request.adapter_slot) for s in seqs],
                [s.request.sampling.prompt_logprobs for s in seqs],
                [s.request.cache_salt for s in seqs],
                [(s.partial, s.chunk_limit) for s in seqs],
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
        seqs, done = self._requeue_partials(seqs, done)  # (without the worker: chunks to go wait here)
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
        self.stats.cached_prompt_tokens += sum(item.cached_tokens for _, item in live)
        now = time.perf_counter()
        for seq, item in live:
            seq.first_token_time = now
            seq.prompt_logprobs = item.prompt_logprobs
            seq.cached_prompt_tokens = item.cached_tokens
        self._advance_all([(seq, logits) for (seq, _), (logits, _) in zip(live, results)])

    def _requeue_partials(
        self, seqs: list[Sequence], done: list[Prefilled]
    ) -> tuple[list[Sequence], list[Prefilled]]:
        """Chunked prefill: a prompt with tokens left keeps its result and goes back to the end of the
        queue for its next chunk (cancelled ones go on, to be finished); returns the others."""
        finished, requeued = [], []
        for seq, item in zip(seqs, done):
            if item.prompt_tokens < len(seq.request.prompt_token_ids) and not seq.cancelled:
                seq.partial = item
                requeued.append(seq)
            else:
                finished.append((seq, item))
        if requeued:
            with self._waiting:
                self.scheduler.waiting.extend(requeued)
                if threading.current_thread() is self._prefill_thread:  # else already counted out
                    self._in_prefill -= len(requeued)
                self._waiting.notify()
        return [s for s, _ in finished], [d for _, d in finished]

    # ------------------------------------------------------------------ tokens → text
    def _advance_all(self, rows: list[tuple[Sequence, torch.Tensor]]) -> None:
        """Samples every row's next token in one step (one grammar mask for the constrained rows) and
        hands each on; a row's failure fails that request only."""
        sampled = []
        for seq, logits in rows:
            if seq.request.sampling.max_tokens == 0:  # echo with max_tokens 0: the prompt (+ logprobs) only
                self._finish(seq, "length")
            else:
                sampled.append((seq, logits))
        outcomes = self.sampler.sample(
            [
                RowToSample(
                    logits,
                    seq.output_ids,
                    seq.request.sampling,
                    seq.generator,
                    seq.request.adapter,
                    seq.grammar,
                )
                for seq, logits in sampled
            ]
        )
        for (seq, logits), outcome in zip(sampled, outcomes):
            self._advance(seq, logits, outcome)

    def _advance(self, seq: Sequence, logits: torch.Tensor, outcome: int | Exception) -> None:
        """Hands on one row's sampled token (or fails the row with the error its sampling met)."""
        params = seq.request.sampling
        try:
            if isinstance(outcome, Exception):
                raise outcome
            token = outcome
            if seq.grammar is not None and not seq.grammar.accept(token):
                raise GrammarRowFailed(seq.grammar.error or f"token {token} is not allowed by the grammar")
            if params.logprobs is not None:
                seq.pending_logprobs.append(token_logprob(logits, token, params.logprobs))
            self._on_token(seq, token)
        except GrammarRowFailed as e:
            logger.warning("request %s: its grammar cannot continue: %s", seq.request_id, e)
            failure = GenerationFailed(
                f"generation stopped: the output cannot continue under its grammar ({e})"
            )
            self._finish(seq, "error", error=failure)
        except NonFiniteLogits as e:
            logger.warning("request %s: non-finite scores on adapter %s", seq.request_id, seq.request.adapter)
            self._finish(seq, "error", error=e)
        except Exception as e:  # noqa: BLE001 - sampling/detokenizing one row must not stop the batch
            logger.exception("sampling failed for request %s", seq.request_id)
            self._finish(seq, "error", error=GenerationFailed(f"generation failed: {type(e).__name__}"))

    def _on_token(self, seq: Sequence, token: int) -> None:
        params = seq.request.sampling
        self.stats.generated_tokens += 1
        if token in self.eos_token_ids and not params.ignore_eos:
            eos_logprob = seq.pending_logprobs.pop() if params.logprobs is not None else None
            self._finish(
                seq,
                "stop",
                completion_tokens=len(seq.output_ids) + 1,
                eos_token=token,
                eos_logprob=eos_logprob,
            )
            return
        seq.output_ids.append(token)
        text = self.tokenizer.decode(seq.output_ids, skip_special_tokens=True)
        stop_at = _find_stop(text, params.stop, len(seq.text_sent))
        if stop_at is not None:
            matched = next(s for s in params.stop if text.startswith(s, stop_at))
            self._finish(seq, "stop", final_text=text[:stop_at], stop_sequence=matched)
        elif len(seq.output_ids) >= params.max_tokens:
            self._finish(seq, "length", final_text=text)
        else:
            safe_end = len(text) - _holdback(text, params.stop)
            if safe_end > len(seq.text_sent):
                delta = text[len(seq.text_sent) : safe_end]
                seq.text_sent = text[:safe_end]
                self._emit(seq, self._output(seq, text_delta=delta, token_ids=_unsent_ids(seq)))

    def _finish(
        self,
        seq: Sequence,
        reason: str,
        final_text: str | None = None,
        completion_tokens: int | None = None,
        error: BaseException | None = None,
        stop_sequence: str | None = None,
        eos_token: int | None = None,
        eos_logprob: TokenLogprob | None = None,
    ) -> None:
        if seq.finished:
            return
        seq.finished = True
        seq.partial = None  # an unfinished chunked prefill's keys and values
        if seq.row is not None and reason in ("stop", "length"):
            self._remember(seq)
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
        token_ids = _unsent_ids(seq) + ([eos_token] if eos_token is not None else [])
        self._by_id.pop(seq.request_id, None)
        seq.request.lease.release()  # the one place a submitted sequence gives its lease share back
        self.stats.finished += 1
        self.stats.finished_by_reason[reason] = self.stats.finished_by_reason.get(reason, 0) + 1
        self._emit(
            seq,
            self._output(
                seq,
                text_delta=delta,
                token_ids=token_ids,
                finished=True,
                finish_reason=reason,
                stop_sequence=stop_sequence,
                eos_logprob=eos_logprob,
                prompt_tokens=len(seq.request.prompt_token_ids),
                cached_prompt_tokens=seq.cached_prompt_tokens,
                completion_tokens=completion_tokens if completion_tokens is not None else len(seq.output_ids),
                error=error,
            ),
        )

    def _remember(self, seq: Sequence) -> None:
        """Offers a finished row's keys and values to the prefix cache (a failure costs reuse only)."""
        if self.runner.prefix_cache is None:
            return
        request = seq.request
        try:
            self.runner.remember_row(
                seq.row, request.prompt_token_ids + seq.output_ids, request.adapter_slot, request.cache_salt
            )
        except Exception:  # noqa: BLE001 - the answer is already complete; only the reuse is lost
            logger.exception("keeping the prefix of request %s failed", seq.request_id)

    def _output(self, seq: Sequence, **fields) -> GenerationOutput:
        """An output of ``seq`` carrying the logprobs gathered since its last one."""
        logprobs, seq.pending_logprobs = seq.pending_logprobs, []
        prompt_logprobs, seq.prompt_logprobs = seq.prompt_logprobs, None
        return GenerationOutput(seq.request_id, logprobs=logprobs, prompt_logprobs=prompt_logprobs, **fields)

    def _emit(self, seq: Sequence, output: GenerationOutput) -> None:
        try:
            seq.emit(output)
        except Exception:  # noqa: BLE001 - the receiver is gone (closed event loop): stop generating
            logger.debug("receiver of %s is gone; cancelling", seq.request_id)
            seq.cancelled = True


def _unsent_ids(seq: Sequence) -> list[int]:
    """The generated token ids not yet reported in an output (text may lag them: held-back stops)."""
    ids = seq.output_ids[seq.ids_sent :]
    seq.ids_sent = len(seq.output_ids)
    return ids


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


def _distinct_adapters(seqs: list[Sequence]) -> tuple[str, ...]:
    """The adapters (not the base) of ``seqs``, each once, sorted."""
    return tuple(sorted({seq.request.adapter for seq in seqs if seq.request.adapter}))
