"""Hot-loading a freshly trained adapter into a running server through its admin API."""

from __future__ import annotations

import logging

import httpx

logger = logging.getLogger(__name__)


class RegistrationError(RuntimeError):
    """The server did not load the adapter; the adapter itself is saved and intact."""

    def __init__(self, url: str, message: str):
        super().__init__(f"could not register the adapter with {url}: {message}")
        self.url = url


def register_adapter(
    server_url: str, name: str, api_key: str | None = None, timeout_s: float = 120.0, transport=None
) -> dict:
    """``POST {server_url}/v1/adapters/{name}/load``; returns the server's JSON reply.

    Args:
        server_url: the server's base URL.
        name: the adapter's name in the server's store.
        api_key: sent as ``Authorization: Bearer`` when given.
        timeout_s: loading may take a while on a busy server.
        transport: an ``httpx`` transport (tests pass a mock).

    Raises:
        RegistrationError: the server is unreachable or answered with an error status.
    """
    url = f"{server_url.rstrip('/')}/v1/adapters/{name}/load"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        with httpx.Client(transport=transport, timeout=timeout_s) as client:
            response = client.post(url, headers=headers)
    except httpx.HTTPError as e:
        raise RegistrationError(server_url, str(e)) from e
    if response.status_code != 200:
        raise RegistrationError(server_url, f"HTTP {response.status_code}: {response.text[:500]}")
    try:
        body = response.json()
    except ValueError:
        body = {}
    logger.info("adapter %s loaded by %s", name, server_url)
    return body
