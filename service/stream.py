"""``/v1/stream``: a WebSocket per session, each message a chunk, each reply that chunk's outputs.

    ws://host:3000/v1/stream?session_id=meter-7        (the session must exist: create it first)

A client message is the body of ``/v1/sessions/step`` without the id: ``{"inputs": [[...]],
"seq": 5, "return_gates": false}``. Each message gets exactly one reply, in order: the step's reply
(``{"session_id", "t", "outputs", "gates"}``), or ``{"error": {"code", "message", ...}, "status":
N}`` with the code and status the HTTP route would answer. A message runs through the same
handler as the HTTP step (``seq``, exactly-once replays, the micro-batcher, the store), so the two
transports can be mixed on one session.

Backpressure: a connection handles one message at a time; it reads the next only after the reply
to the previous one is sent, and a send waits while the client does not read. A client that sends
faster than it is served fills its own TCP window, not the server's memory.

When a connection closes, and why (the close code; an error message goes out first, except for
the last row):

    4401  LSTM_API_KEYS is set and the connection has no valid key (an ``Authorization: Bearer``
          header, or from a browser the subprotocol ``bearer.<key>`` beside ``lstm.v1``)
    4403  the key may not call this route
    4404  the session does not exist, expired, was evicted or deleted
    4408  no message for LSTM_STREAM_IDLE_S seconds
    4429  LSTM_MAX_STREAMS connections are open already
    1009  a message over LSTM_MAX_BODY_BYTES
    1011  the server failed unexpectedly
    1000  the client closed (normal closure), or the server is stopping
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import orjson
from pydantic import ValidationError
from starlette.types import Message
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from service.errors import (
    BadSessionId,
    BodyTooLarge,
    IdleTimeout,
    MissingField,
    ServiceError,
    SessionGone,
    TooManyStreams,
    validation_error_body,
)
from service.schemas import SESSION_ID_PATTERN, Step, StreamMessage

log = logging.getLogger("lstm_sessions.stream")

CLOSE_NORMAL = 1000
CLOSE_TOO_BIG = 1009
CLOSE_SERVER_ERROR = 1011


@dataclass(frozen=True)
class StreamLimits:
    max_streams: int
    idle_s: float
    max_message_bytes: int


SUBPROTOCOL = "lstm.v1"  # accepted when offered (a browser sending its key as a subprotocol)


class StreamSessions(Protocol):
    """What a connection steps through: the engine, or one API key's view of it."""

    async def step(self, body: Step) -> dict[str, Any]: ...

    async def check(self, session_id: str) -> None: ...  # the store's 404 when it is gone


Admit = Callable[[WebSocket], StreamSessions]  # raises the ServiceError (401/403) to close with


class StreamEndpoint:
    """Serves one connection per call; counts the open ones against ``max_streams``."""

    def __init__(
        self,
        limits: StreamLimits,
        admit: Admit,
        *,
        opened: Callable[[int], None] = lambda n: None,
        refused: Callable[[str], None] = lambda code: None,
    ) -> None:
        self.limits = limits
        self.admit = admit  # the connection's caller: whose sessions it steps
        self.opened = opened  # told the count of open streams whenever it changes
        self.refused = refused  # told the code of each message the schema refused
        self.open = 0

    async def serve(self, ws: WebSocket) -> None:
        offered = ws.scope.get("subprotocols", ())
        await ws.accept(subprotocol=SUBPROTOCOL if SUBPROTOCOL in offered else None)
        session_id = ws.query_params.get("session_id", "")
        try:  # who is calling, before anything else is told (even whether the service is full)
            sessions = self.admit(ws)
        except ServiceError as e:
            await self._close_with(ws, e)
            return
        if self.open >= self.limits.max_streams:
            full = TooManyStreams(
                f"{self.open} streams are open, the limit (LSTM_MAX_STREAMS)",
                limit=self.limits.max_streams,
            )
            await self._close_with(ws, full)
            return
        self.open += 1  # counted before any await, so concurrent connects cannot overshoot
        self.opened(self.open)
        try:
            try:
                if "session_id" not in ws.query_params:  # (bad_session_id before; an outside run)
                    raise MissingField("the query parameter session_id is required")
                if not re.fullmatch(SESSION_ID_PATTERN, session_id):
                    raise BadSessionId(
                        f"the query parameter session_id must match {SESSION_ID_PATTERN}"
                    )
                await sessions.check(session_id)
            except ServiceError as e:
                await self._close_with(ws, e)
                return
            await self._messages(ws, sessions, session_id)
        except WebSocketDisconnect:
            pass
        except Exception:
            log.exception("stream for session %r failed", session_id)
            with contextlib.suppress(Exception):
                await ws.close(CLOSE_SERVER_ERROR)
        finally:
            self.open -= 1
            self.opened(self.open)

    async def _messages(self, ws: WebSocket, sessions: StreamSessions, session_id: str) -> None:
        limits = self.limits
        watch = IdleWatch(limits.idle_s)
        try:
            await self._serve_messages(ws, sessions, session_id, watch)
        except asyncio.CancelledError:
            if not watch.expired:
                raise
            idle = IdleTimeout(
                f"no message for {limits.idle_s:g} s (LSTM_STREAM_IDLE_S)", limit=limits.idle_s
            )
            await self._close_with(ws, idle)
        finally:
            watch.close()

    async def _serve_messages(
        self, ws: WebSocket, sessions: StreamSessions, session_id: str, watch: IdleWatch
    ) -> None:
        limits = self.limits
        while True:
            message = await watch.receive(ws)
            if message["type"] == "websocket.disconnect":
                return
            raw: str | bytes = message.get("text") or message.get("bytes") or b""
            if utf8_length_over(raw, limits.max_message_bytes):
                too_big = BodyTooLarge(
                    f"the message is over the limit of {limits.max_message_bytes} bytes "
                    f"(LSTM_MAX_BODY_BYTES)",
                    limit=limits.max_message_bytes,
                )
                await self._close_with(ws, too_big, code=CLOSE_TOO_BIG)
                return
            try:
                reply = await sessions.step(parse_message(raw, session_id))
            except ServiceError as e:
                if isinstance(e, SessionGone) or e.status in (401, 403):  # gone, or the key is
                    await self._close_with(ws, e)
                    return
                log_refused_message(e.status, e.code)
                await ws.send_text(error_text(e.status, e.body()))
                continue
            except MessageRefused as e:
                code = e.body["error"]["code"]
                self.refused(code)
                log_refused_message(e.status, code)
                await ws.send_text(error_text(e.status, e.body))
                continue
            await ws.send_text(orjson.dumps(reply).decode())

    @staticmethod
    async def _close_with(ws: WebSocket, error: ServiceError, code: int | None = None) -> None:
        """Send the error as a message, then close: 4000 + its HTTP status unless ``code``."""
        if ws.application_state != WebSocketState.CONNECTED:
            return
        close = code or 4000 + error.status
        if error.status < 500:
            log.info("refused %s: %d %s (closed %d)", STREAM_ROUTE, error.status, error.code, close)
        else:
            log.error("failed %s: %d %s (closed %d)", STREAM_ROUTE, error.status, error.code, close)
        with contextlib.suppress(WebSocketDisconnect, RuntimeError):
            await ws.send_text(error_text(error.status, error.body()))
            await ws.close(close, reason=error.code)


