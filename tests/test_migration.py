"""Migration by replay (service/versions.py): each session keeps its last W inputs with its state
(the pool's ring, its blobs), and moving it to another model version runs that version over them
from a zero state. After it, the state equals the new model over the window exactly; t, seq and
the replay record carry on. The engines here are tiny and in process; tests/test_versions.py
runs a real server."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import pytest
import torch

from model import ForecasterConfig, LSTMForecaster
from service.backends import EmbeddedBackend
from service.batcher import MicroBatcher
from service.engine import Engine, EngineLimits
from service.errors import MigrationImpossible, VersionInUse
from service.schemas import Step
from service.sessions import SessionStore, StatePool, StoreLimits
from service.state_blob import decode
from service.versions import Version, Versions

VALUES = [0.3, -0.2, 1.1, 0.7, -0.9, 0.4, 0.05, -1.3, 0.8, 0.2, -0.4, 1.5, 0.6, -0.1, 0.9]


def model(hidden: int, layers: int, seed: int) -> LSTMForecaster:
    torch.manual_seed(seed)
    return LSTMForecaster(ForecasterConfig(("v",), hidden_size=hidden, num_layers=layers)).eval()


def engine(net: LSTMForecaster, version: str, window: int) -> Engine:
    config = net.config
    pool = StatePool(config.num_layers, config.hidden_size, 1, 16, "cpu", window=window)
    store = SessionStore(pool, StoreLimits(16, 60, 60, False, 10))
    return Engine(
        EmbeddedBackend(store),
        MicroBatcher(net, pool),
        model=("m", version),
        n_features=1,
        limits=EngineLimits(max_chunk=32, max_predict_len=64, max_many=8, max_horizon=4),
    )


def step(sid: str, rows: list[float], seq: int) -> Step:
    return Step(session_id=sid, inputs=[[v] for v in rows], seq=seq)


def offline(net: LSTMForecaster, rows: list[float]) -> Any:
    """The model over ``rows`` from a zero state: (means per step, final state)."""
    with torch.no_grad():
        out = net(torch.tensor(rows).reshape(1, -1, 1))
    return out.mean[0, :, 0].tolist(), out.state


def run(coro: Any) -> Any:
    return asyncio.run(coro)


@pytest.mark.parametrize("chunks", [[3, 1, 5, 6], [15], [1] * 15, [9, 6]])
def test_the_window_keeps_the_last_inputs_however_they_came(chunks: list[int]) -> None:
    async def scenario() -> None:
        here = engine(model(8, 2, 0), "v1", window=8)
        await here.create("s", None)
        at = 0
        for n in chunks:
            await here.step(step("s", VALUES[at : at + n], seq=at))
            at += n
        session = here.store.get("s")
        kept = here.store.pool.window_of(session.slot)
        assert kept is not None and kept[:, 0].tolist() == pytest.approx(VALUES[-8:])
        # It travels in the blob, and comes back from it.
        _, blob = await here.export("s")
        header, state = decode(blob)
        assert header["window"] == 8 and state.window is not None
        assert state.window[:, 0].tolist() == pytest.approx(VALUES[-8:])
        there = engine(model(8, 2, 0), "v1", window=8)
        await there.import_blob(blob, "s", None)
        again = there.store.pool.window_of(there.store.get("s").slot)
        assert again is not None and again[:, 0].tolist() == pytest.approx(VALUES[-8:])
        await here.reset("s")
        assert here.store.pool.window_of(session.slot).shape[0] == 0  # type: ignore[union-attr]

    run(scenario())


def test_a_migrated_session_equals_the_new_model_over_its_window_and_carries_on() -> None:
    async def scenario() -> None:
        v1_net, v2_net = model(8, 2, 0), model(4, 1, 5)  # other shapes: other pools
        v1, v2 = engine(v1_net, "v1", window=8), engine(v2_net, "v2", window=8)
        versions = Versions(Version("m:v1", v1, "cpu"), loader=lambda tag: Version(tag, v2, "cpu"))
        await versions.create("long", None)  # more inputs than the window
        await versions.create("short", None)  # fewer: the window is the whole history
        await versions.step(step("long", VALUES[:12], seq=0))
        last = await versions.step(step("long", VALUES[12:14], seq=12))
        await versions.step(step("short", VALUES[:5], seq=0))
        await versions.load("m:v2")
        moved = await versions.migrate("long", "m:v2")
        assert (moved.model, moved.t) == (("m", "v2"), 14)
        state = v2.store.pool.read(v2.store.get("long").slot)
        _, expected = offline(v2_net, VALUES[6:14])
        torch.testing.assert_close(state.h, expected.h[:, 0], atol=1e-6, rtol=0)
        torch.testing.assert_close(state.c, expected.c[:, 0], atol=1e-6, rtol=0)
        # The next step continues on v2, as v2 over the window and then this chunk.
        after = await versions.step(step("long", VALUES[14:], seq=14))
        assert (after["model_version"], after["t"]) == ("v2", 15)
        means, _ = offline(v2_net, VALUES[6:15])
        assert after["outputs"][0]["mean"][0] == pytest.approx(means[-1], abs=1e-6)
        # The short one's replay is its whole history: exact.
        await versions.migrate("short", "m:v2")
        rest = await versions.step(step("short", VALUES[5:9], seq=5))
        whole, _ = offline(v2_net, VALUES[:9])
        got = [o["mean"][0] for o in rest["outputs"]]
        assert got == pytest.approx(whole[5:], abs=1e-6)
        # v1 is empty now, and may go.
        assert v1.store.peek("long") is None and len(v1.store) == 0
        assert last["t"] == 14

    run(scenario())


def test_a_retry_of_the_last_step_before_a_migration_is_answered_once_after_it() -> None:
    async def scenario() -> None:
        v1, v2 = engine(model(8, 2, 0), "v1", 8), engine(model(4, 1, 5), "v2", 8)
        versions = Versions(Version("m:v1", v1, "cpu"), loader=lambda tag: Version(tag, v2, "cpu"))
        await versions.create("s", None)
        first = await versions.step(step("s", VALUES[:4], seq=0))
        await versions.load("m:v2")
        await versions.migrate("s", "m:v2")
        retried = await versions.step(step("s", VALUES[:4], seq=0))
        assert retried["t"] == 4 and retried["outputs"] == first["outputs"]
        assert (await versions.get("s")).t == 4

    run(scenario())


def test_a_session_with_no_window_cannot_migrate_and_stays_served() -> None:
    async def scenario() -> None:
        v1, v2 = engine(model(8, 2, 0), "v1", 0), engine(model(4, 1, 5), "v2", 0)
        versions = Versions(Version("m:v1", v1, "cpu"), loader=lambda tag: Version(tag, v2, "cpu"))
        await versions.create("old", None)
        await versions.create("fresh", None)
        await versions.step(step("old", VALUES[:3], seq=0))
        await versions.load("m:v2")
        with pytest.raises(MigrationImpossible, match="kept no inputs"):
            await versions.migrate("old", "m:v2")
        assert (await versions.migrate("fresh", "m:v2")).model == (
            "m",
            "v2",
        )  # t = 0: nothing to replay
        await versions.activate("m:v2", "on_next_step")
        stays = await versions.step(step("old", VALUES[3:4], seq=3))
        assert (stays["model_version"], stays["t"]) == ("v1", 4)
        with pytest.raises(VersionInUse):
            await versions.unload("m:v1")

    run(scenario())


def test_a_session_whose_window_restarted_empty_is_told_so_not_blamed_on_the_setting() -> None:
    """After a crash's recovery (the journal keeps no windows) the refusal said
    LSTM_MIGRATION_WINDOW was 0 (an outside test run): it says how many more steps it needs."""

    async def scenario() -> None:
        v1, v2 = engine(model(8, 2, 0), "v1", 8), engine(model(4, 1, 5), "v2", 8)
        versions = Versions(Version("m:v1", v1, "cpu"), loader=lambda tag: Version(tag, v2, "cpu"))
        await versions.create("s", None)
        await versions.step(step("s", VALUES[:3], seq=0))
        session = v1.store.get("s")
        state = dataclasses.replace(v1.store.pool.read(session.slot), window=None)
        v1.store.pool.write(session.slot, state)  # as a restore from the journal leaves it
        assert v1.store.pool.read(session.slot).window_rows() == 0
        await versions.load("m:v2")
        with pytest.raises(MigrationImpossible, match="kept 0 of its last 3 inputs") as refused:
            await versions.migrate("s", "m:v2")
        assert "LSTM_MIGRATION_WINDOW" not in str(refused.value)

    run(scenario())


def test_a_move_whose_old_copy_cannot_be_deleted_leaves_one_session(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The old version's delete failing (its journal, say) left the session on both versions:
    the clean stop wrote the id twice and the restart refused the whole snapshot (a review)."""
    from service.errors import StoreUnavailable

    async def scenario() -> None:
        v1, v2 = engine(model(8, 2, 0), "v1", 8), engine(model(4, 1, 5), "v2", 8)
        versions = Versions(Version("m:v1", v1, "cpu"), loader=lambda tag: Version(tag, v2, "cpu"))
        await versions.create("s", None)
        await versions.step(step("s", VALUES[:3], seq=0))
        await versions.load("m:v2")

        async def refused(session: Any) -> None:
            raise StoreUnavailable("the session journal cannot be written")

        monkeypatch.setattr(v1.backend, "delete", refused)
        assert (await versions.migrate("s", "m:v2")).model == ("m", "v2")
        assert v1.store.peek("s") is None and v2.store.get("s").t == 3

    run(scenario())


