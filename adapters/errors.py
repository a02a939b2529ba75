"""Domain errors of the adapter package; the server maps them to HTTP in one place.

Each error carries ``code`` (OpenAI-style error code) and ``param`` (the request field at fault)
as class attributes, so the HTTP layer needs no knowledge of the adapter package's internals.
"""

from __future__ import annotations


class AdapterNotFound(LookupError):
    """No adapter of that name is in the store (or visible to the caller)."""

    code = "adapter_not_found"
    param = "adapter"

    def __init__(self, name: str):
        super().__init__(f"The adapter '{name}' does not exist.")
        self.name = name


class AdapterNameInvalid(ValueError):
    """A name that is not ``[A-Za-z0-9._-]{1,64}`` or would resolve outside the store."""

    code = "invalid_adapter_name"
    param = "adapter"

    def __init__(self, name: str, reason: str):
        super().__init__(f"Invalid adapter name {name!r}: {reason}.")
        self.name = name


class AdapterInvalid(ValueError):
    """An adapter that cannot be served on this base model; ``problems`` lists every reason."""

    code = "adapter_invalid"
    param = "adapter"

    def __init__(self, name: str, problems: list[str]):
        super().__init__(f"The adapter '{name}' cannot be loaded: " + "; ".join(problems))
        self.name = name
        self.problems = problems


class AdapterExists(ValueError):
    code = "adapter_exists"
    param = "name"

    def __init__(self, name: str):
        super().__init__(f"An adapter named '{name}' already exists; pass overwrite to replace it.")
        self.name = name


class AdapterBusy(RuntimeError):
    """Every resident slot is pinned by requests in flight; the request may be retried shortly."""

    code = "adapter_capacity_exhausted"
    param = "adapter"

    def __init__(self, capacity: int):
        super().__init__(
            f"All {capacity} adapter slots are in use by requests in flight; retry shortly "
            "or raise --max-loaded-adapters."
        )


class MergeSpecInvalid(ValueError):
    """A per-request merge spec that cannot be computed; ``param`` names the offending request field.

    ``param`` is set per instance (for example ``adapter.merge[1].weight`` or
    ``merged_adapters.merge_strategy``); the class attribute is the fallback.
    """

    code = "invalid_merge_spec"
    param = "adapter"

    def __init__(self, param: str, reason: str, value: object = None):
        super().__init__(f"Invalid merge spec ({param}): {reason}.")
        self.param = param
        self.reason = reason
        self.value = value
