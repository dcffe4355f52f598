"""Request and response bodies: the wire types, with their bounds, described for OpenAPI.

Numbers are strict, finite and bounded: ``NaN``, ``Infinity``, ``1e400``, values beyond
``VALUE_CEILING``, strings and booleans are refused before any handler runs. Bounds here are hard
ceilings; the configured limits (settings) are checked by the service and answered with the same
error codes. These classes are also the OpenAPI document's schemas (``service.openapi``): a field
that may be null says so here, and the document says so too.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema

SESSION_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
CHUNK_CEILING = 4096  # no setting may raise the chunk limit above this
PREDICT_CEILING = 100_000
HORIZON_CEILING = 4096
# Sampled futures per forecast: the default gives 10/90% quantiles to about +-0.02 in
# probability; the ceiling bounds a request's work at PATHS_CEILING x horizon model steps.
DEFAULT_PATHS = 200
PATHS_CEILING = 1000
FEATURE_CEILING = 1024
MANY_CEILING = 65_536  # items in one step_many request
BLOB_CEILING = 16_000_000  # base64 characters of an exported session state
# |value| of an input. The model computes in float32 (largest finite 3.4e38): 1e15 keeps every
# normalised input, gate pre-activation and anomaly z-score of a model whose per-feature std is
# at least 1e-6 far from overflow, so no accepted value can turn into an infinity (or a null).
VALUE_CEILING = 1e15
# seq and t: JSON's exact integers (2^53 - 1), what JavaScript clients and Redis's Lua numbers hold.
SEQ_CEILING = 2**53 - 1
TTL_CEILING = 10 * 365 * 86_400.0  # ten years: a time the clock and datetimes can still add


def _integral(value: Any) -> Any:
    """JSON has one number type: 3.0 is the integer 3 to JSON Schema (and to JavaScript), so it is
    accepted where an integer is; 3.5, strings and booleans are still refused (strict int)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# The bounds come before the validator: after it, pydantic would write them as bare ge/le.
Seq = Annotated[int, Field(strict=True, ge=0, le=SEQ_CEILING), BeforeValidator(_integral)]
Horizon = Annotated[int, Field(strict=True, ge=1, le=HORIZON_CEILING), BeforeValidator(_integral)]
Paths = Annotated[int, Field(strict=True, ge=2, le=PATHS_CEILING), BeforeValidator(_integral)]
Number = Annotated[
    float, Field(strict=True, allow_inf_nan=False, ge=-VALUE_CEILING, le=VALUE_CEILING)
]
# No min_length: a row of no values is the engine's wrong_feature_count, which says how many the
# model takes (the schema's said only that it was short; an outside test run).
Row = Annotated[
    list[Number],
    Field(
        max_length=FEATURE_CEILING,
        description="one value per feature, in the model's order",
    ),
]
SessionId = Annotated[
    str,
    Field(
        pattern=SESSION_ID_PATTERN,
        examples=["meter-42"],
        description="1-128 characters: letters, digits, '.', '_', '-'",
    ),
]


class Request(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class CreateSession(Request):
    session_id: SessionId | None = Field(None, description="client-chosen id; default: random")
    # No le: the service's own limit (LSTM_MAX_SESSION_TTL_S, at most TTL_CEILING) refuses a
    # longer one with that limit named; the schema's ceiling named ten years (an outside run).
    ttl_s: float | None = Field(
        None,
        ge=0.001,
        strict=True,
        allow_inf_nan=False,
        description="idle seconds before expiry; default and maximum are set by the service",
    )


class SessionRef(Request):
    session_id: SessionId


MODEL_TAG_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}(:[A-Za-z0-9._-]{1,128})?$"
ModelTag = Annotated[
    str,
    Field(
        pattern=MODEL_TAG_PATTERN,
        description="a tag of BentoML's model store: name:version (or name, its latest)",
    ),
]


class ModelRef(Request):
    tag: ModelTag