def test_activate_migrates_on_next_step_or_now() -> None:
    async def scenario() -> None:
        v1, v2 = engine(model(8, 2, 0), "v1", 8), engine(model(4, 1, 5), "v2", 8)
        versions = Versions(Version("m:v1", v1, "cpu"), loader=lambda tag: Version(tag, v2, "cpu"))
        for sid in ("a", "b", "c"):
            await versions.create(sid, None)
            await versions.step(step(sid, VALUES[:6], seq=0))
        await versions.load("m:v2")
        await versions.activate("m:v2", "on_next_step")
        assert (await versions.step(step("a", VALUES[6:7], seq=6)))["model_version"] == "v2"
        assert (await versions.get("b")).model == ("m", "v2")  # any call moves it
        assert len(v1.store) == 1  # c has not been called yet
        await versions.activate("m:v1", "now")  # and back, all at once
        assert versions.background is not None
        await versions.background
        assert len(v2.store) == 0 and len(v1.store) == 3
        await versions.unload("m:v2")
        assert [m["tag"] for m in versions.models()] == ["m:v1"]

    run(scenario())


def test_a_step_waiting_on_a_migrating_session_follows_it() -> None:
    async def scenario() -> None:
        v1, v2 = engine(model(8, 2, 0), "v1", 8), engine(model(4, 1, 5), "v2", 8)
        versions = Versions(Version("m:v1", v1, "cpu"), loader=lambda tag: Version(tag, v2, "cpu"))
        await versions.create("s", None)
        await versions.step(step("s", VALUES[:6], seq=0))
        await versions.load("m:v2")
        moved, stepped = await asyncio.gather(
            versions.migrate("s", "m:v2"), versions.step(step("s", VALUES[6:8], seq=6))
        )
        assert moved.model == ("m", "v2")
        assert stepped["t"] == 8 and (await versions.get("s")).t == 8

    run(scenario())


