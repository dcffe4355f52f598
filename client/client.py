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
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from typing import Any

import httpx

Rows = Sequence[Sequence[float]]
RETRY_STATUSES = {502, 503}


class APIError(Exception):
    """An error answer of the service: its status, stable code, message and details."""

    def __init__(self, status: int, body: Any) -> None:
        error = body.get("error", {}) if isinstance(body, dict) else {}
        if not isinstance(error, dict):
            error = {"message": str(error)}
        self.status = status
        self.code = str(error.get("code", "unknown"))
        self.message = str(error.get("message", body))
        self.details = {k: v for k, v in error.items() if k not in ("code", "message")}
        self.attempts = 1  # how many times the request was sent
        super().__init__(f"{status} {self.code}: {self.message}")


def _retryable(response: httpx.Response) -> bool:
    if response.status_code in RETRY_STATUSES:
        return True
    if response.status_code != 409:
        return False
    try:
        return bool(response.json()["error"]["code"] == "stale_session")
    except (ValueError, KeyError, TypeError):
        return False


def _answer(response: httpx.Response, attempts: int) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        body = {"error": {"code": "not_json", "message": response.text[:200]}}
    if response.status_code >= 400:
        error = APIError(response.status_code, body)
        error.attempts = attempts
        raise error
    return dict(body)


def _rows(inputs: Rows) -> list[list[float]]:
    return [list(r) for r in inputs]


def _create_body(session_id: str, ttl_s: float | None) -> dict[str, Any]:
    return {"session_id": session_id, **({"ttl_s": ttl_s} if ttl_s is not None else {})}


class LSTMClient:
    def __init__(
        self,
        base_url: str = "http://127.0.0.1:3000",
        *,
        timeout_s: float = 30.0,
        retries: int = 3,
        backoff_s: float = 0.2,
        http: httpx.Client | None = None,
    ) -> None:
        self.http = http or httpx.Client(base_url=base_url, timeout=timeout_s)
        self.retries = retries
        self.backoff_s = backoff_s

    def call(
        self, route: str, body: dict[str, Any], session_id: str | None = None
    ) -> dict[str, Any]:
        headers = {"X-Session-Id": session_id} if session_id else {}
        for attempt in range(1, self.retries + 2):
            try:
                response = self.http.post(route, json=body, headers=headers)
            except httpx.TransportError:
                if attempt > self.retries:
                    raise
            else:
                if attempt > self.retries or not _retryable(response):
                    return _answer(response, attempt)
            time.sleep(self.backoff_s * 2 ** (attempt - 1))
        raise AssertionError("unreachable")

    def session(
        self, session_id: str | None = None, *, ttl_s: float | None = None, keep: bool = False
    ) -> Session:
        """A new session; as a context manager it is deleted on exit unless ``keep``."""
        session_id = session_id or uuid.uuid4().hex
        try:
            info = self.call("/v1/sessions/create", _create_body(session_id, ttl_s), session_id)
        except APIError as e:
            if e.code == "session_exists" and e.attempts > 1:  # our first attempt made it
                return Session(self, session_id, self.attach(session_id).t, keep)
            raise
        return Session(self, info["session_id"], info["t"], keep)

    def attach(self, session_id: str) -> Session:
        """An existing session (after a client restart, or to resync ``t``); kept on exit."""
        info = self.call("/v1/sessions/get", {"session_id": session_id}, session_id)
        return Session(self, session_id, info["t"], keep=True)

    def predict(self, inputs: Rows, *, return_gates: bool = False) -> dict[str, Any]:
        return self.call("/v1/predict", {"inputs": _rows(inputs), "return_gates": return_gates})

    def model(self) -> dict[str, Any]:
        return self.call("/v1/model", {})

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> LSTMClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Session:
    def __init__(self, client: LSTMClient, session_id: str, t: int, keep: bool) -> None:
        self.client = client
        self.id = session_id
        self.t = t  # timesteps the server has applied, as far as this client knows
        self.keep = keep

    def _call(self, route: str, body: dict[str, Any]) -> dict[str, Any]:
        return self.client.call(route, {"session_id": self.id, **body}, self.id)

    def step(self, inputs: Rows, *, return_gates: bool = False) -> dict[str, Any]:
        """Apply one chunk (T x F); safe to retry: it carries seq = t."""
        reply = self._call(
            "/v1/sessions/step",
            {"inputs": _rows(inputs), "seq": self.t, "return_gates": return_gates},
        )
        self.t = int(reply["t"])
        return reply

    def stream(self, chunks: Iterable[Rows]) -> Iterator[dict[str, Any]]:
        """Chunks in, one output per timestep out (mean, std, anomaly_z)."""
        for chunk in chunks:
            yield from self.step(chunk)["outputs"]

    def forecast(self, horizon: int = 1) -> dict[str, Any]:
        return self._call("/v1/sessions/forecast", {"horizon": horizon})

    def info(self) -> dict[str, Any]:
        """The server's view of the session; also resyncs ``t`` (after a ``seq_conflict``)."""
        reply = self._call("/v1/sessions/get", {})
        self.t = int(reply["t"])
        return reply

    def reset(self) -> None:
        self.t = int(self._call("/v1/sessions/reset", {})["t"])

    def delete(self) -> None:
        self._call("/v1/sessions/delete", {})

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.keep:
            try:
                self.delete()
            except APIError as e:
                if e.status != 404:
                    raise


