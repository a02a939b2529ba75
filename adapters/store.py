"""The adapter store: one folder per adapter on disk, in PEFT's format.

Each subfolder ``NAME/`` holds ``adapter_config.json`` and ``adapter_model.safetensors`` (as written by
PEFT's ``save_pretrained`` and by ``training/``), optionally a ``training_card.json``. Names are
restricted so that a name can never reach outside the store; writes are atomic (a temporary folder
renamed into place), so a half-written adapter is never servable.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from adapters.errors import AdapterExists, AdapterNameInvalid, AdapterNotFound
from adapters.peft_types import adapter_type
from adapters.safe_files import read_json_object

logger = logging.getLogger(__name__)

ADAPTER_NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
CARD_FILE = "training_card.json"
MERGED_PREFIX = "merge-"  # cached per-request merges live under this prefix, never in the store


def check_adapter_name(name: str) -> str:
    """Returns ``name`` if it is a valid adapter name, else raises :class:`AdapterNameInvalid`."""
    if not isinstance(name, str) or not ADAPTER_NAME_RE.fullmatch(name):
        raise AdapterNameInvalid(str(name)[:80], "names are 1-64 characters of [A-Za-z0-9._-]")
    if name.startswith("."):
        raise AdapterNameInvalid(name, "names may not start with '.'")
    return name


@dataclass
class AdapterInfo:
    """What the store knows about an adapter without loading its weights."""

    name: str
    rank: int | None
    alpha: float | None
    target_modules: list[str] | str | None
    size_bytes: int
    base_model: str | None
    card: dict | None = field(default=None)
    peft_type: str | None = None  # lora, rslora, dora, ia3 or prompt_tuning; None: no readable config


class AdapterStore:
    """Adapter folders under one root directory."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._root_resolved = self.root.resolve()

    def path_for(self, name: str) -> Path:
        """The folder of adapter ``name``; never a path outside the store (symlinks included)."""
        check_adapter_name(name)
        path = self.root / name
        resolved = path.resolve()
        if resolved.parent != self._root_resolved or path.is_symlink():
            raise AdapterNameInvalid(name, "it resolves outside the adapter store")
        return path

    def exists(self, name: str) -> bool:
        try:
            path = self.path_for(name)
        except AdapterNameInvalid:
            return False
        return (path / CONFIG_FILE).is_file()

    def require(self, name: str) -> Path:
        path = self.path_for(name)
        if not (path / CONFIG_FILE).is_file():
            raise AdapterNotFound(name)
        return path

    def names(self) -> list[str]:
        """Every adapter folder in the store, read live from disk."""
        found = []
        for entry in sorted(self.root.iterdir()):
            if entry.name.startswith(".") or entry.is_symlink() or not entry.is_dir():
                continue
            if ADAPTER_NAME_RE.fullmatch(entry.name) and (entry / CONFIG_FILE).is_file():
                found.append(entry.name)
        return found

    def read_config(self, name: str) -> dict:
        path = self.require(name) / CONFIG_FILE
        try:
            return read_json_object(path)
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise ValueError(f"{CONFIG_FILE} is not a valid JSON object: {e}") from e

    def read_card(self, name: str) -> dict | None:
        path = self.require(name) / CARD_FILE
        if not path.is_file():
            return None
        try:
            return read_json_object(path)
        except (OSError, UnicodeDecodeError, ValueError):
            logger.warning("adapter %s has an unreadable %s", name, CARD_FILE)
            return None

    def describe(self, name: str) -> AdapterInfo:
        path = self.require(name)
        try:
            config = self.read_config(name)
        except ValueError:
            config = {}
        size = sum(f.lstat().st_size for f in path.iterdir() if f.is_file() and not f.is_symlink())
        return AdapterInfo(
            name=name,
            rank=config.get("r"),
            alpha=config.get("lora_alpha"),
            target_modules=config.get("target_modules"),
            size_bytes=size,
            base_model=config.get("base_model_name_or_path"),
            card=self.read_card(name),
            peft_type=adapter_type(config) if config else None,
        )

    def write(self, name: str, files: Mapping[str, bytes], overwrite: bool = False) -> Path:
        """Writes an adapter's files atomically; the folder appears whole or not at all."""
        tmp = self.staging_dir(name)
        try:
            for filename, content in files.items():
                if "/" in filename or filename.startswith("."):
                    raise ValueError(f"invalid adapter file name {filename!r}")
                with open(tmp / filename, "wb") as f:
                    f.write(content)
                    f.flush()
                    os.fsync(f.fileno())
            return self.commit_staged(tmp, name, overwrite=overwrite)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def staging_dir(self, name: str) -> Path:
        """A hidden temporary folder inside the store (same filesystem, so the final rename is atomic)."""
        check_adapter_name(name)
        return Path(tempfile.mkdtemp(prefix=f".staging-{name}-", dir=self.root))

    def commit_staged(self, staged: Path, name: str, overwrite: bool = False) -> Path:
        """Renames a fully written staging folder into place as adapter ``name``."""
        if name.startswith(MERGED_PREFIX):
            shutil.rmtree(staged, ignore_errors=True)
            raise AdapterNameInvalid(name, f"names starting with '{MERGED_PREFIX}' are reserved for merges")
        target = self.path_for(name)
        os.chmod(staged, 0o755)  # mkdtemp makes it 0700; a served adapter is readable like any folder
        if target.exists():
            if not overwrite:
                shutil.rmtree(staged, ignore_errors=True)
                raise AdapterExists(name)
            trash = self.root / f".trash-{name}-{uuid.uuid4().hex[:8]}"
            os.replace(target, trash)
            os.replace(staged, target)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(staged, target)
        _fsync_dir(self.root)
        return target

    def delete(self, name: str) -> None:
        path = self.require(name)
        trash = self.root / f".trash-{name}-{uuid.uuid4().hex[:8]}"
        os.replace(path, trash)
        shutil.rmtree(trash, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
