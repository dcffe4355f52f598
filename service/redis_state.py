"""Durable session state in Redis, shared by every replica.

Each session is one hash, ``lstm:s:<id>``, with fields ``t`` (decimal), ``epoch`` (a token new at
every create and reset), ``state`` (a state blob: ``service.state_blob``, no pickle),
``created_at``, ``ttl_ms`` and ``last_step`` (JSON: the last applied step's seq, input digest and
response, so any replica can answer a retry). The key's
expiry is the session's TTL, renewed at every write. A second key, ``lstm:k:<id>``, outlives it by
a day so that a vanished session answers ``session_expired`` rather than ``session_not_found``.

On Redis Cluster (``redis+cluster://host:port[,host:port...]``) the two keys carry the session id
as a hash tag, ``lstm:s:{<id>}`` and ``lstm:k:{<id>}``, so that every script touches one slot
(two untagged keys answer CROSSSLOT). A single Redis keeps the untagged names, so an existing
deployment's sessions are found after an upgrade.

Replication: with ``wait_replicas`` > 0, every write (create, step, reset) is followed by a
``WAIT`` on the node that holds it, and is answered only once that many replicas have it; a
master killed after answering then loses nothing, since its replica, promoted, has every
acknowledged write. A WAIT that times out answers ``StoreOutcomeUnknown`` (the write may be lost
in a failover; a retry with the same seq is applied once).

Every step is a compare-and-set on ``(epoch, t)`` in a Lua script: the new state is written only
if the stored session is still the one the step was computed from (same epoch: not reset or
re-created since; same ``t``), so two replicas can never both apply step ``t``. A write that is
already in place (a pipeline re-sent after a dropped connection) is recognised and accepted once.
A batch's writes go in one pipelined round trip.
"""

from __future__ import annotations

import asyncio
import builtins
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import (
    ConnectionError,
    NoScriptError,
    RedisError,
    ResponseError,
    TimeoutError,
)

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


CLUSTER_SCHEMES = ("redis+cluster://", "rediss+cluster://")


def cluster_nodes(url: str) -> list[tuple[str, int]] | None:
    """The startup nodes of a ``redis+cluster://h:p,h:p`` URL; None for a single Redis's URL."""
    if not url.startswith(CLUSTER_SCHEMES):
        return None
    rest = url.split("://", 1)[1].rsplit("@", 1)[-1].split("/", 1)[0]
    nodes = []
    for part in rest.split(","):
        host, _, port = part.strip().rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"LSTM_REDIS_URL: {part!r} is not host:port in {url!r}")
        nodes.append((host, int(port)))
    return nodes


