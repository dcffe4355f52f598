"""The HTTP edge: the request body limit, one error shape for every answer under ``/v1/``, the
OpenAPI document, and one log line per refused request.

BentoML answers schema failures itself (400, ``{"error": str, "detail": [...]}``), 4xx exceptions
as a JSON array, and 5xx with generic text. This ASGI middleware rewrites any such answer into
``{"error": {"code", "message", ...}}`` and leaves the service's own error bodies as they are.
A 405 keeps an ``Allow`` header naming the route's methods. BentoML also logs every schema
failure as an ERROR with its traceback and the offending input; ``RefusalTracebacks`` drops
those, and this middleware logs each refusal as one line instead (route, status, code; never the
input's values).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError

from service.errors import (
    BodyTooLarge,
    RequestTimeout,
    UnsupportedMediaType,
    validation_error_body,
)

Scope = dict[str, Any]
Message = dict[str, Any]

GENERIC_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
    415: "unsupported_media_type",
    500: "internal_error",
}


log = logging.getLogger("lstm_sessions.http")
log.setLevel(logging.INFO)  # refusals are news at INFO; BentoML's root handler shows WARNING up


class RefusalTracebacks(logging.Filter):
    """Drops BentoML's ERROR-with-traceback for a request its schema refused: a client's mistake,
    logged by ``ErrorContract`` as one line. Tracebacks of real failures pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not isinstance(error, ValidationError)

    @classmethod
    def install(cls) -> None:
        logging.getLogger("bentoml._internal.server.http_app").addFilter(cls())


class _TooLarge(Exception):
    pass


def _json(
    status: int, body: dict[str, Any], extra: tuple[tuple[bytes, bytes], ...] = ()
) -> tuple[Message, Message]:
    data = json.dumps(body).encode()
    start = {
        "type": "http.response.start",
        "status": status,
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(data)).encode()),
            *extra,
        ],
    }
    return start, {"type": "http.response.body", "body": data, "more_body": False}


def rewrite_error(status: int, raw: bytes) -> tuple[int, dict[str, Any]] | None:
    """Our (status, body) for an error answer not in our shape; None if it already is."""
    try:
        body = json.loads(raw) if raw else None
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), dict) and "code" in body["error"]:
        return None
    if status == 400 and isinstance(body, dict) and isinstance(body.get("detail"), list):
        return validation_error_body(body["detail"])
    message = raw.decode(errors="replace")[:500] if raw else ""
    if isinstance(body, list) and body and isinstance(body[0], dict):
        message = str(body[0].get("error", message))
    elif isinstance(body, dict):
        message = str(body.get("error", message))
    code = GENERIC_CODES.get(status, "internal_error" if status >= 500 else "bad_request")
    return status, {"error": {"code": code, "message": message}}


def _is_json(scope: Scope) -> bool:
    """Whether the body is declared JSON. Any other type is refused before a body is read
    (BentoML would try to parse it and answer 500), and so is a body of no declared type: a
    page of any origin may send that without a CORS preflight. A POST with no body (``/v1/model``)
    needs no type."""
    body = False
    for name, value in scope.get("headers", []):
        if name == b"content-type":
            media = value.split(b";", 1)[0].strip().lower()
            return media == b"application/json"
        if name == b"transfer-encoding" or (name == b"content-length" and value != b"0"):
            body = True
    return not body


