"""The clients' shared core, sans I/O: what each call sends, what is retried, what answers become.

``LSTMClient`` and ``AsyncLSTMClient`` are thin transports over this module: they send the
``Op`` it builds, feed each outcome (a response, or the transport error raised instead) to an
``Attempts``, sleep as long as it says, and return ``Attempts.result``. So every rule of the
client (the routes and bodies, the ``X-Session-Id`` header, how ``seq`` and ``t`` advance, which
answers are retried and after how long, how an error body becomes an ``APIError``) is written
here once, and both clients follow it to the letter.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import httpx

Rows = Sequence[Sequence[float]]
Reply = dict[str, Any]
Outcome = httpx.Response | httpx.TransportError
T = TypeVar("T")
HTTP = TypeVar("HTTP", httpx.Client, httpx.AsyncClient)

# A 502 is a proxy that lost its replica mid-request, a 503 a service that could not finish
# (Redis down, outcome unknown, shutting down, too many connections): each is safe to send again
# because every step carries seq and every create names its session.
RETRY_STATUSES = {502, 503}


class APIError(Exception):
    """An error answer of the service: its status, stable code, message and details."""

    def __init__(self, status: int, body: Any) -> None:
        error = body.get("error", {}) if isinstance(body, dict) else {}
        if not isinstance(error, dict):
            error = {"message": str(error)}
        self.status = status
        self.code = str(error.get("code", "unknown"))
        self.message = str(error.get("message", body))
        self.details = {k: v for k, v in error.items() if k not in ("code", "message")}
        self.attempts = 1  # how many times the request was sent
        super().__init__(f"{status} {self.code}: {self.message}")


def _reply(answer: Reply) -> Reply:
    return answer


@dataclass(frozen=True)
class Op(Generic[T]):
    """One API call: the request to send, and what its (successful) answer becomes."""

    route: str
    body: dict[str, Any]
    read: Callable[[Reply], T]
    session_id: str | None = None

    @property
    def headers(self) -> dict[str, str]:
        # The session-aware proxy hashes on this header, so a session's calls reach the replica
        # that caches it; calls of no session carry none, nor those of an id no header can carry
        # (not printable ASCII: httpx raised UnicodeEncodeError or h11 LocalProtocolError; the
        # service answers it bad_session_id).
        sid = self.session_id
        return {"X-Session-Id": sid} if sid and sid.isascii() and sid.isprintable() else {}


def retryable(outcome: Outcome) -> bool:
    """Whether sending the same request again is safe and may get a better answer."""
    if isinstance(outcome, httpx.LocalProtocolError):
        return False  # this client's own request cannot be sent: sending it again is no better
    if isinstance(outcome, httpx.TransportError):
        return True
    if outcome.status_code in RETRY_STATUSES:
        return True
    if outcome.status_code != 409:
        return False
    try:  # stale_session: a replica kept losing a race for the session; nothing was applied
        return bool(outcome.json()["error"]["code"] == "stale_session")
    except (ValueError, KeyError, TypeError):
        return False


def answer(response: httpx.Response, attempts: int) -> Reply:
    """The body of a successful answer; an error answer raises ``APIError``."""
    try:
        body = response.json()
    except ValueError:
        body = {"error": {"code": "not_json", "message": response.text[:200]}}
    if response.status_code >= 400:
        error = APIError(response.status_code, body)
        error.attempts = attempts
        raise error
    return dict(body)


class Attempts(Generic[T]):
    """The attempts of one ``Op``: after each, whether to send it again, and after how long."""

    def __init__(self, op: Op[T], policy: RetryPolicy) -> None:
        self.op = op
        self.policy = policy
        self.sent = 0

    def wait_before_next(self, outcome: Outcome) -> float | None:
        """Seconds to wait before sending again, or None: ``outcome`` is the call's result."""
        self.sent += 1
        p = self.policy
        # A refused connection is a server not (yet) listening, a restart: nothing was sent.
        limit = p.connect_retries if isinstance(outcome, httpx.ConnectError) else p.retries
        if self.sent > limit or not retryable(outcome):
            return None
        return min(p.backoff_s * 2 ** (self.sent - 1), p.max_backoff_s)

    def result(self, outcome: Outcome) -> T:
        """The final outcome, read: the op's value, or the error that ended the call, raised."""
        if isinstance(outcome, httpx.TransportError):
            raise outcome
        return self.op.read(answer(outcome, self.sent))


