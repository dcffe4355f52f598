"""The engine as one API key sees it: its sessions in a namespace of their own.

A tenant's session ``meter-42`` is the engine's ``<tenant>/meter-42`` (``scoped_id``); replies,
errors and exported blobs carry the client's id again (``public_id``). Two keys can therefore each
hold a ``meter-42``, and a key probing another's ids learns nothing: its calls reach sessions of its
own namespace, which answer as unknown ones do. Without API keys the service calls the ``Engine``
straight, and ids are the clients' own.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

from service.engine import Engine, ForecastView, SessionView
from service.errors import ServiceError
from service.schemas import Step
from service.sessions import new_session_id, public_id, scoped_id
from service.versions import Versions


class TenantSessions:
    """The session calls of an ``Engine`` (or of ``Versions``), each in ``tenant``'s namespace."""

    def __init__(self, engine: Engine | Versions, tenant: str) -> None:
        self.engine, self.tenant = engine, tenant
        self._mark = f"'{tenant}/"  # how a scoped id shows in an error's message (its repr)

    @contextlib.contextmanager
    def _own_ids(self) -> Iterator[None]:
        """An error about a scoped id, told with the client's id."""
        try:
            yield
        except ServiceError as e:
            self._unscope_error(e)
            raise

    def _unscope_error(self, e: ServiceError) -> None:
        e.message = self._unscope_message(e.message)
        if isinstance(e.details.get("session_id"), str):
            e.details["session_id"] = public_id(e.details["session_id"])

    def _unscope_message(self, message: str) -> str:
        return message.replace(self._mark, "'")

    def _view(self, view: SessionView) -> SessionView:
        return dataclasses.replace(view, session_id=public_id(view.session_id))

    def _step(self, body: Step) -> Step:
        return body.model_copy(update={"session_id": scoped_id(self.tenant, body.session_id)})

    def _reply(self, reply: dict[str, Any]) -> dict[str, Any]:
        reply["session_id"] = public_id(reply["session_id"])
        return reply

    async def create(self, session_id: str | None, ttl_s: float | None) -> SessionView:
        with self._own_ids():
            sid = scoped_id(self.tenant, session_id or new_session_id())
            return self._view(await self.engine.create(sid, ttl_s))

    async def get(self, session_id: str) -> SessionView:
        with self._own_ids():
            return self._view(await self.engine.get(scoped_id(self.tenant, session_id)))

    async def reset(self, session_id: str) -> SessionView:
        with self._own_ids():
            return self._view(await self.engine.reset(scoped_id(self.tenant, session_id)))

    async def delete(self, session_id: str) -> str:
        with self._own_ids():
            return public_id(await self.engine.delete(scoped_id(self.tenant, session_id)))

    async def forecast(
        self, session_id: str, horizon: int, *, paths: int, seed: int
    ) -> ForecastView:
        with self._own_ids():
            view = await self.engine.forecast(
                scoped_id(self.tenant, session_id), horizon, paths=paths, seed=seed
            )
            return dataclasses.replace(view, session_id=public_id(view.session_id))

    async def export(self, session_id: str) -> tuple[SessionView, bytes]:
        with self._own_ids():
            view, blob = await self.engine.export(scoped_id(self.tenant, session_id))
            return self._view(view), blob

    async def import_blob(
        self, blob: bytes, session_id: str | None, ttl_s: float | None
    ) -> SessionView:
        with self._own_ids():
            view = await self.engine.import_blob(
                blob, session_id, ttl_s, namespace=f"{self.tenant}/"
            )
            return self._view(view)

    async def step(self, body: Step) -> dict[str, Any]:
        with self._own_ids():
            return self._reply(await self.engine.step(self._step(body)))

    async def step_many(self, items: list[Step]) -> list[dict[str, Any]]:
        with self._own_ids():
            results = await self.engine.step_many([self._step(item) for item in items])
        for result in results:
            if result["ok"]:
                self._reply(result["result"])
            else:
                error = result["error"]
                error["message"] = self._unscope_message(error["message"])
                if isinstance(error.get("session_id"), str):
                    error["session_id"] = public_id(error["session_id"])
        return results

    async def migrate(self, session_id: str, to: str | None) -> SessionView:
        if not isinstance(self.engine, Versions):  # pragma: no cover - the service uses Versions
            raise TypeError("migration needs the service's versions")
        with self._own_ids():
            return self._view(await self.engine.migrate(scoped_id(self.tenant, session_id), to))

    async def check(self, session_id: str) -> None:
        """Raises the store's 404 when the session is gone (the stream's check at connect)."""
        await self.get(session_id)


class KeyedStream:
    """A WebSocket's sessions, its key checked again at every message: a key revoked while
    its stream is open stops being served at the next message (401, then close 4401)."""

    def __init__(self, sessions: TenantSessions, recheck: Callable[[], object]) -> None:
        self.sessions, self.recheck = sessions, recheck

    async def step(self, body: Step) -> dict[str, Any]:
        self.recheck()
        return await self.sessions.step(body)

    async def check(self, session_id: str) -> None:
        await self.sessions.check(session_id)
