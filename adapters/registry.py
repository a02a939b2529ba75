"""Which adapters are resident in model memory: name → slot, LRU over idle adapters, pins in flight.

At most ``max_loaded`` adapters hold a slot. Loading one more evicts the least recently used adapter
that no request is using; an adapter with requests in flight (``pins > 0``) is never evicted or
unloaded under them. Requests pin through :meth:`AdapterRegistry.lease` only (see
``adapters/lease.py``). A computed merge remembers its parts: :meth:`AdapterRegistry.forget` of a part
drops every merge built from it, and a merge computed while one of its parts changed is not cached.
Two locks: ``lock`` guards the banks (forward passes hold it shared, so banks
never change under a running batch; writing a loaded adapter's weights and clearing an evicted one
hold it exclusively), and a table lock guards names, slots and pins for a few microseconds at a time, so a
request for a resident adapter never waits for a forward pass. When both are taken, ``lock`` comes
first. Reading and validating an adapter from disk holds neither.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from adapters.bank_lock import BankLock
from adapters.batched_lora import BatchedLoRAModel
from adapters.errors import AdapterBusy
from adapters.lease import AdapterChoice, AdapterLease
from adapters.lora import LoRAWeights, load_lora_weights
from adapters.merging import merge_lora
from adapters.store import AdapterStore

logger = logging.getLogger(__name__)


class AdapterChanged(RuntimeError):
    """A merge's part kept changing on disk while the merge was computed; the request may be retried."""

    code = "adapter_changed"
    param = "adapter"

    def __init__(self, name: str):
        super().__init__(f"The parts of '{name}' changed while it was computed; retry the request.")


class AdapterInUse(ValueError):
    """An unload asked for while requests still use the adapter."""

    code = "adapter_in_use"
    param = "name"

    def __init__(self, name: str, pins: int):
        super().__init__(f"The adapter '{name}' is serving {pins} request(s); unload it when they finish.")


@dataclass
class ResidentAdapter:
    name: str
    slot: int
    weights: LoRAWeights
    load_seconds: float
    pins: int = 0
    origin: str = "store"  # "store" or "merge"
    spec: dict | None = None  # the merge spec of a computed merge
    parts: tuple[str, ...] = ()  # the adapters a merge was computed from
    loaded_at: float = field(default_factory=time.time)


@dataclass
class RegistryStats:
    loads: int = 0
    evictions: int = 0
    load_seconds_total: float = 0.0
    last_load_seconds: float = 0.0