STREAM_ROUTE = "WS /v1/stream"


def log_refused_message(status: int, code: str) -> None:
    """One line per refused message, as an HTTP refusal gets (``service.http.log_refusal``):
    never its body (found missing by an outside test run)."""
    if status < 500:
        log.info("refused %s message: %d %s", STREAM_ROUTE, status, code)
    else:
        log.error("failed %s message: %d %s", STREAM_ROUTE, status, code)


class IdleWatch:
    """The idle limit of one connection: ``receive`` waits for the next message, and a wait of
    ``idle_s`` or more is cancelled (``expired`` then says so). One timer per connection, which
    re-arms itself for what is left when it fires early: a timeout around each receive cost 4-5
    us a message, as much as parsing it."""

    def __init__(self, idle_s: float) -> None:
        self.idle_s = idle_s
        self.loop = asyncio.get_running_loop()
        self.task = asyncio.current_task()
        self.waiting_since: float | None = None  # loop time the current receive began
        self.expired = False
        self.before = self.task.cancelling() if self.task is not None else 0
        self.timer = self.loop.call_later(idle_s, self._check)

    async def receive(self, ws: WebSocket) -> Message:
        self.waiting_since = self.loop.time()
        try:
            return await ws.receive()
        except asyncio.CancelledError:
            if self.expired and self.task is not None:
                # Ours is taken back (the caller answers it as idle_timeout) unless another
                # canceller's (a shutdown) came too: then it is not an idle close.
                self.expired = self.task.uncancel() <= self.before
            raise
        finally:
            self.waiting_since = None

    def _check(self) -> None:
        since, now = self.waiting_since, self.loop.time()
        if since is not None and now - since >= self.idle_s and self.task is not None:
            self.expired = True
            self.task.cancel()
            return
        self.timer = self.loop.call_at((now if since is None else since) + self.idle_s, self._check)

    def close(self) -> None:
        self.timer.cancel()


def utf8_length_over(raw: str | bytes, limit: int) -> bool:
    """Whether the message is over ``limit`` bytes: a text frame's characters take 1-4 bytes in
    UTF-8, so only one that could be over is encoded to count them."""
    if isinstance(raw, bytes) or len(raw) > limit:
        return len(raw) > limit
    return len(raw) * 4 > limit and len(raw.encode()) > limit


def parse_message(raw: str | bytes, session_id: str) -> Step:
    """One message as the Step it stands for, or the error the HTTP route would answer."""
    try:
        message = StreamMessage.model_validate_json(raw)
    except ValidationError as e:
        errors: list[dict[str, Any]] = [dict(err) for err in e.errors(include_url=False)]
        status, body = validation_error_body(errors)
        raise MessageRefused(status, body) from None
    return Step.model_construct(
        session_id=session_id,
        inputs=message.inputs,
        seq=message.seq,
        return_gates=message.return_gates,
    )


class MessageRefused(Exception):
    """A message that fails the schema: the status and body the HTTP route would answer."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(body["error"]["message"])
        self.status, self.body = status, body


def error_text(status: int, body: dict[str, Any]) -> str:
    return orjson.dumps({**body, "status": status}).decode()
