"""CORS: which browser pages on other origins may call the API (``LSTM_CORS_ORIGINS``).

None by default: the shipped page is served by the service itself (same origin), and a page on
another origin gets no ``Access-Control-Allow-Origin``, so the browser keeps the answer from it.
With origins listed, a request whose ``Origin`` is one of them gets that origin back (never
``*`` with credentials), and a preflight (``OPTIONS`` with ``Access-Control-Request-Method``) is
answered here, before any API key is asked for: browsers send a preflight without one. A
preflight from an origin not listed answers 403 ``cors_origin_refused``, with none listed too
(it met the key gate's 401 or a 405 before; an outside test run). ``*`` allows every origin (a
key is then the only guard).
"""

from __future__ import annotations

from typing import Any

from service.auth import send_error
from service.errors import CorsOriginRefused

ALLOW_METHODS = b"GET, POST, OPTIONS"
ALLOW_HEADERS = b"authorization, content-type"
MAX_AGE_S = b"600"  # how long a browser may reuse a preflight's answer


class Cors:
    """ASGI middleware, outermost of the HTTP stack."""

    def __init__(self, app: Any, origins: list[str]) -> None:
        self.app = app
        self.any = "*" in origins
        self.origins = {o.lower().encode() for o in origins if o != "*"}
        self.none = not self.any and not self.origins  # only preflights to refuse

    def _allowed(self, origin: bytes) -> bool:
        return self.any or origin.lower() in self.origins

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or (self.none and scope["method"] != "OPTIONS"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers", ()))
        origin = headers.get(b"origin")
        if origin is None:
            await self.app(scope, receive, send)
            return
        preflight = scope["method"] == "OPTIONS" and b"access-control-request-method" in headers
        if preflight:
            if not self._allowed(origin):
                await send_error(
                    send,
                    CorsOriginRefused(
                        f"origin {origin.decode('latin-1')!r} is not in LSTM_CORS_ORIGINS"
                    ),
                )
                return
            await send(
                {
                    "type": "http.response.start",
                    "status": 204,
                    "headers": [
                        *self._allow(origin),
                        (b"access-control-allow-methods", ALLOW_METHODS),
                        (b"access-control-allow-headers", ALLOW_HEADERS),
                        (b"access-control-max-age", MAX_AGE_S),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        if not self._allowed(origin):
            await self.app(scope, receive, send)
            return

        async def with_allow(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = [*message.get("headers", ()), *self._allow(origin)]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, with_allow)

    @staticmethod
    def _allow(origin: bytes) -> list[tuple[bytes, bytes]]:
        return [(b"access-control-allow-origin", origin), (b"vary", b"Origin")]


def check_ws_origin(scope: dict[str, Any] | Any, origins: list[str]) -> None:
    """A WebSocket from a browser page is its origin's: browsers send ``Origin`` and apply no
    CORS to WebSockets, so a page anywhere could stream into a session. One with an ``Origin``
    that is neither the service's own (its ``Host``) nor listed is refused (403, close 4403);
    clients that are not browsers send none."""
    headers = dict(scope.get("headers", ()))
    origin = headers.get(b"origin")
    if origin is None or "*" in origins:
        return
    text = origin.decode("latin-1").rstrip("/")
    host = headers.get(b"host", b"").decode("latin-1")
    if text.split("://", 1)[-1].lower() == host.lower() or text.lower() in (
        o.lower() for o in origins
    ):
        return
    raise CorsOriginRefused(
        f"a stream from origin {text!r} is refused: not this service's, nor in LSTM_CORS_ORIGINS"
    )