class ActivateModel(Request):
    tag: ModelTag
    migrate: Literal["none", "on_next_step", "now"] = Field(
        "none",
        description="the other versions' sessions: none, they stay where they are (migrate "
        "one with /v1/sessions/migrate); on_next_step, each moves at its next call; now, all "
        "move in the background, a batch at a time",
    )


class Migrate(Request):
    session_id: SessionId
    to: ModelTag | None = Field(None, description="a loaded version; default: the active one")


class StreamMessage(Request):
    """A chunk for one session: the body of a step without its id (a /v1/stream message)."""

    inputs: list[Row] = Field(
        min_length=1, max_length=CHUNK_CEILING, description="T x F raw values, oldest first"
    )
    seq: Seq | None = Field(
        None,
        description="the t the client believes the session is at; a retry "
        "of the last applied step with the same seq and inputs "
        "returns the same response without applying it again",
    )
    return_gates: bool = Field(
        False, strict=True, description="add per-layer mean gate activations"
    )


class Step(StreamMessage):
    session_id: SessionId


class StepMany(Request):
    items: list[Step] = Field(
        min_length=1,
        max_length=MANY_CEILING,
        description="steps of many sessions; a schema error in any item refuses the whole "
        "request, any other error fails its item alone",
    )


class Forecast(Request):
    session_id: SessionId
    horizon: Horizon = Field(1, description="future steps to forecast")
    paths: Paths = Field(
        DEFAULT_PATHS,
        description="futures sampled through the model (each draw fed back in as if observed); "
        "steps after the first are summarised from them",
    )
    seed: Seq = Field(
        0, description="seed of the sampling: the same seed, state and paths give the same answer"
    )


class ImportSession(Request):
    blob: str = Field(
        min_length=1,
        max_length=BLOB_CEILING,
        description="base64 state blob from /v1/sessions/export of a deployment serving the "
        "same model version",
    )
    session_id: SessionId | None = Field(None, description="default: the exported session's id")
    ttl_s: float | None = Field(None, ge=0.001, strict=True, allow_inf_nan=False)  # as create's


class Predict(Request):
    inputs: list[Row] = Field(
        min_length=1,
        max_length=PREDICT_CEILING,
        description="a whole sequence, T x F raw values, oldest first",
    )
    return_gates: bool = Field(False, strict=True)


# A list of numbers or null, written as one schema with a type list rather than pydantic's
# anyOf: BentoML's client flattens anyOf to its first branch and then fails on the null.
NullableNumbers = Annotated[
    list[float] | None,
    WithJsonSchema({"type": ["array", "null"], "items": {"type": "number"}}),
]


class StepOutput(BaseModel):
    mean: list[float] = Field(description="forecast of the next value, per feature")
    std: list[float] = Field(description="standard deviation of that forecast, per feature")
    anomaly_z: NullableNumbers = Field(
        description="z-score of the value just received against the forecast made one step "
        "before, per feature; null for the values the model gives no score: at t = 0, and "
        "for a running-scaled model (the shipped one) at t < 8, whose forecasts, from so few "
        "values, it was not trained on"
    )


class Gates(BaseModel):
    forget: list[list[float]] = Field(description="(layers, T) mean forget-gate activation")
    input: list[list[float]] = Field(description="(layers, T) mean input-gate activation")
    output: list[list[float]] = Field(description="(layers, T) mean output-gate activation")


class SessionInfo(BaseModel):
    session_id: str
    model: str
    model_version: str
    t: int = Field(description="timesteps consumed")
    created_at: datetime
    last_active_at: datetime
    expires_at: datetime
    ttl_s: float


class StepResult(BaseModel):
    session_id: str
    model_version: str = Field(description="the model version that answered")
    t: int = Field(description="timesteps consumed after this chunk")
    outputs: list[StepOutput] = Field(description="one per timestep of the chunk")
    gates: Gates | None = None


