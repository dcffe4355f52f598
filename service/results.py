"""What a step answers, as plain data: shared by the batcher that makes it, the store that keeps
the last one for retries, and the service that sends it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class Outputs:
    """Per-timestep results as plain lists, ready for the wire."""

    mean: list[list[float]]  # (T, F)
    std: list[list[float]]
    anomaly_z: list[list[float] | None]  # (T, F), None where no forecast preceded the value
    gates: dict[str, list[list[float]]] | None  # name -> (layers, T)


@dataclass(slots=True)
class ForecastOutputs:
    """A sampled forecast as plain lists, each (horizon, F): per future step the mean, std and
    10/50/90% quantiles."""

    means: list[list[float]]
    stds: list[list[float]]
    p10: list[list[float]]
    p50: list[list[float]]
    p90: list[list[float]]


@dataclass(slots=True)
class StepDone:
    t: int
    outputs: Outputs
