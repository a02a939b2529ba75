"""One thread runs the embedding model; requests queue for it, bounded in tokens.

The sentence-transformers model and its fast tokenizer are not safe to call from several threads at once,
so a single worker thread runs every ``encode``. Texts of requests that wait together are encoded in one
call (sentence-transformers then batches them by length), which is what makes many small requests cheap.
The queue holds at most ``max_queued_tokens`` tokens; a request beyond that is refused at once (429)
rather than queued without bound.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from rag.embedder import Embedder

logger = logging.getLogger(__name__)

MAX_TEXTS_PER_CALL = 256  # texts of several requests encoded in one call, at most
CLOSE_TIMEOUT_SECONDS = 30.0


class EmbeddingQueueFull(RuntimeError):
    """The queue cannot take ``tokens`` more tokens now; retrying shortly may succeed."""

    code = "server_overloaded"
    param = None

    def __init__(self, tokens: int, queued_tokens: int, max_queued_tokens: int):
        super().__init__(
            f"The embedding queue holds {queued_tokens} of at most {max_queued_tokens} tokens and cannot "
            f"take {tokens} more; retry shortly."
        )
        self.tokens = tokens
        self.headers = {"Retry-After": "1"}


class EmbeddingWorkerClosed(RuntimeError):
    """The server is shutting down; no new embeddings are computed."""

    code = "server_shutting_down"
    param = None


@dataclass
class EmbeddingJob:
    """The texts of one request and where their vectors go."""

    texts: list[str]
    tokens: int
    future: Future = field(default_factory=Future)  # -> (len(texts), dimension) float32


class EmbeddingWorker:
    """Encodes queued texts in a dedicated thread.

    Args:
        embedder: returns the (shared, lazily loaded) embedder; called in the worker thread.
        max_queued_tokens: tokens of the requests waiting or running, at most.
    """

    def __init__(self, embedder: Callable[[], Embedder], max_queued_tokens: int):
        self._embedder = embedder
        self.max_queued_tokens = max_queued_tokens
        self._jobs: queue.SimpleQueue[EmbeddingJob | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._queued_tokens = 0
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="loraplex-embeddings", daemon=True)
        self._thread.start()

    def submit(self, texts: list[str], tokens: int) -> Future:
        """Queues ``texts`` (``tokens`` tokens in all); the future resolves to their vectors.

        Raises:
            EmbeddingQueueFull: the queue has no room for ``tokens`` more tokens now.
            EmbeddingWorkerClosed: the worker is closed.
        """
        job = EmbeddingJob(texts, tokens)
        with self._lock:
            if self._closed:
                raise EmbeddingWorkerClosed("The server is shutting down.")
            if self._queued_tokens + tokens > self.max_queued_tokens:
                raise EmbeddingQueueFull(tokens, self._queued_tokens, self.max_queued_tokens)
            self._queued_tokens += tokens
        self._jobs.put(job)
        return job.future

    def close(self) -> None:
        """Finishes the queued jobs and stops the thread."""
        with self._lock:
            self._closed = True
        self._jobs.put(None)
        self._thread.join(CLOSE_TIMEOUT_SECONDS)

    def _run(self) -> None:
        while True:
            first = self._jobs.get()
            if first is None:
                return
            jobs, stop = self._gather(first)
            self._encode(jobs)
            if stop:
                return

    def _gather(self, first: EmbeddingJob) -> tuple[list[EmbeddingJob], bool]:
        """``first`` plus the jobs already waiting, up to about :data:`MAX_TEXTS_PER_CALL` texts."""
        jobs, texts = [first], len(first.texts)
        while texts < MAX_TEXTS_PER_CALL:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is None:
                return jobs, True
            jobs.append(job)
            texts += len(job.texts)
        return jobs, False

    def _encode(self, jobs: list[EmbeddingJob]) -> None:
        # A job whose future was cancelled (its request task was, e.g. at shutdown) is not encoded.
        live = [job for job in jobs if job.future.set_running_or_notify_cancel()]
        try:
            if live:
                vectors = self._embedder().encode([text for job in live for text in job.texts])  # (N, d)
                start = 0
                for job in live:
                    job.future.set_result(np.ascontiguousarray(vectors[start : start + len(job.texts)]))
                    start += len(job.texts)
        except Exception as e:  # noqa: BLE001 - every waiting request gets the failure, the thread lives on
            logger.exception("encoding %d embedding requests failed", len(live))
            for job in live:
                if not job.future.done():
                    job.future.set_exception(e)
        finally:
            with self._lock:
                self._queued_tokens -= sum(job.tokens for job in jobs)
