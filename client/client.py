"""``LSTMClient`` (sync) and ``AsyncLSTMClient``: the service's API with its guarantees kept.

Every step carries ``seq`` (the session's ``t`` as the client knows it), so a step whose answer
was lost can be sent again: the server either applies it once or answers the same response again.
The client therefore retries steps (and every other call) on connection errors, 502, 503 and
``409 stale_session`` (a replica that kept losing a race for the session). Sessions are created
under a client-chosen id (a random one unless you give one), so a create whose answer was lost is
retried safely too: ``session_exists`` after a retry means the first attempt made it.
Each request of a session carries ``X-Session-Id``, which the session-aware proxy routes on.

    with LSTMClient("http://127.0.0.1:3000") as api, api.session() as s:
        for out in s.stream([[[0.1], [0.5]], [[1.7]]]):
            print(out["mean"], out["anomaly_z"])

Both clients are transports over ``client._core``, which holds every rule (requests, retries,
answers, ``t``); this module only sends, sleeps and awaits.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Any, TypeVar

import httpx

from client import _core as core
from client._core import (
    RETRY_STATUSES,
    APIError,
    ClientBase,
    Op,
    Outcome,
    Rows,
    SessionState,
    already_gone,
    made_by_an_earlier_attempt,
)

__all__ = ["RETRY_STATUSES", "APIError", "AsyncLSTMClient", "AsyncSession", "LSTMClient", "Session"]

T = TypeVar("T")


class LSTMClient(ClientBase[httpx.Client]):
    http_class = httpx.Client

    def _send(self, op: Op[Any]) -> Outcome:
        try:
            return self.http.post(op.route, json=op.body, headers=op.headers)
        except httpx.TransportError as error:
            return error

    def _run(self, op: Op[T]) -> T:
        attempts = self.attempts(op)
        while True:
            outcome = self._send(op)
            wait = attempts.wait_before_next(outcome)
            if wait is None:
                return attempts.result(outcome)
            time.sleep(wait)

    def call(
        self, route: str, body: dict[str, Any], session_id: str | None = None
    ) -> dict[str, Any]:
        return self._run(core.raw(route, body, session_id))

    def session(
        self, session_id: str | None = None, *, ttl_s: float | None = None, keep: bool = False
    ) -> Session:
        """A new session; as a context manager it is deleted on exit unless ``keep``."""
        session_id = session_id or uuid.uuid4().hex
        try:
            info = self._run(core.create(session_id, ttl_s))
        except APIError as e:
            if made_by_an_earlier_attempt(e):
                return Session(self, session_id, self.attach(session_id).t, keep)
            raise
        return Session(self, info["session_id"], info["t"], keep)

    def attach(self, session_id: str) -> Session:
        """An existing session (after a client restart, or to resync ``t``); kept on exit."""
        return Session(self, session_id, self._run(core.get(session_id))["t"], keep=True)

    def predict(self, inputs: Rows, *, return_gates: bool = False) -> dict[str, Any]:
        return self._run(core.predict(inputs, return_gates))

    def model(self) -> dict[str, Any]:
        return self._run(core.model())

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> LSTMClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Session(SessionState):
    def __init__(self, client: LSTMClient, session_id: str, t: int, keep: bool) -> None:
        super().__init__(session_id, t, keep)
        self.client = client

    def step(self, inputs: Rows, *, return_gates: bool = False) -> dict[str, Any]:
        """Apply one chunk (T x F); safe to retry: it carries seq = t."""
        return self.client._run(self.step_op(inputs, return_gates))

    def stream(self, chunks: Iterable[Rows]) -> Iterator[dict[str, Any]]:
        """Chunks in, one output per timestep out (mean, std, anomaly_z)."""
        for chunk in chunks:
            yield from self.step(chunk)["outputs"]

    def forecast(
        self, horizon: int = 1, *, paths: int | None = None, seed: int | None = None
    ) -> dict[str, Any]:
        """``horizon`` future steps, each with mean, std, p10/p50/p90 from ``paths`` sampled
        futures (the server's default unless given), reproducible per ``seed``."""
        return self.client._run(self.forecast_op(horizon, paths, seed))

    def info(self) -> dict[str, Any]:
        """The server's view of the session; also resyncs ``t`` (after a ``seq_conflict``)."""
        return self.client._run(self.info_op())

    def reset(self) -> None:
        self.client._run(self.reset_op())

    def delete(self) -> None:
        self.client._run(self.delete_op())

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.keep:
            return
        try:
            self.delete()
        except APIError as e:
            if not already_gone(e):
                raise


class AsyncLSTMClient(ClientBase[httpx.AsyncClient]):
    http_class = httpx.AsyncClient

    async def _send(self, op: Op[Any]) -> Outcome:
        try:
            return await self.http.post(op.route, json=op.body, headers=op.headers)
        except httpx.TransportError as error:
            return error

    async def _run(self, op: Op[T]) -> T:
        attempts = self.attempts(op)
        while True:
            outcome = await self._send(op)
            wait = attempts.wait_before_next(outcome)
            if wait is None:
                return attempts.result(outcome)
            await asyncio.sleep(wait)

    async def call(
        self, route: str, body: dict[str, Any], session_id: str | None = None
    ) -> dict[str, Any]:
        return await self._run(core.raw(route, body, session_id))

    async def session(
        self, session_id: str | None = None, *, ttl_s: float | None = None, keep: bool = False
    ) -> AsyncSession:
        """A new session; ``async with await api.session() as s`` deletes it on exit."""
        session_id = session_id or uuid.uuid4().hex
        try:
            info = await self._run(core.create(session_id, ttl_s))
        except APIError as e:
            if made_by_an_earlier_attempt(e):
                return AsyncSession(self, session_id, (await self.attach(session_id)).t, keep)
            raise
        return AsyncSession(self, info["session_id"], info["t"], keep)

    async def attach(self, session_id: str) -> AsyncSession:
        info = await self._run(core.get(session_id))
        return AsyncSession(self, session_id, info["t"], keep=True)

    async def predict(self, inputs: Rows, *, return_gates: bool = False) -> dict[str, Any]:
        return await self._run(core.predict(inputs, return_gates))

    async def model(self) -> dict[str, Any]:
        return await self._run(core.model())

    async def aclose(self) -> None:
        await self.http.aclose()

    async def __aenter__(self) -> AsyncLSTMClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class AsyncSession(SessionState):
    def __init__(self, client: AsyncLSTMClient, session_id: str, t: int, keep: bool) -> None:
        super().__init__(session_id, t, keep)
        self.client = client

    async def step(self, inputs: Rows, *, return_gates: bool = False) -> dict[str, Any]:
        return await self.client._run(self.step_op(inputs, return_gates))

    async def stream(self, chunks: Iterable[Rows]) -> AsyncIterator[dict[str, Any]]:
        for chunk in chunks:
            for out in (await self.step(chunk))["outputs"]:
                yield out

    async def forecast(
        self, horizon: int = 1, *, paths: int | None = None, seed: int | None = None
    ) -> dict[str, Any]:
        return await self.client._run(self.forecast_op(horizon, paths, seed))

    async def info(self) -> dict[str, Any]:
        return await self.client._run(self.info_op())

    async def reset(self) -> None:
        await self.client._run(self.reset_op())

    async def delete(self) -> None:
        await self.client._run(self.delete_op())

    async def __aenter__(self) -> AsyncSession:
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.keep:
            return
        try:
            await self.delete()
        except APIError as e:
            if not already_gone(e):
                raise
