"""Durable session state in Redis, shared by every replica.

Each session is one hash, ``lstm:s:<id>``, with fields ``t`` (decimal), ``epoch`` (a token new at
every create and reset), ``state`` (a state blob: ``service.state_blob``, no pickle),
``created_at``, ``ttl_ms`` and ``last_step`` (JSON: the last applied step's seq, input digest and
response, so any replica can answer a retry). The key's
expiry is the session's TTL, renewed at every write. A second key, ``lstm:k:<id>``, outlives it by
a day so that a vanished session answers ``session_expired`` rather than ``session_not_found``.

Every step is a compare-and-set on ``(epoch, t)`` in a Lua script: the new state is written only
if the stored session is still the one the step was computed from (same epoch: not reset or
re-created since; same ``t``), so two replicas can never both apply step ``t``. A write that is
already in place (a pipeline re-sent after a dropped connection) is recognised and accepted once.
A batch's writes go in one pipelined round trip.
"""

from __future__ import annotations

import builtins
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError, NoScriptError, RedisError, TimeoutError

from service.errors import StoreOutcomeUnknown, StoreUnavailable

Arg = bytes | str | int | float
KNOWN_FOR_MS = 86_400_000  # how long a vanished session is still recognised as expired

CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 't', '0', 'state', ARGV[1], 'created_at', ARGV[2], 'ttl_ms', ARGV[3],
           'epoch', ARGV[5])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('SET', KEYS[2], '1', 'PX', ARGV[4])
return 1
"""

# Returns {1, t} when written (or already written by this very write), {0, t} when the stored
# session moved on or was reset, {-1} when it is gone.
COMMIT = """
local t = redis.call('HGET', KEYS[1], 't')
if not t then return {-1} end
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if epoch == ARGV[7] and t == ARGV[2] and redis.call('HGET', KEYS[1], 'last_step') == ARGV[4] then
  return {1, tonumber(t)}
