"""The worker's TCP connections: a deadline and a size limit for each request's headers, a cap on
open connections below the file-descriptor limit, and that limit raised as far as allowed.

uvicorn, as BentoML 1.4 starts it (httptools, one worker), arms no timer on a new connection: one
that sends nothing, or half a request line, stays open for ever, and 20,000 of them took every
descriptor of the worker, so that ``accept()`` failed for everyone else. uvicorn's only cap
(``limit_concurrency``) answers 503 once a request's headers arrive, which a silent connection
never sends. BentoML builds uvicorn's ``Config`` itself and passes neither on, so ``install``
points uvicorn's ``auto`` HTTP protocol at ``GuardedHttpToolsProtocol`` (the worker imports the
service before it builds the Config).

The rules, per connection:
- from its accept, or from the first byte of a later request on it, its headers must be complete
  within ``header_timeout_s`` and ``max_header_bytes``, or it is closed (408 ``header_timeout``
  or 431 ``headers_too_large`` when it had sent part of a request, a bare close when nothing);
- idle between requests, it is closed after ``keep_alive_s`` (uvicorn's own keep-alive timer);
- at ``max_connections`` open (HTTP and WebSocket together), a new connection closes the oldest
  one that is only waiting for headers (silent, slow, or idle between requests): those serve
  nobody. Only when every open connection has a request or a stream in progress is the new one
  refused: ``503 too_many_connections``, then closed once the client has read it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
from asyncio import TimerHandle
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, ClassVar

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.protocols.websockets.auto import AutoWebSocketsProtocol

from service import metrics
from service.errors import HeadersTooLarge, HeaderTimeout, ServiceError, TooManyConnections

log = logging.getLogger("lstm_sessions")

# Descriptors kept out of the connection cap: model and metric files, Redis, the lingering
# refusals below, whatever a library opens.
FD_HEADROOM_MIN = 256
LINGER_S = 2.0  # a refused connection stays open this long at most, so the client reads the 503
SUMMARY_EVERY_S = 10.0  # dropped connections are logged as one line per this interval, not each


@dataclass(frozen=True)
class ConnectionLimits:
    max_connections: int  # open HTTP + WebSocket connections of the worker
    header_timeout_s: float
    max_header_bytes: int
    keep_alive_s: float
    lingering: int  # refused connections kept open at once to deliver their 503; more are reset


def raise_fd_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit; return the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):  # a container may forbid it: keep the soft limit
            pass
    return soft


def fd_headroom(fds: int) -> int:
    """Descriptors kept out of the connection cap, of ``fds``."""
    return max(FD_HEADROOM_MIN, fds // 10)


def connection_cap(max_connections: int, fds: int) -> int:
    """``max_connections``, lowered so that the connections and the headroom fit in ``fds``."""
    return min(max_connections, max(fds - fd_headroom(fds), 1))


def fit_to_fd_limit(
    max_connections: int, header_timeout_s: float, max_header_bytes: int, keep_alive_s: float
) -> ConnectionLimits:
    """The limits, with the connection cap lowered where the descriptor limit would not hold it."""
    fds = raise_fd_limit()
    cap = connection_cap(max_connections, fds)
    if cap < max_connections:
        log.warning(
            "LSTM_MAX_CONNECTIONS=%d does not fit the worker's %d file descriptors: capping "
            "connections at %d (raise the hard `ulimit -n` to allow more)",
            max_connections,
            fds,
            cap,
        )
    return ConnectionLimits(
        max_connections=cap,
        header_timeout_s=header_timeout_s,
        max_header_bytes=max_header_bytes,
        keep_alive_s=keep_alive_s,
        lingering=max(1, fd_headroom(fds) // 2),
    )


def install(limits: ConnectionLimits, front: Callable[[Any], Any] | None = None) -> None:
    """Make uvicorn's default HTTP protocol the guarded one, with ``limits``; ``front(app)``: the
    ASGI app that its requests go to, in front of uvicorn's (BentoML's) ``app``."""
    from uvicorn import config

    GuardedHttpToolsProtocol.limits = limits
    GuardedHttpToolsProtocol.front = front
    config.HTTP_PROTOCOLS["auto"] = f"{__name__}:GuardedHttpToolsProtocol"
    config.HTTP_PROTOCOLS["httptools"] = f"{__name__}:GuardedHttpToolsProtocol"
    if front is not None and _WEBSOCKETS is not None:
        config.WS_PROTOCOLS["auto"] = f"{__name__}:FrontedWebSockets"


def fronted(app: Any) -> Any:
    """``front(app)``, made once for uvicorn's ``app`` and shared by every connection, HTTP or
    WebSocket; ``app`` itself when no front was installed."""
    front, made = GuardedHttpToolsProtocol.front, GuardedHttpToolsProtocol._fronted
    if front is None:
        return app
    if made is None or made[0] is not app:
        made = GuardedHttpToolsProtocol._fronted = (app, front(app))
    return made[1]


_WEBSOCKETS: Any = AutoWebSocketsProtocol  # uvicorn's default; None without a WebSocket library


class FrontedWebSockets(_WEBSOCKETS or object):  # type: ignore[misc]
    """uvicorn's default WebSocket protocol, its connections sent to the front: an upgraded
    connection is served by a new protocol object, which takes uvicorn's app, not the HTTP
    protocol's."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.app = fronted(self.app)  # type: ignore[has-type]  # uvicorn's, set by its __init__


