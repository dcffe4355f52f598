"""The Redis layout against a real redis-server: a commit is one round trip, and survives Redis
losing its scripts."""

from __future__ import annotations

import asyncio
from pathlib import Path

from service.redis_state import RedisState, Write
from tests.servers import RedisServer


def calls(port: int, name: str) -> int:
    """How many times Redis ran command ``name`` (INFO commandstats), asked on its own client."""
    import redis as sync_redis

    stats = sync_redis.Redis(port=port).info("commandstats")
    return int(stats.get(f"cmdstat_{name}", {}).get("calls", 0))


def test_a_commit_is_one_round_trip_and_survives_a_script_flush(redis: RedisServer) -> None:
    async def scenario() -> None:
        state = RedisState(redis.url)
        for sid in ("a", "b"):
            assert await state.create(sid, b"blob", 1.0, 60, "e")

        def writes(t: int) -> list[Write]:
            return [Write(sid, "e", t - 1, t, b"s%d" % t, b"l%d" % t, 60) for sid in ("a", "b")]

        assert await state.commit(writes(1)) == [(1, 1), (1, 1)]  # loads the script, once
        exists_before = calls(redis.port, "script|exists")
        evalsha_before = calls(redis.port, "evalsha")
        assert await state.commit(writes(2)) == [(1, 2), (1, 2)]
        assert calls(redis.port, "evalsha") == evalsha_before + 2  # the counter counts
        # redis-py's Script sent SCRIPT EXISTS before every pipelined commit: two round trips
        assert calls(redis.port, "script|exists") == exists_before
        import redis as sync_redis

        sync_redis.Redis(port=redis.port).script_flush()  # as after a restart without them
        assert await state.commit(writes(3)) == [(1, 3), (1, 3)]
        assert (await state.load("a")).t == 3  # type: ignore[union-attr]
        await state.client.aclose()

    asyncio.run(scenario())


