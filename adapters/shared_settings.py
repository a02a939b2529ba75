"""The settings every entry point shares (server, ``loraplex train``/``eval``, ``loraplex rag``, the
kernel build): where data and caches live. With ``server/config.py`` (which extends it) this is the
only code that reads ``LORAPLEX_*`` variables; everything else is handed its values."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class SharedSettings(BaseSettings):
    """Data and cache locations (``LORAPLEX_DATA_DIR``, ``LORAPLEX_ADAPTER_DIR``, ``LORAPLEX_CACHE_DIR``)."""

    model_config = SettingsConfigDict(env_prefix="LORAPLEX_", extra="ignore", validate_default=True)

    data_dir: Path = Field(Path("data"), description="data directory (adapters, RAG collections)")
    adapter_dir: Path | None = Field(None, description="adapter store (default: DATA_DIR/adapters)")
    cache_dir: Path = Field(
        Path.home() / ".cache" / "loraplex", description="where converted models are cached"
    )

    @property
    def adapter_store(self) -> Path:
        """The adapter store: ``adapter_dir`` if set, else ``DATA_DIR/adapters``."""
        return self.adapter_dir if self.adapter_dir is not None else self.data_dir / "adapters"


class KernelSettings(BaseSettings):
    """The compiled CPU kernel's build (``LORAPLEX_KERNEL_DIR``, ``LORAPLEX_NO_KERNELS``)."""

    model_config = SettingsConfigDict(env_prefix="LORAPLEX_", extra="ignore")

    kernel_dir: Path = Field(
        Path.home() / ".cache" / "loraplex" / "kernels", description="kernel build cache"
    )
    no_kernels: bool = Field(False, description="never build or load the compiled kernel")
