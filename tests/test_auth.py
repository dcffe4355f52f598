"""API keys (LSTM_API_KEYS), tenants and CORS (LSTM_CORS_ORIGINS).

Before: anyone who could reach the port could step, read, export or delete any session by its id.
Now, with a key file set, every route but health, metrics and the documents needs a key, and a
key's sessions are its own: another key's call on the same id answers exactly what an unknown
session answers. The bad-input table at the end runs against a real server.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from service import auth
from service.auth import (
    ApiKeys,
    KeyFileError,
    bearer,
    key_line,
    new_key,
    parse_key_file,
    websocket_authorization,
)
from service.errors import (
    ApiKeyInvalid,
    ApiKeyMalformed,
    ApiKeyMissing,
    SessionExists,
    SessionNotFound,
)
from service.schemas import Step
from service.startup import is_loopback, serving_host
from service.state_blob import decode
from service.tenants import TenantSessions
from tests.servers import bentoml_server
from tests.test_blobs import VALUES
from tests.test_blobs import engine as blob_engine

# --- the key file ------------------------------------------------------------------------------


def test_a_key_file_holds_names_roles_and_digests_never_keys(tmp_path: Path) -> None:
    key = new_key()
    line = key_line("alice", "user", key)
    assert key not in line and line.startswith("alice user sha256:")
    entries = parse_key_file("# the team's keys\n\n" + line + key_line("ops", "admin", new_key()))
    assert [(e.principal.name, e.principal.role) for e in entries] == [
        ("alice", "user"),
        ("ops", "admin"),
    ]
    assert entries[1].principal.admin and not entries[0].principal.admin


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("alice user\n", "line 1: expected"),
        ("alice root sha256:" + "0" * 64 + "\n", "role 'root'"),
        ("-x user sha256:" + "0" * 64 + "\n", "name '-x'"),
        ("alice user sha256:abc\n", "64 hex digits"),
        ("a user sha256:" + "0" * 64 + "\na admin sha256:" + "1" * 64, "line 2: the name 'a'"),
    ],
)
def test_a_bad_key_file_is_refused_with_its_line(text: str, says: str) -> None:
    with pytest.raises(KeyFileError, match=says):
        parse_key_file(text)


@pytest.mark.parametrize(
    ("header", "error"),
    [
        (None, ApiKeyMissing),
        ("", ApiKeyMissing),
        ("Basic YWxpY2U6c2VjcmV0", ApiKeyMalformed),
        ("Bearer", ApiKeyMalformed),
        ("Bearer lsk_short", ApiKeyMalformed),
        ("Bearer " + new_key() + "x", ApiKeyMalformed),
    ],
)
def test_a_missing_or_malformed_authorization_is_refused(header: str | None, error: type) -> None:
    with pytest.raises(error):
        bearer(header)


def test_keys_are_checked_and_a_removed_line_revokes_its_key(tmp_path: Path) -> None:
    alice, bob = new_key(), new_key()
    path = tmp_path / "keys"
    path.write_text(key_line("alice", "user", alice) + key_line("bob", "admin", bob))
    now = [0.0]
    keys = ApiKeys(path, clock=lambda: now[0])
    assert keys.authenticate(f"Bearer {alice}").name == "alice"
    assert keys.authenticate(f"bearer  {bob} ").role == "admin"
    with pytest.raises(ApiKeyInvalid):
        keys.authenticate(f"Bearer {new_key()}")
    path.write_text(key_line("alice", "user", alice))
    assert keys.authenticate(f"Bearer {bob}").name == "bob"  # read at most once a second
    now[0] += auth.RELOAD_EVERY_S
    with pytest.raises(ApiKeyInvalid):
        keys.authenticate(f"Bearer {bob}")
    # A bad edit keeps the keys read before rather than lock everyone out, but for the keys
    # whose lines it removed: revocation still works in a file broken elsewhere.
    carol = new_key()
    path.write_text(key_line("alice", "user", alice) + key_line("carol", "user", carol))
    now[0] += auth.RELOAD_EVERY_S
    assert keys.authenticate(f"Bearer {carol}").name == "carol"
    path.write_text(key_line("alice", "user", alice) + "garbage\n")
    now[0] += auth.RELOAD_EVERY_S
    assert keys.authenticate(f"Bearer {alice}").name == "alice"
    with pytest.raises(ApiKeyInvalid):
        keys.authenticate(f"Bearer {carol}")
    # A key replaced in place, the file's size and times kept, is seen: contents are compared.
    dave = new_key()
    text = key_line("alice", "user", dave)
    stat = path.stat()
    path.write_text(text)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    now[0] += auth.RELOAD_EVERY_S
    assert keys.authenticate(f"Bearer {dave}").name == "alice"
    with pytest.raises(ApiKeyInvalid):
        keys.authenticate(f"Bearer {alice}")


def test_two_names_for_one_key_are_refused() -> None:
    key = new_key()
    with pytest.raises(KeyFileError, match="same key"):
        parse_key_file(key_line("a", "user", key) + key_line("b", "admin", key))


def test_a_websocket_key_comes_from_its_header_or_a_bearer_subprotocol() -> None:
    key = new_key()
    header = {"headers": [(b"authorization", f"Bearer {key}".encode())], "subprotocols": []}
    assert websocket_authorization(header) == f"Bearer {key}"
    browser = {"headers": [], "subprotocols": ["lstm.v1", f"bearer.{key}"]}
    assert websocket_authorization(browser) == f"Bearer {key}"
    assert websocket_authorization({"headers": [], "subprotocols": ["lstm.v1"]}) is None


def test_the_start_warns_only_off_loopback() -> None:
    assert serving_host(["bentoml", "serve", "x", "--host", "10.0.0.5"]) == "10.0.0.5"
    assert serving_host(["bentoml", "serve", "x", "--host=::1"]) == "::1"
    assert serving_host(["bentoml", "serve", "x"]) == "0.0.0.0"  # BentoML's default
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4")


# --- tenants over the engine -------------------------------------------------------------------


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_two_keys_each_have_their_own_session_of_one_id() -> None:
    async def scenario() -> None:
        engine = blob_engine(None)
        alice, bob = TenantSessions(engine, "alice"), TenantSessions(engine, "bob")
        assert (await alice.create("meter-42", None)).session_id == "meter-42"
        first = await alice.step(Step(session_id="meter-42", inputs=[[v] for v in VALUES], seq=0))
        assert first["session_id"] == "meter-42" and first["t"] == len(VALUES)
        # bob's view of the id is a session of his own: not found, then created afresh.
        with pytest.raises(SessionNotFound) as theirs:
            await bob.get("meter-42")
        with pytest.raises(SessionNotFound) as never:
            await bob.get("meter-43")
        unknown = json.loads(json.dumps(never.value.body()).replace("meter-43", "meter-42"))
        assert theirs.value.body() == unknown
        assert unknown["error"] == {
            "code": "session_not_found",
            "message": "no session 'meter-42'",
            "session_id": "meter-42",
        }
        assert (await bob.create("meter-42", None)).t == 0
        assert (await alice.get("meter-42")).t == len(VALUES)
        # step_many answers per item in the caller's ids, errors included.
        results = await bob.step_many(
            [
                Step(session_id="meter-42", inputs=[[0.5]], seq=0),
                Step(session_id="ghost", inputs=[[0.5]]),
            ]
        )
        assert results[0]["result"]["session_id"] == "meter-42"
        assert results[1]["error"] == {
            "code": "session_not_found",
            "message": "no session 'ghost'",
            "session_id": "ghost",
        }
        # An exported blob carries the client's id, not the namespace, and imports into another.
        _, blob = await alice.export("meter-42")
        assert decode(blob)[0]["session_id"] == "meter-42"
        moved = await bob.import_blob(blob, "copy", None)
        assert (moved.session_id, moved.t) == ("copy", len(VALUES))
        with pytest.raises(SessionExists):  # the blob's own id, in bob's namespace: taken
            await bob.import_blob(blob, None, None)
        assert sorted(s.id for s in engine.store.sessions()) == [
            "alice/meter-42",
            "bob/copy",
            "bob/meter-42",
        ]

    run(scenario())


# --- a real server with keys: the bad-input table ----------------------------------------------


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A server with three keys (alice and bob users, ops admin) and one allowed CORS origin."""
    where = tmp_path_factory.mktemp("keyed")
    keys = {"alice": new_key(), "bob": new_key(), "ops": new_key(), "eve": new_key()}
    path = where / "keys"
    path.write_text(
        key_line("alice", "user", keys["alice"])
        + key_line("bob", "user", keys["bob"])
        + key_line("ops", "admin", keys["ops"])
        + key_line("eve", "user", keys["eve"])
    )
    env = {
        "LSTM_API_KEYS": str(path),
        "LSTM_CORS_ORIGINS": "https://app.example",
        "BENTOML_HOME": str(where / "home"),
    }
    log = where / "server.log"
    with bentoml_server(env, log=log) as url:
        yield url, keys, path, log