def test_with_wait_a_write_its_replica_lacks_is_never_confirmed(
    redis: RedisServer, tmp_path: Path
) -> None:
    """LSTM_REDIS_WAIT_REPLICAS=1 on a master whose replica is frozen (SIGSTOP): no write is
    answered as confirmed, however the writes share the client's connections (WAIT counts only
    the writes of the connection it is sent on: it goes in each write's own pipeline), and a
    create that was not confirmed is taken back, so its retry creates it afresh."""
    import os
    import signal
    import subprocess

    import pytest
    import redis as sync_redis

    from service.errors import StoreOutcomeUnknown, StoreUnavailable
    from tests.servers import free_port, need_binary

    sync_redis.Redis(port=redis.port).config_set("repl-diskless-sync-delay", 0)
    port = free_port()
    replica = subprocess.Popen(
        [need_binary("redis-server"), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--dir", str(tmp_path), "--replicaof", "127.0.0.1", str(redis.port)],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        import time

        import redis as sync_redis

        master = sync_redis.Redis(port=redis.port)
        deadline = time.monotonic() + 20
        while master.info("replication").get("slave0", {}).get("state") != "online":
            assert time.monotonic() < deadline, "the replica never synced"
            time.sleep(0.1)

        async def scenario() -> None:
            # 1 s: long enough for a live replica's acknowledgement on a loaded machine (100 ms
            # failed a CI run's confirmed creates), and what a frozen one costs each write.
            state = RedisState(redis.url, wait_replicas=1, wait_timeout_ms=1000, timeout_s=3)
            ids = [f"w{i}" for i in range(6)]
            for sid in ids:  # replicated: confirmed
                assert await state.create(sid, b"blob", 1.0, 60, "e")
            os.kill(replica.pid, signal.SIGSTOP)
            writes = [[Write(sid, "e", 0, 1, b"s", b"l", 60)] for sid in ids]
            outcomes = await asyncio.gather(
                *(state.commit(w) for w in writes), return_exceptions=True
            )
            assert all(isinstance(o, StoreOutcomeUnknown) for o in outcomes), outcomes
            with pytest.raises(StoreUnavailable, match="not created"):
                await state.create("fresh", b"blob", 1.0, 60, "e")
            assert await state.load("fresh") is None  # taken back: a retry can create it
            os.kill(replica.pid, signal.SIGCONT)
            # The replica, resumed, catches up; until then the create is taken back again, so
            # retry it for a while.
            deadline = time.monotonic() + 10
            while True:
                try:
                    assert await state.create("fresh", b"blob", 1.0, 60, "e")
                    break
                except StoreUnavailable:
                    assert time.monotonic() < deadline, "the resumed replica never confirmed"
                    await asyncio.sleep(0.1)

        asyncio.run(scenario())
    finally:
        os.kill(replica.pid, signal.SIGCONT)
        replica.kill()
        replica.wait()


def test_a_create_retried_after_its_reply_was_lost_is_still_its_own(redis: RedisServer) -> None:
    """The client retries once on a timeout (redis-py's Retry): a create whose script ran but
    whose reply came too late is sent again. It failed once under load with session_exists for
    the session that very call had created; the create's epoch tells its own retry apart."""

    async def scenario() -> None:
        state = RedisState(redis.url)
        assert await state.create("once", b"blob", 1.0, 60, "epoch-1")
        assert await state.create("once", b"blob", 1.0, 60, "epoch-1")  # the retry: its own
        assert not await state.create("once", b"blob", 1.0, 60, "epoch-2")  # another create
        assert await state.commit([Write("once", "epoch-1", 0, 1, b"s1", b"l1", 60)]) == [(1, 1)]
        # once stepped, the same create sent again no longer counts as its own
        assert not await state.create("once", b"blob", 1.0, 60, "epoch-1")
        assert (await state.load("once")).t == 1  # type: ignore[union-attr]
        await state.client.aclose()

    asyncio.run(scenario())


def test_a_write_redis_refuses_is_answered_as_refused_and_leaves_nothing(
    redis: RedisServer,
) -> None:
    """Under maxmemory with noeviction Redis answers a script with an OOM error, which the
    pipeline hands back as a value: create and reset took it for success (the session never
    made, the reset never done), and an import whose write was refused left its t = 0 session
    behind in Redis (a review)."""
    import pytest
    import redis as sync_redis
    import torch

    from service.backends import RedisBackend
    from service.errors import StoreUnavailable
    from service.sessions import SessionStore, StatePool, StoreLimits
    from service.state_blob import SessionState

    direct = sync_redis.Redis(port=redis.port)
    pool = StatePool(2, 8, 1, 16, "cpu")
    store = SessionStore(pool, StoreLimits(16, 60, 60, False, 10))
    state = RedisState(redis.url)
    backend = RedisBackend(store, state, {"model": "tiny", "model_version": "v1"})
    key = state._keys("old")[0]

    async def scenario() -> None:
        old = await backend.create("old", None)
        epoch = direct.hget(key, "epoch")
        direct.config_set("maxmemory-policy", "noeviction")
        direct.config_set("maxmemory", 1)
        try:
            with pytest.raises(StoreUnavailable, match="refused the new session"):
                await backend.create("new", None)
            assert store.peek("new") is None
            with pytest.raises(StoreUnavailable, match="refused the reset"):
                await backend.reset(old)
            assert old.epoch == epoch.decode()  # the cached copy is Redis's, unchanged
        finally:
            direct.config_set("maxmemory", 0)
        real_commit = state.commit

        async def refused(writes: list[Write]) -> list[tuple[int, int]]:
            return [(-2, -2)] * len(writes)  # what commit answers for an error reply

        state.commit = refused  # type: ignore[method-assign]
        blob = SessionState(
            torch.full((2, 8), 0.1), torch.full((2, 8), 0.2), torch.zeros(1), torch.ones(1)
        )
        with pytest.raises(StoreUnavailable, match="refused the import"):
            await backend.restore("imported", blob, 5, None)
        state.commit = real_commit  # type: ignore[method-assign]
        assert store.peek("imported") is None and not direct.exists(state._keys("imported")[0])
        assert (await backend.restore("imported", blob, 5, None)).t == 5  # the retry lands
        await state.client.aclose()

    asyncio.run(scenario())
