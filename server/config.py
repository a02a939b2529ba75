"""The one settings object; the only place that reads the environment.

Every setting is a ``loraplex serve`` flag (``--max-loaded-adapters``) and a ``LORAPLEX_*`` environment
variable (``LORAPLEX_MAX_LOADED_ADAPTERS``). Flags win over the environment, which wins over defaults.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from adapters.shared_settings import SharedSettings
from rag.embedder import DEFAULT_EMBEDDING_MODEL, DEFAULT_MODEL_ALIASES


class Settings(SharedSettings):
    """Server settings (see ``loraplex serve --help``); the data and cache locations are the shared
    ones (``adapters/shared_settings.py``) that training, RAG and the kernel build read too."""

    model_config = SettingsConfigDict(env_prefix="LORAPLEX_", extra="forbid", validate_default=True)

    host: str = Field("127.0.0.1", description="address to bind")
    port: int = Field(8000, ge=0, le=65535, description="port to bind")
    base_model: str | None = Field(
        None,
        description="local HF causal-LM dir or .gguf file (default: the embedded SmolLM2-135M-Instruct)",
    )
    quantization: Literal["auto", "w8", "w8a8", "nf4", "int8", "none"] = Field(
        "auto",
        description="base weights: w8 (int8 weight-only, loraplex's CPU kernel, fp32 compute), w8a8 (the "
        "same weights, activations int8 per block of 64: integer dot products), nf4/int8 (bitsandbytes), "
        "none; auto: w8a8 on the CPU when its kernel has AVX512-VNNI or AVX2, else w8 when built, else nf4",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="compute dtype (auto: bfloat16 on GPUs and on CPUs with native bf16, else float32)",
    )
    device: str | None = Field(None, description="torch device (default: cuda when available, else cpu)")
    cuda_graphs: Literal["on", "off"] = Field(
        "on",
        description="replay the decode step from a CUDA graph per batch-size bucket (CUDA devices only; "
        "no effect on the CPU)",
    )
    torch_threads: int | None = Field(
        None,
        ge=1,
        description="CPU threads per engine thread (default: one per core, half with the prefill worker)",
    )
    max_loaded_adapters: int = Field(16, ge=1, le=1024, description="adapters resident in model memory")
    max_adapter_rank: int = Field(64, ge=1, le=1024, description="largest LoRA rank accepted")
    max_batch_size: int = Field(64, ge=1, le=1024, description="sequences decoded together per step")
    max_prefills_per_step: int = Field(4, ge=1, le=256, description="new sequences prefilled per step")
    prefill_chunk_tokens: int = Field(
        512,
        ge=0,
        le=1_000_000,
        description="chunked prefill: the most prompt tokens one prefill pass computes; a longer prompt "
        "takes several passes, with decode steps and other prompts between them (0: whole prompts)",
    )
    prefill_worker: Literal["auto", "on", "off"] = Field(
        "auto",
        description="prefill in a second thread while decoding (auto: on for CPUs with 2+ cores, "
        "each thread then gets half the cores)",
    )
    prefix_cache_bytes: int = Field(
        512 << 20,
        ge=0,
        description="bytes of prompt keys/values kept for reuse by later prompts with the same start, "
        "adapter and tenant (0: off)",
    )
    max_model_len: int = Field(
        2048, ge=16, description="context window cap (prompt + completion tokens), at most the model's"
    )
    default_max_tokens: int = Field(256, ge=1, description="max_tokens when a request gives none")
    max_n: int = Field(8, ge=1, le=128, description="largest n (choices per request)")
    max_merge_parts: int = Field(8, ge=1, le=64, description="most adapters in one per-request merge")
    embedding_model: str | None = Field(
        None, description="sentence-transformers directory for RAG (default: the packaged all-MiniLM-L6-v2)"
    )
    embedding_aliases: Annotated[dict[str, str], NoDecode] = Field(
        {},
        description="another name for the embedding model on /v1/embeddings, ALIAS=MODEL_ID "
        "(repeatable: --embedding-alias text-embedding-3-small=all-MiniLM-L6-v2; env: a comma list)",
        json_schema_extra={"repeatable_flag": "--embedding-alias"},
    )
    max_embedding_inputs: int = Field(2048, ge=1, description="most inputs in one /v1/embeddings request")
    max_embedding_tokens: int = Field(
        65536, ge=1, description="most embedder tokens in one /v1/embeddings request (400 beyond)"
    )
    max_embedding_queue_tokens: int = Field(
        262144, ge=1, description="embedder tokens queued or running; beyond it requests get 429 at once"
    )
    rag_max_upload_bytes: int = Field(20 << 20, ge=1024, description="largest RAG document or file")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log level")
    log_json: bool = Field(False, description="log one JSON object per line (with request ids)")
    api_keys_file: Path | None = Field(None, description="YAML/JSON keys file; every route then needs a key")
    allow_unauthenticated: bool = Field(
        False, description="allow binding a non-loopback address without API keys"
    )
    max_body_bytes: int = Field(1 << 20, ge=1024, description="largest JSON request body (413 beyond)")
    max_upload_bytes: int = Field(256 << 20, ge=1024, description="largest multipart upload (413 beyond)")
    max_headers: int = Field(64, ge=8, description="most request headers (431 beyond)")
    max_prompt_tokens: int = Field(8192, ge=1, description="largest prompt in tokens (400 beyond)")
    max_tokens_limit: int = Field(4096, ge=1, description="largest max_tokens a request may ask for")
    max_pending: int = Field(
        256, ge=1, description="running + queued sequences; beyond it requests get 429 at once"
    )
    request_timeout_seconds: float = Field(600.0, gt=0, description="a generation is cancelled after this")
    shutdown_grace_seconds: float = Field(
        30.0, ge=0, description="on SIGTERM, how long in-flight requests may finish"
    )

    @property
    def embedding_model_id(self) -> str:
        """The embedding model's public name: the default's, or its directory's name (never a path)."""
        if self.embedding_model is None or self.embedding_model in DEFAULT_MODEL_ALIASES:
            return DEFAULT_EMBEDDING_MODEL
        return Path(self.embedding_model).expanduser().name

    @field_validator("embedding_aliases", mode="before")
    @classmethod
    def _parse_aliases(cls, value: object) -> object:
        """ALIAS=MODEL entries from a comma list (env), a list (repeated flag) or a mapping (config file)."""
        if isinstance(value, str):
            value = [item for item in value.split(",") if item.strip()]
        if not isinstance(value, list):
            return value
        aliases: dict[str, str] = {}
        for item in value:
            alias, sep, target = str(item).partition("=")
            if not sep or not alias.strip() or not target.strip():
                raise ValueError(f"{item!r} is not ALIAS=MODEL_ID")
            aliases[alias.strip()] = target.strip()
        return aliases

    @model_validator(mode="after")
    def _check_quantization_dtype(self) -> Settings:
        if self.quantization in ("w8", "w8a8") and self.dtype not in ("auto", "float32"):
            raise ValueError(
                f"--quantization {self.quantization} computes in float32; --dtype {self.dtype} does not apply"
            )
        return self

    @model_validator(mode="after")
    def _check_embedding_settings(self) -> Settings:
        model_id = self.embedding_model_id
        for alias, target in self.embedding_aliases.items():
            if target != model_id:
                raise ValueError(f"--embedding-alias {alias}={target}: the embedding model is {model_id!r}")
            if alias == model_id:
                raise ValueError(f"--embedding-alias {alias}: that is the model's own name")
        if self.max_embedding_queue_tokens < self.max_embedding_tokens:
            raise ValueError(
                "--max-embedding-queue-tokens must be at least --max-embedding-tokens, "
                "or a request within the per-request limit could never be queued"
            )
        return self

    @model_validator(mode="after")
    def _fill_paths(self) -> Settings:
        if self.adapter_dir is None:
            self.adapter_dir = self.adapter_store
        return self
