"""What the ingress reads off a request: the multiplexed model id, and whether it changes the store.

Pure functions over the method, path and body: no Ray, no app. The multiplexed id is the adapter
a generating request runs on (the registry's name for it: a stored name or a merge's
``merge-<hash>``); base-model requests and everything else get ``""`` and are load-balanced.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Literal

from adapters.merging import MergeSpec, merged_name
from adapters.store import MERGED_PREFIX, AdapterStore

# Routes whose JSON body names an adapter (OpenAI, Responses, TGI/LoRAX native).
GENERATING_PATHS = frozenset(
    {
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/responses",
        "/generate",
        "/generate_stream",
        "/",  # TGI's root route: /generate or /generate_stream by its "stream" field
    }
)

StoreChange = Literal["forget", "unload"]


@dataclass(frozen=True)
class AdminAction:
    """An adapter-admin request: the adapter it acts on and what every other replica must do after
    it succeeds (``forget``: the files changed; ``unload``: free the slot); ``load`` requests go to
    the replica the adapter's multiplexed id picks, so they change nothing elsewhere."""

    name: str
    change: StoreChange | None


_ADMIN_ROUTES: tuple[tuple[str, re.Pattern[str], StoreChange | None], ...] = (
    ("PUT", re.compile(r"/v1/adapters/([^/]+)"), "forget"),
    ("DELETE", re.compile(r"/v1/adapters/([^/]+)"), "forget"),
    ("POST", re.compile(r"/v1/adapters/([^/]+)/save"), "forget"),
    ("POST", re.compile(r"/v1/adapters/([^/]+)/unload"), "unload"),
    ("POST", re.compile(r"/v1/adapters/([^/]+)/load"), None),
)
_VLLM_ADMIN = {"/v1/load_lora_adapter": None, "/v1/unload_lora_adapter": "unload"}


def admin_action(method: str, path: str, body: bytes) -> AdminAction | None:
    """The adapter-admin action of a request, or None for every other request."""
    for route_method, pattern, change in _ADMIN_ROUTES:
        match = pattern.fullmatch(path)
        if match and method == route_method:
            return AdminAction(match.group(1), change)
    if method == "POST" and path in _VLLM_ADMIN:
        name = _json_object(body).get("lora_name")
        if isinstance(name, str) and name:
            return AdminAction(name, _VLLM_ADMIN[path])
    return None


def multiplexed_model_id(
    method: str, path: str, body: bytes, store: AdapterStore, max_merge_parts: int
) -> str:
    """The Ray Serve multiplexed model id of a request ("" for the base model and non-generating routes).

    A ``model`` that is not a stored adapter (the base model's id, or a name the replica will answer
    404 for) is no adapter: those requests are load-balanced. An invalid merge spec gets "" too; the
    replica then answers the same 400 as ``loraplex serve``.
    """
    action = admin_action(method, path, body)
    if action is not None:
        return action.name if action.change is None else ""
    if method != "POST" or path not in GENERATING_PATHS:
        return ""
    data = _json_object(body)
    parameters = data.get("parameters") if isinstance(data.get("parameters"), dict) else {}
    merged = data.get("merged_adapters", parameters.get("merged_adapters"))
    adapter = data.get("adapter", parameters.get("adapter_id"))
    try:
        if merged is not None:
            return merged_name(MergeSpec.from_lorax(merged, max_parts=max_merge_parts))
        if isinstance(adapter, dict):
            return merged_name(MergeSpec.from_request(adapter, max_parts=max_merge_parts))
    except ValueError:
        return ""
    for name in (adapter, data.get("model")):
        if isinstance(name, str) and (name.startswith(MERGED_PREFIX) or store.exists(name)):
            return name
    return ""


def _json_object(body: bytes) -> dict:
    try:
        data = json.loads(body) if body else {}
    except (ValueError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}