end
if epoch ~= ARGV[7] or t ~= ARGV[1] then return {0, tonumber(t)} end
redis.call('HSET', KEYS[1], 't', ARGV[2], 'state', ARGV[3], 'last_step', ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
redis.call('SET', KEYS[2], '1', 'PX', ARGV[6])
return {1, tonumber(ARGV[2])}
"""

RESET = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 't', '0', 'state', ARGV[1], 'epoch', ARGV[3])
redis.call('HDEL', KEYS[1], 'last_step')
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""


@dataclass(frozen=True)
class Stored:
    t: int
    epoch: str
    state: bytes
    created_at: float
    ttl_s: float
    last_step: bytes | None


@dataclass(frozen=True)
class Write:
    session_id: str
    epoch: str
    seq: int
    t: int
    state: bytes
    last_step: bytes
    ttl_s: float


class RedisState:
    def __init__(self, url: str, *, timeout_s: float = 1.0) -> None:
        self.url = url
        # One retry on a dropped connection: after Redis restarts, the pool's first connection
        # is dead. A retried compare-and-set that had in fact been applied answers "stale", and
        # the step then finds its own result as the last applied step: still exactly once.
        self.client = aioredis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 1),
            retry_on_error=[ConnectionError, TimeoutError],
        )
        self._create = self.client.register_script(CREATE)
        self._commit = self.client.register_script(COMMIT)
        self._reset = self.client.register_script(RESET)

    @staticmethod
    def _keys(session_id: str) -> list[str]:
        return [f"lstm:s:{session_id}", f"lstm:k:{session_id}"]

    async def _call(self, awaitable: Any) -> Any:
        try:
            return await awaitable
        except (RedisError, OSError) as e:
            raise StoreUnavailable(
                f"the session store (Redis) is unavailable: {e}; nothing was applied, retry "
                f"when it is back (check that Redis runs and LSTM_REDIS_URL)"
            ) from e

    async def ping(self) -> bool:
        try:
            return bool(await self.client.ping())
        except (RedisError, OSError):
            return False

    async def create(
        self, session_id: str, state: bytes, created_at: float, ttl_s: float, epoch: str
    ) -> bool:
        """Store a new session at t = 0; False if the id is taken."""
        ttl_ms = max(1, int(ttl_s * 1000))
        args: list[Arg] = [state, repr(created_at), ttl_ms, ttl_ms + KNOWN_FOR_MS, epoch]
        return bool(await self._call(self._create(keys=self._keys(session_id), args=args)))

    async def load(self, session_id: str) -> Stored | None:
        fields = await self._call(self.client.hgetall(self._keys(session_id)[0]))
        if not fields or b"t" not in fields:
            return None
        return Stored(
            int(fields[b"t"]),
            fields.get(b"epoch", b"").decode(),
            fields[b"state"],
            float(fields[b"created_at"]),
            int(fields[b"ttl_ms"]) / 1000,
            fields.get(b"last_step"),
        )

    async def version(self, session_id: str) -> tuple[str, int] | None:
        """The stored (epoch, t), None if the session is gone: one small read."""
        epoch, t = await self._call(self.client.hmget(self._keys(session_id)[0], "epoch", "t"))
        return None if t is None else ((epoch or b"").decode(), int(t))

    async def known(self, session_id: str) -> bool:
        return bool(await self._call(self.client.exists(self._keys(session_id)[1])))

    async def commit(self, writes: list[Write]) -> list[tuple[int, int]]:
        """Compare-and-set every write in one round trip: (1, t) written, (0, t) stale, (-1, -1)
        gone, (-2, -2) this write failed in Redis (the others stand).

        The script is called by its SHA straight on the pipeline: through redis-py's Script, a
        pipeline first asks ``SCRIPT EXISTS`` in a round trip of its own, on every commit. Redis
        answers NOSCRIPT without running anything when it lost its scripts (a restart): those
        writes are sent again once the script is loaded.
        """
        try:
            replies = await self._call(self._commit_pipeline(writes))
        except StoreUnavailable as e:
            if not isinstance(e.__cause__, TimeoutError | builtins.TimeoutError):
                raise
            # Slow, not down: the pipeline reached Redis and may run after we gave up on it (7 of
            # 41 steps answered "nothing was applied" under a slow Redis had been applied).
            raise StoreOutcomeUnknown(
                "the session store (Redis) did not confirm the write in time: the step may have "
                "been applied; retry it with the same seq, which is answered exactly once"
            ) from None
        lost = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if lost:
            await self._call(self.client.script_load(COMMIT))
            again = await self._call(self._commit_pipeline([writes[i] for i in lost]))
            for i, reply in zip(lost, again, strict=True):
                replies[i] = reply
        out = []
        for reply in replies:
            if isinstance(reply, Exception):
                out.append((-2, -2))
            else:
                out.append((int(reply[0]), int(reply[1])) if reply[0] != -1 else (-1, -1))
        return out

    async def _commit_pipeline(self, writes: list[Write]) -> list[Any]:
        pipe = self.client.pipeline(transaction=False)
        for w in writes:
            ttl_ms = max(1, int(w.ttl_s * 1000))
            pipe.evalsha(
                self._commit.sha,
                2,
                *self._keys(w.session_id),
                w.seq,
                w.t,
                w.state,
                w.last_step,
                ttl_ms,
                ttl_ms + KNOWN_FOR_MS,
                w.epoch,
            )
        return list(await pipe.execute(raise_on_error=False))

    async def reset(self, session_id: str, state: bytes, ttl_s: float, epoch: str) -> bool:
        ttl_ms = max(1, int(ttl_s * 1000))
        args: list[Arg] = [state, ttl_ms, epoch]
        return bool(await self._call(self._reset(keys=self._keys(session_id), args=args)))

    async def touch(self, session_id: str, ttl_s: float) -> None:
        ttl_ms = max(1, int(ttl_s * 1000))
        pipe = self.client.pipeline(transaction=False)
        pipe.pexpire(self._keys(session_id)[0], ttl_ms)
        pipe.pexpire(self._keys(session_id)[1], ttl_ms + KNOWN_FOR_MS)
        await self._call(pipe.execute())

    async def delete(self, session_id: str) -> None:
        await self._call(self.client.delete(*self._keys(session_id)))
