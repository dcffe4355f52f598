"""The wire contract from outside: BentoML's own client on every route, refused requests logged
as one line (never a traceback, never the input), and schema-refused steps counted by code."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.servers import ROOT, bentoml_server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    log = tmp_path_factory.mktemp("wire") / "serve.log"
    with bentoml_server(log=log) as url:
        yield url, log


def every_route(client: Any, sid: str) -> dict[str, Any]:
    """Every route through a BentoML client, called as its docs say: keyword arguments."""
    got: dict[str, Any] = {}
    got["create"] = client.create(session_id=sid, ttl_s=600.0)
    got["step0"] = client.step(session_id=sid, inputs=[[0.5]], seq=0)  # anomaly_z is null here
    got["step1"] = client.step(session_id=sid, inputs=[[0.4], [1.7]], seq=1, return_gates=True)
    got["many"] = client.step_many(items=[{"session_id": sid, "inputs": [[0.1]], "seq": 3}])
    got["forecast"] = client.forecast(session_id=sid, horizon=3)
    got["get"] = client.get(session_id=sid)
    got["export"] = client.export(session_id=sid)
    got["import"] = client.import_(blob=got["export"]["blob"], session_id=f"{sid}-copy")
    got["reset"] = client.reset(session_id=sid)
    got["delete"] = client.delete(session_id=sid)
    got["predict"] = client.predict(inputs=[[0.5], [0.4]])
    got["model"] = client.model()
    got["ping"] = client.ping()
    return got


def check_answers(got: dict[str, Any]) -> None:
    assert got["create"]["t"] == 0
    assert got["step0"]["t"] == 1 and got["step0"]["outputs"][0]["anomaly_z"] is None
    assert got["step1"]["t"] == 3 and len(got["step1"]["gates"]["forget"]) == 2
    assert got["many"]["results"][0]["ok"] and got["many"]["results"][0]["result"]["t"] == 4
    assert len(got["forecast"]["forecast"]) == 3
    assert got["get"]["t"] == 4 and got["export"]["t"] == 4 and got["import"]["t"] == 4
    assert got["reset"]["t"] == 0 and got["delete"]["deleted"] is True
    assert got["predict"]["outputs"][0]["anomaly_z"] is None
    assert got["model"]["limits"]["max_chunk"] == 512 and got["ping"] == {"ok": True}


def test_bentoml_sync_client_works_on_every_route(served: tuple[str, Path]) -> None:
    import bentoml

    url, _ = served
    with bentoml.SyncHTTPClient(url) as client:
        check_answers(every_route(client, "bento-sync"))
        # an error answer reaches the caller as BentoML's exception, carrying our body
        with pytest.raises(bentoml.exceptions.NotFound, match="session_not_found"):
            client.step(session_id="bento-ghost", inputs=[[1.0]])


def test_bentoml_async_client_works_on_every_route(served: tuple[str, Path]) -> None:
    import bentoml

    url, _ = served

    class Awaited:
        """The async client's calls, each run to completion, so every_route serves both."""

        def __init__(self, client: Any) -> None:
            self.client = client

        def __getattr__(self, name: str) -> Any:
            method = getattr(self.client, name)
            return lambda **kw: loop.run_until_complete(method(**kw))

    loop = asyncio.new_event_loop()
    client = bentoml.AsyncHTTPClient(url)
    try:
        loop.run_until_complete(client.__aenter__())  # as `async with` does
        check_answers(every_route(Awaited(client), "bento-async"))
    finally:
        loop.run_until_complete(client.__aexit__(None, None, None))
        loop.close()


def test_a_refused_request_is_one_log_line_without_its_input(served: tuple[str, Path]) -> None:
    url, log = served
    secret = 987654.321  # a value that must not reach the log
    before = log.read_text(errors="replace")
    r = httpx.post(
        f"{url}/v1/sessions/step", json={"session_id": "-bad", "inputs": [[secret]]}, timeout=10
    )
    assert r.status_code == 422 and r.json()["error"]["code"] == "bad_session_id"
    r = httpx.post(
        f"{url}/v1/sessions/step",
        content=b"{not json",
        headers={"content-type": "application/json"},
        timeout=10,
    )
    assert r.status_code == 400
    r = httpx.post(
        f"{url}/v1/sessions/step", json={"session_id": "ghost-x", "inputs": [[secret]]}, timeout=10
    )
    assert r.status_code == 404
    httpx.get(f"{url}/livez")  # let the log catch up
    new = log.read_text(errors="replace")[len(before) :]
    lines = [ln for ln in new.splitlines() if "/v1/sessions/step" in ln]
    assert len(lines) == 3, new
    assert re.search(r"refused POST /v1/sessions/step: 422 bad_session_id", lines[0]), lines
    assert "400 malformed_json" in lines[1] and "404 session_not_found" in lines[2], lines
    assert "Traceback" not in new and "ERROR" not in new, new
    assert str(secret) not in new and "not json" not in new, new


def metric(url: str, name: str, labels: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    found = re.search(rf"^{re.escape(name + labels)}\s+([0-9.e+-]+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def test_schema_refused_steps_are_counted_by_their_code(served: tuple[str, Path]) -> None:
    url, _ = served
    counted = {
        code: metric(url, "lstm_step_requests_total", f'{{outcome="{code}"}}')
        for code in ("bad_session_id", "non_finite_number", "value_out_of_range", "missing_field")
    }
    for body in (
        b'{"session_id": "-x", "inputs": [[1.0]]}',
        b'{"session_id": "x", "inputs": [[NaN]]}',
        b'{"session_id": "x", "inputs": [[1e39]]}',
        b'{"session_id": "x"}',
    ):
        r = httpx.post(
            f"{url}/v1/sessions/step", content=body, headers={"content-type": "application/json"}
        )
        assert r.status_code == 422, r.text
    for code, before in counted.items():
        after = metric(url, "lstm_step_requests_total", f'{{outcome="{code}"}}')
        assert after == before + 1, (code, before, after)


def test_readme_bentoml_client_example_runs_as_written_twice(
    served: tuple[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    url, _ = served
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"### BentoML's own client\s*```python\n(.*?)```", readme, re.DOTALL)
    assert block, "README lost its BentoML client example"
    code = compile(block.group(1).replace("http://127.0.0.1:3000", url), "README", "exec")
    for _ in range(2):  # an example a reader runs again must work again
        exec(code, {})
        printed = capsys.readouterr().out.splitlines()
        assert [line.split()[0] for line in printed[:3]] == ["1", "2", "3"], printed
        assert printed[0].endswith("None") and len(printed) == 4, printed
