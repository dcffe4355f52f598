"""Several model versions served at once: one *active* for new sessions, every other session on
the version it was created on until it is migrated.

Each loaded version is a whole ``Engine`` of its own (its model, state pool, session store and
micro-batcher: states of different versions may differ in shape, and a batch mixes no versions).
``Versions`` stands in front of them with the engine's session calls: a call on an existing
session goes to the version whose store holds it (or remembers it: an expired session answers
``session_expired`` from its own version), anything new to the active one. An id is unique across
versions: a create of an id another version holds answers ``session_exists``.

Admin calls (``load``, ``activate``, ``unload``, ``models``) change which versions are held; the
framework's routes for them sit under ``/v1/admin/``, behind the admin role when API keys are on
(service/auth.py). Loading builds a version in a thread (its weights read from BentoML's store),
so traffic on the loop keeps flowing meanwhile. A version with sessions on it cannot be unloaded
(``409 model_version_in_use``), nor can the active one (``409 model_version_active``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from service.engine import Engine, ForecastView, SessionView
from service.errors import (
    ModelMismatch,
    SessionExists,
    SessionOnOtherVersion,
    VersionActive,
    VersionInUse,
    VersionNotLoaded,
)
from service.results import Outputs
from service.schemas import Step
from service.state_blob import BlobError, decode


@dataclass(eq=False)
class Version:
    """A loaded model version: its tag (``name:version``) and its engine."""

    tag: str
    engine: Engine
    device: str
    loaded_at: float = field(default_factory=time.time)
    close: Callable[[], Awaitable[None]] = field(default=lambda: _nothing())

    @property
    def sessions(self) -> int:
        return len(self.engine.store)


async def _nothing() -> None:
    return None


T = TypeVar("T")
Loader = Callable[[str], Version]  # a tag -> its version, built (blocking: run in a thread)


class Versions:
    """The session calls of ``Engine``, over every loaded version; and the admin calls."""

    def __init__(self, first: Version, loader: Loader) -> None:
        self.loader = loader
        self.held: dict[str, Version] = {first.tag: first}
        self.active = first
        self._changing = asyncio.Lock()  # one load/activate/unload at a time

    # --- which version ------------------------------------------------------------------------

    def of(self, session_id: str) -> Engine:
        """The engine of the version that holds (or remembers) the session; else the active."""
        active = self.active.engine
        if len(self.held) == 1 or active.store.knows(session_id):
            return active
        for version in self.held.values():
            if version.engine.store.knows(session_id):
                return version.engine
        return active

    @property
    def model(self) -> tuple[str, str]:
        return self.active.engine.model

    def total_sessions(self) -> int:
        return sum(v.sessions for v in self.held.values())

    # --- the session calls --------------------------------------------------------------------

    async def create(self, session_id: str | None, ttl_s: float | None) -> SessionView:
        if session_id is not None and len(self.held) > 1:
            holder = self.of(session_id)
            if holder is not self.active.engine and holder.store.peek(session_id) is not None:
                raise SessionExists(f"session {session_id!r} already exists", session_id=session_id)
        return await self.active.engine.create(session_id, ttl_s)

    async def _on(self, session_id: str, call: Callable[[Engine], Awaitable[T]]) -> T:
        """``call`` on the session's version. With Redis a session this replica has not cached
        is found on the version it was stored by (``SessionOnOtherVersion``)."""
        try:
            return await call(self.of(session_id))
        except SessionOnOtherVersion as e:
            for version in self.held.values():
                if version.engine.model == e.model:
                    return await call(version.engine)
            raise

    async def check(self, session_id: str) -> None:
        await self._on(session_id, lambda engine: engine.check(session_id))

    async def get(self, session_id: str) -> SessionView:
        return await self._on(session_id, lambda engine: engine.get(session_id))

    async def reset(self, session_id: str) -> SessionView:
        return await self._on(session_id, lambda engine: engine.reset(session_id))

    async def delete(self, session_id: str) -> str:
        return await self._on(session_id, lambda engine: engine.delete(session_id))

    async def forecast(self, session_id: str, horizon: int) -> ForecastView:
        return await self._on(session_id, lambda engine: engine.forecast(session_id, horizon))

    async def export(self, session_id: str) -> tuple[SessionView, bytes]:
        return await self._on(session_id, lambda engine: engine.export(session_id))

    async def import_blob(
        self, blob: bytes, session_id: str | None, ttl_s: float | None, namespace: str = ""
    ) -> SessionView:
        """Into the version the blob belongs to, when it is loaded; else the active version
        answers (``model_mismatch``)."""
        target = self.active.engine
        if len(self.held) > 1:
            try:
                header = decode(blob, target.blob_key)[0]
            except BlobError:
                header = {}  # the engine's own decode answers the refusal
            theirs = (header.get("model"), header.get("model_version"))
            for version in self.held.values():
                if version.engine.model == theirs:
                    target = version.engine
        return await target.import_blob(blob, session_id, ttl_s, namespace)

    async def step(self, body: Step) -> dict[str, Any]:
        if len(self.held) == 1:  # the common case: no closure per step
            return await self.active.engine.step(body)
        return await self._on(body.session_id, lambda engine: engine.step(body))

    async def step_many(self, items: list[Step]) -> list[dict[str, Any]]:
        if len(self.held) == 1:
            return await self.active.engine.step_many(items)
        by_engine: dict[int, tuple[Engine, list[int]]] = {}
        for i, item in enumerate(items):
            engine = self.of(item.session_id)
            by_engine.setdefault(id(engine), (engine, []))[1].append(i)
        results: list[dict[str, Any]] = [{}] * len(items)

        async def one(engine: Engine, indices: list[int]) -> None:
            for i, result in zip(
                indices, await engine.step_many([items[i] for i in indices]), strict=True
            ):
                results[i] = result

        await asyncio.gather(*(one(engine, ix) for engine, ix in by_engine.values()))
        return results

    async def predict(self, rows: list[list[float]], return_gates: bool) -> Outputs:
        return await self.active.engine.predict(rows, return_gates)

    # --- admin ----------------------------------------------------------------------------------

    def models(self) -> list[dict[str, Any]]:
        return [
            {
                "tag": v.tag,
                "name": v.engine.model[0],
                "version": v.engine.model[1],
                "active": v is self.active,
                "sessions": v.sessions,
                "device": v.device,
                "loaded_at": v.loaded_at,
            }
            for v in self.held.values()
        ]

    def _held(self, tag: str) -> Version:
        version = self.held.get(tag)
        if version is None:
            raise VersionNotLoaded(
                f"model {tag!r} is not loaded (loaded: {', '.join(self.held)}); load it first",
                tag=tag,
            )
        return version

    async def load(self, tag: str) -> Version:
        """The version ``tag`` of BentoML's store, loaded (already loaded: as it is)."""
        async with self._changing:
            if tag in self.held:
                return self.held[tag]
            version = await asyncio.to_thread(self.loader, tag)
            if version.tag in self.held:  # "name" or "name:latest" resolved to a held version
                await version.close()
                return self.held[version.tag]
            first = self.active.engine
            if version.engine.n_features != first.n_features:
                await version.close()
                raise ModelMismatch(
                    f"model {version.tag} takes {version.engine.n_features} features per "
                    f"timestep; the served ones take {first.n_features}: clients could not "
                    f"send the same inputs to both",
                    model=version.engine.model[0],
                    model_version=version.engine.model[1],
                )
            self.held[version.tag] = version
            return version

    async def activate(self, tag: str) -> Version:
        async with self._changing:
            self.active = self._held(tag)
            return self.active

    async def unload(self, tag: str) -> None:
        async with self._changing:
            version = self._held(tag)
            if version is self.active:
                raise VersionActive(
                    f"model {tag} is the active version: activate another one first", tag=tag
                )
            if version.sessions:
                raise VersionInUse(
                    f"{version.sessions} sessions are on model {tag}: migrate or delete them first",
                    tag=tag,
                    sessions=version.sessions,
                )
            del self.held[tag]
        await version.close()
