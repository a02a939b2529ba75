"""What a request runs on, and the one object that holds it resident while it runs.

:class:`AdapterChoice` is what a request names: the base model, a stored adapter, or a merge spec.
:meth:`adapters.registry.AdapterRegistry.lease` turns a choice into an :class:`AdapterLease`: the
adapter (or merge, computed once) is made resident and pinned once, for ``holders`` sequences. Each
sequence releases its share exactly once; the last release unpins. Nothing else pins or unpins.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from adapters.merging import MergeSpec


@dataclass(frozen=True)
class AdapterChoice:
    """The adapter a request runs on: a stored adapter, a (cached) merge, or None for the base."""

    name: str | None
    spec: MergeSpec | None = None

    @property
    def parts(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.spec.parts) if self.spec else ()


class LeaseOverReleased(RuntimeError):
    """A lease was released more often than it has holders (a bug in the caller, never ignored)."""


class AdapterLease:
    """A pin on one resident adapter shared by ``holders`` sequences (slot 0 and no pin for the base).

    Args:
        name: the resident name (``None`` for the base model).
        slot: the adapter's slot in the batched layers.
        holders: how many sequences share the lease; each calls :meth:`release` once.
        unpin: called once, when the last holder releases.
    """

    def __init__(self, name: str | None, slot: int, holders: int, unpin: Callable[[], None] | None):
        if holders < 1:
            raise ValueError("a lease needs at least one holder")
        self.name = name
        self.slot = slot
        self._holders = holders
        self._unpin = unpin
        self._lock = threading.Lock()

    @classmethod
    def base(cls, holders: int = 1) -> AdapterLease:
        """The base model: nothing to pin."""
        return cls(None, 0, holders, None)

    @property
    def holders(self) -> int:
        with self._lock:
            return self._holders

    def release(self) -> None:
        """Gives back one holder's share; the last one unpins the adapter."""
        with self._lock:
            if self._holders == 0:
                raise LeaseOverReleased(f"the lease on {self.name!r} was released more often than held")
            self._holders -= 1
            last = self._holders == 0
        if last and self._unpin is not None:
            self._unpin()

    def __repr__(self) -> str:
        return f"AdapterLease({self.name!r}, slot={self.slot}, holders={self.holders})"