class ClientBase(Generic[HTTP]):
    """A client's construction and retry policy, the same for the sync and the async one."""

    http_class: type[HTTP]

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:3000",
        *,
        timeout_s: float = 30.0,
        retries: int = 3,
        connect_retries: int = 12,
        backoff_s: float = 0.2,
        max_backoff_s: float = 2.0,
        http: HTTP | None = None,
        api_key: str | None = None,
    ) -> None:
        """``api_key``: sent as ``Authorization: Bearer`` on every call (a service with
        LSTM_API_KEYS needs one); default: the LSTM_API_KEY environment variable, if set.
        ``retries``: how many times a call is sent again (a lost answer, 502, 503);
        ``connect_retries``: how many times a refused connection is (a server restarting:
        3 retries, 1.4 s, gave up during one; an outside run); waiting ``backoff_s`` doubling to
        at most ``max_backoff_s``: about 19 s of refused connections by default."""
        api_key = api_key or os.environ.get("LSTM_API_KEY") or None
        auth = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self.http: HTTP = http or self.http_class(
            base_url=base_url, timeout=timeout_s, headers=auth
        )
        if http is not None and auth:
            self.http.headers.update(auth)
        self.policy = RetryPolicy(retries, connect_retries, backoff_s, max_backoff_s)

    def attempts(self, op: Op[T]) -> Attempts[T]:
        return Attempts(op, self.policy)


@dataclass(frozen=True)
class RetryPolicy:
    """How often a call is sent again, and how long to wait before each (ClientBase's)."""

    retries: int
    connect_retries: int
    backoff_s: float
    max_backoff_s: float


def rows(inputs: Rows) -> list[list[float]]:
    """The rows as lists; a NaN or an infinity refused here, nothing sent (JSON cannot carry
    them: it was httpx's 'Out of range float values are not JSON compliant'; an outside test
    run), in the words of the service's ``non_finite_number``."""
    out = [list(r) for r in inputs]
    for t, row in enumerate(out):
        for f, v in enumerate(row):
            if isinstance(v, float) and not math.isfinite(v):
                raise ValueError(f"inputs[{t}][{f}] is {v}: values must be finite numbers")
    return out


def raw(route: str, body: dict[str, Any], session_id: str | None) -> Op[Reply]:
    return Op(route, body, _reply, session_id)


def create(session_id: str, ttl_s: float | None) -> Op[Reply]:
    body = {"session_id": session_id, **({"ttl_s": ttl_s} if ttl_s is not None else {})}
    return Op("/v1/sessions/create", body, _reply, session_id)


def get(session_id: str) -> Op[Reply]:
    return Op("/v1/sessions/get", {"session_id": session_id}, _reply, session_id)


def predict(inputs: Rows, return_gates: bool) -> Op[Reply]:
    return Op("/v1/predict", {"inputs": rows(inputs), "return_gates": return_gates}, _reply)


def model() -> Op[Reply]:
    return Op("/v1/model", {}, _reply)


def made_by_an_earlier_attempt(error: APIError) -> bool:
    """A create refused as ``session_exists`` after a retry: the lost first attempt made it."""
    return error.code == "session_exists" and error.attempts > 1


class SessionState:
    """What a client knows of one session (its id and ``t``), and the ops that keep ``t`` true."""

    def __init__(self, session_id: str, t: int, keep: bool) -> None:
        self.id = session_id
        self.t = t  # timesteps the server has applied, as far as this client knows
        self.keep = keep

    def _op(self, route: str, body: dict[str, Any], read: Callable[[Reply], T]) -> Op[T]:
        return Op(route, {"session_id": self.id, **body}, read, self.id)

    def _advance(self, reply: Reply) -> Reply:
        self.t = int(reply["t"])
        return reply

    def _reset(self, reply: Reply) -> None:
        self._advance(reply)

    def step_op(self, inputs: Rows, return_gates: bool) -> Op[Reply]:
        # seq = t makes the step safe to retry: the server applies it once or answers it again.
        body = {"inputs": rows(inputs), "seq": self.t, "return_gates": return_gates}
        return self._op("/v1/sessions/step", body, self._advance)

    def forecast_op(self, horizon: int, paths: int | None, seed: int | None) -> Op[Reply]:
        body: dict[str, Any] = {"horizon": horizon}
        body.update({k: v for k, v in (("paths", paths), ("seed", seed)) if v is not None})
        return self._op("/v1/sessions/forecast", body, _reply)

    def info_op(self) -> Op[Reply]:
        return self._op("/v1/sessions/get", {}, self._advance)

    def reset_op(self) -> Op[None]:
        return self._op("/v1/sessions/reset", {}, self._reset)

    def delete_op(self) -> Op[None]:
        return self._op("/v1/sessions/delete", {}, lambda _: None)


def already_gone(error: APIError) -> bool:
    """A delete on leaving a session's context that found it gone (expired, evicted): done."""
    return error.status == 404
