"""``LSTMClient`` (sync) and ``AsyncLSTMClient``: the service's API with its guarantees kept.

Every step carries ``seq`` (the session's ``t`` as the client knows it), so a step whose answer
was lost can be sent again: the server either applies it once or answers the same response again.
The client therefore retries steps (and every other call) on connection errors, 502 and 503.
Each request of a session carries ``X-Session-Id``, which the session-aware proxy routes on.

    with LSTMClient("http://127.0.0.1:3000") as api, api.session() as s:
        for out in s.stream([[[0.1], [0.5]], [[1.7]]]):
            print(out["mean"], out["anomaly_z"])
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from types import TracebackType
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
        super().__init__(f"{status} {self.code}: {self.message}")


def _answer(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        body = {"error": {"code": "not_json", "message": response.text[:200]}}
    if response.status_code >= 400:
        raise APIError(response.status_code, body)
    return dict(body)


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
        for attempt in range(self.retries + 1):
            try:
                response = self.http.post(route, json=body, headers=headers)
            except httpx.TransportError:
                if attempt == self.retries:
                    raise
            else:
                if response.status_code not in RETRY_STATUSES or attempt == self.retries:
                    return _answer(response)
            time.sleep(self.backoff_s * 2**attempt)
        raise AssertionError("unreachable")

    def session(
        self, session_id: str | None = None, *, ttl_s: float | None = None, keep: bool = False
    ) -> Session:
        """A new session; as a context manager it is deleted on exit unless ``keep``."""
        body: dict[str, Any] = {"session_id": session_id} if session_id else {}
        if ttl_s is not None:
            body["ttl_s"] = ttl_s
        info = self.call("/v1/sessions/create", body, session_id)
        return Session(self, info["session_id"], info["t"], keep)

    def attach(self, session_id: str) -> Session:
        """An existing session, e.g. after a client restart."""
        info = self.call("/v1/sessions/get", {"session_id": session_id}, session_id)
        return Session(self, session_id, info["t"], keep=True)

    def predict(self, inputs: Rows, *, return_gates: bool = False) -> dict[str, Any]:
        return self.call(
            "/v1/predict", {"inputs": [list(r) for r in inputs], "return_gates": return_gates}
        )

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
            {"inputs": [list(r) for r in inputs], "seq": self.t, "return_gates": return_gates},
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
        reply = self._call("/v1/sessions/get", {})
        self.t = int(reply["t"])
        return reply

    def reset(self) -> None:
        self.t = int(self._call("/v1/sessions/reset", {})["t"])

    def delete(self) -> None:
        self._call("/v1/sessions/delete", {})

    def __enter__(self) -> Session:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
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
        for attempt in range(self.retries + 1):
            try:
                response = await self.http.post(route, json=body, headers=headers)
            except httpx.TransportError:
                if attempt == self.retries:
                    raise
            else:
                if response.status_code not in RETRY_STATUSES or attempt == self.retries:
                    return _answer(response)
            await asyncio.sleep(self.backoff_s * 2**attempt)
        raise AssertionError("unreachable")

    async def session(
        self, session_id: str | None = None, *, ttl_s: float | None = None, keep: bool = False
    ) -> AsyncSession:
        body: dict[str, Any] = {"session_id": session_id} if session_id else {}
        if ttl_s is not None:
            body["ttl_s"] = ttl_s
        info = await self.call("/v1/sessions/create", body, session_id)
        return AsyncSession(self, info["session_id"], info["t"], keep)

    async def predict(self, inputs: Rows, *, return_gates: bool = False) -> dict[str, Any]:
        return await self.call(
            "/v1/predict", {"inputs": [list(r) for r in inputs], "return_gates": return_gates}
        )

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
            {"inputs": [list(r) for r in inputs], "seq": self.t, "return_gates": return_gates},
        )
        self.t = int(reply["t"])
        return reply

    async def stream(self, chunks: Iterable[Rows]) -> AsyncIterator[dict[str, Any]]:
        for chunk in chunks:
            for out in (await self.step(chunk))["outputs"]:
                yield out

    async def forecast(self, horizon: int = 1) -> dict[str, Any]:
        return await self._call("/v1/sessions/forecast", {"horizon": horizon})

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
