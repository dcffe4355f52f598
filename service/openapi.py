"""The OpenAPI document: the whole wire contract, built from the schemas and the error classes.

BentoML generates a document of its own, but it types ``error`` as a string, drops nullable
fields, marks no body as required and lists statuses that our routes never answer (schemathesis
found 59 such disagreements). This one is written from what the service does: every operation,
its body (required), its reply, and every status it can answer with the error body and the codes
that status carries. ``/docs.json`` serves it (``ErrorContract``), and the Swagger UI at ``/``
reads it from there. ``ALLOWED`` is the same table seen per path: the ``Allow`` header of a 405.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from service import errors as e
from service.schemas import (
    ActivateModel,
    CreateSession,
    Deleted,
    ErrorBody,
    Exported,
    Forecast,
    ForecastResult,
    ImportSession,
    LoadedModels,
    Migrate,
    ModelCard,
    ModelRef,
    Predict,
    PredictResult,
    SessionInfo,
    SessionRef,
    Step,
    StepMany,
    StepManyResult,
    StepResult,
    Unloaded,
)


class Pong(BaseModel):
    ok: bool


@dataclass(frozen=True)
class Operation:
    path: str
    name: str
    summary: str
    request: type[BaseModel] | None
    response: type[BaseModel]
    errors: tuple[type[e.ServiceError], ...] = ()
    read_only: bool = False  # answers GET (no body) beside POST


GONE = (e.SessionNotFound, e.SessionExpired, e.SessionEvicted)
STORE = (e.StoreUnavailable, e.StoreCorrupted)
STEP_ERRORS = (
    *GONE,
    e.SeqConflict,
    e.StaleSession,
    e.WrongFeatureCount,
    e.ChunkTooLong,
    e.ModelFailure,
    e.StoreOutcomeUnknown,
    *STORE,
)

OPERATIONS: tuple[Operation, ...] = (
    Operation(
        "/v1/sessions/create",
        "create",
        "Open a session at t = 0, with a client-chosen or random id",
        CreateSession,
        SessionInfo,
        (e.SessionExists, e.TTLTooLong, e.TooManySessions, *STORE),
    ),
    Operation(
        "/v1/sessions/step",
        "step",
        "Feed a chunk of T timesteps; get the forecast and anomaly score after each",
        Step,
        StepResult,
        STEP_ERRORS,
    ),
    Operation(
        "/v1/sessions/step_many",
        "step_many",
        "Steps of many sessions in one request, each succeeding or failing on its own",
        StepMany,
        StepManyResult,
        (e.TooManyItems, e.ModelFailure, e.StoreOutcomeUnknown),
    ),
    Operation(
        "/v1/sessions/forecast",
        "forecast",
        "Forecast `horizon` future steps from `paths` futures sampled through the model "
        "(mean, std, 10/50/90% quantiles per step), without changing the session",
        Forecast,
        ForecastResult,
        (*GONE, e.NoObservations, e.HorizonTooLong, e.ModelFailure, *STORE),
    ),
    Operation(
        "/v1/sessions/get",
        "get",
        "A session's t and times",
        SessionRef,
        SessionInfo,
        (*GONE, *STORE),
    ),
    Operation(
        "/v1/sessions/reset",
        "reset",
        "Back to a zero state at t = 0",
        SessionRef,
        SessionInfo,
        (*GONE, *STORE),
    ),
    Operation(
        "/v1/sessions/delete",
        "delete",
        "Free a session and its state",
        SessionRef,
        Deleted,
        (*GONE, *STORE),
    ),
    Operation(
        "/v1/sessions/export",
        "export",
        "The session's state as a blob another deployment of the same model can import",
        SessionRef,
        Exported,
        (*GONE, *STORE),
    ),
    Operation(
        "/v1/sessions/import",
        "import",
        "A session restored from an exported blob, continuing where it was",
        ImportSession,
        SessionInfo,
        (
            e.BlobCorrupted,
            e.BlobSignatureInvalid,
            e.BlobOutOfRange,
            e.ModelMismatch,
            e.SessionExists,
            e.TTLTooLong,
            e.TooManySessions,
            *STORE,
        ),
    ),
    Operation(
        "/v1/sessions/migrate",
        "migrate",
        "Move a session to another loaded model version by replaying its kept inputs",
        Migrate,
        SessionInfo,
        (*GONE, e.MigrationImpossible, e.VersionNotLoaded, e.ModelFailure, *STORE),
    ),
    Operation(
        "/v1/predict",
        "predict",
        "A whole sequence in, the outputs after every timestep out; no session involved",
        Predict,
        PredictResult,
        (e.WrongFeatureCount, e.ChunkTooLong, e.ModelFailure),
    ),
    Operation(
        "/v1/model",
        "model",
        "The model card: what is served, how it was trained, its limits",
        None,
        ModelCard,
        read_only=True,
    ),
    Operation(
        "/v1/admin/models",
        "admin_models",
        "The loaded model versions: which is active, how many sessions are on each",
        None,
        LoadedModels,
        read_only=True,
    ),
    Operation(
        "/v1/admin/models/load",
        "admin_load",
        "Load a version from BentoML's model store beside the others (not active yet)",
        ModelRef,
        LoadedModels,
        (e.VersionNotFound, e.ModelMismatch),
    ),
    Operation(
        "/v1/admin/models/activate",
        "admin_activate",
        "Make a loaded version the one new sessions are created on",
        ActivateModel,
        LoadedModels,
        (e.VersionNotLoaded,),
    ),
    Operation(
        "/v1/admin/models/unload",
        "admin_unload",
        "Unload a version that is not active and that no session is on",
        ModelRef,
        Unloaded,
        (e.VersionNotLoaded, e.VersionActive, e.VersionInUse),
    ),
    Operation(
        "/v1/ping",
        "ping",
        "Does nothing: the server's own cost per request",
        None,
        Pong,
        read_only=True,
    ),
)

# Every route under /v1/ can answer these: the edge (service.http) and the schema refuse a request
# before any handler runs, and any route can fail or run past its deadline.
EDGE_ERRORS: tuple[tuple[int, str, tuple[str, ...]], ...] = (
    (400, "the body is not JSON", ("malformed_json",)),
    (408, "the request line and headers took over LSTM_HEADER_TIMEOUT_S", ("header_timeout",)),
    (413, "the body is over LSTM_MAX_BODY_BYTES", ("body_too_large",)),
    (415, "the body is not application/json", ("unsupported_media_type",)),
    (431, "the request line and headers are over LSTM_MAX_HEADER_BYTES", ("headers_too_large",)),
    (500, "a failure of the service; the message says what", ("internal_error",)),
    (
        503,
        "the service cannot take the request now (see the code)",
        ("too_many_connections", "shutting_down"),
    ),
    (504, "the request ran past the deadline", ("request_timeout",)),
)
STATUS_WORDS = {
    404: "the session is not there (never was, expired, evicted or deleted)",
    409: "the request conflicts with the session's state",
    422: "the request breaks a rule of the schema or a configured limit",
    429: "a capacity limit of the service is reached",
    503: "the session store is unavailable",
}
SCHEMA_CODES = (
    *sorted(set(e.VALIDATION_CODES.values()) - {"malformed_json"}),
    "empty_chunk",
    "chunk_too_long",
    "horizon_too_long",
    "ttl_too_long",
    "value_out_of_range",
    "seq_out_of_range",
    "wrong_feature_count",
    "bad_model_tag",
    "invalid_request",
)

ALLOWED: dict[str, str] = {
    op.path: "GET, HEAD, POST" if op.read_only else "POST" for op in OPERATIONS
}

HEALTH = {
    "/livez": ("Liveness: 200 while the process serves", (200,)),
    "/readyz": ("Readiness: 200 once the model and the store are ready, else 503", (200, 503)),
    "/healthz": ("Health: as /livez", (200,)),
    "/metrics": ("Prometheus metrics, text exposition format", (200,)),
}

DESCRIPTION = """\
A stateful LSTM forecaster: each session keeps the LSTM's (h, c) between calls, so a client
streams a sequence chunk by chunk and gets exactly what it would get by sending it whole.