class AdapterRegistry:
    """Thread-safe map from adapter names to resident slots.

    Args:
        store: the adapter store on disk.
        lora: the model's batched LoRA layers.
        max_loaded: how many adapters may be resident at once.
        max_rank: the largest rank accepted.
    """

    def __init__(self, store: AdapterStore, lora: BatchedLoRAModel, max_loaded: int, max_rank: int):
        if max_loaded < 1:
            raise ValueError("max_loaded must be at least 1")
        self.store = store
        self.lora = lora
        self.max_loaded = max_loaded
        self.max_rank = max_rank
        self.lock = BankLock()  # guards the banks: shared by forward passes, exclusive for bank writes
        self._table = threading.RLock()  # guards _resident, pins and _free_slots; never held for long
        self.stats = RegistryStats()
        self._resident: OrderedDict[str, ResidentAdapter] = OrderedDict()  # LRU order: oldest first
        self._free_slots = list(range(max_loaded, 0, -1))  # slot 0 is the base model
        self._versions: dict[str, int] = {}  # name -> times forgotten (a merge checks its parts' against it)
        self._name_locks: dict[str, threading.Lock] = {}
        self._name_locks_guard = threading.Lock()
        lora.reserve_slots(max_loaded + 1)

    # ----------------------------------------------------------------- queries
    def resident(self) -> list[ResidentAdapter]:
        with self._table:
            return list(self._resident.values())

    def get(self, name: str) -> ResidentAdapter | None:
        with self._table:
            return self._resident.get(name)

    def is_loaded(self, name: str) -> bool:
        with self._table:
            return name in self._resident

    def merge_parts(self, name: str) -> tuple[str, ...] | None:
        """The parts of a resident computed merge, or None if ``name`` is not one."""
        with self._table:
            resident = self._resident.get(name)
            return resident.parts if resident is not None and resident.origin == "merge" else None

    # ----------------------------------------------------------------- lifecycle
    def lease(self, choice: AdapterChoice, holders: int = 1) -> AdapterLease:
        """Makes ``choice`` resident (loading, or computing a merge once) and pins it for ``holders``.

        While a merge is computed only its own name is locked: requests on other adapters carry on.

        Raises:
            AdapterNotFound, AdapterInvalid, MergeSpecInvalid: the choice cannot be served.
            AdapterBusy: every slot is pinned by requests in flight.
        """
        if choice.name is None:
            return AdapterLease.base(holders)
        name = choice.name
        if choice.spec is None:
            resident = self._ensure(name, pin=True, loader=lambda: self._read_from_store(name))
        else:
            resident = self._ensure_merge(choice)
        return AdapterLease(name, resident.slot, holders, lambda: self._unpin(name))

    def load(self, name: str) -> ResidentAdapter:
        """Makes ``name`` resident without pinning it (the admin API's load)."""
        return self._ensure(name, pin=False, loader=lambda: self._read_from_store(name))

    def read_weights(self, name: str) -> LoRAWeights:
        """An adapter's weights, from its resident copy or (validated) from the store, without loading it."""
        with self._table:
            resident = self._resident.get(name)
            if resident is not None and resident.origin == "store":
                return resident.weights
        return self._read_from_store(name)

    def merged_weights(self, choice: AdapterChoice, name: str) -> LoRAWeights:
        """The weights of merge ``choice`` under ``name``, computed from the parts, not made resident."""
        parts = [self.read_weights(part) for part in choice.parts]
        return merge_lora(choice.spec, parts, name, max_rank=self.max_rank)

    def unload(self, name: str) -> bool:
        """Frees the slot of ``name``; False if it was not resident."""
        with self._name_lock(name), self.lock, self._table:
            resident = self._resident.get(name)
            if resident is None:
                return False
            if resident.pins:
                raise AdapterInUse(name, resident.pins)
            self._drop(resident)
            return True

    def forget(self, name: str) -> None:
        """Drops a resident copy whose files changed on disk (upload or delete), and merges made from it.

        A merge being computed from ``name`` right now is not cached when it completes (its parts'
        versions changed), so no merge outlives the weights it was made from.
        """
        with self._name_lock(name), self.lock, self._table:
            self._versions[name] = self._versions.get(name, 0) + 1
            stale = [r for r in self._resident.values() if r.name == name or name in r.parts]
            busy = [r for r in stale if r.pins]
            if busy:
                raise AdapterInUse(busy[0].name, busy[0].pins)
            for resident in stale:
                self._drop(resident)

    # ----------------------------------------------------------------- internals
    def _unpin(self, name: str) -> None:
        with self._table:
            resident = self._resident.get(name)
            if resident is None or resident.pins == 0:  # a bug: a lease outlived its pin
                raise RuntimeError(f"unpin of {name!r}, which holds no pin")
            resident.pins -= 1

    def _ensure_merge(self, choice: AdapterChoice) -> ResidentAdapter:
        """Pins a cached merge, or computes it from the parts' current weights and caches it."""
        name = choice.name
        for _ in range(3):  # a part re-uploaded during the computation: compute again
            with self._table:
                versions = {part: self._versions.get(part, 0) for part in choice.parts}
            resident = self._ensure(
                name,
                pin=True,
                loader=lambda: self.merged_weights(choice, name),
                origin="merge",
                spec=choice.spec.to_dict(),
                parts=choice.parts,
                versions=versions,
            )
            if resident is not None:
                return resident
        raise AdapterChanged(name)

    def _read_from_store(self, name: str) -> LoRAWeights:
        folder = self.store.require(name)
        return load_lora_weights(
            name,
            folder,
            self.lora.linear_shapes,
            self.max_rank,
            dtype=self.lora.dtype,
            attention=self.lora.attention_shape,
        )

    def _ensure(
        self,
        name: str,
        pin: bool,
        loader: Callable[[], LoRAWeights],
        origin: str = "store",
        spec: dict | None = None,
        parts: tuple[str, ...] = (),
        versions: dict[str, int] | None = None,
    ) -> ResidentAdapter | None:
        """Returns the pinned (if ``pin``) resident entry; None if ``versions`` went stale meanwhile."""
        with self._table:  # the warm path: no name lock, no bank lock
            resident = self._hit(name, pin)
            if resident is not None:
                return resident
        with self._name_lock(name):
            with self._table:
                resident = self._hit(name, pin)
                if resident is not None:
                    return resident
            started = time.perf_counter()
            weights = loader()  # disk read + validation, outside both locks
            with self.lock, self._table:
                if versions and any(self._versions.get(p, 0) != v for p, v in versions.items()):
                    return None  # a part changed while we computed: these weights are stale
                slot = self._take_slot()
                try:
                    self.lora.install(slot, weights)  # DoRA: may refuse weights that do not fit this base
                except BaseException:
                    self.lora.clear(slot)
                    self._free_slots.append(slot)
                    raise
                elapsed = time.perf_counter() - started
                resident = ResidentAdapter(
                    name, slot, weights, elapsed, pins=int(pin), origin=origin, spec=spec, parts=parts
                )
                self._resident[name] = resident
                self.stats.loads += 1
                self.stats.load_seconds_total += elapsed
                self.stats.last_load_seconds = elapsed
            logger.info("adapter %s loaded into slot %d in %.1f ms", name, slot, elapsed * 1e3)
            return resident

    def _hit(self, name: str, pin: bool) -> ResidentAdapter | None:
        resident = self._resident.get(name)
        if resident is not None:
            self._resident.move_to_end(name)
            resident.pins += int(pin)
        return resident

    def _take_slot(self) -> int:
        if self._free_slots:
            return self._free_slots.pop()
        for resident in self._resident.values():  # oldest first
            if resident.pins == 0:
                logger.info("evicting idle adapter %s (least recently used)", resident.name)
                self.stats.evictions += 1
                self._drop(resident)
                return self._free_slots.pop()
        raise AdapterBusy(self.max_loaded)

    def _drop(self, resident: ResidentAdapter) -> None:
        self.lora.clear(resident.slot)
        del self._resident[resident.name]
        self._free_slots.append(resident.slot)

    def _name_lock(self, name: str) -> threading.Lock:
        with self._name_locks_guard:
            return self._name_locks.setdefault(name, threading.Lock())
