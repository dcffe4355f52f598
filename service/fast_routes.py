"""The hot routes, ``POST /v1/sessions/step``, ``/v1/sessions/step_many`` and ``/v1/predict``,
answered by a raw ASGI app in front of BentoML's request stack (installed by
``service.connections`` as the app uvicorn calls); every other request goes on to BentoML
unchanged.

Why: py-spy on the worker under 64 clients put two thirds of its samples in BentoML's layers
around the handler (metrics, OpenTelemetry, the deadline, our contract's send wrappers, Starlette's
routing and exception middleware, the IO descriptors), against a batched step of tens of
microseconds per session. This path does what those layers did for these two routes, and only that:

- the edge of ``service.http.ErrorContract``: 415 for a body that is not JSON, 413 past
  ``LSTM_MAX_BODY_BYTES`` (by Content-Length, or while reading), schema failures as
  ``validation_error_body`` of the same pydantic errors BentoML's route gives (the same models,
  ``model_validate_json``, as BentoML's JSON serde calls), a ServiceError as its own body, one log
  line per refusal (``log_refusal``), refused steps counted (``refused_at_edge``);
- ``RequestDeadline``: 504 ``request_timeout`` past the service's traffic timeout (``Deadlines``:
  one timer for all requests, up to a quarter of the timeout or 0.5 s late);
- BentoML's request metrics: the same ``bentoml_service_request_*`` series (endpoint, status)
  that the alerts and the dashboard read, written to BentoML's own metric objects, found in its
  middleware stack, so nothing downstream changes.

The WebSocket route ``/v1/stream`` is served here too (``streams``: path -> endpoint), its
connection handed straight to the endpoint as Starlette's ``WebSocket``. Below this, BentoML's
traffic middleware wrapped every message's receive and send with two size summaries (a quarter
of the stream's server time in py-spy at 64 connections); the stream's own gauge
(``lstm_streams_open``) and step counts (``lstm_step_requests_total``) stay, BentoML's
``bentoml_service_websocket_*`` series are not written for it.

Not done here: an OpenTelemetry span per request (it cost more than the step; the step is still
counted by ``lstm_step_requests_total`` and timed by the histograms above).
``LSTM_FAST_ROUTES=false`` sends these routes through BentoML's stack again, the slower path the
tests compare this one with.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, cast

import orjson
from pydantic import BaseModel, ValidationError
from starlette.websockets import WebSocket

from service.errors import (
    BodyTooLarge,
    RequestTimeout,
    ServiceError,
    UnsupportedMediaType,
    validation_error_body,
)
from service.http import Message, Scope, log_refusal

ASGIApp = Callable[[Scope, Any, Any], Awaitable[None]]
Handler = Callable[[Any], Awaitable[Any]]  # a validated body -> JSON-ready reply
Stream = Callable[[WebSocket], Awaitable[None]]  # serves one WebSocket connection to its end

log = logging.getLogger("lstm_sessions.http")

JSON_TYPE = (b"content-type", b"application/json")


class Deadlines:
    """The requests' deadline: a request still running ``timeout_s`` after it began has its task
    cancelled (``expired`` then says so), by one timer for all of them that fires every ``tick``,
    so the cancel comes up to a tick late. A timeout per request (its own timer, armed and
    cancelled) cost 4-5 us, as much as parsing the step. One event loop at a time: a new loop
    (a test's next ``asyncio.run``) starts afresh."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.tick = min(0.5, timeout_s / 4)
        # task -> (loop time begun, its cancel requests then); oldest first
        self.running: dict[asyncio.Task[Any], tuple[float, int]] = {}
        self.cancelled: dict[asyncio.Task[Any], int] = {}  # ours, with that count
        self.timer: asyncio.TimerHandle | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    def begin(self) -> asyncio.Task[Any]:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        if loop is not self.loop:  # the timer, if any, belonged to a loop that is gone
            self.loop, self.timer = loop, None
            self.running.clear()
            self.cancelled.clear()
        self.running[task] = (loop.time(), task.cancelling())
        if self.timer is None:
            self.timer = loop.call_later(self.tick, self._expire, loop)
        return task

    def end(self, task: asyncio.Task[Any]) -> None:
        self.running.pop(task, None)
        self.cancelled.pop(task, None)

    def expired(self, task: asyncio.Task[Any]) -> bool:
        """Whether ``task``'s cancel was its deadline's alone. Ours is taken back, so the
        request can still answer its 504; another canceller's (a shutdown) still stands."""
        before = self.cancelled.pop(task, None)
        if before is None:
            return False
        return task.uncancel() <= before

    def _expire(self, loop: asyncio.AbstractEventLoop) -> None:
        self.timer = None
        late = loop.time() - self.timeout_s
        for task, (begun, before) in list(self.running.items()):
            if begun > late:
                break  # the rest began later still
            del self.running[task]
            self.cancelled[task] = before
            task.cancel()
        if self.running:
            self.timer = loop.call_later(self.tick, self._expire, loop)


class RequestMetrics:
    """BentoML's ``bentoml_service_request_*`` series for one endpoint, written to the metric
    objects of BentoML's own ``RunnerTrafficMetricsMiddleware``, children cached per status
    (``labels()`` was a tenth of a request's cost). Each request's duration is observed when it
    is answered; the in-progress gauge, the last request's time and the counts are written once
    per pass of the event loop (a multiprocess metric's write cost ~1 us, and a pass answers a
    whole batch)."""

    def __init__(self, middleware: Any, endpoint: str) -> None:
        from bentoml._internal.context import server_context

        self.middleware = middleware
        self.names = {
            "endpoint": endpoint,
            "service_name": server_context.bento_name,
            "service_version": server_context.bento_version,
            "runner_name": server_context.service_name,
        }
        m = middleware
        service = {k: v for k, v in self.names.items() if k != "endpoint"}
        self.in_progress = m.metrics_request_in_progress.labels(**self.names)
        self.last_request = m.metrics_last_request_timestamp.labels(**service)
        self.by_status: dict[int, tuple[Any, Any]] = {}
        self.began = 0  # since the last write: requests begun, answered per status
        self.counts: dict[int, int] = {}
        self.armed = False
        self.loop: asyncio.AbstractEventLoop | None = None

    def begin(self) -> None:
        self.began += 1
        self._arm()

    def answered(self, status: int, seconds: float) -> None:
        children = self.by_status.get(status)
        if children is None:
            labels = {**self.names, "http_response_code": status}
            children = (
                self.middleware.metrics_request_total.labels(**labels),
                self.middleware.metrics_request_duration.labels(**labels),
            )
            self.by_status[status] = children
        children[1].observe(seconds)
        self.counts[status] = self.counts.get(status, 0) + 1
        self._arm()

    def _arm(self) -> None:
        loop = asyncio.get_running_loop()
        if not self.armed or loop is not self.loop:  # armed on a loop that is gone: again
            self.armed, self.loop = True, loop
            loop.call_soon(self.write)

    def write(self) -> None:
        self.armed = False
        answered = sum(self.counts.values())
        if self.began:
            self.last_request.set(time.time())
        if self.began != answered:
            self.in_progress.inc(self.began - answered)
        for status, n in self.counts.items():
            self.by_status[status][0].inc(n)
        self.began, self.counts = 0, {}


def find_metrics_middleware(app: Any, depth: int = 32) -> Any | None:
    """BentoML's request-metrics middleware, once set up, in the ASGI stack below ``app``."""
    from bentoml._internal.server.http.instruments import RunnerTrafficMetricsMiddleware

    for _ in range(depth):
        if app is None:
            return None
        if isinstance(app, RunnerTrafficMetricsMiddleware):
            return app if getattr(app, "_is_setup", False) else None
        app = getattr(app, "middleware_stack", None) or getattr(app, "app", None)
    return None


class _TooLarge(Exception):
    pass


class FastRoutes:
    """The ASGI app uvicorn calls: ``routes`` (path -> (body model, handler)) answered here, the
    WebSockets of ``streams`` (path -> endpoint) served here, everything else passed to ``app``
    (BentoML's)."""

    def __init__(
        self,
        app: ASGIApp,
        routes: dict[str, tuple[type[BaseModel], Handler]],
        *,
        max_body_bytes: int,
        timeout_s: float,
        refused_at_edge: Callable[[str, str], None] = lambda path, code: None,
        streams: dict[str, Stream] | None = None,
    ) -> None:
        self.app = app
        self.routes = routes
        self.streams = streams or {}
        self.max_body_bytes = max_body_bytes
        self.timeout_s = timeout_s
        self.refused_at_edge = refused_at_edge
        self.metrics: dict[str, RequestMetrics] = {}
        self.deadlines = Deadlines(timeout_s)

    def _metrics(self, path: str) -> RequestMetrics | None:
        found = self.metrics.get(path)
        if found is None:
            middleware = find_metrics_middleware(self.app)
            if middleware is None:
                return None
            found = self.metrics[path] = RequestMetrics(middleware, path)
        return found

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "websocket":
            stream = self.streams.get(scope["path"])
            if stream is None:
                await self.app(scope, receive, send)
            else:
                await stream(WebSocket(scope, receive, send))
            return
        route = self.routes.get(scope["path"]) if scope["type"] == "http" else None
        if route is None or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        metrics = self._metrics(scope["path"])
        if metrics is None:
            # BentoML's stack has not served a request yet (its metrics are made on the first):
            # it serves this one, with the same answer, slower.
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        metrics.begin()
        status = 500
        try:
            status = await self._serve(scope, receive, send, *route)
        finally:
            metrics.answered(status, time.perf_counter() - started)

    async def _serve(
        self, scope: Scope, receive: Any, send: Any, model: type[BaseModel], handler: Handler
    ) -> int:
        """Answer the request; its status."""
        path = scope["path"]
        content_length = -1
        declared: bool | None = None  # a body of no declared type is refused too (see _is_json)
        chunked = False
        for name, value in scope["headers"]:
            if name == b"content-type":
                declared = value.split(b";", 1)[0].strip().lower() == b"application/json"
            elif name == b"content-length" and value.isdigit():
                content_length = int(value)
            elif name == b"transfer-encoding":
                chunked = True
        if declared is False or (declared is None and (content_length > 0 or chunked)):
            refused = UnsupportedMediaType("send the body as application/json")
            return await self._refuse(scope, send, refused.status, refused.body())
        limit = self.max_body_bytes
        if content_length > limit:
            return await self._too_large(scope, send)
        task = self.deadlines.begin()
        try:
            try:
                raw = await self._body(receive, limit)
            except _TooLarge:
                return await self._too_large(scope, send)
            try:
                body = model.model_validate_json(raw or b"{}")
            except ValidationError as e:
                errors = e.errors(include_context=False, include_input=False)
                invalid = validation_error_body(cast(list[dict[str, Any]], errors))
                return await self._refuse(scope, send, *invalid)
            try:
                reply = await handler(body)
            except ServiceError as e:
                log_refusal(scope, e.status, e.code)
                return await _answer(send, e.status, orjson.dumps(e.body()))
        except ConnectionError:  # nobody to answer
            return 499
        except asyncio.CancelledError:
            if not self.deadlines.expired(task):
                raise
            late = RequestTimeout(
                f"the request took longer than {self.timeout_s:g} s", limit=self.timeout_s
            )
            log_refusal(scope, late.status, late.code)
            return await _answer(send, late.status, orjson.dumps(late.body()))
        except Exception:
            log.exception("failed %s %s", scope["method"], path)
            log_refusal(scope, 500, "internal_error")
            body500 = {"error": {"code": "internal_error", "message": "internal server error"}}
            return await _answer(send, 500, orjson.dumps(body500))
        finally:
            self.deadlines.end(task)
        return await _answer(send, 200, orjson.dumps(reply))

    @staticmethod
    async def _body(receive: Any, limit: int) -> bytes:
        message: Message = await receive()
        body: bytes = message.get("body", b"")
        if not message.get("more_body"):
            if len(body) > limit:
                raise _TooLarge
            return body
        chunks = [body]
        received = len(body)
        while message.get("more_body"):
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                raise ConnectionError("the client disconnected before its body was in")
            chunk = message.get("body", b"")
            received += len(chunk)
            if received > limit:
                raise _TooLarge
            chunks.append(chunk)
        return b"".join(chunks)

    async def _too_large(self, scope: Scope, send: Any) -> int:
        limit = self.max_body_bytes
        refused = BodyTooLarge(f"the request body is over the limit of {limit} bytes", limit=limit)
        return await self._refuse(scope, send, refused.status, refused.body())

    async def _refuse(self, scope: Scope, send: Any, status: int, body: dict[str, Any]) -> int:
        """A request refused before its handler ran: counted, logged as one line, answered."""
        code = str(body["error"]["code"])
        self.refused_at_edge(scope["path"], code)
        log_refusal(scope, status, code)
        return await _answer(send, status, orjson.dumps(body))


async def _answer(send: Any, status: int, data: bytes) -> int:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [JSON_TYPE, (b"content-length", str(len(data)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": data, "more_body": False})
    return status
