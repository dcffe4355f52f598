"""Every error the API can answer: an HTTP status and a stable machine-readable code.

The body is always ``{"error": {"code": ..., "message": ..., ...details}}``. Handlers raise these;
``service.service`` turns them into responses, and ``service.http`` rewrites BentoML's own
schema-validation answers into the same shape.
"""

from __future__ import annotations

from typing import Any, ClassVar


class ServiceError(Exception):
    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, **self.details}}


class InvalidRequest(ServiceError):
    status, code = 422, "invalid_request"


class BadSessionId(ServiceError):
    """A session id that is not of the pattern (what the schemas' validation answers too)."""

    status, code = 422, "bad_session_id"


class MissingField(ServiceError):
    """A field that must be given and was not (what the schemas' validation answers too)."""

    status, code = 422, "missing_field"


class ApiKeyMissing(ServiceError):
    """LSTM_API_KEYS is set and the request has no ``Authorization: Bearer`` header."""

    status, code = 401, "api_key_missing"


class ApiKeyMalformed(ServiceError):
    """An ``Authorization`` header that is not ``Bearer <key>`` with a key of ours' shape."""

    status, code = 401, "api_key_malformed"


class ApiKeyInvalid(ServiceError):
    """A key of the right shape that the key file does not hold: never issued, or revoked (the
    same answer for both, so a caller cannot tell which)."""

    status, code = 401, "api_key_invalid"


class AdminOnly(ServiceError):
    status, code = 403, "admin_only"


class CorsOriginRefused(ServiceError):
    """A CORS preflight from an origin that LSTM_CORS_ORIGINS does not list."""

    status, code = 403, "cors_origin_refused"


class UnsupportedMediaType(ServiceError):
    status, code = 415, "unsupported_media_type"


class WrongFeatureCount(ServiceError):
    status, code = 422, "wrong_feature_count"


class ChunkTooLong(ServiceError):
    status, code = 422, "chunk_too_long"


class TooManyItems(ServiceError):
    status, code = 422, "too_many_items"


class HorizonTooLong(ServiceError):
    status, code = 422, "horizon_too_long"


class TTLTooLong(ServiceError):
    status, code = 422, "ttl_too_long"


class BodyTooLarge(ServiceError):
    status, code = 413, "body_too_large"


class HeaderTimeout(ServiceError):
    status, code = 408, "header_timeout"


class HeadersTooLarge(ServiceError):
    status, code = 431, "headers_too_large"


class TooManyConnections(ServiceError):
    status, code = 503, "too_many_connections"


class SessionGone(ServiceError):
    """The session is not (or no longer) there; the subclasses say why."""

    status, code = 404, "session_not_found"


class SessionNotFound(SessionGone):
    status, code = 404, "session_not_found"


class SessionExpired(SessionGone):
    status, code = 404, "session_expired"


class SessionEvicted(SessionGone):
    status, code = 404, "session_evicted"


class SessionOnOtherVersion(SessionNotFound):
    """The stored session is on another model version than the engine that looked: the one
    that holds it (service/versions.py) answers instead; with none loaded, a plain 404."""

    def __init__(self, message: str, *, model: tuple[str, str], **details: Any) -> None:
        super().__init__(message, **details)
        self.model = model


class SessionExists(ServiceError):
    status, code = 409, "session_exists"


class SeqConflict(ServiceError):
    status, code = 409, "seq_conflict"


class NoObservations(ServiceError):
    status, code = 409, "no_observations"


class BlobCorrupted(ServiceError):
    status, code = 422, "blob_corrupted"


class BlobSignatureInvalid(ServiceError):
    """An import whose blob is unsigned, or signed with another key, where LSTM_BLOB_KEY is set
    (or signed where it is not: nothing to check it with)."""

    status, code = 422, "blob_signature_invalid"


class BlobOutOfRange(ServiceError):
    """A blob, intact, whose t or values no session of this model can have."""

    status, code = 422, "blob_out_of_range"


class ModelMismatch(ServiceError):
    status, code = 409, "model_mismatch"


class VersionNotLoaded(ServiceError):
    status, code = 404, "model_version_not_loaded"


