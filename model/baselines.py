"""One-step baselines the trained model must beat, scored on the same timesteps as the model.

Every score is the one-step mean squared error over timesteps ``warmup..T-1`` of each series,
pooled over series and features, in the data's own units.
"""

from __future__ import annotations

import numpy as np


def persistence_mse(series: list[np.ndarray], warmup: int) -> float:
    """Predict the last value seen."""
    errors = [(s[warmup:] - s[warmup - 1 : -1]) ** 2 for s in series]
    return float(np.concatenate(errors).mean())


def seasonal_lag_mse(
    series: list[np.ndarray], warmup: int, max_lag: int
) -> tuple[float, list[int]]:
    """Predict the value ``lag`` steps back, with the best lag in 1..max_lag for each series.

    The lag is chosen on the scored timesteps themselves (an oracle), which makes this baseline
    stronger than any lag a forecaster could pick from the past alone.
    """
    if max_lag > warmup:
        raise ValueError("max_lag must not exceed warmup, so every lag is scored on equal steps")
    errors, lags = [], []
    for s in series:
        target = s[warmup:]
        per_lag = [
            ((target - s[warmup - lag : len(s) - lag]) ** 2) for lag in range(1, max_lag + 1)
        ]
        best = int(np.argmin([e.mean() for e in per_lag]))
        errors.append(per_lag[best])
        lags.append(best + 1)
    return float(np.concatenate(errors).mean()), lags


def training_mean_mse(series: list[np.ndarray], warmup: int, train_mean: np.ndarray) -> float:
    """Predict the training data's mean of each feature, always."""
    errors = [(s[warmup:] - train_mean) ** 2 for s in series]
    return float(np.concatenate(errors).mean())