class LoadedModel(BaseModel):
    tag: str
    name: str
    version: str
    active: bool = Field(description="new sessions are created on it")
    sessions: int = Field(description="sessions on it now")
    device: str
    loaded_at: datetime


class LoadedModels(BaseModel):
    models: list[LoadedModel]


class Unloaded(BaseModel):
    tag: str
    unloaded: bool


class ErrorDetail(BaseModel):
    model_config = ConfigDict(extra="allow")

    code: str = Field(description="stable, machine-readable; the README lists every code")
    message: str = Field(description="for people; may change between versions")


class ErrorBody(BaseModel):
    """Every error answer: ``{"error": {"code", "message", ...details}}``."""

    error: ErrorDetail


class StepManyItem(BaseModel):
    ok: bool
    result: StepResult | None = Field(None, description="when ok")
    error: ErrorDetail | None = Field(None, description="when not ok: code, message, ...")


class StepManyResult(BaseModel):
    results: list[StepManyItem] = Field(description="one per item, in the items' order")


class ForecastStep(BaseModel):
    mean: list[float] = Field(description="mean of the value this many steps ahead, per feature")
    std: list[float] = Field(
        description="its standard deviation, per feature: the spread of the sampled paths, so "
        "it holds the uncertainty of every step before it, times the model's factor for this "
        "step (fitted so that mean ± 2 std covered 95.45% of held-out values; "
        "training.horizon_calibration in the model's card.json)"
    )
    p10: list[float] = Field(
        description="10% quantile, per feature: the paths read at the level for this step that "
        "held-out values fell below 10% of the time (training.horizon_calibration in the "
        "model's card.json)"
    )
    p50: list[float] = Field(description="median, per feature, calibrated as p10 is")
    p90: list[float] = Field(description="90% quantile, per feature, calibrated as p10 is")


class ForecastResult(BaseModel):
    session_id: str
    t: int
    forecast: list[ForecastStep] = Field(
        description="one per future step, nearest first; the first is the model's Gaussian "
        "forecast itself (the last step's mean and std, quantiles from that Gaussian at the "
        "calibrated levels), later ones are summarised from the sampled paths"
    )
    paths: int = Field(description="paths sampled")
    seed: int = Field(description="seed they were sampled with")


class PredictResult(BaseModel):
    outputs: list[StepOutput]
    gates: Gates | None = None


class Deleted(BaseModel):
    session_id: str
    deleted: bool


class Exported(BaseModel):
    session_id: str
    t: int
    model: str
    model_version: str
    blob: str = Field(
        description="base64 state blob: versioned, checksummed, bound to the model "
        "version; give it to /v1/sessions/import"
    )


class Limits(BaseModel):
    """The service's configured limits (each named by its LSTM_* setting in the README)."""

    max_chunk: int = Field(description="timesteps per step (LSTM_MAX_CHUNK)")
    max_horizon: int = Field(description="forecast steps (LSTM_MAX_HORIZON)")
    max_predict_len: int = Field(description="timesteps per /v1/predict (LSTM_MAX_PREDICT_LEN)")
    max_many: int = Field(description="items per step_many (LSTM_MAX_MANY)")
    max_sessions: int = Field(description="sessions held (LSTM_MAX_SESSIONS)")
    max_body_bytes: int = Field(description="request body bytes (LSTM_MAX_BODY_BYTES)")
    session_ttl_s: float = Field(description="default ttl_s (LSTM_SESSION_TTL_S)")
    max_session_ttl_s: float = Field(description="largest ttl_s (LSTM_MAX_SESSION_TTL_S)")
    max_abs_value: float = Field(description="largest |input value| accepted")
    max_seq: int = Field(description="largest seq accepted")


class ModelCard(BaseModel):
    name: str
    version: str
    device: str
    features: list[str]
    config: dict[str, Any]
    normalisation: dict[str, list[float]]
    metrics: dict[str, Any]
    limits: Limits
