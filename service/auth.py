"""API keys: who is calling, and in whose namespace their sessions live.

With ``LSTM_API_KEYS`` set, every HTTP route but the open ones (health, metrics, the API's
documents and the page's static files) needs ``Authorization: Bearer <key>``; the WebSocket takes
the same header, or, from a browser (which cannot set headers on a WebSocket), the subprotocol
``bearer.<key>``. A key has a name and a role (``user``, or ``admin``, which alone may call
``/v1/admin/``). The key file holds one key per line, ``<name> <role> sha256:<hex>``, only the
SHA-256 of each key (``lstm-serve keys add`` writes a line and prints the key once); ``#`` starts
a comment. It is re-read when it changes, at most once a second: a line removed is a key revoked.

Keys are random (32 bytes), so one SHA-256 is enough (a password would need a slow hash). A
presented key's digest is compared with every stored one in constant time (``hmac.compare_digest``,
no early exit), and no key, hashed or not, is ever logged.

A key's sessions are its own: the engine sees them under ``<key name>/<id>`` (``/`` is outside
the session-id pattern, so a scoped id never collides with a client's), through
``service.tenants.TenantSessions``. Another key's call on the same id is a call on another
session: it answers what an unknown session answers, and a create of a taken id creates its own.
Sessions belong to the key's *name*: a key rotated under the same name keeps them, so never give
a revoked name to another party.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import re
import secrets
import time
from collections.abc import Callable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.errors import (
    AdminOnly,
    ApiKeyInvalid,
    ApiKeyMalformed,
    ApiKeyMissing,
    ServiceError,
)

log = logging.getLogger("lstm_sessions.http")

KEY_PREFIX = "lsk_"
KEY_PATTERN = re.compile(r"lsk_[A-Za-z0-9_-]{43}")  # KEY_PREFIX + token_urlsafe(32)
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
ROLES = ("user", "admin")
RELOAD_EVERY_S = 1.0  # how stale the key file may be: a revoked key works at most this long
WS_SUBPROTOCOL_PREFIX = "bearer."
# Open with keys on: the probes, Prometheus, the documents (BentoML's Swagger page at /, which a
# browser opens without a header, and its /docs.json) and the page's static files (the page then
# asks for a key); nothing here reads or changes a session.
# /schema.json: BentoML's client reads it before any call, and it is the API's shape as
# /docs.json is; behind a key the client failed with "Failed to fetch schema", never the 401
# (an outside test run).
OPEN_PATHS = frozenset(
    {"/", "/livez", "/readyz", "/healthz", "/metrics", "/docs.json", "/schema.json"}
)
OPEN_PREFIXES = ("/ui", "/static_content/")
ADMIN_PREFIX = "/v1/admin/"


@dataclass(frozen=True)
class Principal:
    """A caller the key file knows."""

    name: str
    role: str

    @property
    def admin(self) -> bool:
        return self.role == "admin"


@dataclass(frozen=True)
class KeyEntry:
    principal: Principal
    digest: bytes  # SHA-256 of the key


class KeyFileError(ValueError):
    pass


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def key_digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def key_line(name: str, role: str, key: str) -> str:
    """The key file's line for ``key``: its name, role and digest, never the key."""
    if not NAME_PATTERN.fullmatch(name):
        raise KeyFileError(f"key name {name!r} must match {NAME_PATTERN.pattern}")
    if role not in ROLES:
        raise KeyFileError(f"role {role!r} is not one of {', '.join(ROLES)}")
    return f"{name} {role} sha256:{key_digest(key).hex()}\n"


def parse_key_file(text: str, where: str = "LSTM_API_KEYS") -> list[KeyEntry]:
    entries: list[KeyEntry] = []
    names: set[str] = set()
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 3 or not parts[2].startswith("sha256:"):
            raise KeyFileError(f"{where} line {n}: expected '<name> <role> sha256:<hex>'")
        name, role, digest = parts[0], parts[1], parts[2].removeprefix("sha256:")
        if not NAME_PATTERN.fullmatch(name):
            raise KeyFileError(f"{where} line {n}: name {name!r} must match {NAME_PATTERN.pattern}")
        if role not in ROLES:
            raise KeyFileError(f"{where} line {n}: role {role!r} is not one of {', '.join(ROLES)}")
        if not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise KeyFileError(f"{where} line {n}: the digest is not 64 hex digits")
        if name in names:
            raise KeyFileError(f"{where} line {n}: the name {name!r} is taken by an earlier line")
        if any(e.digest.hex() == digest for e in entries):
            raise KeyFileError(f"{where} line {n}: the same key as an earlier line")
        names.add(name)
        entries.append(KeyEntry(Principal(name, role), bytes.fromhex(digest)))
    return entries