def test_a_blob_of_a_version_not_loaded_migrates_on_import() -> None:
    async def scenario() -> None:
        v1_net, v2_net = model(8, 2, 0), model(4, 1, 5)
        old = engine(v1_net, "v1", 8)  # another deployment, on the old version
        await old.create("s", None)
        await old.step(step("s", VALUES[:12], seq=0))
        _, blob = await old.export("s")
        here = engine(v2_net, "v2", 8)
        versions = Versions(
            Version("m:v2", here, "cpu"), loader=lambda tag: Version(tag, here, "cpu")
        )
        moved = await versions.import_blob(blob, None, None)
        assert (moved.model, moved.t, moved.session_id) == (("m", "v2"), 12, "s")
        _, expected = offline(v2_net, VALUES[4:12])
        state = here.store.pool.read(here.store.get("s").slot)
        torch.testing.assert_close(state.h, expected.h[:, 0], atol=1e-6, rtol=0)
        # A blob that kept no inputs cannot migrate: a coded refusal, nothing created.
        bare = engine(v1_net, "v1", 0)
        await bare.create("b", None)
        await bare.step(step("b", VALUES[:3], seq=0))
        _, no_window = await bare.export("b")
        with pytest.raises(MigrationImpossible, match="keeps no inputs"):
            await versions.import_blob(no_window, None, None)
        assert here.store.peek("b") is None

    run(scenario())