class ErrorContract:
    """``openapi()``: the document served at ``/docs.json``; ``allowed``: path -> its ``Allow``
    header; ``refused_at_edge(path, code)``: told of each request refused before its handler ran
    (the schema, the body limit, the media type), so the service can count refused steps."""

    def __init__(
        self,
        app: Any,
        max_body_bytes: int,
        openapi: Callable[[], bytes] = lambda: b"{}",
        allowed: dict[str, str] | None = None,
        refused_at_edge: Callable[[str, str], None] = lambda path, code: None,
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.openapi = openapi
        self.allowed = allowed or {}
        self.refused_at_edge = refused_at_edge

    async def _refuse(self, scope: Scope, send: Any, status: int, body: dict[str, Any]) -> None:
        """Answer an error made here or rewritten here (the handler never ran)."""
        code = str(body["error"]["code"])
        self.refused_at_edge(scope["path"], code)
        log_refusal(scope, status, code)
        extra: tuple[tuple[bytes, bytes], ...] = ()
        if status == 405 and scope["path"] in self.allowed:
            extra = ((b"allow", self.allowed[scope["path"]].encode()),)
        for message in _json(status, body, extra):
            await send(message)

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["path"] == "/docs.json" and scope["method"] in ("GET", "HEAD"):
            await _send_document(send, self.openapi(), scope["method"] == "HEAD")
            return
        if not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        if scope["method"] == "POST" and not _is_json(scope):
            refused = UnsupportedMediaType("send the body as application/json")
            await self._refuse(scope, send, refused.status, refused.body())
            return
        limit = self.max_body_bytes
        too_large = BodyTooLarge(
            f"the request body is over the limit of {limit} bytes", limit=limit
        )
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                await self._refuse(scope, send, too_large.status, too_large.body())
                return

        received = 0
        overflow = False

        async def limited_receive() -> Message:
            nonlocal received, overflow
            message: Message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    overflow = True
                    raise _TooLarge
            return message

        held: Message | None = None
        chunks: list[bytes] = []
        answered = False

        async def contract_send(message: Message) -> None:
            nonlocal held, answered
            if answered:
                return
            if message["type"] == "http.response.start":
                if overflow:
                    await self._refuse(scope, send, too_large.status, too_large.body())
                    answered = True
                    return
                if message["status"] >= 400:
                    held = message
                    return
                await send(message)
                return
            if held is None:
                await send(message)
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body"):
                return
            raw = b"".join(chunks)
            rewritten = rewrite_error(held["status"], raw)
            if rewritten is None:  # the handler's own error answer, already in our shape
                log_refusal(scope, held["status"], _code_of(raw))
                headers = [(k, v) for k, v in held["headers"] if k != b"content-length"]
                headers.append((b"content-length", str(len(raw)).encode()))
                await send({**held, "headers": headers})
                await send({"type": "http.response.body", "body": raw, "more_body": False})
            else:
                await self._refuse(scope, send, *rewritten)
            answered = True

        try:
            await self.app(scope, limited_receive, contract_send)
        except _TooLarge:
            if not answered:
                await self._refuse(scope, send, too_large.status, too_large.body())


def _code_of(raw: bytes) -> str:
    try:
        return str(json.loads(raw)["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return "?"


def log_refusal(scope: Scope, status: int, code: str) -> None:
    """One line per refused request: never its body, which may be large or private."""
    if status < 500:
        log.info("refused %s %s: %d %s", scope["method"], scope["path"], status, code)
    else:
        log.error("failed %s %s: %d %s", scope["method"], scope["path"], status, code)


async def _send_document(send: Any, document: bytes, head: bool) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(document)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": b"" if head else document})


class RequestDeadline:
    """Answers 504 ``request_timeout`` when an HTTP request runs past the service's traffic
    timeout; BentoML installs it in place of its own ``TimeoutMiddleware`` (see ``install``).

    BentoML 1.4's version arms a ``call_later`` timer per request and never cancels it, and a timer
    keeps the request's context (its tracing span and everything the span refers to) alive until
    it fires: at 60 s and ~1,300 requests/s, about a million objects that every full garbage
    collection walked, in pauses that reached 0.9 s under load. ``asyncio.timeout`` cancels its
    timer when the request ends. WebSockets pass through: a stream has its own idle limit.
    """

    def __init__(self, app: Any, timeout: float) -> None:
        self.app = app
        self.timeout = timeout

    @classmethod
    def install(cls) -> None:
        from bentoml._internal.server.http import traffic

        traffic.TimeoutMiddleware = cls  # type: ignore[misc,assignment]

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            async with asyncio.timeout(self.timeout):
                await self.app(scope, receive, tracking_send)
        except TimeoutError:
            if started:  # too late for a status: the client sees the answer cut short
                raise
            late = RequestTimeout(
                f"the request took longer than {self.timeout:g} s", limit=self.timeout
            )
            for message in _json(late.status, late.body()):
                await send(message)