def bearer(authorization: str | None) -> str:
    """The key in an ``Authorization: Bearer <key>`` header's value."""
    if authorization is None or not authorization.strip():
        raise ApiKeyMissing(
            "this service needs an API key: send Authorization: Bearer <key> (LSTM_API_KEYS)"
        )
    scheme, _, key = authorization.strip().partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not KEY_PATTERN.fullmatch(key):
        raise ApiKeyMalformed(
            f"the Authorization header must be 'Bearer {KEY_PREFIX}<43 characters>'"
        )
    return key


class ApiKeys:
    """The key file, read at start (a bad file stops the start) and again when it changes."""

    def __init__(self, path: Path, clock: Callable[[], float] = time.monotonic) -> None:
        self.path, self.clock = path, clock
        try:
            self._text = path.read_text()
        except OSError as e:
            raise KeyFileError(f"LSTM_API_KEYS: cannot read {path}: {e.strerror}") from None
        self._entries = parse_key_file(self._text)
        self._checked = clock()

    def __len__(self) -> int:
        return len(self._entries)

    def _refresh(self) -> None:
        """Re-read the file (a few hundred bytes) at most once a second and compare contents: a
        key replaced in place with the file's size and time kept is seen too."""
        now = self.clock()
        if now - self._checked < RELOAD_EVERY_S:
            return
        self._checked = now
        reason: Exception
        try:
            text = self.path.read_text()
        except OSError as e:
            text, reason = "", e
        else:
            if text == self._text:
                return
            try:
                self._entries, self._text = parse_key_file(text), text
                log.info("LSTM_API_KEYS re-read: %d keys", len(self._entries))
                return
            except KeyFileError as e:
                reason = e
        # A bad edit keeps the keys read before, not to lock everyone out, but fails closed for
        # removals: a key whose digest is no longer in the file is revoked all the same.
        self._entries = [e for e in self._entries if e.digest.hex() in text]
        log.error(
            "LSTM_API_KEYS %s was not re-read (%s): the keys read before still hold, but for "
            "those no longer in it",
            self.path,
            reason,
        )

    def authenticate(self, authorization: str | None) -> Principal:
        """The caller of a request with this ``Authorization`` value, or the 401 to answer."""
        digest = key_digest(bearer(authorization))
        self._refresh()
        found: Principal | None = None
        for entry in self._entries:  # every entry compared: no early exit
            if hmac.compare_digest(entry.digest, digest):
                found = entry.principal
        if found is None:
            raise ApiKeyInvalid("the API key is not valid (never issued, or revoked)")
        return found


caller: ContextVar[Principal | None] = ContextVar("lstm_caller", default=None)


@contextlib.contextmanager
def acting_as(principal: Principal) -> Iterator[None]:
    """The request's caller, for everything it awaits (``caller.get()``)."""
    token = caller.set(principal)
    try:
        yield
    finally:
        caller.reset(token)


def is_open(path: str) -> bool:
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)


def admit(keys: ApiKeys, path: str, authorization: str | None) -> Principal:
    """The caller of ``path``, or the 401/403 to answer: the one rule for HTTP and WebSocket."""
    principal = keys.authenticate(authorization)
    if path.startswith(ADMIN_PREFIX) and not principal.admin:
        raise AdminOnly(f"{path} needs a key with the admin role")
    return principal


def _header(scope: Mapping[str, Any], name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return str(value.decode("latin-1"))
    return None


def websocket_authorization(scope: Mapping[str, Any]) -> str | None:
    """A WebSocket's key: its Authorization header, else a ``bearer.<key>`` subprotocol."""
    header = _header(scope, b"authorization")
    if header is not None:
        return header
    for protocol in scope.get("subprotocols", ()):
        if protocol.startswith(WS_SUBPROTOCOL_PREFIX):
            return "Bearer " + protocol.removeprefix(WS_SUBPROTOCOL_PREFIX)
    return None


class ApiKeyGate:
    """ASGI middleware, outermost of the HTTP stack: admits a request (setting ``caller``) or
    answers its 401/403 with one log line. WebSockets pass: the stream endpoint admits them."""

    def __init__(self, app: Any, keys: ApiKeys, refused: Callable[[str, str], None]) -> None:
        self.app, self.keys, self.refused = app, keys, refused

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or is_open(scope["path"]):
            await self.app(scope, receive, send)
            return
        try:
            principal = admit(self.keys, scope["path"], _header(scope, b"authorization"))
        except ServiceError as e:
            log.info("refused %s %s: %d %s", scope["method"], scope["path"], e.status, e.code)
            self.refused(scope["path"], e.code)
            await send_error(send, e)
            return
        with acting_as(principal):
            await self.app(scope, receive, send)


async def send_error(send: Any, error: ServiceError) -> None:
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if error.status == 401:
        headers.append((b"www-authenticate", b'Bearer realm="lstm-sessions"'))
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