class AsyncLSTMClient:
    def __init__(
        self,
        base_url: str = "http://127.0.0.1:3000",
        *,
        timeout_s: float = 30.0,
        retries: int = 3,
        backoff_s: float = 0.2,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        self.http = http or httpx.AsyncClient(base_url=base_url, timeout=timeout_s)
        self.retries = retries
        self.backoff_s = backoff_s

    async def call(
        self, route: str, body: dict[str, Any], session_id: str | None = None
    ) -> dict[str, Any]:
        headers = {"X-Session-Id": session_id} if session_id else {}
        for attempt in range(1, self.retries + 2):
            try:
                response = await self.http.post(route, json=body, headers=headers)
            except httpx.TransportError:
                if attempt > self.retries:
                    raise
            else:
                if attempt > self.retries or not _retryable(response):
                    return _answer(response, attempt)
            await asyncio.sleep(self.backoff_s * 2 ** (attempt - 1))
        raise AssertionError("unreachable")

    async def session(
        self, session_id: str | None = None, *, ttl_s: float | None = None, keep: bool = False
    ) -> AsyncSession:
        """A new session; ``async with await api.session() as s`` deletes it on exit."""
        session_id = session_id or uuid.uuid4().hex
        try:
            info = await self.call(
                "/v1/sessions/create", _create_body(session_id, ttl_s), session_id
            )
        except APIError as e:
            if e.code == "session_exists" and e.attempts > 1:
                return AsyncSession(self, session_id, (await self.attach(session_id)).t, keep)
            raise
        return AsyncSession(self, info["session_id"], info["t"], keep)

    async def attach(self, session_id: str) -> AsyncSession:
        info = await self.call("/v1/sessions/get", {"session_id": session_id}, session_id)
        return AsyncSession(self, session_id, info["t"], keep=True)

    async def predict(self, inputs: Rows, *, return_gates: bool = False) -> dict[str, Any]:
        return await self.call(
            "/v1/predict", {"inputs": _rows(inputs), "return_gates": return_gates}
        )

    async def model(self) -> dict[str, Any]:
        return await self.call("/v1/model", {})

    async def aclose(self) -> None:
        await self.http.aclose()

    async def __aenter__(self) -> AsyncLSTMClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class AsyncSession:
    def __init__(self, client: AsyncLSTMClient, session_id: str, t: int, keep: bool) -> None:
        self.client = client
        self.id = session_id
        self.t = t
        self.keep = keep

    async def _call(self, route: str, body: dict[str, Any]) -> dict[str, Any]:
        return await self.client.call(route, {"session_id": self.id, **body}, self.id)

    async def step(self, inputs: Rows, *, return_gates: bool = False) -> dict[str, Any]:
        reply = await self._call(
            "/v1/sessions/step",
            {"inputs": _rows(inputs), "seq": self.t, "return_gates": return_gates},
        )
        self.t = int(reply["t"])
        return reply

    async def stream(self, chunks: Iterable[Rows]) -> AsyncIterator[dict[str, Any]]:
        for chunk in chunks:
            for out in (await self.step(chunk))["outputs"]:
                yield out

    async def forecast(self, horizon: int = 1) -> dict[str, Any]:
        return await self._call("/v1/sessions/forecast", {"horizon": horizon})

    async def info(self) -> dict[str, Any]:
        reply = await self._call("/v1/sessions/get", {})
        self.t = int(reply["t"])
        return reply

    async def reset(self) -> None:
        self.t = int((await self._call("/v1/sessions/reset", {}))["t"])

    async def delete(self) -> None:
        await self._call("/v1/sessions/delete", {})

    async def __aenter__(self) -> AsyncSession:
        return self

    async def __aexit__(self, *exc: object) -> None:
        if not self.keep:
            try:
                await self.delete()
            except APIError as e:
                if e.status != 404:
                    raise
