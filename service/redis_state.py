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

Replication: with ``wait_replicas`` > 0, every write (create, step, reset) ends its pipeline with
a ``WAIT`` on the same connection (WAIT counts only the writes of the connection it is sent on),
and is answered only once that many replicas have it; a master killed after answering then loses
nothing, since its replica, promoted, has every acknowledged write. A WAIT that falls short
answers ``StoreOutcomeUnknown`` for a step (it may be lost in a failover; a retry with the same
seq is applied once); a create is taken back and answers ``StoreUnavailable``.

Every step is a compare-and-set on ``(epoch, t)`` in a Lua script: the new state is written only
if the stored session is still the one the step was computed from (same epoch: not reset or
re-created since; same ``t``), so two replicas can never both apply step ``t``. A write that is
already in place (a pipeline re-sent after a dropped connection) is recognised and accepted once.
A batch's writes go in one pipelined round trip.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
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
ACTIVE_MODEL_KEY = "lstm:active-model"  # the tag one replica activated; the others follow it

# Returns 1 when created, or already created by this very create (its epoch, still at t = 0: a
# retry whose first reply was lost), 0 when the id is taken.
CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  local own = redis.call('HGET', KEYS[1], 'epoch') == ARGV[5]
  if own and redis.call('HGET', KEYS[1], 't') == '0' then return 1 end
  return 0
end
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


def _applied(reply: Any) -> bool:
    """Whether a script's reply says it wrote: CREATE and RESET answer 1, COMMIT {1, t}."""
    if isinstance(reply, list):
        return bool(reply) and reply[0] == 1
    return reply == 1