def test_step_many_items_waiting_on_a_migrating_session_follow_it() -> None:
    async def scenario() -> None:
        v1, v2 = engine(model(8, 2, 0), "v1", 8), engine(model(4, 1, 5), "v2", 8)
        versions = Versions(Version("m:v1", v1, "cpu"), loader=lambda tag: Version(tag, v2, "cpu"))
        for sid in ("a", "b"):
            await versions.create(sid, None)
            await versions.step(step(sid, VALUES[:6], seq=0))
        await versions.load("m:v2")
        _, many = await asyncio.gather(
            versions.migrate("a", "m:v2"),
            versions.step_many([step("a", VALUES[6:7], seq=6), step("b", VALUES[6:7], seq=6)]),
        )
        assert [r["ok"] for r in many] == [True, True], many
        assert (await versions.get("a")).t == 7 and (await versions.get("b")).t == 7
        # The request's item limit holds before it is split by version.
        from service.errors import TooManyItems

        with pytest.raises(TooManyItems):
            await versions.step_many([step("a", [0.1], seq=None) for _ in range(9)])
        assert (await versions.get("a")).t == 7

    run(scenario())


def test_an_incomplete_window_does_not_migrate_and_a_second_activate_stops_the_first() -> None:
    async def scenario() -> None:
        v1, v2 = engine(model(8, 2, 0), "v1", 8), engine(model(4, 1, 5), "v2", 8)
        versions = Versions(Version("m:v1", v1, "cpu"), loader=lambda tag: Version(tag, v2, "cpu"))
        await versions.create("s", None)
        await versions.step(step("s", VALUES[:10], seq=0))
        # As a crash's recovery leaves it: t 10, no window; then one more input.
        session = v1.store.get("s")
        state = v1.store.pool.read(session.slot)
        v1.store.pool.write(session.slot, dataclasses.replace(state, window=None))
        await versions.step(step("s", VALUES[10:11], seq=10))
        await versions.load("m:v2")
        with pytest.raises(MigrationImpossible, match="kept 1 of its last 8"):
            await versions.migrate("s", "m:v2")
        await versions.step(step("s", VALUES[11:15], seq=11))
        await versions.step(step("s", VALUES[11:14], seq=15))  # 8 inputs since: complete again
        assert (await versions.migrate("s", "m:v2")).model == ("m", "v2")
        # activate(v1, now) (it would move s back to v1), then straight away activate(v2,
        # none): the first's moves stop, s stays where the last call left it.
        await versions.activate("m:v1", "now")
        await versions.activate("m:v2", "none")
        assert versions.background is not None
        await versions.background
        assert v2.store.peek("s") is not None and v1.store.peek("s") is None

    run(scenario())


def test_an_import_into_another_loaded_version_cannot_duplicate_an_id() -> None:
    async def scenario() -> None:
        v1, v2 = engine(model(8, 2, 0), "v1", 8), engine(model(4, 1, 5), "v2", 8)
        versions = Versions(Version("m:v1", v1, "cpu"), loader=lambda tag: Version(tag, v2, "cpu"))
        await versions.create("s", None)
        await versions.step(step("s", VALUES[:4], seq=0))
        _, blob = await versions.export("s")
        await versions.load("m:v2")
        await versions.activate("m:v2", "none")
        await versions.migrate("s")  # now on v2
        from service.errors import SessionExists

        with pytest.raises(SessionExists):
            await versions.import_blob(blob, None, None)  # a v1 blob of s: s is taken
        assert v1.store.peek("s") is None and v2.store.peek("s") is not None

    run(scenario())
