"""The served model: raw values -> normalisation -> stacked LSTM -> Gaussian head.

After each timestep the forecaster gives the mean and standard deviation of the next value of every
feature, in the units the client sent. Normalisation statistics travel with the checkpoint, so
clients never normalise anything themselves.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.lstm import VARIANTS, GateTrace, LSTMState, StackedLSTM, Variant

if TYPE_CHECKING:
    from model.native import StackEngine


@dataclass(frozen=True)
class ForecasterConfig:
    feature_names: tuple[str, ...] = ("power",)  # one forecast (mean, std) per feature
    hidden_size: int = 64  # enough for ACSF1's on/off cycles; the state stays 1 KiB per session
    num_layers: int = 2  # a second layer lowered held-out NLL; a third did not pay
    dropout: float = 0.0  # between layers while training; ACSF1 did not overfit without it
    variant: Variant = "standard"  # standard keeps nn.LSTM interoperability
    forget_bias: float = 1.0  # remember by default early in training (Gers et al. 2000)
    min_std: float = 1e-3  # floor on the normalised std, so the NLL cannot run to -inf

    def __post_init__(self) -> None:
        if not self.feature_names:
            raise ValueError("feature_names must name at least one feature")
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.hidden_size < 1 or self.num_layers < 1:
            raise ValueError("hidden_size and num_layers must be positive")

    @property
    def n_features(self) -> int:
        return len(self.feature_names)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["feature_names"] = list(self.feature_names)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ForecasterConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}")
        d = dict(d)
        if "feature_names" in d:
            d["feature_names"] = tuple(d["feature_names"])
        return cls(**d)


@dataclass(frozen=True)
class Normalisation:
    """Per-feature statistics of the training data: the model sees ``(x - mean) / std``."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def identity(cls, n_features: int) -> Normalisation:
        return cls((0.0,) * n_features, (1.0,) * n_features)

    def to_dict(self) -> dict[str, list[float]]:
        return {"mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Normalisation:
        return cls(tuple(float(v) for v in d["mean"]), tuple(float(v) for v in d["std"]))


class Forecast(NamedTuple):
    mean: Tensor  # (B, T, F): forecast of the next value, raw units
    std: Tensor  # (B, T, F)
    state: LSTMState
    gates: GateTrace | None


class LSTMForecaster(nn.Module):
    input_mean: Tensor
    input_std: Tensor

    def __init__(self, config: ForecasterConfig, normalisation: Normalisation | None = None):
        super().__init__()
        self.config = config
        norm = normalisation or Normalisation.identity(config.n_features)
        if len(norm.mean) != config.n_features or len(norm.std) != config.n_features:
            raise ValueError("normalisation must have one mean and one std per feature")
        if any(s <= 0 for s in norm.std):
            raise ValueError("normalisation std must be positive")
        self.normalisation = norm
        # Not persistent: the statistics live in the checkpoint's JSON card, not in the weights.
        self.register_buffer("input_mean", torch.tensor(norm.mean), persistent=False)
        self.register_buffer("input_std", torch.tensor(norm.std), persistent=False)
        self.lstm = StackedLSTM(
            config.n_features,
            config.hidden_size,
            config.num_layers,
            variant=config.variant,
            forget_bias=config.forget_bias,
            dropout=config.dropout,
        )
        self.head = nn.Linear(config.hidden_size, 2 * config.n_features)  # (mean, raw std)
        # What runs the stack's forward: None, the eager stack itself (model/native.py has the
        # engines). A plain attribute, not a submodule: it never enters the state dict.
        self.engine: StackEngine | None = None

    def use_engine(self, engine: StackEngine | None) -> None:
        """Run the stack through ``engine`` (built for this forecaster's ``lstm``); None, or the
        stack itself: eager."""
        # The stack itself is kept as None: assigned, a module would register a second time.
        self.engine = None if engine is self.lstm else engine

    def zero_state(self, batch: int) -> LSTMState:
        return self.lstm.zero_state(batch)

    def forward_normalised(
        self,
        x: Tensor,
        state: LSTMState | None = None,
        *,
        return_gates: bool = False,
    ) -> Forecast:
        """Everything in normalised units: what training's loss is computed on."""
        z = (x - self.input_mean) / self.input_std
        stack = self.lstm if self.engine is None else self.engine
        out, state, gates = stack(z, state, return_gates=return_gates)
        mean, raw_std = self.head(out).chunk(2, dim=-1)  # (B, T, F) each
        std = F.softplus(raw_std) + self.config.min_std
        return Forecast(mean, std, state, gates)

    def forward(
        self,
        x: Tensor,
        state: LSTMState | None = None,
        *,
        return_gates: bool = False,
    ) -> Forecast:
        """(B, T, F) raw values -> the next value's mean and std after each step, in raw units."""
        mean, std, state, gates = self.forward_normalised(x, state, return_gates=return_gates)
        return Forecast(mean * self.input_std + self.input_mean, std * self.input_std, state, gates)

    @torch.no_grad()
    def rollout(
        self,
        next_mean: Tensor,
        next_std: Tensor,
        state: LSTMState,
        horizon: int,
    ) -> tuple[Tensor, Tensor]:
        """Forecast ``horizon`` future steps by feeding each predicted mean back in.

        ``next_mean``/``next_std`` (B, F) are the forecast already made for the next step, and
        ``state`` the state after the last observed value; returns (B, horizon, F) each. The std
        of later steps is the head's one-step std given the fed-back means: it does not add the
        uncertainty compounded along the path.
        """
        means, stds = [next_mean], [next_std]
        for _ in range(horizon - 1):
            mean, std, state, _ = self.forward(means[-1].unsqueeze(1), state)
            means.append(mean[:, 0])
            stds.append(std[:, 0])
        return torch.stack(means, dim=1), torch.stack(stds, dim=1)


def gaussian_nll(mean: Tensor, std: Tensor, target: Tensor, beta: float = 0.0) -> Tensor:
    """Mean negative log-likelihood of ``target`` under N(mean, std^2), constant term included.

    ``beta`` > 0 gives the beta-NLL of Seitzer et al. (2022): each point's NLL is weighted by
    ``std^(2 beta)`` (no gradient through the weight), so confident points no longer dominate the
    mean's gradient; beta = 1 makes the mean's gradient that of the squared error.
    """
    nll = F.gaussian_nll_loss(mean, target, std.square(), full=True, eps=0.0, reduction="none")
    if beta:
        nll = nll * std.detach().pow(2 * beta)
    return nll.mean()