def _answer(error: ServiceError, extra: bytes = b"") -> bytes:
    """A complete HTTP/1.1 response carrying ``error``'s body, closing the connection."""
    body = json.dumps(error.body()).encode()
    head = (
        f"HTTP/1.1 {error.status} {HTTPStatus(error.status).phrase}\r\n"
        "content-type: application/json\r\n"
        f"content-length: {len(body)}\r\n"
        "connection: close\r\n"
    ).encode()
    return head + extra + b"\r\n" + body


class _Watch:
    """What all connections of the worker share: those waiting for headers, oldest first (the
    ones to close when the cap is reached), the drop tallies, the open-connections gauge."""

    def __init__(self) -> None:
        self.waiting: dict[GuardedHttpToolsProtocol, None] = {}  # insertion order: oldest first
        self.lingering = 0
        self.dropped: Counter[str] = Counter()  # since the last summary line
        self.connections: set[Any] | None = None

    def start(self, connections: set[Any], loop: asyncio.AbstractEventLoop) -> None:
        if self.connections is None:
            self.connections = connections
            loop.call_later(1.0, self._tick, loop, 0.0)

    def drop(self, reason: str) -> None:
        self.dropped[reason] += 1
        metrics.CONNECTIONS_DROPPED.labels(reason).inc()

    def _tick(self, loop: asyncio.AbstractEventLoop, since_summary: float) -> None:
        # One sample a second: a gauge write per connection would cost more under a flood.
        metrics.CONNECTIONS_OPEN.set(len(self.connections or ()))
        since_summary += 1.0
        if since_summary >= SUMMARY_EVERY_S and self.dropped:
            limits = GuardedHttpToolsProtocol.limits
            log.warning(
                "connections dropped in the last %.0f s: %s (LSTM_MAX_CONNECTIONS=%s, "
                "LSTM_HEADER_TIMEOUT_S=%s, LSTM_MAX_HEADER_BYTES=%s)",
                since_summary,
                ", ".join(f"{n} {why}" for why, n in sorted(self.dropped.items())),
                limits and limits.max_connections,
                limits and limits.header_timeout_s,
                limits and limits.max_header_bytes,
            )
            self.dropped.clear()
            since_summary = 0.0
        loop.call_later(1.0, self._tick, loop, since_summary)