class RedisState:
    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = 1.0,
        wait_replicas: int = 0,
        wait_timeout_ms: int = 500,
    ) -> None:
        self.url = url
        self.wait_replicas, self.wait_timeout_ms = wait_replicas, wait_timeout_ms
        nodes = cluster_nodes(url)
        self.cluster = nodes is not None
        # One retry on a dropped connection: after Redis restarts, the pool's first connection
        # is dead. A retried compare-and-set that had in fact been applied answers "stale", and
        # the step then finds its own result as the last applied step: still exactly once.
        common: dict[str, Any] = {
            "socket_timeout": timeout_s,
            "socket_connect_timeout": timeout_s,
            "retry": Retry(NoBackoff(), 1),
            "retry_on_error": [ConnectionError, TimeoutError],
        }
        self.client: Any
        if nodes is None:
            self.client = aioredis.Redis.from_url(url, **common)
        else:
            userinfo = url.split("://", 1)[1].rsplit("@", 1)
            username = password = None
            if len(userinfo) == 2:
                username, _, password = userinfo[0].partition(":")
            # The same single retry (common["retry"]): a dead master is given up on (the step
            # answers 503, its client retries with its seq) rather than retried for seconds
            # while its replica takes over.
            self.client = RedisCluster(
                startup_nodes=[ClusterNode(h, p) for h, p in nodes],
                ssl=url.startswith("rediss+"),
                username=username or None,
                password=password or None,
                **common,
            )
        self._create = self.client.register_script(CREATE)
        self._commit = self.client.register_script(COMMIT)
        self._reset = self.client.register_script(RESET)

    def _keys(self, session_id: str) -> list[str]:
        if self.cluster:  # one slot for both: the id is the hash tag
            return [f"lstm:s:{{{session_id}}}", f"lstm:k:{{{session_id}}}"]
        return [f"lstm:s:{session_id}", f"lstm:k:{session_id}"]

    async def _replicated(self, session_ids: list[str]) -> None:
        """Return once ``wait_replicas`` replicas hold the writes just made to these sessions'
        keys (one WAIT per node involved), else StoreOutcomeUnknown."""
        if self.wait_replicas == 0 or not session_ids:
            return
        args = ("WAIT", self.wait_replicas, self.wait_timeout_ms)
        try:
            if self.cluster:
                nodes = {
                    node.name: node
                    for node in (
                        self.client.get_node_from_key(self._keys(s)[0]) for s in session_ids
                    )
                }
                acks = [
                    await self._call(self.client.execute_command(*args, target_nodes=node))
                    for node in nodes.values()
                ]
            else:
                acks = [await self._call(self.client.execute_command(*args))]
        except StoreUnavailable:
            acks = [0]  # the writes were made: not knowing whether they are replicated is all
        if min(int(a) for a in acks) < self.wait_replicas:
            raise StoreOutcomeUnknown(
                f"the session store (Redis) applied the write but fewer than "
                f"LSTM_REDIS_WAIT_REPLICAS={self.wait_replicas} replicas confirmed it within "
                f"{self.wait_timeout_ms} ms: a failover could lose it; retry with the same seq, "
                f"which is answered exactly once"
            )

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
        created = bool(await self._call(self._create(keys=self._keys(session_id), args=args)))
        if created:
            await self._replicated([session_id])
        return created

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
        written = [w.session_id for w, o in zip(writes, out, strict=True) if o[0] == 1]
        await self._replicated(written)
        return out

    async def _commit_pipeline(self, writes: list[Write]) -> list[Any]:
        calls = []
        for w in writes:
            ttl_ms = max(1, int(w.ttl_s * 1000))
            calls.append(
                (
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
            )
        if self.cluster:
            return await self._commit_on_cluster(calls)
        pipe = self.client.pipeline(transaction=False)
        for args in calls:
            pipe.evalsha(*args)
        return list(await pipe.execute(raise_on_error=False))

    async def _commit_on_cluster(self, calls: list[tuple[Any, ...]]) -> list[Any]:
        """The writes at once, each to its slot's master: redis-py's cluster pipeline refuses
        scripts. A node that fails fails the batch as a pipeline would (503); if writes to other
        nodes went through meanwhile, it says the outcome is unknown (retries are exactly once)."""
        replies = await asyncio.gather(
            *(self.client.evalsha(*args) for args in calls), return_exceptions=True
        )
        failed = [
            r for r in replies if isinstance(r, Exception) and not isinstance(r, ResponseError)
        ]
        if failed:
            if any(not isinstance(r, BaseException) for r in replies):
                raise StoreOutcomeUnknown(
                    f"the session store (Redis Cluster) failed on one node ({failed[0]}) while "
                    "others took their writes; retry with the same seq, answered exactly once"
                )
            raise failed[0]
        return list(replies)

    async def reset(self, session_id: str, state: bytes, ttl_s: float, epoch: str) -> bool:
        ttl_ms = max(1, int(ttl_s * 1000))
        args: list[Arg] = [state, ttl_ms, epoch]
        done = bool(await self._call(self._reset(keys=self._keys(session_id), args=args)))
        if done:
            await self._replicated([session_id])
        return done

    async def touch(self, session_id: str, ttl_s: float) -> None:
        ttl_ms = max(1, int(ttl_s * 1000))
        pipe = self.client.pipeline(transaction=False)
        pipe.pexpire(self._keys(session_id)[0], ttl_ms)
        pipe.pexpire(self._keys(session_id)[1], ttl_ms + KNOWN_FOR_MS)
        await self._call(pipe.execute())

    async def delete(self, session_id: str) -> None:
        await self._call(self.client.delete(*self._keys(session_id)))
