"""API key check shared by the routers."""

from __future__ import annotations

import hmac

from fastapi import Request

from ..errors import APIError


def key_ok(request: Request) -> bool:
    """Whether the request carries the server's API key (or none is configured).

    The key is accepted as ``Authorization: Bearer KEY`` (OpenAI clients) or
    ``x-api-key: KEY`` (Anthropic clients).
    """
    want = request.app.state.tiercache.cfg.api_key
    if want is None:
        return True
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    candidates = [request.headers.get("x-api-key", "")]
    if scheme.lower() == "bearer":
        candidates.append(token.strip())
    return any(hmac.compare_digest(c.encode(), want.encode()) for c in candidates if c)


async def require_key(request: Request) -> None:
    """FastAPI dependency: raise a 401 unless :func:`key_ok`."""
    if not key_ok(request):
        raise APIError(401, "invalid or missing API key", None, "invalid_api_key")