WATCH = _Watch()


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a header deadline and size limit, and the connection cap
    (see the module's docstring)."""

    limits: ClassVar[ConnectionLimits | None] = None
    front: ClassVar[Callable[[Any], Any] | None] = None
    _fronted: ClassVar[tuple[Any, Any] | None] = None  # (uvicorn's app, the app in front of it)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.app = fronted(self.app)
        limits = self.limits
        assert limits is not None, "service.connections.install() was not called"
        self.guard = limits
        self.timeout_keep_alive = limits.keep_alive_s  # type: ignore[assignment]
        self._header_timer: TimerHandle | None = None
        self._header_bytes = 0  # received since this request began, while its headers are not in
        self._awaiting_headers = True
        # The request's body is still arriving (its headers are in, its message is not): an
        # answer sent early (a 413, say) must not make the rest of that body count as headers.
        self._body_pending = False
        self._refused: TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        WATCH.start(self.connections, self.loop)
        if len(self.connections) > self.guard.max_connections and not self._make_room():
            self._refuse()
            return
        WATCH.waiting[self] = None
        self._arm_header_timer()

    def _make_room(self) -> bool:
        """Close the oldest connection that is only waiting for headers; False if none is."""
        while WATCH.waiting:
            oldest = next(iter(WATCH.waiting))
            del WATCH.waiting[oldest]
            if not oldest.transport.is_closing():
                WATCH.drop("evicted")
                oldest.transport.close()
                return True
        return False

    def _refuse(self) -> None:
        self.connections.discard(self)  # it serves nothing: the cap counts the others
        WATCH.drop("refused")
        if WATCH.lingering >= self.guard.lingering:  # a flood of refusals: no descriptors to spare
            self.transport.abort()
            return
        WATCH.lingering += 1
        refusal = TooManyConnections(
            f"the server holds its limit of {self.guard.max_connections} connections "
            f"(LSTM_MAX_CONNECTIONS); retry shortly",
            limit=self.guard.max_connections,
        )
        self.transport.write(_answer(refusal, b"retry-after: 1\r\n"))
        # Closing at once, with the client's request unread, would send a reset that can
        # destroy the 503 before the client reads it: half-close, read what comes, then close.
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self._refused = self.loop.call_later(LINGER_S, self.transport.abort)

    def _arm_header_timer(self) -> None:
        self._header_timer = self.loop.call_later(self.guard.header_timeout_s, self._too_slow)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _too_slow(self) -> None:
        self._header_timer = None
        WATCH.waiting.pop(self, None)
        if self.transport.is_closing():
            return
        WATCH.drop("header_timeout")
        if self._header_bytes:
            late = HeaderTimeout(
                f"the request's headers did not arrive within {self.guard.header_timeout_s:g} s "
                f"(LSTM_HEADER_TIMEOUT_S)",
                limit=self.guard.header_timeout_s,
            )
            self.transport.write(_answer(late))
        self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self._refused is not None:
            return  # the 503 is on its way; what the client sends is read and dropped
        if self._awaiting_headers:
            self._header_bytes += len(data)
        super().data_received(data)
        if (
            self._awaiting_headers
            and self._header_bytes > self.guard.max_header_bytes
            and not self.transport.is_closing()
        ):
            self._disarm_header_timer()
            WATCH.waiting.pop(self, None)
            WATCH.drop("headers_too_large")
            large = HeadersTooLarge(
                f"the request's line and headers are over {self.guard.max_header_bytes} bytes "
                f"(LSTM_MAX_HEADER_BYTES)",
                limit=self.guard.max_header_bytes,
            )
            self.transport.write(_answer(large))
            self.transport.close()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._awaiting_headers = True
        if self._header_timer is None:  # a later request on a kept-alive connection
            self._arm_header_timer()

    def on_headers_complete(self) -> None:
        self._disarm_header_timer()
        self._awaiting_headers = False
        self._body_pending = True
        self._header_bytes = 0
        WATCH.waiting.pop(self, None)
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._body_pending = False
        super().on_message_complete()
        if self.cycle is not None and self.cycle.response_complete:
            self._disarm_header_timer()  # answered before its body was all in: idle only now
            self._idle()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self._body_pending:
            self._idle()
        elif not self.transport.is_closing():
            # Answered (a 413, a timeout) while the body is still coming: uvicorn reads and drops
            # the rest, and each chunk cancels its keep-alive timer. Bound it as a connection
            # waiting for headers is bounded, and let the cap close it first.
            WATCH.waiting[self] = None
            if self._header_timer is None:
                self._arm_header_timer()

    def _idle(self) -> None:
        if not self.transport.is_closing() and not self.pipeline:
            # Idle until its next request: a connection to close first when the cap is reached.
            self._awaiting_headers = True
            WATCH.waiting[self] = None

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        WATCH.waiting.pop(self, None)
        if self._refused is not None:
            self._refused.cancel()
            WATCH.lingering -= 1
        super().connection_lost(exc)
