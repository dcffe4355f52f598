"""The LSTM forecaster: gates, layers, the forecasting head, checkpoints. Knows nothing of HTTP."""

from model.checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from model.forecaster import (
    Forecast,
    ForecasterConfig,
    LSTMForecaster,
    Normalisation,
    gaussian_nll,
)
from model.lstm import VARIANTS, GateTrace, LSTMCell, LSTMLayer, LSTMState, StackedLSTM, Variant


def pick_device(preference: str = "auto") -> str:
    """``auto`` is CUDA when available, else CPU; anything else is taken as asked."""
    import torch

    if preference == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return preference


__all__ = [
    "VARIANTS",
    "Checkpoint",
    "CheckpointError",
    "Forecast",
    "ForecasterConfig",
    "GateTrace",
    "LSTMCell",
    "LSTMForecaster",
    "LSTMLayer",
    "LSTMState",
    "Normalisation",
    "StackedLSTM",
    "Variant",
    "gaussian_nll",
    "load_checkpoint",
    "pick_device",
    "save_checkpoint",
]
