"""The Redis layout against a real redis-server: a commit is one round trip, and survives Redis
losing its scripts."""

from __future__ import annotations

import asyncio

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
