"""Request and response bodies: the wire types, with their bounds, described for OpenAPI.

Numbers are strict and finite: ``NaN``, ``Infinity``, ``1e400``, strings and booleans are refused
before any handler runs. Bounds here are hard ceilings; the configured limits (settings) are
checked by the service and answered with the same error codes.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

SESSION_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
CHUNK_CEILING = 4096  # no setting may raise the chunk limit above this
PREDICT_CEILING = 100_000
HORIZON_CEILING = 4096
FEATURE_CEILING = 1024
MANY_CEILING = 65_536  # items in one step_many request
BLOB_CEILING = 16_000_000  # base64 characters of an exported session state

Number = Annotated[float, Field(strict=True, allow_inf_nan=False)]
Row = Annotated[
    list[Number],
    Field(
        min_length=1,
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
    ttl_s: float | None = Field(
        None,
        ge=0.001,
        strict=True,
        allow_inf_nan=False,
        description="idle seconds before expiry; default and maximum are set by the service",
    )


class SessionRef(Request):
    session_id: SessionId


class StreamMessage(Request):
    """A chunk for one session: the body of a step without its id (a /v1/stream message)."""

    inputs: list[Row] = Field(
        min_length=1, max_length=CHUNK_CEILING, description="T x F raw values, oldest first"
    )
    seq: int | None = Field(
        None,
        ge=0,
        strict=True,
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
    horizon: int = Field(
        1, ge=1, le=HORIZON_CEILING, strict=True, description="future steps to forecast"
    )


class ImportSession(Request):
    blob: str = Field(
        min_length=1,
        max_length=BLOB_CEILING,
        description="base64 state blob from /v1/sessions/export of a deployment serving the "
        "same model version",
    )
    session_id: SessionId | None = Field(None, description="default: the exported session's id")
    ttl_s: float | None = Field(None, ge=0.001, strict=True, allow_inf_nan=False)


class Predict(Request):
    inputs: list[Row] = Field(
        min_length=1,
        max_length=PREDICT_CEILING,
        description="a whole sequence, T x F raw values, oldest first",
    )
    return_gates: bool = Field(False, strict=True)


class StepOutput(BaseModel):
    mean: list[float] = Field(description="forecast of the next value, per feature")
    std: list[float] = Field(description="standard deviation of that forecast, per feature")
    anomaly_z: list[float] | None = Field(
        description="z-score of the value just received against the forecast made one step "
        "before, per feature; null at t = 0"
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
    t: int = Field(description="timesteps consumed after this chunk")
    outputs: list[StepOutput] = Field(description="one per timestep of the chunk")
    gates: Gates | None = None


class StepManyItem(BaseModel):
    ok: bool
    result: StepResult | None = Field(None, description="when ok")
    error: dict[str, object] | None = Field(None, description="when not ok: code, message, ...")


class StepManyResult(BaseModel):
    results: list[StepManyItem] = Field(description="one per item, in the items' order")


class ForecastStep(BaseModel):
    mean: list[float]
    std: list[float]


class ForecastResult(BaseModel):
    session_id: str
    t: int
    forecast: list[ForecastStep] = Field(description="one per future step, nearest first")


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


class ModelCard(BaseModel):
    name: str
    version: str
    device: str
    features: list[str]
    config: dict[str, object]
    normalisation: dict[str, list[float]]
    metrics: dict[str, object]
    limits: dict[str, float]
