"""The one settings object; the only place that reads the environment.

Every setting is a ``loraplex serve`` flag (``--max-loaded-adapters``) and a ``LORAPLEX_*`` environment
variable (``LORAPLEX_MAX_LOADED_ADAPTERS``). Flags win over the environment, which wins over defaults.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Server settings (see ``loraplex serve --help``)."""

    model_config = SettingsConfigDict(env_prefix="LORAPLEX_", extra="forbid", validate_default=True)

    host: str = Field("127.0.0.1", description="address to bind")
    port: int = Field(8000, ge=0, le=65535, description="port to bind")
    base_model: str | None = Field(
        None,
        description="local HF causal-LM dir or .gguf file (default: the embedded SmolLM2-135M-Instruct)",
    )
    quantization: Literal["nf4", "int8", "none"] = Field("nf4", description="bitsandbytes quantization")
    device: str | None = Field(None, description="torch device (default: cuda when available, else cpu)")
    data_dir: Path = Field(Path("data"), description="data directory (adapters, RAG collections)")
    adapter_dir: Path | None = Field(None, description="adapter store (default: DATA_DIR/adapters)")
    cache_dir: Path = Field(
        Path.home() / ".cache" / "loraplex", description="where converted models are cached"
    )
    max_loaded_adapters: int = Field(16, ge=1, le=1024, description="adapters resident in model memory")
    max_adapter_rank: int = Field(64, ge=1, le=1024, description="largest LoRA rank accepted")
    max_batch_size: int = Field(64, ge=1, le=1024, description="sequences decoded together per step")
    max_prefills_per_step: int = Field(4, ge=1, le=256, description="new sequences prefilled per step")
    max_model_len: int = Field(
        2048, ge=16, description="context window cap (prompt + completion tokens), at most the model's"
    )
    default_max_tokens: int = Field(256, ge=1, description="max_tokens when a request gives none")
    max_n: int = Field(8, ge=1, le=128, description="largest n (choices per request)")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log level")

    @model_validator(mode="after")
    def _fill_paths(self) -> Settings:
        if self.adapter_dir is None:
            self.adapter_dir = self.data_dir / "adapters"
        return self