Every error answers `{"error": {"code", "message", ...details}}` with a stable `code`; each
operation lists its statuses and their codes. `seq` makes a retry exactly-once. The WebSocket
`/v1/stream?session_id=...` (not describable in OpenAPI) takes step bodies without the id, one
message per step, and answers each in order (see the README).
"""


Refs = Mapping[tuple[Any, Any], dict[str, Any]]


def _error_response(description: str, codes: list[str]) -> dict[str, Any]:
    return {
        "description": f"{description}. Codes: " + ", ".join(f"`{c}`" for c in codes),
        "content": {
            "application/json": {
                "schema": {"$ref": "#/components/schemas/ErrorBody"},
                "example": {"error": {"code": codes[0], "message": "..."}},
            }
        },
    }


KEY_ERRORS: tuple[type[e.ServiceError], ...] = (e.ApiKeyMissing, e.ApiKeyMalformed, e.ApiKeyInvalid)
SECURITY_SCHEME = {
    "type": "http",
    "scheme": "bearer",
    "description": "an API key of LSTM_API_KEYS (`lstm-serve keys add`); each key sees only the "
    "sessions it created",
}


def _responses(op: Operation, refs: Refs, keys: bool = False) -> dict[str, Any]:
    by_status: dict[int, list[str]] = {}
    for status, _, edge_codes in EDGE_ERRORS:
        by_status.setdefault(status, []).extend(edge_codes)
    for error in KEY_ERRORS if keys else ():
        by_status.setdefault(error.status, []).append(error.code)
    if keys and op.path.startswith("/v1/admin/"):
        by_status.setdefault(e.AdminOnly.status, []).append(e.AdminOnly.code)
    if op.request is not None:
        by_status.setdefault(422, []).extend(SCHEMA_CODES)
    for error in op.errors:
        by_status.setdefault(error.status, []).append(error.code)
    responses: dict[str, Any] = {
        "200": {
            "description": "OK",
            "content": {"application/json": {"schema": refs[(op.response, "serialization")]}},
        }
    }
    words = {
        **STATUS_WORDS,
        **{s: d for s, d, _ in EDGE_ERRORS},
        401: "no valid API key",
        403: "the key's role may not call this route",
    }
    for status in sorted(by_status):
        responses[str(status)] = _error_response(
            words.get(status, "refused"), sorted(set(by_status[status]))
        )
    return responses


def _tag(path: str) -> str:
    if path.startswith("/v1/sessions/"):
        return "sessions"
    return "admin" if path.startswith("/v1/admin/") else "stateless"


def _operation(op: Operation, method: str, refs: Refs, keys: bool = False) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "operationId": op.name if method == "post" else f"{op.name}_get",
        "summary": op.summary,
        "tags": [_tag(op.path)],
        "responses": _responses(op, refs, keys),
    }
    if op.request is not None:
        doc["requestBody"] = {
            # create's every field is optional: an empty POST opens a random session
            "required": any(f.is_required() for f in op.request.model_fields.values()),
            "content": {"application/json": {"schema": refs[(op.request, "validation")]}},
        }
    return doc


@dataclass(frozen=True)
class Deployment:
    """What the schema classes cannot know: the served model's width and the configured limits.
    The document states them, so a request it calls valid is one this deployment accepts."""

    n_features: int
    max_chunk: int
    max_predict_len: int
    max_many: int
    max_horizon: int
    max_session_ttl_s: float
    max_body_bytes: int
    api_keys: bool = False  # LSTM_API_KEYS set: every /v1 route needs a bearer key


def _narrow(schemas: dict[str, Any], to: Deployment) -> None:
    """Tighten the schema classes' hard ceilings to this deployment's limits, in place.

    A step_many item keeps the ceilings: its feature count and chunk length are checked by the
    handler and fail that item alone (``results[i].error``), not the request."""
    schemas["StepItem"] = copy.deepcopy(schemas["Step"])
    schemas["StepItem"]["title"] = "StepItem"
    schemas["StepMany"]["properties"]["items"]["items"] = {"$ref": "#/components/schemas/StepItem"}
    for name, chunk in (("Step", to.max_chunk), ("Predict", to.max_predict_len)):
        inputs = schemas[name]["properties"]["inputs"]
        inputs["maxItems"] = chunk
        inputs["items"]["minItems"] = inputs["items"]["maxItems"] = to.n_features
    schemas["StepMany"]["properties"]["items"]["maxItems"] = to.max_many
    schemas["Forecast"]["properties"]["horizon"]["maximum"] = to.max_horizon
    for name in ("CreateSession", "ImportSession"):
        for branch in schemas[name]["properties"]["ttl_s"]["anyOf"]:  # [number, null]
            if branch.get("type") == "number":
                branch["maximum"] = to.max_session_ttl_s
    # A blob longer than the body limit is refused (413) before anything reads it.
    blob = schemas["ImportSession"]["properties"]["blob"]
    blob["maxLength"] = min(blob["maxLength"], to.max_body_bytes - 1024)


# What a created session leads to: OpenAPI links, so a client generator (and schemathesis's
# stateful phase) can chain create -> step / forecast / ... on the id the create answered.
SESSION_LINKS = ("step", "forecast", "get", "reset", "export", "delete")


def _links(n_features: int) -> dict[str, Any]:
    sid = "$response.body#/session_id"
    body: dict[str, dict[str, Any]] = {
        "step": {"session_id": sid, "inputs": [[0.5] * n_features], "seq": 0},
        "forecast": {"session_id": sid, "horizon": 2},
    }
    return {
        f"{name}_session": {
            "operationId": name,
            "requestBody": body.get(name, {"session_id": sid}),
            "description": f"{name} the session just created",
        }
        for name in SESSION_LINKS
    }


def openapi_document(version: str, deployment: Deployment | None = None) -> dict[str, Any]:
    """The document, for the service's package ``version``; narrowed to ``deployment``'s model
    and limits when given (the served document always is)."""
    models = {op.request for op in OPERATIONS if op.request is not None}
    replies = {op.response for op in OPERATIONS} | {ErrorBody}
    refs, schemas = models_json_schema(
        [(m, "validation") for m in sorted(models, key=lambda m: m.__name__)]
        + [(m, "serialization") for m in sorted(replies, key=lambda m: m.__name__)],
        ref_template="#/components/schemas/{model}",
    )
    defs = schemas.get("$defs", {})
    if deployment is not None:
        _narrow(defs, deployment)
    keys = deployment is not None and deployment.api_keys
    paths: dict[str, Any] = {}
    for op in OPERATIONS:
        item = {"post": _operation(op, "post", refs, keys)}
        if op.name == "create":
            n_features = deployment.n_features if deployment else 1
            item["post"]["responses"]["200"]["links"] = _links(n_features)
        if op.read_only:
            item["get"] = _operation(op, "get", refs, keys)
        paths[op.path] = item
    for path, (summary, statuses) in HEALTH.items():
        paths[path] = {
            "get": {
                "operationId": path.strip("/"),
                "summary": summary,
                "tags": ["health"],
                "security": [],  # open with keys on, as the probes and Prometheus need
                "responses": {
                    str(s): {
                        "description": "OK" if s == 200 else "not ready",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                    for s in statuses
                },
            }
        }
    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": "lstm-sessions", "version": version, "description": DESCRIPTION},
        "paths": paths,
        "components": {"schemas": defs},
    }
    if keys:
        document["components"]["securitySchemes"] = {"apiKey": SECURITY_SCHEME}
        document["security"] = [{"apiKey": []}]
    return document