class VersionActive(ServiceError):
    status, code = 409, "model_version_active"


class VersionInUse(ServiceError):
    status, code = 409, "model_version_in_use"


class MigrationImpossible(ServiceError):
    """The session cannot move to the other version: it kept no inputs to replay (a window of
    0, or a blob from before windows), the versions take different features, or the store
    cannot do it (Redis: not yet)."""

    status, code = 409, "migration_impossible"


class VersionNotFound(ServiceError):
    """A tag BentoML's model store does not hold (or whose checkpoint is refused)."""

    status, code = 404, "model_not_in_store"


class TooManySessions(ServiceError):
    status, code = 429, "too_many_sessions"


class TooManyStreams(ServiceError):
    status, code = 429, "too_many_streams"


class IdleTimeout(ServiceError):
    status, code = 408, "idle_timeout"


class StaleSession(ServiceError):
    """Another replica moved the session on: the step reloads it and tries again; a client sees
    this only when a session keeps changing under a replica (retry it, as the client does)."""

    status, code = 409, "stale_session"


class StoreUnavailable(ServiceError):
    status, code = 503, "store_unavailable"


class StoreOutcomeUnknown(ServiceError):
    """Redis did not answer a step's write in time: it may still apply it. A retry with the same
    ``seq`` is answered exactly once (the compare-and-set recognises its own write)."""

    status, code = 503, "store_outcome_unknown"


class ShuttingDown(ServiceError):
    """The server is stopping: a step it held may or may not have been applied; a retry with the
    same ``seq`` (here once restarted, or on another replica) is answered exactly once."""

    status, code = 503, "shutting_down"


class StoreCorrupted(ServiceError):
    status, code = 500, "store_corrupted"


class RequestTimeout(ServiceError):
    status, code = 504, "request_timeout"


class ModelFailure(ServiceError):
    status, code = 500, "model_failure"


# pydantic error types -> our codes, for validation BentoML does before our handlers run.
VALIDATION_CODES: dict[str, str] = {
    "missing": "missing_field",
    "extra_forbidden": "unknown_field",
    "finite_number": "non_finite_number",
    "float_type": "not_a_number",
    "float_parsing": "not_a_number",
    "int_type": "not_an_integer",
    "string_pattern_mismatch": "bad_session_id",
    "json_invalid": "malformed_json",
    "json_type": "malformed_json",
}


def validation_error_body(errors: list[dict[str, Any]]) -> tuple[int, dict[str, Any]]:
    """Our status and body for BentoML's list of pydantic errors; the first error names the code."""
    first = errors[0] if errors else {"type": "", "loc": (), "msg": "invalid request"}
    kind, loc = str(first.get("type", "")), tuple(first.get("loc", ()))
    code = VALIDATION_CODES.get(kind, "invalid_request")
    bound = kind in ("less_than_equal", "greater_than_equal", "greater_than")
    if kind in ("too_short", "too_long") and loc and loc[-1] == "inputs":
        code = "empty_chunk" if kind == "too_short" else "chunk_too_long"
    elif kind == "too_long" and len(loc) >= 2 and loc[-2] == "inputs":
        code = "wrong_feature_count"  # a row of more values than any model takes
    elif bound and "horizon" in loc:
        code = "horizon_too_long" if kind == "less_than_equal" else "invalid_request"
    elif bound and "inputs" in loc:
        code = "value_out_of_range"
    elif bound and loc and loc[-1] == "seq":
        code = "seq_out_of_range"
    elif kind == "less_than_equal" and loc and loc[-1] == "ttl_s":
        code = "ttl_too_long"
    elif kind == "string_pattern_mismatch" and loc and loc[-1] in ("tag", "to"):
        code = "bad_model_tag"  # (it said bad_session_id; found by an outside test run)
    where = ".".join(str(p) for p in loc) or "body"
    fields = [
        {"loc": list(e.get("loc", ())), "type": e.get("type"), "msg": e.get("msg")} for e in errors
    ]
    status = 400 if code == "malformed_json" else 422
    return status, {
        "error": {"code": code, "message": f"{where}: {first.get('msg')}", "fields": fields}
    }
