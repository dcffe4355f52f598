"""The session store and the micro-batcher, without HTTP."""

from __future__ import annotations

import asyncio
import gc
import math
import random
import tracemalloc
from array import array

import pytest
import torch

from model import ForecasterConfig, LSTMForecaster
from model.native import build_engine
from service.batcher import MicroBatcher
from service.errors import (
    ModelFailure,
    SessionEvicted,
    SessionExists,
    SessionExpired,
    SessionGone,
    SessionNotFound,
    ShuttingDown,
    TooManySessions,
    TTLTooLong,
)
from service.sessions import (
    AppliedStep,
    Session,
    SessionStore,
    StatePool,
    StoreEvents,
    StoreLimits,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_store(
    max_sessions: int = 3,
    evict: bool = False,
    clock: Clock | None = None,
    events: StoreEvents | None = None,
) -> SessionStore:
    pool = StatePool(2, 4, 1, max_sessions, "cpu")
    limits = StoreLimits(
        max_sessions, default_ttl_s=10, max_ttl_s=100, evict_when_full=evict, tombstones=10
    )
    return SessionStore(pool, limits, events=events, clock=clock or Clock())


def test_create_get_delete_and_slot_reuse() -> None:
    store = make_store()
    a = store.create("a")
    assert store.get("a") is a and a.t == 0
    with pytest.raises(SessionExists):
        store.create("a")
    store.pool.h[:, a.slot] = 5.0
    slot = a.slot
    store.delete(a)
    with pytest.raises(SessionNotFound):
        store.get("a")
    b = store.create("b")
    assert b.slot == slot and float(store.pool.h[:, b.slot].abs().sum()) == 0.0
    with pytest.raises(RuntimeError, match="let go of"):  # never b's t through a's old handle
        _ = a.t


def test_full_store_answers_429_and_sweeps_expired_first() -> None:
    clock = Clock()
    store = make_store(clock=clock)
    for name in "abc":
        store.create(name)
    with pytest.raises(TooManySessions, match="maximum of 3"):
        store.create("d")
    clock.now += 11
    store.create("d")  # the expired ones were swept to make room
    with pytest.raises(SessionExpired):
        store.get("a")


def test_ttl_expiry_and_tombstones() -> None:
    clock = Clock()
    expired: list[int] = []
    store = make_store(clock=clock, events=StoreEvents(expired=expired.append))
    store.create("short", ttl_s=1)
    store.create("long", ttl_s=50)
    with pytest.raises(TTLTooLong):
        store.create("huge", ttl_s=101)
    clock.now += 2
    assert store.sweep() == 1 and expired == [1]
    with pytest.raises(SessionExpired, match="expired"):
        store.get("short")
    assert store.get("long").t == 0
    with pytest.raises(SessionNotFound):
        store.get("never")


def test_lru_eviction_spares_busy_sessions() -> None:
    async def scenario() -> None:
        clock = Clock()
        store = make_store(evict=True, clock=clock)
        a, b, _ = store.create("a"), store.create("b"), store.create("c")
        clock.now += 1
        store.touch(b)  # b is now most recent; a is the least recently used...
        await a.acquire()  # ...but a is busy
        store.create("d")
        with pytest.raises(SessionEvicted):
            store.get("c")
        assert store.get("a") is a
        a.release()

    asyncio.run(scenario())


def tiny_model() -> LSTMForecaster:
    torch.manual_seed(0)
    return LSTMForecaster(ForecasterConfig(("v",), hidden_size=8, num_layers=2)).eval()


@pytest.mark.parametrize("engine", ["eager", "native"])
def test_interleaved_sessions_equal_their_offline_runs(engine: str) -> None:
    """Many sessions, random chunkings, stepped concurrently: each equals its own whole run
    (the eager model's), whichever engine the rounds run."""
    model = tiny_model()
    stack_engine = build_engine(engine, model.lstm)
    rng = random.Random(0)
    series = [torch.randn(40, 1) for _ in range(12)]

    async def scenario() -> list[list[list[float]]]:
        store = SessionStore(StatePool(2, 8, 1, 16, "cpu"), StoreLimits(16, 60, 60, False, 10))
        batcher = MicroBatcher(model, store.pool, max_batch=8, stack_engine=stack_engine)

        async def stream(i: int) -> list[list[float]]:
            session = store.create(f"s{i}")
            t, means = 0, []
            while t < 40:
                size = rng.randint(1, 7)
                async with session:
                    done = await batcher.step(session, series[i][t : t + size])
                means += done.outputs.mean
                t += size
                assert done.t == min(t, 40)
                await asyncio.sleep(0)
            return means

        out = await asyncio.gather(*(stream(i) for i in range(12)))
        await batcher.close()
        return out

    streamed = asyncio.run(scenario())
    assert (model.engine is None) == (engine == "eager")
    model.use_engine(None)
    with torch.no_grad():
        for i, means in enumerate(streamed):
            whole = model(series[i].unsqueeze(0)).mean[0]
            torch.testing.assert_close(torch.tensor(means), whole, atol=1e-5, rtol=0)


def test_never_two_steps_of_one_session_in_one_batch_and_bad_items_fail_alone() -> None:
    model = tiny_model()
    batch_sizes: list[int] = []

    async def scenario() -> None:
        store = SessionStore(StatePool(2, 8, 1, 4, "cpu"), StoreLimits(4, 60, 60, False, 10))
        from service.batcher import BatchObserver

        batcher = MicroBatcher(model, store.pool, observer=BatchObserver(batch=batch_sizes.append))
        a, b = store.create("a"), store.create("b")
        x = torch.ones(1, 1)
        # Submitted without the locks on purpose: the batcher must still serialise them.
        results = await asyncio.gather(
            batcher.step(a, x),
            batcher.step(a, x),
            batcher.step(b, x),
            batcher.step(b, torch.ones(1, 3)),  # wrong feature count: fails alone
            return_exceptions=True,
        )
        assert [r.t for r in results[:3]] == [1, 2, 1]  # type: ignore[union-attr]
        assert isinstance(results[3], ModelFailure)
        assert a.t == 2 and b.t == 1
        await batcher.close()

    asyncio.run(scenario())
    assert max(batch_sizes) <= 2  # a and b together; never a twice


def test_forecast_leaves_the_state_alone() -> None:
    model = tiny_model()

    async def scenario() -> None:
        store = SessionStore(StatePool(2, 8, 1, 2, "cpu"), StoreLimits(2, 60, 60, False, 10))
        batcher = MicroBatcher(model, store.pool)
        s = store.create("s")
        await batcher.step(s, torch.randn(5, 1))
        before = store.pool.h.clone(), store.pool.c.clone(), store.pool.next_mean.clone()
        f = await batcher.forecast(s, 4, paths=50, seed=0)
        assert len(f.means) == len(f.stds) == len(f.p10) == len(f.p90) == 4
        assert torch.equal(store.pool.h, before[0]) and torch.equal(store.pool.c, before[1])
        assert torch.equal(store.pool.next_mean, before[2]) and s.t == 5
        await batcher.close()

    asyncio.run(scenario())


def test_a_busy_expired_session_is_not_replaced_under_its_step() -> None:
    async def scenario() -> None:
        clock = Clock()
        store = make_store(clock=clock)
        old = store.create("same", ttl_s=1)
        await old.acquire()  # a step is in flight
        clock.now += 5  # and the TTL ran out meanwhile
        with pytest.raises(SessionExists):
            store.create("same")
        old.release()
        store.create("same")  # idle now: expired, so the id may be taken again

    asyncio.run(scenario())


def test_a_failing_persister_answers_every_job_and_the_batcher_lives_on() -> None:
    model = tiny_model()
    calls = 0

    async def broken_persist(commits: list) -> list:  # type: ignore[type-arg]
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("not a ServiceError")
        return [None] * len(commits)

    async def scenario() -> None:
        store = SessionStore(StatePool(2, 8, 1, 2, "cpu"), StoreLimits(2, 60, 60, False, 10))
        batcher = MicroBatcher(model, store.pool, persist=broken_persist)
        s = store.create("s")
        with pytest.raises(ModelFailure):
            await asyncio.wait_for(batcher.step(s, torch.ones(1, 1)), timeout=10)
        assert s.t == 0 and float(store.pool.h.abs().sum()) == 0.0  # nothing applied
        done = await asyncio.wait_for(batcher.step(s, torch.ones(1, 1)), timeout=10)
        assert done.t == 1
        await batcher.close()

    asyncio.run(scenario())


def test_a_model_failure_is_logged_once_with_its_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The batcher turned model exceptions into model_failure answers and logged nothing: a
    # broken model was invisible in the server's log (issue "engine").
    model = tiny_model()

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("weights on fire")

    model.forward = broken  # type: ignore[method-assign,assignment]

    async def scenario() -> list[object]:
        store = SessionStore(StatePool(2, 8, 1, 4, "cpu"), StoreLimits(4, 60, 60, False, 10))
        batcher = MicroBatcher(model, store.pool)
        sessions = [store.create(f"s{i}") for i in range(3)]
        x = torch.ones(1, 1)
        futures = [batcher.submit_step(s, x) for s in sessions]  # queued together: one round
        results = await asyncio.gather(*futures, return_exceptions=True)
        await batcher.close()
        return list(results)

    with caplog.at_level("WARNING", logger="lstm_sessions.batcher"):
        results = asyncio.run(scenario())
    assert all(isinstance(r, ModelFailure) for r in results)
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert len(tracebacks) == 1 and "weights on fire" in str(tracebacks[0].exc_info[1])


def test_resets_do_not_grow_the_replay_queue() -> None:
    # Each reset left the session's entry and the next step added another: a session reset every
    # second held 1,800 entries after 30 minutes (issue "engine").
    from service.results import Outputs, StepDone

    clock = Clock()
    store = make_store(clock=clock)
    s = store.create("r")
    step = AppliedStep(0, bytes(16), StepDone(1, Outputs([[0.0]], [[1.0]], [None], None)))
    for _ in range(200):
        s.last_step = step
        store.reset(s)
        clock.now += 1
    assert len(store.slots.replays) == 1 and s.last_step is None
    s.last_step = step
    clock.now += 100
    store.sweep()  # past the window: the record and the entry go
    assert s.last_step is None and len(store.slots.replays) == 0


def test_closing_the_batcher_answers_every_job_it_held() -> None:
    # close() cancelled the worker and left in-flight, deferred and queued futures pending forever.
    model = tiny_model()
    persisting = asyncio.Event()

    async def slow_persist(commits: list) -> list:  # type: ignore[type-arg]
        persisting.set()
        await asyncio.sleep(30)  # the round is in flight when close() comes
        return [None] * len(commits)

    async def scenario() -> None:
        store = SessionStore(StatePool(2, 8, 1, 4, "cpu"), StoreLimits(4, 60, 60, False, 10))
        batcher = MicroBatcher(model, store.pool, persist=slow_persist)
        a, b = store.create("a"), store.create("b")
        x = torch.ones(1, 1)
        in_flight = [batcher.submit_step(a, x), batcher.submit_step(a, x)]  # the 2nd: deferred
        await asyncio.wait_for(persisting.wait(), timeout=10)
        queued = batcher.submit_step(b, x)
        await asyncio.wait_for(batcher.close(), timeout=5)
        for future in [*in_flight, queued]:
            assert future.done() and isinstance(future.exception(), ShuttingDown)
        assert a.t == 0 and b.t == 0  # none was applied: the persister never accepted them
        with pytest.raises(ShuttingDown):
            await batcher.step(b, x)

    asyncio.run(scenario())


def test_expiry_and_eviction_follow_activity_across_ttls_without_scanning() -> None:
    clock = Clock()
    store = make_store(max_sessions=1000, evict=True, clock=clock)
    short = [store.create(f"short-{i}", ttl_s=5) for i in range(3)]
    for i in range(997):
        store.create(f"long-{i}", ttl_s=50)
    clock.now += 4
    store.touch(short[0])  # now the most recently active of its list
    visited = 0
    oldest = store.slots.oldest

    def counting(ttl: float):  # type: ignore[no-untyped-def]
        nonlocal visited
        for session in oldest(ttl):
            visited += 1
            yield session

    store.slots.oldest = counting  # type: ignore[method-assign]
    clock.now += 2  # short-1 and short-2 are past their 5 s; short-0 and the long ones are not
    assert store.sweep() == 2
    assert visited <= 2 + 2  # the two expired, then one live head per list: not 1000 sessions
    assert store.get("short-0") is short[0]
    with pytest.raises(SessionExpired):
        store.get("short-1")
    for i in range(2):  # full: make room by evicting the least recently used idle sessions
        store.create(f"new-{i}")
    visited = 0
    store.create("one-more")
    assert len(store.slots.lanes) == 3  # the lists of TTL 5, 50 and the default 10
    assert visited <= 2 * 3  # the sweep and the eviction each look at one head per list
    with pytest.raises(SessionEvicted):  # long-0 (active at 0) is older than short-0 (at 4)
        store.get("long-0")
    assert store.get("short-0") is short[0]


def test_replay_records_are_kept_for_the_window_then_freed() -> None:
    from service.results import Outputs, StepDone

    clock = Clock()
    store = SessionStore(
        StatePool(2, 4, 1, 4, "cpu"),
        StoreLimits(4, 600, 600, False, 10, replay_window_s=60),
        clock=clock,
    )
    a, b = store.create("a"), store.create("b")
    outputs = Outputs([[0.25]], [[1.5]], [None], {"forget": [[0.1], [0.9]]})
    a.last_step = AppliedStep(0, bytes(16), StepDone(1, outputs))
    assert a.last_step == AppliedStep(0, bytes(16), StepDone(1, outputs))  # kept exactly
    b.last_step = AppliedStep(0, b"y" * 16, StepDone(1, Outputs([[0.0]], [[1.0]], [None], None)))
    clock.now += 50
    b.last_step = AppliedStep(1, b"z" * 16, StepDone(2, Outputs([[0.0]], [[1.0]], [[0.3]], None)))
    clock.now += 11
    store.sweep()
    assert a.last_step is None  # 61 s old
    assert b.last_step is not None and b.last_step.seq == 1  # 11 s old: kept
    clock.now += 50
    store.sweep()
    assert b.last_step is None


def test_concurrent_callers_share_rounds_even_when_they_arrive_a_few_loop_passes_apart() -> None:
    """Handlers reach the batcher after some awaits of their own (parsing, the session's lock):
    a round must not start with the first of them alone."""
    from service.batcher import BatchObserver

    model = tiny_model()
    sizes: list[int] = []

    async def scenario() -> None:
        store = SessionStore(StatePool(2, 8, 1, 32, "cpu"), StoreLimits(32, 60, 60, False, 10))
        batcher = MicroBatcher(
            model, store.pool, inline_work=256, observer=BatchObserver(batch=sizes.append)
        )

        async def handler(i: int) -> None:
            session = store.create(f"s{i}")
            for _ in range(i % 3):  # a little work before the step, different for each
                await asyncio.sleep(0)
            async with session:
                await batcher.step(session, torch.ones(1, 1))

        await asyncio.gather(*(handler(i) for i in range(32)))
        await batcher.close()

    asyncio.run(scenario())
    assert sum(sizes) == 32 and max(sizes) >= 16, sizes


def test_the_session_lock_is_first_come_first_served_and_survives_cancellations() -> None:
    async def scenario() -> list[str]:
        store = make_store()
        session = store.create("s")
        order: list[str] = []
        assert session.try_acquire() and not session.try_acquire()

        async def user(name: str) -> None:
            async with session:
                order.append(name)
                await asyncio.sleep(0)

        a = asyncio.create_task(user("a"))
        b = asyncio.create_task(user("b"))
        c = asyncio.create_task(user("c"))
        await asyncio.sleep(0)  # all three wait, in this order
        b.cancel()  # b gives up while waiting
        await asyncio.sleep(0)
        session.release()  # the holder leaves: the lock is handed to a...
        a.cancel()  # ...which is cancelled before it runs: it must pass the lock on to c
        results = await asyncio.gather(a, b, c, return_exceptions=True)
        assert isinstance(results[0], asyncio.CancelledError)
        assert isinstance(results[1], asyncio.CancelledError)
        assert not session.busy  # nobody holds it, nobody waits
        return order

    assert asyncio.run(scenario()) == ["c"]


def test_replay_records_round_trip_exactly_and_the_queue_compacts() -> None:
    from service.results import Outputs, StepDone
    from service.sessions import ReplayQueue, pack_step, unpack_step

    rng = random.Random(1)
    mean = [[rng.random(), -rng.random()] for _ in range(3)]
    std = [[rng.random(), rng.random()] for _ in range(3)]
    anomaly: list[list[float] | None] = [None, [1e-300, -2.5], [3.0, 0.0]]
    gates = {"forget": [[0.1, 0.2, 0.3]], "input": [[0.4, 0.5, 0.6]], "output": [[0.7, 0.8, 0.9]]}
    step = AppliedStep(7, bytes(range(16)), StepDone(10, Outputs(mean, std, anomaly, gates)))
    assert unpack_step(pack_step(step, 123.5)) == (step, 123.5)

    store = make_store()
    queue, session = ReplayQueue(), store.create("s")
    for k in range(10_000):
        queue.append(float(k), session)
    for k in range(9_000):
        assert queue.first_time() == float(k) and queue.popleft() is session
    assert len(queue) == 1_000 and len(queue.sessions) < 10_000  # the consumed part was dropped
    assert queue.first_time() == 9_000.0


class CountingArray(array):  # type: ignore[type-arg]
    """A copy of ``Slots.last_active`` that counts reads: each is one session looked at."""

    reads = 0

    def __getitem__(self, index: int) -> float:  # type: ignore[override]
        self.reads += 1
        return float(super().__getitem__(index))


def count_reads(store: SessionStore) -> CountingArray:
    counted = CountingArray("d", store.slots.last_active)
    store.slots.last_active = counted
    return counted


def test_a_sweep_with_many_distinct_ttls_looks_only_at_what_expires() -> None:
    # The sweep looked at the head of every TTL's list each second: 65 ms at 100k distinct
    # client-chosen TTLs, however few expired (issue 11).
    clock = Clock()
    store = make_store(max_sessions=2001, evict=True, clock=clock)
    sessions = [store.create(f"s{i}", ttl_s=10 + i / 100) for i in range(2000)]
    reads = count_reads(store)
    clock.now += 2
    for s in sessions[:5]:  # touched: their lanes' keys are now early, corrected lazily
        store.touch(s)
    clock.now += 8.025  # s0..s2 (TTL 10, 10.01, 10.02), active at 1000, would expire now...
    reads.reads = 0
    assert store.sweep() == 0  # ...but they were touched at 1002
    assert reads.reads <= 2 * 5  # one look at each touched lane, none at the 1,995 others
    clock.now += 2  # now s0..s2 (touched) and s5..s202 (not touched) have expired
    reads.reads = 0
    freed = store.sweep()
    assert freed == 3 + 198
    assert reads.reads <= 4 * freed
    for i in [0, 1, 2, *range(5, 203)]:
        assert store.peek(f"s{i}") is None
    for i in [3, 4, *range(203, 2000)]:
        assert store.peek(f"s{i}") is sessions[i]
    reads.reads = 0
    assert store.sweep() == 0 and reads.reads == 0  # nothing due: nothing looked at
    # Eviction: the least recently active idle session across 1,800 lanes, without scanning them.
    for i in range(202):
        store.create(f"n{i}", ttl_s=99)
    reads.reads = 0
    store.create("one-more", ttl_s=99)  # full: s203 (active at 1000, untouched) is the oldest
    with pytest.raises(SessionEvicted):
        store.get("s203")
    assert reads.reads <= 8


def check_lanes(store: SessionStore) -> None:
    """Every session in its TTL's lane, lanes linked both ways in order of activity, and each
    lane's one entry in each heap a lower bound of its head's expiry and last activity."""
    meta, seen = store.slots, set()
    # array.__getitem__: the checks' own reads do not count as the store's (CountingArray)
    for ttl, lane in meta.lanes.items():
        slot, before, last = lane.head, -1, -math.inf
        while slot != -1:
            owner = meta.owner[slot]
            assert owner is not None and owner.slot == slot and owner.ttl_s == ttl
            assert meta.prev[slot] == before and array.__getitem__(meta.last_active, slot) >= last
            seen.add(owner.id)
            before, last, slot = slot, array.__getitem__(meta.last_active, slot), meta.next[slot]
        assert lane.tail == before and lane.ttl == ttl
        head_active = array.__getitem__(meta.last_active, lane.head)
        assert lane.due is not None and (lane.due, ttl) in meta.expiry
        assert lane.due <= head_active + ttl
        assert lane.since is not None and (lane.since, ttl) in meta.recency
        assert lane.since <= head_active
    assert seen == {s.id for s in store.sessions()}
    assert (
        len(meta.expiry) <= 2 * len(meta.lanes) + 64
        and len(meta.recency) <= 2 * len(meta.lanes) + 64
    )


def test_expiry_and_eviction_with_many_ttls_agree_with_a_reference_model() -> None:
    """Random creates, touches, resets, deletes, reads, locks, snapshot-style restores (activity
    set back) and sweeps on a full store with mostly distinct TTLs: after each, the store holds
    exactly the sessions a plain model says (which expired, which LRU victim), its lanes and heaps
    are consistent, and all its sweeps together looked at what expired or changed, not at every
    lane each time (they looked at every lane's head: about lanes x sweeps)."""
    rng = random.Random(11)
    clock = Clock()
    cap = 30
    store = make_store(max_sessions=cap, evict=True, clock=clock)
    reads = count_reads(store)
    model: dict[str, tuple[float, float]] = {}  # id -> (last_active, ttl)
    busy: set[str] = set()
    changes = looked_at = sweeps = 0
    stats = {"evicted": 0, "lanes": 0, "full": 0}

    def expired_idle(now: float) -> set[str]:
        return {i for i, (at, ttl) in model.items() if at + ttl <= now and i not in busy}

    def create(sid: str, ttl: float) -> Session | None:
        now = clock.now
        if sid in model:
            at, old_ttl = model[sid]
            if at + old_ttl > now or sid in busy:
                with pytest.raises(SessionExists):
                    store.create(sid, ttl)
                return None
            del model[sid]  # expired: the id may be taken again
        if len(model) >= cap:
            for gone in expired_idle(now):  # a full store sweeps first...
                del model[gone]
        if len(model) >= cap:
            idle = [i for i in model if i not in busy]
            if not idle:
                with pytest.raises(TooManySessions):
                    store.create(sid, ttl)
                return None
            del model[min(idle, key=lambda i: model[i][0])]  # ...then evicts the LRU idle one
            stats["evicted"] += 1
        model[sid] = (now, ttl)
        return store.create(sid, ttl)

    for _ in range(4000):
        clock.now += rng.choice([0.001, 0.01, 0.05, 0.1])
        now, op = clock.now, rng.random()
        live = sorted(model)
        sid = rng.choice(live) if live and op < 0.6 else f"s{rng.randrange(70)}"
        ttl = rng.choice([5.0, 20.0]) if rng.random() < 0.3 else round(rng.uniform(1, 30), 2)
        if op < 0.12 and sid in model:
            store.touch(store.peek(sid))  # type: ignore[arg-type]
            model[sid] = (now, model[sid][1])
        elif op < 0.18 and sid in model:
            store.reset(store.peek(sid))  # type: ignore[arg-type]
            model[sid] = (now, model[sid][1])
        elif op < 0.24 and sid in model:
            store.delete(store.peek(sid))  # type: ignore[arg-type]
            del model[sid]
            busy.discard(sid)
        elif op < 0.32 and sid in model:
            session = store.peek(sid)
            assert session is not None
            if sid in busy:
                session.release()
                busy.discard(sid)
            else:
                assert session.try_acquire()
                busy.add(sid)
        elif op < 0.40:
            at, old_ttl = model.get(sid, (math.inf, 0.0))
            if at + old_ttl <= now and sid not in busy:
                with pytest.raises(SessionExpired):  # expired on access
                    store.get(sid)
                del model[sid]
            elif sid in model:
                assert store.get(sid) is store.peek(sid)
            else:
                with pytest.raises(SessionGone):
                    store.get(sid)
        elif op < 0.45:
            # A snapshot's session: created, then its last activity set back, no earlier than
            # its lane's newest session (a snapshot restores oldest first).
            newest = max((at for at, t in model.values() if t == ttl), default=now - 2 * ttl)
            session = create(sid, ttl)
            if session is not None:
                session.last_active = rng.uniform(newest, now)
                model[sid] = (session.last_active, ttl)
        elif op < 0.75:
            expected = expired_idle(now)
            busy_expired = sum(at + t <= now for i, (at, t) in model.items() if i in busy)
            reads.reads = 0
            assert store.sweep() == len(expected)
            looked_at += reads.reads - 4 * (len(expected) + busy_expired)
            sweeps += 1
            for gone in expected:
                del model[gone]
            changes -= 1
        else:
            create(sid, ttl)
        changes += 1
        assert {s.id for s in store.sessions()} == set(model)
        for i, (at, _) in model.items():
            assert array.__getitem__(store.slots.last_active, store.peek(i).slot) == at  # type: ignore[union-attr]
        check_lanes(store)
        stats["lanes"] += len(store.slots.lanes)
        stats["full"] += len(model) == cap
    # It did exercise what it means to: many sweeps, evictions, full stretches, many lanes.
    assert sweeps > 1000 and stats["evicted"] > 100 and stats["full"] > 1000
    assert stats["lanes"] / 4000 > 15
    assert looked_at <= 2 * changes, (looked_at, changes)


def test_a_ttl_is_forgotten_with_the_last_session_that_had_it() -> None:
    # The store interned every TTL ever asked for: 200k distinct values kept 14.6 MiB with no
    # session left (issue 11). Now each goes with its lane, by every way a session goes.
    clock = Clock()
    store = make_store(max_sessions=1000, evict=True, clock=clock)
    distinct = iter(range(10**9))

    def one_round() -> None:
        first = []
        for i in range(1000):
            first.append(store.create(f"a{i}", ttl_s=1 + next(distinct) / 1e7))
            clock.now += 0.0001
        for i in range(500):  # full: each evicts the least recently used of the first ones
            store.create(f"b{i}", ttl_s=1 + next(distinct) / 1e7)
            assert store.peek(f"a{i}") is None
        for session in first[500:750]:
            store.delete(session)
        clock.now += 5
        for session in first[750:850]:
            with pytest.raises(SessionExpired):
                store.get(session.id)  # expired on access
        assert store.sweep() == 150 + 500
        assert len(store) == 0 and not store.slots.lanes

    tracemalloc.start()
    one_round()  # grows the tables to their size (a dict never shrinks)
    gc.collect()
    after_first = tracemalloc.get_traced_memory()[0]
    for _ in range(3):
        one_round()
    gc.collect()
    grown = tracemalloc.get_traced_memory()[0] - after_first
    tracemalloc.stop()
    assert grown < 3 * 1500 * 4, grown  # under 4 bytes per TTL that came and went (it was ~70)
    assert len(store.slots.expiry) <= 64 and len(store.slots.recency) <= 64  # the rebuild bound
