"""Several model versions in one server (service/versions.py): a second version loaded and
activated with no restart; new sessions on it, existing ones staying on theirs; every reply says
which version answered; a version with sessions on it, or the active one, cannot be unloaded."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import numpy as np
import pytest
import torch

from model import ForecasterConfig, LSTMForecaster, load_checkpoint, save_checkpoint
from model.checkpoint import AnyForecaster, build_forecaster
from tests.servers import ROOT, bentoml_server

pytestmark = pytest.mark.slow

SHIPPED = ROOT / "models" / "acsf1-forecaster"


def second_version(directory: Path) -> AnyForecaster:
    """Another version of the shipped model's name: a smaller network (its states have other
    shapes), the same features, normalisation and scaling."""
    shipped = load_checkpoint(SHIPPED)
    config = ForecasterConfig(
        **{**shipped.model.config.to_dict(), "hidden_size": 16, "num_layers": 1}
    )
    torch.manual_seed(7)
    model = build_forecaster(config, shipped.model.normalisation)
    save_checkpoint(model, directory, name=shipped.name)
    return model


def import_into(home: Path, directory: Path) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "service.model_registry", "import", str(directory)],
        cwd=ROOT,
        env={**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, AnyForecaster]]:
    where = tmp_path_factory.mktemp("versions")
    home = where / "home"
    with bentoml_server({"BENTOML_HOME": str(home)}) as url:
        model = second_version(where / "v2")
        yield url, import_into(home, where / "v2"), model


def post(url: str, route: str, body: dict[str, Any] | None = None) -> httpx.Response:
    return httpx.post(url + route, json=body or {}, timeout=60)


def test_a_second_version_goes_live_and_sessions_stay_on_theirs(
    served: tuple[str, str, AnyForecaster], held_out_series: list[np.ndarray]
) -> None:
    url, v2_tag, v2_model = served
    listed = post(url, "/v1/admin/models").json()["models"]
    assert [m["active"] for m in listed] == [True]
    v1_tag = listed[0]["tag"]
    v1, v2 = v1_tag.split(":")[1], v2_tag.split(":")[1]
    values = held_out_series[0][:30]
    old = post(url, "/v1/sessions/create", {"session_id": "old"}).json()
    assert old["model_version"] == v1
    first = post(url, "/v1/sessions/step", {"session_id": "old", "inputs": values[:10].tolist()})
    assert first.json()["model_version"] == v1

    loaded = post(url, "/v1/admin/models/load", {"tag": v2_tag})
    assert loaded.status_code == 200, loaded.text
    assert [(m["tag"], m["active"]) for m in loaded.json()["models"]] == [
        (v1_tag, True),
        (v2_tag, False),
    ]
    assert (
        post(url, "/v1/sessions/create", {"session_id": "still-v1"}).json()["model_version"] == v1
    )
    activated = post(url, "/v1/admin/models/activate", {"tag": v2_tag}).json()["models"]
    assert [m["active"] for m in activated] == [False, True]

    new = post(url, "/v1/sessions/create", {"session_id": "new"}).json()
    assert new["model_version"] == v2
    # An id is one session across versions.
    taken = post(url, "/v1/sessions/create", {"session_id": "old"})
    assert taken.status_code == 409 and taken.json()["error"]["code"] == "session_exists"

    # The old session continues on v1, exactly as if nothing happened; the new one is v2's.
    rest = post(url, "/v1/sessions/step", {"session_id": "old", "inputs": values[10:].tolist()})
    assert rest.json()["model_version"] == v1 and rest.json()["t"] == 30
    means = [o["mean"][0] for o in first.json()["outputs"] + rest.json()["outputs"]]
    v1_model = load_checkpoint(SHIPPED).model.eval()
    with torch.no_grad():
        expected_v1 = v1_model(torch.from_numpy(values)[None]).mean[0, :, 0].numpy()
        expected_v2 = v2_model.eval()(torch.from_numpy(values)[None]).mean[0, :, 0].numpy()
    np.testing.assert_allclose(means, expected_v1, atol=1e-5)
    on_v2 = post(url, "/v1/sessions/step", {"session_id": "new", "inputs": values.tolist()}).json()
    assert on_v2["model_version"] == v2
    np.testing.assert_allclose([o["mean"][0] for o in on_v2["outputs"]], expected_v2, atol=1e-5)
    # predict runs the active version.
    whole = post(url, "/v1/predict", {"inputs": values.tolist()}).json()
    np.testing.assert_allclose([o["mean"][0] for o in whole["outputs"]], expected_v2, atol=1e-5)

    # step_many across versions: each item on its own session's version, in order.
    many = post(
        url,
        "/v1/sessions/step_many",
        {
            "items": [
                {"session_id": "new", "inputs": [[0.1]], "seq": 30},
                {"session_id": "old", "inputs": [[0.1]], "seq": 30},
                {"session_id": "ghost", "inputs": [[0.1]]},
            ]
        },
    ).json()["results"]
    assert [r["ok"] for r in many] == [True, True, False]
    assert [r["result"]["model_version"] for r in many[:2]] == [v2, v1]
    assert many[2]["error"]["code"] == "session_not_found"
    got = post(url, "/v1/sessions/get", {"session_id": "old"}).json()
    assert (got["model_version"], got["t"]) == (v1, 31)

    # A blob goes back to the version it was exported from, active or not.
    blob = post(url, "/v1/sessions/export", {"session_id": "old"}).json()
    assert blob["model_version"] == v1
    moved = post(url, "/v1/sessions/import", {"blob": blob["blob"], "session_id": "old-copy"})
    assert moved.status_code == 200 and moved.json()["model_version"] == v1, moved.text

    # Unload: refused while it is active or has sessions; then it goes.
    active = post(url, "/v1/admin/models/unload", {"tag": v2_tag})
    assert (active.status_code, active.json()["error"]["code"]) == (409, "model_version_active")
    in_use = post(url, "/v1/admin/models/unload", {"tag": v1_tag})
    assert (in_use.status_code, in_use.json()["error"]["code"]) == (409, "model_version_in_use")
    assert in_use.json()["error"]["sessions"] == 3
    for sid in ("old", "still-v1", "old-copy"):
        assert post(url, "/v1/sessions/delete", {"session_id": sid}).status_code == 200
    assert post(url, "/v1/admin/models/unload", {"tag": v1_tag}).json() == {
        "tag": v1_tag,
        "unloaded": True,
    }
    listed = httpx.get(url + "/v1/admin/models", timeout=10).json()["models"]
    assert [(m["tag"], m["active"], m["sessions"]) for m in listed] == [(v2_tag, True, 1)]
    gone = post(url, "/v1/admin/models/activate", {"tag": v1_tag})
    assert (gone.status_code, gone.json()["error"]["code"]) == (404, "model_version_not_loaded")
    missing = post(url, "/v1/admin/models/load", {"tag": "acsf1-forecaster:000000000000"})
    assert (missing.status_code, missing.json()["error"]["code"]) == (404, "model_not_in_store")
    # A tag off the pattern: its own code (it said bad_session_id; an outside test run).
    bad = post(url, "/v1/admin/models/load", {"tag": "bad tag"})
    assert (bad.status_code, bad.json()["error"]["code"]) == (422, "bad_model_tag")


def test_the_cli_lists_loads_and_activates(
    served: tuple[str, str, AnyForecaster], capsys: pytest.CaptureFixture[str]
) -> None:
    from client.cli import main

    url, v2_tag, _ = served
    assert main(["models", "load", v2_tag, "--url", url]) == 0
    assert main(["models", "activate", v2_tag, "--url", url]) == 0
    assert main(["models", "list", "--url", url]) == 0
    out = capsys.readouterr().out
    assert f"* {v2_tag}" in out
    assert main(["models", "unload", "nothing:here", "--url", url]) == 2
    assert "model_version_not_loaded" in capsys.readouterr().err


def test_on_redis_a_replica_finds_a_cold_session_on_the_version_that_stored_it(
    tmp_path: Path,
) -> None:
    """Two versions over one Redis: a session this replica has not cached, stored by v1 while v2
    is active, is answered by v1 (the backend says which version holds it), never a 404."""
    from service.backends import RedisBackend
    from service.batcher import MicroBatcher
    from service.engine import Engine, EngineLimits
    from service.redis_state import RedisState
    from service.sessions import SessionStore, StatePool, StoreLimits
    from service.versions import Version, Versions
    from tests.servers import RedisServer
    from tests.test_engine import step, tiny_model

    server = RedisServer(tmp_path)
    server.start()
    try:
        url = server.url

        def engine(version: str, hidden: int) -> Engine:
            torch.manual_seed(hidden)
            model = (
                tiny_model()
                if hidden == 8
                else LSTMForecaster(ForecasterConfig(hidden_size=hidden, num_layers=1))
            )
            pool = StatePool(model.config.num_layers, hidden, 1, 8, "cpu")
            store = SessionStore(pool, StoreLimits(8, 60, 60, evict_when_full=True, tombstones=0))
            backend = RedisBackend(
                store, RedisState(url), {"model": "tiny", "model_version": version}
            )
            return Engine(
                backend,
                MicroBatcher(model, pool, persist=backend.persist),
                model=("tiny", version),
                n_features=1,
                limits=EngineLimits(max_chunk=16, max_predict_len=64, max_many=8, max_horizon=4),
            )

        async def scenario() -> None:
            v1, v2 = engine("v1", 8), engine("v2", 4)
            versions = Versions(
                Version("tiny:v1", v1, "cpu"), loader=lambda tag: Version(tag, v2, "cpu")
            )
            await versions.create("s", None)
            await versions.step(step("s", [0.1, 0.2], seq=0))
            await versions.load("tiny:v2")
            await versions.activate("tiny:v2")
            v1.store.drop(v1.store.get("s"))  # another replica: nothing cached
            reply = await versions.step(step("s", [0.3], seq=2))
            assert (reply["model_version"], reply["t"]) == ("v1", 3)
            assert (await versions.get("s")).model == ("tiny", "v1")
            fresh = await versions.create("n", None)
            assert fresh.model == ("tiny", "v2")

        asyncio.run(scenario())
    finally:
        server.stop()


WINDOW = 16  # small, so that replays start from a window shorter than the history
STEPS = 40


async def stream_one(
    url: str,
    sid: str,
    values: np.ndarray,
    websocket: bool,
    replies: list[dict[str, Any]],
    progress: list[int],
) -> None:
    """One value a step, with its seq; every reply kept. Any failed request fails the test."""
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{url}/v1/sessions/create", json={"session_id": sid}) as r:
            assert r.status == 200, await r.text()
        if websocket:
            async with http.ws_connect(
                f"{url.replace('http', 'ws')}/v1/stream?session_id={sid}"
            ) as ws:
                for t in range(len(values)):
                    await ws.send_json({"inputs": values[t : t + 1].tolist(), "seq": t})
                    reply = await ws.receive_json()
                    assert "error" not in reply, (sid, t, reply)
                    replies.append(reply)
                    progress.append(1)
                    await asyncio.sleep(0.005)
        else:
            for t in range(len(values)):
                body = {"session_id": sid, "inputs": values[t : t + 1].tolist(), "seq": t}
                async with http.post(f"{url}/v1/sessions/step", json=body) as r:
                    reply = await r.json()
                    assert r.status == 200, (sid, t, reply)
                replies.append(reply)
                progress.append(1)
                await asyncio.sleep(0.005)


def expected_means(net: AnyForecaster, values: np.ndarray, start: int, first: int) -> list[float]:
    """``net`` over values[start:], from a zero state: its means from index ``first`` on."""
    with torch.no_grad():
        out = net.eval()(torch.from_numpy(values[start:])[None])
    return out.mean[0, first - start :, 0].tolist()


@pytest.fixture(scope="module")
def windowed(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[str, str, str, AnyForecaster]]:
    where = tmp_path_factory.mktemp("windowed")
    home = where / "home"
    env = {"BENTOML_HOME": str(home), "LSTM_MIGRATION_WINDOW": str(WINDOW)}
    with bentoml_server(env) as url:
        v1_tag = post(url, "/v1/admin/models").json()["models"][0]["tag"]
        model = second_version(where / "v2")
        v2_tag = import_into(home, where / "v2")
        assert post(url, "/v1/admin/models/load", {"tag": v2_tag}).status_code == 200
        yield url, v1_tag, v2_tag, model


@pytest.mark.parametrize("mode", ["none", "on_next_step", "now"])
def test_fifty_sessions_stream_through_an_activation(
    windowed: tuple[str, str, str, AnyForecaster], held_out_series: list[np.ndarray], mode: str
) -> None:
    """50 sessions (half HTTP, half WebSocket) stream while the other version is activated with
    ``mode``: no request fails, every reply names its version, and each session's outputs are
    its first version's over its whole history until it moved, then the new version's over the
    window it moved with and the inputs that followed."""
    url, v1_tag, v2_tag, v2_model = windowed
    active = next(m["tag"] for m in post(url, "/v1/admin/models").json()["models"] if m["active"])
    other = v2_tag if active == v1_tag else v1_tag
    nets = {v1_tag.split(":")[1]: load_checkpoint(SHIPPED).model, v2_tag.split(":")[1]: v2_model}
    before, after = active.split(":")[1], other.split(":")[1]
    plans = {
        f"{mode}-{i}": held_out_series[i % len(held_out_series)][i : i + STEPS] for i in range(50)
    }
    replies: dict[str, list[dict[str, Any]]] = {sid: [] for sid in plans}
    progress: list[int] = []

    async def main() -> None:
        streams = [
            asyncio.ensure_future(stream_one(url, sid, v, i % 2 == 1, replies[sid], progress))
            for i, (sid, v) in enumerate(plans.items())
        ]
        while len(progress) < 50 * STEPS // 3 and not any(s.done() for s in streams):
            await asyncio.sleep(0.02)
        async with (
            __import__("aiohttp").ClientSession() as http,
            http.post(f"{url}/v1/admin/models/activate", json={"tag": other, "migrate": mode}) as r,
        ):
            assert r.status == 200, await r.text()
        await asyncio.gather(*streams)

    asyncio.run(main())
    moved = 0
    for sid, values in plans.items():
        versions = [r["model_version"] for r in replies[sid]]
        assert set(versions) <= {before, after}, (sid, versions)
        k = versions.index(after) if after in versions else len(versions)
        assert versions == [before] * k + [after] * (len(versions) - k), (sid, versions)
        means = [r["outputs"][0]["mean"][0] for r in replies[sid]]
        np.testing.assert_allclose(
            means[:k], expected_means(nets[before], values, 0, 0)[:k], atol=1e-5, err_msg=sid
        )
        if k < len(values):
            moved += 1
            tail = expected_means(nets[after], values, max(0, k - WINDOW), k)
            np.testing.assert_allclose(means[k:], tail, atol=1e-5, err_msg=sid)
    if mode == "none":
        assert moved == 0
    else:
        assert moved == 50, moved
    # New sessions go to the version just activated; the streamed ones are cleaned up.
    assert (
        post(url, "/v1/sessions/create", {"session_id": f"{mode}-new"}).json()["model_version"]
        == after
    )
    for sid in [*plans, f"{mode}-new"]:
        assert post(url, "/v1/sessions/delete", {"session_id": sid}).status_code == 200


def test_a_restart_with_a_new_model_migrates_the_snapshot_by_replay(
    tmp_path: Path, held_out_series: list[np.ndarray]
) -> None:
    """LSTM_MODEL_TAG changed between a clean stop and the next start: the snapshot's sessions
    continue on the new version (t kept; outputs the new model's over the window and what
    follows); without a window they cannot, and say so (409 migration_impossible, not a 404)."""
    home = tmp_path / "home"
    v2_model = second_version(tmp_path / "v2")
    v2_tag = import_into(home, tmp_path / "v2")
    values = held_out_series[3][:40].astype(np.float32)
    for window, sid in ((WINDOW, "kept"), (0, "bare")):
        env = {
            "BENTOML_HOME": str(home),
            "LSTM_SNAPSHOT_PATH": str(tmp_path / f"{sid}.snapshot"),
            "LSTM_MIGRATION_WINDOW": str(window),
        }
        with bentoml_server(env) as url:
            v1 = post(url, "/v1/sessions/create", {"session_id": sid}).json()["model_version"]
            post(url, "/v1/sessions/create", {"session_id": f"{sid}-empty"})
            first = post(
                url,
                "/v1/sessions/step",
                {"session_id": sid, "inputs": values[:30].tolist(), "seq": 0},
            )
            assert first.status_code == 200
        with bentoml_server({**env, "LSTM_MODEL_TAG": v2_tag}) as url:
            got = post(url, "/v1/sessions/get", {"session_id": f"{sid}-empty"}).json()
            assert (got["model_version"], got["t"]) == (v2_tag.split(":")[1], 0), got  # t 0 moves
            if window:
                info = post(url, "/v1/sessions/get", {"session_id": sid}).json()
                assert (info["model_version"], info["t"]) == (v2_tag.split(":")[1], 30), info
                rest = post(
                    url,
                    "/v1/sessions/step",
                    {"session_id": sid, "inputs": values[30:].tolist(), "seq": 30},
                ).json()
                means = [o["mean"][0] for o in rest["outputs"]]
                np.testing.assert_allclose(
                    means, expected_means(v2_model, values, 30 - WINDOW, 30), atol=1e-5
                )
                assert v1 != rest["model_version"]
            else:
                refused = post(
                    url, "/v1/sessions/step", {"session_id": sid, "inputs": [[0.1]], "seq": 30}
                )
                assert refused.status_code == 409, refused.text
                assert refused.json()["error"]["code"] == "migration_impossible"
        if not window:
            # kept aside, not lost: the old version serves it again from there (before, it was
            # gone for good at the next compaction; an outside test run)
            aside = tmp_path / f"{sid}.snapshot.unmigrated"
            with bentoml_server({**env, "LSTM_SNAPSHOT_PATH": str(aside)}) as url:
                info = post(url, "/v1/sessions/get", {"session_id": sid}).json()
                assert (info["model_version"], info["t"]) == (v1, 30), info


def test_sessions_on_a_version_loaded_at_runtime_survive_a_clean_restart_on_it(
    tmp_path: Path, held_out_series: list[np.ndarray]
) -> None:
    """Loaded and activated with migrate now, stopped cleanly, started again on the new
    version: the sessions carry on exactly where they were on it (the snapshot holds every
    version's sessions)."""
    import time

    home = tmp_path / "home"
    v2_model = second_version(tmp_path / "v2")
    v2_tag = import_into(home, tmp_path / "v2")
    values = held_out_series[5][:40].astype(np.float32)
    env = {
        "BENTOML_HOME": str(home),
        "LSTM_SNAPSHOT_PATH": str(tmp_path / "s.snapshot"),
        "LSTM_MIGRATION_WINDOW": str(WINDOW),
    }
    with bentoml_server(env) as url:
        post(url, "/v1/sessions/create", {"session_id": "s"})
        post(
            url, "/v1/sessions/step", {"session_id": "s", "inputs": values[:30].tolist(), "seq": 0}
        )
        assert post(url, "/v1/admin/models/load", {"tag": v2_tag}).status_code == 200
        assert (
            post(url, "/v1/admin/models/activate", {"tag": v2_tag, "migrate": "now"}).status_code
            == 200
        )
        deadline = time.monotonic() + 30
        while (
            post(url, "/v1/sessions/get", {"session_id": "s"}).json()["model_version"]
            != v2_tag.split(":")[1]
        ):
            assert time.monotonic() < deadline, "the background migration never moved s"
            time.sleep(0.1)
        moved = post(
            url,
            "/v1/sessions/step",
            {"session_id": "s", "inputs": values[30:35].tolist(), "seq": 30},
        )
        assert moved.json()["model_version"] == v2_tag.split(":")[1]
    with bentoml_server({**env, "LSTM_MODEL_TAG": v2_tag}) as url:
        info = post(url, "/v1/sessions/get", {"session_id": "s"}).json()
        assert (info["model_version"], info["t"]) == (v2_tag.split(":")[1], 35), info
        rest = post(
            url, "/v1/sessions/step", {"session_id": "s", "inputs": values[35:].tolist(), "seq": 35}
        ).json()
        means = [o["mean"][0] for o in moved.json()["outputs"] + rest["outputs"]]
        np.testing.assert_allclose(
            means, expected_means(v2_model, values, 30 - WINDOW, 30), atol=1e-5
        )


def test_with_redis_one_replica_activates_and_the_other_follows(
    tmp_path: Path, held_out_series: list[np.ndarray]
) -> None:
    """Two replicas on one Redis: the admin call on one rolls the version out to both (the other
    loads it from its own store and activates it within a sweep); sessions made before stay on
    their version and either replica serves them; new ones get the new version everywhere."""
    import time

    from tests.servers import RedisServer

    (tmp_path / "redis").mkdir()
    redis = RedisServer(tmp_path / "redis")
    redis.start()
    try:
        homes = [tmp_path / "home-a", tmp_path / "home-b"]
        v2_tag = ""
        for home in homes:
            second_version(tmp_path / "v2")
            v2_tag = import_into(home, tmp_path / "v2")
        envs = [{"BENTOML_HOME": str(h), "LSTM_REDIS_URL": redis.url} for h in homes]
        values = held_out_series[2][:20].astype(np.float32)
        with bentoml_server(envs[0]) as a, bentoml_server(envs[1]) as b:
            v1 = post(a, "/v1/sessions/create", {"session_id": "before"}).json()["model_version"]
            post(
                a,
                "/v1/sessions/step",
                {"session_id": "before", "inputs": values[:10].tolist(), "seq": 0},
            )
            assert post(a, "/v1/admin/models/load", {"tag": v2_tag}).status_code == 200
            assert post(a, "/v1/admin/models/activate", {"tag": v2_tag}).status_code == 200
            deadline = time.monotonic() + 30
            while True:
                models = post(b, "/v1/admin/models").json()["models"]
                if [m["tag"] for m in models if m["active"]] == [v2_tag]:
                    break
                assert time.monotonic() < deadline, f"replica b never followed: {models}"
                time.sleep(0.2)
            v2 = v2_tag.split(":")[1]
            assert (
                post(b, "/v1/sessions/create", {"session_id": "after"}).json()["model_version"]
                == v2
            )
            # The old session, stepped on the replica that never saw it: still v1's, exactly.
            rest = post(
                b,
                "/v1/sessions/step",
                {"session_id": "before", "inputs": values[10:].tolist(), "seq": 10},
            )
            assert (rest.json()["model_version"], rest.json()["t"]) == (v1, 20), rest.text
            on_a = post(a, "/v1/sessions/get", {"session_id": "after"}).json()
            assert (on_a["model_version"], on_a["t"]) == (v2, 0)
    finally:
        redis.stop()
