"""The vector index of one collection: FAISS over chunk ids, written atomically.

``IndexIDMap2`` maps FAISS rows to chunk ids (SQLite's ``chunks.id``), over an inner-product flat index by
default or HNSW for large collections. HNSW cannot delete vectors in place, so removal from an HNSW index
rebuilds it from the remaining vectors (they are stored in the graph's flat storage), keeping "deleted"
meaning gone rather than hidden.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import faiss
import numpy as np

logger = logging.getLogger(__name__)

INDEX_KINDS = ("flat", "hnsw")


@dataclass(frozen=True)
class IndexSettings:
    """Which FAISS index a collection uses; recorded in the collection's metadata."""

    kind: str = "flat"
    hnsw_m: int = 32
    hnsw_ef_construction: int = 80
    hnsw_ef_search: int = 64

    def to_dict(self) -> dict:
        return asdict(self)


def _replace(src: Path, dst: Path) -> None:
    """Renames ``src`` over ``dst`` and makes the rename durable (a seam the crash test patches)."""
    os.replace(src, dst)
    fsync_dir(dst.parent)


def fsync_dir(path: Path) -> None:
    """Flushes a directory entry so that a rename inside it survives a power cut."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class VectorIndex:
    """Vectors keyed by chunk id. Not thread-safe for writes; the collection serialises them."""

    def __init__(self, dimension: int, settings: IndexSettings, index: faiss.IndexIDMap2 | None = None):
        self.dimension = dimension
        self.settings = settings
        self._index = index if index is not None else self._empty()

    def _empty(self) -> faiss.IndexIDMap2:
        if self.settings.kind == "hnsw":
            inner = faiss.IndexHNSWFlat(self.dimension, self.settings.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            inner.hnsw.efConstruction = self.settings.hnsw_ef_construction
            inner.hnsw.efSearch = self.settings.hnsw_ef_search
        else:
            inner = faiss.IndexFlatIP(self.dimension)
        return faiss.IndexIDMap2(inner)

    @property
    def count(self) -> int:
        return int(self._index.ntotal)

    def ids(self) -> np.ndarray:
        """The chunk ids in the index, (N,) int64."""
        return faiss.vector_to_array(self._index.id_map).astype(np.int64)

    def clone(self) -> VectorIndex:
        """An independent copy (writers change a copy and swap it in, so readers never lock)."""
        return VectorIndex(self.dimension, self.settings, faiss.clone_index(self._index))

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Adds (N, d) float32 ``vectors`` under chunk ``ids`` (N,)."""
        if len(ids):
            self._index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), ids.astype(np.int64))

    def remove(self, ids: np.ndarray) -> None:
        """Removes the vectors of chunk ``ids``; unknown ids are ignored."""
        if not len(ids):
            return
        if self.settings.kind != "hnsw":
            self._index.remove_ids(faiss.IDSelectorBatch(ids.astype(np.int64)))
            return
        keep = np.setdiff1d(self.ids(), ids.astype(np.int64))
        vectors = np.stack([self._index.reconstruct(int(i)) for i in keep]) if len(keep) else None
        self._index = self._empty()
        if vectors is not None:
            self.add(keep, vectors)

    def search(
        self, query: np.ndarray, k: int, allowed_ids: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest chunks to one (d,) query vector, optionally only among ``allowed_ids``.

        Returns:
            (scores, ids), each (≤k,), best first; cosine scores for normalised vectors.
        """
        k = min(k, self.count)
        if k <= 0:
            return np.zeros(0, dtype=np.float32), np.zeros(0, dtype=np.int64)
        params = None
        if allowed_ids is not None:
            selector = faiss.IDSelectorBatch(allowed_ids.astype(np.int64))
            if self.settings.kind == "hnsw":
                params = faiss.SearchParametersHNSW(
                    sel=selector, efSearch=max(self.settings.hnsw_ef_search, k)
                )
            else:
                params = faiss.SearchParameters(sel=selector)
        elif self.settings.kind == "hnsw":
            params = faiss.SearchParametersHNSW(efSearch=max(self.settings.hnsw_ef_search, k))
        # One query gains nothing from OpenMP threads, and waking them costs milliseconds on a busy machine.
        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)
        try:
            scores, ids = self._index.search(
                query.reshape(1, -1).astype(np.float32), k, params=params
            )  # (1, k)
        finally:
            faiss.omp_set_num_threads(threads)
        found = ids[0] >= 0
        return scores[0][found], ids[0][found]

    def save(self, path: Path) -> None:
        """Writes the index to ``path`` atomically: a temporary file, fsync, rename."""
        tmp = path.with_name(path.name + ".tmp")
        data = faiss.serialize_index(self._index)  # (bytes,) uint8
        with open(tmp, "wb") as f:
            f.write(data.tobytes())
            f.flush()
            os.fsync(f.fileno())
        _replace(tmp, path)

    @classmethod
    def load(cls, path: Path, dimension: int, settings: IndexSettings) -> VectorIndex:
        """Reads an index written by :meth:`save`."""
        index = faiss.read_index(str(path))  # already the concrete class; it owns its memory
        if index.d != dimension:
            raise ValueError(f"index {path.name} has dimension {index.d}, expected {dimension}")
        if not isinstance(index, faiss.IndexIDMap2):
            raise ValueError(f"index {path.name} is not an IndexIDMap2")
        if settings.kind == "hnsw":
            faiss.downcast_index(index.index).hnsw.efSearch = settings.hnsw_ef_search
        return cls(dimension, settings, index)