def as_(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


@pytest.mark.slow
def test_with_keys_every_route_but_health_metrics_and_docs_needs_one(keyed: Any) -> None:
    url, keys, _, _ = keyed
    for open_route in ("/livez", "/readyz", "/metrics", "/docs.json", "/schema.json", "/ui/"):
        assert httpx.get(url + open_route, timeout=10).status_code == 200, open_route
    import bentoml

    # BentoML's client reads /schema.json first: it failed there, never saying a key was missing
    with bentoml.SyncHTTPClient(url) as anonymous, pytest.raises(Exception) as refused:
        anonymous.model()
    assert "api_key_missing" in str(refused.value) or "401" in str(refused.value), refused.value
    for route, body in [
        ("/v1/sessions/create", {}),
        ("/v1/sessions/step", {"session_id": "x", "inputs": [[0.1]]}),  # the fast path
        ("/v1/sessions/step_many", {"items": []}),
        ("/v1/predict", {"inputs": [[0.1]]}),
        ("/v1/model", {}),
    ]:
        refused = httpx.post(url + route, json=body, timeout=10)
        assert refused.status_code == 401, (route, refused.text)
        assert refused.json()["error"]["code"] == "api_key_missing"
        assert refused.headers["www-authenticate"].startswith("Bearer")
    assert httpx.get(url + "/v1/model", timeout=10).status_code == 401
    # The document says so: a bearer scheme for all, none for the probes, 401 on every /v1 route.
    doc = httpx.get(url + "/docs.json", timeout=10).json()
    assert doc["components"]["securitySchemes"]["apiKey"]["scheme"] == "bearer"
    assert doc["security"] == [{"apiKey": []}] and doc["paths"]["/livez"]["get"]["security"] == []
    for path, item in doc["paths"].items():
        if path.startswith("/v1/"):
            assert "api_key_invalid" in item["post"]["responses"]["401"]["description"], path
    admin = httpx.post(url + "/v1/admin/models", headers=as_(keys["ops"]), timeout=10)
    assert admin.status_code == 200 and admin.json()["models"][0]["active"], admin.text
    assert httpx.get(url + "/v1/model", headers=as_(keys["bob"]), timeout=10).status_code == 200


@pytest.mark.slow
def test_the_bad_input_table_for_keys_and_blobs(keyed: Any) -> None:
    """Each row: a coded 4xx, and alice's session exactly as it was."""
    url, keys, path, log = keyed
    alice = httpx.Client(base_url=url, headers=as_(keys["alice"]), timeout=10)
    sid = "meter-42"
    assert alice.post("/v1/sessions/create", json={"session_id": sid}).status_code == 200
    stepped = alice.post(
        "/v1/sessions/step", json={"session_id": sid, "inputs": [[v] for v in VALUES], "seq": 0}
    )
    assert stepped.json()["session_id"] == sid and stepped.json()["t"] == len(VALUES)
    before = alice.post("/v1/sessions/get", json={"session_id": sid}).json()
    blob = alice.post("/v1/sessions/export", json={"session_id": sid}).json()["blob"]

    def other(route: str, body: dict[str, Any], key: str | None) -> httpx.Response:
        headers = as_(key) if key else {}
        return httpx.post(url + route, json=body, headers=headers, timeout=10)

    step = {"session_id": sid, "inputs": [[0.5]], "seq": len(VALUES)}
    bob = keys["bob"]
    raw = base64.b64decode(blob)
    rows: list[tuple[str, httpx.Response, int, str]] = [
        ("missing", other("/v1/sessions/step", step, None), 401, "api_key_missing"),
        (
            "malformed",
            httpx.post(
                url + "/v1/sessions/step",
                json=step,
                headers={"authorization": "Basic YWxpY2U6cGFzcw=="},
                timeout=10,
            ),
            401,
            "api_key_malformed",
        ),
        ("never issued", other("/v1/sessions/step", step, new_key()), 401, "api_key_invalid"),
        ("other tenant's step", other("/v1/sessions/step", step, bob), 404, "session_not_found"),
        (
            "other tenant's reset",
            other("/v1/sessions/reset", {"session_id": sid}, bob),
            404,
            "session_not_found",
        ),
        (
            "other tenant's delete",
            other("/v1/sessions/delete", {"session_id": sid}, bob),
            404,
            "session_not_found",
        ),
        (
            "other tenant's export",
            other("/v1/sessions/export", {"session_id": sid}, bob),
            404,
            "session_not_found",
        ),
        ("user on an admin route", other("/v1/admin/models", {}, bob), 403, "admin_only"),
        (
            "a step whose body has no Content-Type (a cross-origin simple request)",
            httpx.post(
                url + "/v1/sessions/step",
                content=json.dumps(step),
                headers=as_(keys["alice"]),
                timeout=10,
            ),
            415,
            "unsupported_media_type",
        ),
        (
            "a delete whose body has no Content-Type",
            httpx.post(
                url + "/v1/sessions/delete",
                content=json.dumps({"session_id": sid}),
                headers=as_(keys["alice"]),
                timeout=10,
            ),
            415,
            "unsupported_media_type",
        ),
        (
            "replayed blob",
            alice.post("/v1/sessions/import", json={"blob": blob}),
            409,
            "session_exists",
        ),
        (
            "truncated blob",
            alice.post(
                "/v1/sessions/import",
                json={"blob": base64.b64encode(raw[: len(raw) // 2]).decode(), "session_id": "t"},
            ),
            422,
            "blob_corrupted",
        ),
        (
            "forged blob",
            alice.post(
                "/v1/sessions/import",
                json={
                    "blob": base64.b64encode(raw[:-1] + bytes([raw[-1] ^ 1])).decode(),
                    "session_id": "f",
                },
            ),
            422,
            "blob_corrupted",
        ),
        (
            "oversized blob",
            alice.post("/v1/sessions/import", json={"blob": "A" * 2_100_000}),
            413,
            "body_too_large",
        ),
    ]
    for name, answer, status, code in rows:
        assert (answer.status_code, answer.json()["error"]["code"]) == (status, code), (
            name,
            answer.text,
        )
    # Another tenant's answers equal an unknown session's, byte for byte but the id.
    theirs = other("/v1/sessions/get", {"session_id": sid}, bob).json()
    unknown = other("/v1/sessions/get", {"session_id": "meter-43"}, bob).json()
    assert json.dumps(theirs) == json.dumps(unknown).replace("meter-43", sid)
    # Revoked: its line deleted, refused within a second.
    assert other("/v1/sessions/get", {"session_id": "nope"}, bob).status_code == 404
    path.write_text(
        "".join(line for line in path.read_text().splitlines(True) if "bob" not in line)
    )
    deadline = time.monotonic() + 5
    while other("/v1/sessions/get", {"session_id": "nope"}, bob).status_code != 401:
        assert time.monotonic() < deadline, "bob's key still works after its line was deleted"
        time.sleep(0.2)
    revoked = other("/v1/sessions/get", {"session_id": "nope"}, bob).json()["error"]["code"]
    assert revoked == "api_key_invalid"
    # Nothing changed: alice's session is where it was, and is still hers alone.
    after = alice.post("/v1/sessions/get", json={"session_id": sid}).json()
    assert after["t"] == before["t"] == len(VALUES)
    assert alice.post("/v1/sessions/step", json=step).json()["t"] == len(VALUES) + 1
    # One line per refusal, no traceback, no key.
    text = log.read_text()
    assert "refused POST /v1/sessions/step: 401 api_key_missing" in text
    assert "Traceback" not in text
    assert not any(key in text for key in keys.values())


@pytest.mark.slow
def test_the_stream_takes_a_key_by_header_or_browser_subprotocol(keyed: Any) -> None:
    url, keys, path, _ = keyed
    alice = httpx.Client(base_url=url, headers=as_(keys["alice"]), timeout=10)
    assert alice.post("/v1/sessions/create", json={"session_id": "ws-1"}).status_code == 200
    ws_url = url.replace("http", "ws") + "/v1/stream?session_id=ws-1"
    with connect(ws_url, additional_headers=as_(keys["alice"])) as ws:
        ws.send(json.dumps({"inputs": [[0.1]], "seq": 0}))
        assert json.loads(ws.recv())["t"] == 1
    with connect(ws_url, subprotocols=["lstm.v1", f"bearer.{keys['alice']}"]) as ws:  # type: ignore[list-item]
        assert ws.subprotocol == "lstm.v1"
        ws.send(json.dumps({"inputs": [[0.2]], "seq": 1}))
        reply = json.loads(ws.recv())
        assert (reply["session_id"], reply["t"]) == ("ws-1", 2)
    for headers, code in [({}, "api_key_missing"), (as_(new_key()), "api_key_invalid")]:
        with connect(ws_url, additional_headers=headers) as ws:
            assert json.loads(ws.recv())["error"]["code"] == code
            with pytest.raises(ConnectionClosed) as closed:
                ws.recv()
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 4401
    # A key revoked while its stream is open is refused at the stream's next message.
    eve = httpx.Client(base_url=url, headers=as_(keys["eve"]), timeout=10)
    assert eve.post("/v1/sessions/create", json={"session_id": "ws-eve"}).status_code == 200
    eve_url = ws_url.replace("ws-1", "ws-eve")
    with connect(eve_url, additional_headers=as_(keys["eve"])) as ws:
        ws.send(json.dumps({"inputs": [[0.1]], "seq": 0}))
        assert json.loads(ws.recv())["t"] == 1
        path.write_text(
            "".join(line for line in path.read_text().splitlines(True) if "eve" not in line)
        )
        time.sleep(auth.RELOAD_EVERY_S + 0.3)
        ws.send(json.dumps({"inputs": [[0.2]], "seq": 1}))
        assert json.loads(ws.recv())["error"]["code"] == "api_key_invalid"
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4401
    # A browser page of another origin cannot stream (no CORS for WebSockets); the service's own
    # origin and the listed one can.
    with connect(
        ws_url, additional_headers={**as_(keys["alice"]), "origin": "https://evil.example"}
    ) as ws:
        assert json.loads(ws.recv())["error"]["code"] == "cors_origin_refused"
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4403
    for origin in ("https://app.example", url):
        with connect(ws_url, additional_headers={**as_(keys["alice"]), "origin": origin}) as ws:
            t = alice.post("/v1/sessions/get", json={"session_id": "ws-1"}).json()["t"]
            ws.send(json.dumps({"inputs": [[0.3]], "seq": t}))
            assert json.loads(ws.recv())["t"] == t + 1, origin
    # Another key's stream of the id is a stream of its own, unknown, session.
    with connect(ws_url, additional_headers=as_(keys["ops"])) as ws:
        assert json.loads(ws.recv())["error"]["code"] == "session_not_found"
    assert alice.post("/v1/sessions/get", json={"session_id": "ws-1"}).json()["t"] == 4


@pytest.mark.slow
def test_cors_allows_only_the_listed_origin(keyed: Any) -> None:
    url, keys, _, _ = keyed
    preflight = {
        "access-control-request-method": "POST",
        "access-control-request-headers": "authorization",
    }
    ok = httpx.options(
        url + "/v1/sessions/step",
        headers={"origin": "https://app.example", **preflight},
        timeout=10,
    )
    assert ok.status_code == 204
    assert ok.headers["access-control-allow-origin"] == "https://app.example"
    assert "authorization" in ok.headers["access-control-allow-headers"]
    refused = httpx.options(
        url + "/v1/sessions/step",
        headers={"origin": "https://evil.example", **preflight},
        timeout=10,
    )
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "cors_origin_refused"
    for origin, allowed in [("https://app.example", True), ("https://evil.example", False)]:
        answer = httpx.post(
            url + "/v1/sessions/get",
            json={"session_id": "none"},
            headers={"origin": origin, **as_(keys["ops"])},
            timeout=10,
        )
        assert answer.status_code == 404
        assert ("access-control-allow-origin" in answer.headers) is allowed, origin
    # A 401 carries it too, so the page can read why it was refused.
    denied = httpx.post(url + "/v1/model", headers={"origin": "https://app.example"}, timeout=10)
    assert denied.status_code == 401 and "access-control-allow-origin" in denied.headers


def test_the_cli_adds_a_key_once_and_prints_it_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from client.cli import main

    path = tmp_path / "keys"
    assert main(["keys", "add", "alice", "--file", str(path)]) == 0
    key = capsys.readouterr().out.strip()
    assert key not in path.read_text()
    assert ApiKeys(path).authenticate(f"Bearer {key}") == auth.Principal("alice", "user")
    assert main(["keys", "add", "alice", "--file", str(path), "--role", "admin"]) == 2
    assert "has a key named 'alice' already" in capsys.readouterr().err
    assert main(["keys", "add", "ops", "--file", str(path), "--role", "admin"]) == 0
    assert len(ApiKeys(path)) == 2
    capsys.readouterr()
    # A file whose last line has no newline (written by hand) gets a whole new line.
    path.write_text(path.read_text().rstrip("\n"))
    assert main(["keys", "add", "bob", "--file", str(path)]) == 0
    bob = capsys.readouterr().out.strip()
    assert ApiKeys(path).authenticate(f"Bearer {bob}").name == "bob" and len(ApiKeys(path)) == 3
    # the file's mode kept (it became the umask's), a new file's 0600; no folder: one line, 2
    assert path.stat().st_mode & 0o777 == 0o600
    path.chmod(0o640)
    assert main(["keys", "add", "carol", "--file", str(path)]) == 0
    assert path.stat().st_mode & 0o777 == 0o640
    capsys.readouterr()
    assert main(["keys", "add", "dan", "--file", str(tmp_path / "nowhere" / "keys")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot write" in err and "nowhere" in err, err


def test_the_client_sends_its_key_on_every_call(monkeypatch: pytest.MonkeyPatch) -> None:
    from client.client import LSTMClient

    seen: list[str | None] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("authorization"))
        return httpx.Response(200, json={"name": "m"})

    key = new_key()
    transport = httpx.MockTransport(answer)
    with LSTMClient(api_key=key, http=httpx.Client(transport=transport, base_url="http://x")) as c:
        c.model()
    monkeypatch.setenv("LSTM_API_KEY", key)
    with LSTMClient(http=httpx.Client(transport=transport, base_url="http://x")) as c:
        c.model()
    monkeypatch.delenv("LSTM_API_KEY")
    with LSTMClient(http=httpx.Client(transport=transport, base_url="http://x")) as c:
        c.model()
    assert seen == [f"Bearer {key}", f"Bearer {key}", None]


@pytest.mark.slow
def test_the_cli_stream_without_its_key_says_to_pass_one(
    keyed: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A setup error, exit 2, naming the flag (it said 'is the service running there?', exit 1;
    found by an outside test run)."""
    from client.cli import main

    url, keys, _, _ = keyed
    monkeypatch.delenv("LSTM_API_KEY", raising=False)
    source = tmp_path / "in.csv"
    source.write_text("series_id,time,power\nm,0,1.5\n")
    assert main(["stream", str(source), "--url", url, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "401" in err and "--api-key or LSTM_API_KEY" in err, err
    # alice: a key no test of this module revokes (eve and bob are)
    assert main(["stream", str(source), "--url", url, "--quiet", "--api-key", keys["alice"]]) == 0