def _done(reply: Any, what: str) -> bool:
    """A script's reply as whether it did what it was for; an error reply (the pipeline answers
    them as values: OOM under noeviction, a MOVED slot) is StoreUnavailable, where before it was
    a truthy exception object and so a success that never happened (a review)."""
    if isinstance(reply, Exception):
        raise StoreUnavailable(
            f"the session store (Redis) refused {what}: {reply}; nothing was applied, retry"
        )
    return bool(reply)


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
        self._nodes: dict[str, Any] = {}  # cluster: a plain client per master (_node_client)
        self._node_options = dict(common)
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
            auth: dict[str, Any] = {
                "ssl": url.startswith("rediss+"),
                "username": username or None,
                "password": password or None,
            }
            self._node_options.update(auth)
            self.client = RedisCluster(
                startup_nodes=[ClusterNode(h, p) for h, p in nodes], **auth, **common
            )
        self._create = self.client.register_script(CREATE)
        self._commit = self.client.register_script(COMMIT)
        self._reset = self.client.register_script(RESET)

    def _keys(self, session_id: str) -> list[str]:
        if self.cluster:  # one slot for both: the id is the hash tag
            return [f"lstm:s:{{{session_id}}}", f"lstm:k:{{{session_id}}}"]
        return [f"lstm:s:{session_id}", f"lstm:k:{session_id}"]

    def _node_client(self, key: str) -> Any:
        """A plain client of the master that holds ``key`` (cluster mode), made once per node:
        a batch's scripts and its WAIT go on one connection of it, in one pipeline, since WAIT
        counts only the writes made on the connection it is sent on."""
        node = self.client.get_node_from_key(key)
        client = self._nodes.get(node.name)
        if client is None:
            client = self._nodes[node.name] = aioredis.Redis(
                host=node.host, port=node.port, **self._node_options
            )
        return client

    def _forget(self, client: Any) -> None:
        for name, known in list(self._nodes.items()):
            if known is client:
                del self._nodes[name]
                closing = asyncio.get_running_loop().create_task(client.aclose())
                closing.add_done_callback(lambda task: task.cancelled() or task.exception())

    async def _run(self, calls: list[tuple[str, list[str], list[Arg]]]) -> list[Any]:
        """Each (sha, keys, args) script call, in one pipeline per master (one connection each),
        followed there by a WAIT when ``wait_replicas`` is set; the scripts' replies, in order
        (an error reply as its exception). StoreOutcomeUnknown if a WAIT falls short or one
        master failed while another took its writes; StoreUnavailable if none took any."""
        if self.cluster:
            await self.client.initialize()  # the slot map, on the first call (then a no-op)
        groups: dict[int, tuple[Any, list[int]]] = {}
        for i, (_, keys, _) in enumerate(calls):
            client = self._node_client(keys[0]) if self.cluster else self.client
            groups.setdefault(id(client), (client, []))[1].append(i)

        async def one(client: Any, members: list[int]) -> list[Any]:
            pipe = client.pipeline(transaction=False)
            for i in members:
                sha, keys, args = calls[i]
                pipe.evalsha(sha, len(keys), *keys, *args)
            if self.wait_replicas:
                pipe.execute_command("WAIT", self.wait_replicas, self.wait_timeout_ms)
            return list(await pipe.execute(raise_on_error=False))

        done = await asyncio.gather(
            *(one(client, members) for client, members in groups.values()), return_exceptions=True
        )
        failed = [d for d in done if isinstance(d, BaseException)]
        if failed:
            if self.cluster:
                # A master may have moved: learn the map, and make the failed nodes' clients
                # afresh (a pool may keep a connection its peer's death left unusable).
                for (client, _), outcome in zip(groups.values(), done, strict=True):
                    if isinstance(outcome, BaseException):
                        self._forget(client)
                with contextlib.suppress(Exception):
                    await self.client.nodes_manager.initialize()
            if len(failed) < len(done):
                raise StoreOutcomeUnknown(
                    f"the session store (Redis) failed on one node ({failed[0]}) while others "
                    "took their writes; retry with the same seq, which is answered exactly once"
                )
            raise failed[0]
        replies: list[Any] = [None] * len(calls)
        short = False
        for (_, members), reply in zip(groups.values(), done, strict=True):
            assert not isinstance(reply, BaseException)
            if self.wait_replicas:
                acks = reply.pop()
                applied = any(_applied(r) for r in reply)
                unconfirmed = isinstance(acks, Exception) or int(acks) < self.wait_replicas
                short = short or (applied and unconfirmed)
            for i, r in zip(members, reply, strict=True):
                replies[i] = r
        if any(isinstance(r, ResponseError) and str(r).startswith("MOVED") for r in replies):
            with contextlib.suppress(Exception):
                await self.client.nodes_manager.initialize()
        if short:
            raise StoreOutcomeUnknown(
                f"the session store (Redis) applied the write but fewer than "
                f"LSTM_REDIS_WAIT_REPLICAS={self.wait_replicas} replicas confirmed it within "
                f"{self.wait_timeout_ms} ms: a failover could lose it; retry with the same seq, "
                f"which is answered exactly once"
            )
        return replies

    async def _call(self, awaitable: Any) -> Any:
        try:
            return await awaitable
        except (RedisError, OSError, RuntimeError) as e:
            # RuntimeError: uvloop's answer to a write on a connection whose peer died.
            raise StoreUnavailable(
                f"the session store (Redis) is unavailable: {e}; nothing was applied, retry "
                f"when it is back (check that Redis runs and LSTM_REDIS_URL)"
            ) from e

    async def active_model(self) -> str | None:
        """The model version the replicas serve new sessions with (``set_active_model``)."""
        value = await self._call(self.client.get(ACTIVE_MODEL_KEY))
        return None if value is None else value.decode()

    async def set_active_model(self, tag: str) -> None:
        await self._call(self.client.set(ACTIVE_MODEL_KEY, tag))

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
        keys = self._keys(session_id)
        try:
            (reply,) = await self._scripts([(self._create, CREATE, keys, args)])
        except StoreOutcomeUnknown:
            # Created, not confirmed on a replica: take it back, so that a retry (a create has
            # no seq) creates it afresh instead of finding it taken.
            with contextlib.suppress(StoreUnavailable):
                await self._call(self.client.delete(*keys))
            raise StoreUnavailable(
                f"the session store (Redis) did not confirm the new session on "
                f"LSTM_REDIS_WAIT_REPLICAS={self.wait_replicas} replicas in time; it was not "
                f"created, retry"
            ) from None
        return _done(reply, "the new session")

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
        """Compare-and-set every write in one round trip (one per master on a cluster): (1, t)
        written, (0, t) stale, (-1, -1) gone, (-2, -2) this write failed in Redis (the others
        stand)."""
        calls = []
        for w in writes:
            ttl_ms = max(1, int(w.ttl_s * 1000))
            args: list[Arg] = [
                w.seq,
                w.t,
                w.state,
                w.last_step,
                ttl_ms,
                ttl_ms + KNOWN_FOR_MS,
                w.epoch,
            ]
            calls.append((self._commit, COMMIT, self._keys(w.session_id), args))
        try:
            replies = await self._scripts(calls)
        except StoreUnavailable as e:
            if not isinstance(e.__cause__, TimeoutError | builtins.TimeoutError):
                raise
            # Slow, not down: the pipeline reached Redis and may run after we gave up on it (7 of
            # 41 steps answered "nothing was applied" under a slow Redis had been applied).
            raise StoreOutcomeUnknown(
                "the session store (Redis) did not confirm the write in time: the step may have "
                "been applied; retry it with the same seq, which is answered exactly once"
            ) from None
        out = []
        for reply in replies:
            if isinstance(reply, Exception):
                out.append((-2, -2))
            else:
                out.append((int(reply[0]), int(reply[1])) if reply[0] != -1 else (-1, -1))
        return out

    async def _scripts(self, calls: list[tuple[Any, str, list[str], list[Arg]]]) -> list[Any]:
        """(script, its source, keys, args) calls through ``_run``, by SHA straight on the
        pipeline: through redis-py's Script a pipeline first asks ``SCRIPT EXISTS`` in a round trip
        of its own. Redis answers NOSCRIPT without running anything when it lost its scripts (a
        restart, a promoted replica): those calls are sent again once the script is loaded."""
        replies = await self._call(self._run([(s.sha, k, a) for s, _, k, a in calls]))
        lost = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if lost:
            for source in {calls[i][1] for i in lost}:
                await self._call(self.client.script_load(source))
            again = await self._call(
                self._run([(calls[i][0].sha, calls[i][2], calls[i][3]) for i in lost])
            )
            for i, reply in zip(lost, again, strict=True):
                replies[i] = reply
        return list(replies)

    async def reset(self, session_id: str, state: bytes, ttl_s: float, epoch: str) -> bool:
        ttl_ms = max(1, int(ttl_s * 1000))
        args: list[Arg] = [state, ttl_ms, epoch]
        (reply,) = await self._scripts([(self._reset, RESET, self._keys(session_id), args)])
        return _done(reply, "the reset")

    async def touch(self, session_id: str, ttl_s: float) -> None:
        ttl_ms = max(1, int(ttl_s * 1000))
        pipe = self.client.pipeline(transaction=False)
        pipe.pexpire(self._keys(session_id)[0], ttl_ms)
        pipe.pexpire(self._keys(session_id)[1], ttl_ms + KNOWN_FOR_MS)
        await self._call(pipe.execute())

    async def delete(self, session_id: str) -> None:
        await self._call(self.client.delete(*self._keys(session_id)))
