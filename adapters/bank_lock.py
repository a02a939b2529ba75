"""A shared/exclusive lock for the adapter banks: forward passes share them, writes are exclusive."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator


class BankLock:
    """Any number of forward passes at once (:meth:`shared`), or one writer (``with lock:``).

    The engine's decode step and its prefill worker run forward passes concurrently, each holding the
    lock shared; loading, evicting or clearing an adapter's bank slots holds it exclusively, so banks
    never change under a running forward pass. A waiting writer blocks new readers (an adapter load is
    not starved by a busy engine). Both modes are re-entrant in the thread that holds them, and the
    exclusive holder may also take it shared.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer: int | None = None
        self._writer_depth = 0
        self._writers_waiting = 0
        self._local = threading.local()

    # ------------------------------------------------------------------ exclusive
    def acquire(self) -> None:
        me = threading.get_ident()
        with self._cond:
            if self._writer == me:
                self._writer_depth += 1
                return
            if getattr(self._local, "depth", 0):
                raise RuntimeError("cannot take the bank lock exclusively while holding it shared")
            self._writers_waiting += 1
            try:
                while self._writer is not None or self._readers:
                    self._cond.wait()
            finally:
                self._writers_waiting -= 1
            self._writer, self._writer_depth = me, 1

    def release(self) -> None:
        with self._cond:
            if self._writer != threading.get_ident():
                raise RuntimeError("the bank lock is not held exclusively by this thread")
            self._writer_depth -= 1
            if not self._writer_depth:
                self._writer = None
                self._cond.notify_all()

    def __enter__(self) -> BankLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    # ------------------------------------------------------------------ shared
    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        me = threading.get_ident()
        depth = getattr(self._local, "depth", 0)
        with self._cond:
            if depth == 0 and self._writer != me:
                while self._writer is not None or self._writers_waiting:
                    self._cond.wait()
                self._readers += 1
        self._local.depth = depth + 1
        try:
            yield
        finally:
            self._local.depth = depth
            if depth == 0 and self._writer != me:
                with self._cond:
                    self._readers -= 1
                    if not self._readers:
                        self._cond.notify_all()
