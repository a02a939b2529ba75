"""Reading untrusted adapter files: regular files only, bounded in size, JSON bounded in depth.

An adapter folder comes from an upload or from whoever can write to the store. Its files are opened
only if they are regular files inside the folder (a symlinked ``adapter_config.json`` pointing at
``/etc/passwd`` is refused, not followed), and its JSON is size- and depth-checked before parsing, so a
50 MB or 100k-deep config is a clear error rather than a memory spike or a ``RecursionError``.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

MAX_CONFIG_BYTES = 1 << 20  # adapter_config.json, training_card.json
MAX_JSON_DEPTH = 32  # nesting of objects and arrays


class UnsafeFile(ValueError):
    """A file that is not a regular file in its folder, or is larger than allowed."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path.name} {reason}")
        self.path = path
        self.reason = reason


class JSONTooDeep(ValueError):
    """JSON nested more deeply than :data:`MAX_JSON_DEPTH` (or the limit given)."""

    def __init__(self, max_depth: int):
        super().__init__(f"JSON is nested more than {max_depth} levels deep")
        self.max_depth = max_depth


def check_regular_file(path: Path) -> os.stat_result:
    """Raises :class:`UnsafeFile` unless ``path`` is a regular file itself (not a symlink to one)."""
    try:
        info = os.lstat(path)
    except FileNotFoundError as e:
        raise UnsafeFile(path, "is missing") from e
    if stat.S_ISLNK(info.st_mode):
        raise UnsafeFile(path, "is a symbolic link; only regular files inside the adapter folder are read")
    if not stat.S_ISREG(info.st_mode):
        raise UnsafeFile(path, "is not a regular file")
    return info


def read_regular_bytes(path: Path, max_bytes: int) -> bytes:
    """The contents of a regular file of at most ``max_bytes`` (never following a final symlink)."""
    info = check_regular_file(path)
    if info.st_size > max_bytes:
        raise UnsafeFile(path, f"is {info.st_size} bytes; the limit is {max_bytes} bytes")
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:  # grew between the stat and the read
        raise UnsafeFile(path, f"is over the limit of {max_bytes} bytes")
    return data


def json_depth_exceeds(text: str, max_depth: int) -> bool:
    """Whether ``text`` nests objects/arrays deeper than ``max_depth`` (one linear scan, no recursion)."""
    depth, in_string, escaped = 0, False, False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > max_depth:
                return True
        elif ch in "]}":
            depth -= 1
    return False


def loads_bounded(text: str, max_depth: int = MAX_JSON_DEPTH) -> object:
    """``json.loads`` that refuses documents nested deeper than ``max_depth`` (:class:`JSONTooDeep`)."""
    if json_depth_exceeds(text, max_depth):
        raise JSONTooDeep(max_depth)
    return json.loads(text)


def read_json_object(path: Path, max_bytes: int = MAX_CONFIG_BYTES, max_depth: int = MAX_JSON_DEPTH) -> dict:
    """A JSON object from a regular file, bounded in size and depth.

    Raises:
        UnsafeFile: not a regular file, or too large.
        ValueError: not UTF-8, not JSON, too deep, or not an object.
    """
    data = read_regular_bytes(path, max_bytes)
    value = loads_bounded(data.decode("utf-8"), max_depth)
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    return value
