"""Checkpoints that describe themselves and load without pickle.

A checkpoint is a directory with two files:
- ``model.safetensors``: the weights, nothing else;
- ``card.json``: format version, name, version, config, normalisation, training metrics, the data
  fingerprint, and the SHA-256 of the weights file, so a corrupted or swapped file is refused.

The weights include the std's calibration (``std_scale``) and the sampled forecast's per future
step (``horizon_std_factor``, ``horizon_levels``), both fitted after training: a different
calibration is a different version, since the model answers differently.
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

# /3: the weights hold the sampled forecast's calibration per future step too (HorizonCalibration).
# /2 (the std's calibration, std_scale, alone) and /1 (neither) checkpoints, written before
# them, load with what they lack as identity, their version unchanged. Older code refuses /3 by
# name.
FORMAT = "lstm-forecaster/3"
FORMAT_UNCALIBRATED = "lstm-forecaster/1"
FORMAT_STD_CALIBRATED = "lstm-forecaster/2"
FORMATS = (FORMAT, FORMAT_STD_CALIBRATED, FORMAT_UNCALIBRATED)
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "card.json"
UNCALIBRATED_KEY = "std_scale"  # the weight a /1 checkpoint lacks
HORIZON_KEYS = ("horizon_std_factor", "horizon_levels")  # the weights a /1 or /2 one lacks


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupted, or does not match the model it describes."""


@dataclass
class Checkpoint:
    model: AnyForecaster
    name: str
    version: str  # the first 12 hex digits of the weights' SHA-256: equal weights, equal version
    card: dict[str, Any] = field(default_factory=dict)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save_checkpoint(
    model: AnyForecaster,
    directory: str | Path,
    *,
    name: str,
    extra: dict[str, Any] | None = None,
) -> Checkpoint:
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
    return Checkpoint(model, name, card["version"], card)


def read_card(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / CARD_FILE
    try:
        card = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise CheckpointError(f"no {CARD_FILE} in {directory}") from e
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(card, dict) or card.get("format") not in FORMATS:
        found = card.get("format") if isinstance(card, dict) else None
        raise CheckpointError(
            f"{path} has format {found!r}; this code reads {', '.join(map(repr, FORMATS))}"
        )
    return card


def load_checkpoint(
    directory: str | Path,
    *,
    device: torch.device | str = "cpu",
) -> Checkpoint:
    """Load and verify a checkpoint of either scaling (a running-scaled model's sessions keep its
    statistics beside (h, c)); raise CheckpointError naming what is wrong."""
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
    # Written before they existed: what the model holds until fitted (ones, identity).
    initial = model.state_dict()
    if card["format"] == FORMAT_UNCALIBRATED and UNCALIBRATED_KEY not in weights:
        weights[UNCALIBRATED_KEY] = initial[UNCALIBRATED_KEY].clone()
    held = [k for k in HORIZON_KEYS if k in weights]
    if card["format"] == FORMAT and len(held) < len(HORIZON_KEYS):
        missing = ", ".join(k for k in HORIZON_KEYS if k not in weights)
        raise CheckpointError(
            f"a {FORMAT} checkpoint holds the forecast's calibration: no {missing}"
        )
    if card["format"] != FORMAT:
        if held:
            raise CheckpointError(
                f"a {card['format']} checkpoint holds no forecast calibration, this one has "
                f"{', '.join(held)}"
            )
        weights.update({k: initial[k].clone() for k in HORIZON_KEYS})
    expected = {k: tuple(v.shape) for k, v in initial.items()}
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
    check_horizon_calibration(weights[HORIZON_KEYS[0]], weights[HORIZON_KEYS[1]])
    model.load_state_dict(weights)
    model.to(device).eval()
    return Checkpoint(model, card["name"], card["version"], card)


def check_horizon_calibration(std_factor: torch.Tensor, levels: torch.Tensor) -> None:
    """Refuse a forecast calibration that cannot be applied: a std factor that is not positive,
    or quantile levels outside (0, 1) or out of order."""
    if not (torch.isfinite(std_factor).all() and (std_factor > 0).all()):
        raise CheckpointError(
            "the forecast's std factors (horizon_std_factor) are not all positive and finite"
        )
    inside = torch.isfinite(levels).all() and (levels > 0).all() and (levels < 1).all()
    if not (inside and (levels.diff(dim=1) >= 0).all()):
        raise CheckpointError(
            "the forecast's quantile levels (horizon_levels) are not in (0, 1) and in order"
        )


def build_forecaster(config: ForecasterConfig, normalisation: Normalisation) -> AnyForecaster:
    """The model class the config's scaling names."""
    if config.scaling == "running":
        return RunningScaleForecaster(config, normalisation)
    return LSTMForecaster(config, normalisation)
