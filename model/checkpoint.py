"""Checkpoints that describe themselves and load without pickle.

A checkpoint is a directory with two files:
- ``model.safetensors``: the weights, nothing else;
- ``card.json``: format version, name, version, config, normalisation, training metrics, the data
  fingerprint, and the SHA-256 of the weights file, so a corrupted or swapped file is refused.

The weights include the std's calibration (``std_scale``, fitted after training): a different
factor is a different version, since the model answers differently.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from model.forecaster import ForecasterConfig, LSTMForecaster, Normalisation
from model.scaling import RunningScaleForecaster

AnyForecaster = LSTMForecaster | RunningScaleForecaster

# /2: the weights hold the std's calibration (std_scale); /1 checkpoints, written before it
# existed, load uncalibrated (ones), their version unchanged. Older code refuses /2 by name.
FORMAT = "lstm-forecaster/2"
FORMAT_UNCALIBRATED = "lstm-forecaster/1"
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "card.json"
UNCALIBRATED_KEY = "std_scale"  # the weight a /1 checkpoint lacks


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupted, or does not match the model it describes."""


@dataclass
class Checkpoint:
    model: LSTMForecaster
    name: str
    version: str  # the first 12 hex digits of the weights' SHA-256: equal weights, equal version
    card: dict[str, Any] = field(default_factory=dict)


@dataclass
class AnyCheckpoint:
    """A checkpoint of either scaling, for training and evaluation (not for serving)."""

    model: AnyForecaster
    name: str
    version: str
    card: dict[str, Any] = field(default_factory=dict)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save_checkpoint(
    model: AnyForecaster,
    directory: str | Path,
    *,
    name: str,
    extra: dict[str, Any] | None = None,
) -> AnyCheckpoint:
    """Write weights and card into ``directory``; ``extra`` (metrics, data...) joins the card."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(weights, str(directory / WEIGHTS_FILE), metadata={"format": FORMAT})
    # safetensors writes 0600: a container's non-root user (make image) could not read it. The
    # mode any other file gets here (0666 less the umask), as the card has.
    umask = os.umask(0)
    os.umask(umask)
    (directory / WEIGHTS_FILE).chmod(0o666 & ~umask)
    digest = _sha256(directory / WEIGHTS_FILE)
    card = {
        "format": FORMAT,
        "name": name,
        "version": digest[:12],
        "weights_sha256": digest,
        "config": model.config.to_dict(),
        "normalisation": model.normalisation.to_dict(),
        **(extra or {}),
    }
    (directory / CARD_FILE).write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
    return AnyCheckpoint(model, name, card["version"], card)


def read_card(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / CARD_FILE
    try:
        card = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise CheckpointError(f"no {CARD_FILE} in {directory}") from e
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(card, dict) or card.get("format") not in (FORMAT, FORMAT_UNCALIBRATED):
        found = card.get("format") if isinstance(card, dict) else None
        raise CheckpointError(
            f"{path} has format {found!r}; this code reads {FORMAT!r} and {FORMAT_UNCALIBRATED!r}"
        )
    return card


def load_checkpoint(
    directory: str | Path,
    *,
    device: torch.device | str = "cpu",
) -> Checkpoint:
    """Load and verify a servable checkpoint; raise CheckpointError naming what is wrong."""
    ckpt = load_any_checkpoint(directory, device=device)
    if not isinstance(ckpt.model, LSTMForecaster):
        raise CheckpointError(
            f"{directory} holds a model with scaling={ckpt.model.config.scaling!r}: serving it "
            "needs each session's running statistics in its state (pool, blobs, snapshots, "
            "Redis), which this service does not keep yet"
        )
    return Checkpoint(ckpt.model, ckpt.name, ckpt.version, ckpt.card)


def load_any_checkpoint(
    directory: str | Path,
    *,
    device: torch.device | str = "cpu",
) -> AnyCheckpoint:
    """Load and verify a checkpoint of either scaling; CheckpointError names what is wrong."""
    directory = Path(directory)
    card = read_card(directory)
    weights_path = directory / WEIGHTS_FILE
    if not weights_path.is_file():
        raise CheckpointError(f"no {WEIGHTS_FILE} in {directory}")
    digest = _sha256(weights_path)
    if digest != card.get("weights_sha256"):
        raise CheckpointError(
            f"{weights_path} is corrupted or does not belong to this card: its SHA-256 is "
            f"{digest[:12]}..., the card expects {str(card.get('weights_sha256'))[:12]}..."
        )
    try:
        config = ForecasterConfig.from_dict(card["config"])
        model = build_forecaster(config, Normalisation.from_dict(card["normalisation"]))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{directory / CARD_FILE} describes no valid model: {e}") from e
    try:
        weights = load_file(str(weights_path))
    except SafetensorError as e:
        raise CheckpointError(f"{weights_path} is not a readable safetensors file: {e}") from e
    if card["format"] == FORMAT_UNCALIBRATED and UNCALIBRATED_KEY not in weights:
        weights[UNCALIBRATED_KEY] = torch.ones(config.n_features)  # written before it existed
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in weights.items()}
    if expected != found:
        diff = sorted(
            f"{k}: expected {expected.get(k)}, found {found.get(k)}"
            for k in set(expected) | set(found)
            if expected.get(k) != found.get(k)
        )
        raise CheckpointError(f"weights do not match the card's config: {'; '.join(diff)}")
    scale = weights[UNCALIBRATED_KEY]
    if not (torch.isfinite(scale).all() and (scale > 0).all()):
        raise CheckpointError(
            f"the std's calibration (std_scale) is {scale.tolist()}: not positive"
        )
    model.load_state_dict(weights)
    model.to(device).eval()
    return AnyCheckpoint(model, card["name"], card["version"], card)


def build_forecaster(config: ForecasterConfig, normalisation: Normalisation) -> AnyForecaster:
    """The model class the config's scaling names."""
    if config.scaling == "running":
        return RunningScaleForecaster(config, normalisation)
    return LSTMForecaster(config, normalisation)
