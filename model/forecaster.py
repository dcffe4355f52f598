"""The served model: raw values -> normalisation -> stacked LSTM -> Gaussian head.

After each timestep the forecaster gives the mean and standard deviation of the next value of every
feature, in the units the client sent. Normalisation statistics travel with the checkpoint, so
clients never normalise anything themselves.

Several steps ahead, ``sample_forecast`` draws paths through the model (each draw fed back in as
if observed), so the spread of later steps carries the uncertainty compounded along the way;
``rollout`` feeds back the means alone and does not.

``scaling="running"`` (model/scaling.py, the shipped model's) normalises each series
by its own causal running mean and std instead of the training set's, so series of any magnitude
reach the network in comparable units.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, Literal, NamedTuple, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.lstm import VARIANTS, GateTrace, LSTMState, StackedLSTM, Variant

if TYPE_CHECKING:
    from model.checkpoint import AnyForecaster
    from model.native import StackEngine

Scaling = Literal["global", "running"]
SCALINGS: tuple[Scaling, ...] = ("global", "running")
S = TypeVar("S")  # a forecaster's state: LSTMState, or the running-scaled model's ScaledState
QUANTILES = (0.1, 0.5, 0.9)  # the quantiles a sampled forecast reports, per future step
# Future steps with a calibration of their own (std factor, quantile levels: HorizonCalibration);
# a step further ahead takes the last one's.
CALIBRATED_HORIZONS = 32


@dataclass(frozen=True)
class ForecasterConfig:
    feature_names: tuple[str, ...] = ("power",)  # one forecast (mean, std) per feature
    hidden_size: int = 64  # enough for ACSF1's on/off cycles; the state stays 1 KiB per session
    num_layers: int = 2  # a second layer lowered held-out NLL; a third did not pay
    dropout: float = 0.0  # between layers while training; ACSF1 did not overfit without it
    variant: Variant = "standard"  # standard keeps nn.LSTM interoperability
    forget_bias: float = 1.0  # remember by default early in training (Gers et al. 2000)
    # floor on the normalised std before its calibration (std_scale), so the NLL cannot run to -inf
    min_std: float = 1e-3
    # global: every series in the training set's units; running: each series in its own causal
    # running mean and std (model/scaling.py), whatever its magnitude (needs them in the state)
    scaling: Scaling = "global"
    # running: the least scale, as a fraction of the training std, so a constant start (std 0)
    # divides by no zero
    scale_floor: float = 1e-4
    # running: the half-life, in timesteps, of a value's weight in the running mean and std; 0
    # weighs every value since the series' start alike (cumulative)
    scale_halflife: float = 0.0

    def __post_init__(self) -> None:
        if not self.feature_names:
            raise ValueError("feature_names must name at least one feature")
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.hidden_size < 1 or self.num_layers < 1:
            raise ValueError("hidden_size and num_layers must be positive")
        if self.scaling not in SCALINGS:
            raise ValueError(f"scaling must be one of {SCALINGS}, got {self.scaling!r}")
        if not self.scale_floor > 0:
            raise ValueError("scale_floor must be positive")
        if not self.scale_halflife >= 0:
            raise ValueError("scale_halflife must be 0 (cumulative) or positive")

    @property
    def scale_decay(self) -> float:
        """Each step's factor on the running statistics' weights: 1 when cumulative."""
        return 2.0 ** (-1.0 / self.scale_halflife) if self.scale_halflife else 1.0

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


class KeptStep(NamedTuple):
    """A step from a state as a service keeps it (``step_kept``)."""

    mean: Tensor  # (B, T, F): the next value's forecast after each value, raw units
    std: Tensor
    z: Tensor  # (B, T, F): each value's anomaly score against the forecast made before it
    lstm: LSTMState  # the state after the chunk
    stats: Tensor | None  # the statistics after it (B, stats_width) float64; None: none kept
    gates: GateTrace | None


def anomaly_z(x: Tensor, prev_mean: Tensor, prev_std: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """Each value of ``x`` (B, T, F) scored against the forecast made before it: ``prev_mean`` and
    ``prev_std`` (B, F) for the first, then the chunk's own (``mean``, ``std`` (B, T, F))."""
    before_mean = torch.cat([prev_mean.unsqueeze(1), mean[:, :-1]], dim=1)
    before_std = torch.cat([prev_std.unsqueeze(1), std[:, :-1]], dim=1)
    return (x - before_mean) / before_std


def step_kept(
    model: AnyForecaster,
    x: Tensor,
    lstm: LSTMState,
    stats: Tensor | None,
    prev_mean: Tensor,
    prev_std: Tensor,
    *,
    return_gates: bool = False,
    stack: StackEngine | None = None,
) -> KeptStep:
    """``model`` over a chunk ``x`` (B, T, F) from a state as a service keeps it: (h, c), the
    statistics (None when it keeps none) and the forecast made for the chunk's first value.
    No host synchronisation: a CUDA graph may capture it (model/graphed.py)."""
    f = model(x, model.join_state(lstm, stats), return_gates=return_gates, stack=stack)
    lstm_after, stats_after = model.split_state(f.state)
    z = anomaly_z(x, prev_mean, prev_std, f.mean, f.std)
    return KeptStep(f.mean, f.std, z, lstm_after, stats_after, f.gates)


def build_body(module: nn.Module, config: ForecasterConfig, norm: Normalisation) -> None:
    """What every forecaster holds: the training set's statistics as buffers, the stack, the
    Gaussian head, its std's calibration and the sampled forecast's (``input_mean``,
    ``input_std``, ``lstm``, ``head``, ``std_scale``, ``horizon_std_factor``,
    ``horizon_levels``)."""
    # Not persistent: the statistics live in the checkpoint's JSON card, not in the weights.
    module.register_buffer("input_mean", torch.tensor(norm.mean), persistent=False)
    module.register_buffer("input_std", torch.tensor(norm.std), persistent=False)
    # Persistent: a factor on the head's std per feature, fitted after training on the
    # validation series (model.evaluate.calibrate_std); part of the weights, so of the version.
    # Ones until fitted, and for checkpoints written before it existed.
    module.register_buffer("std_scale", torch.ones(config.n_features))
    # Persistent: the sampled forecast's calibration per future step (HorizonCalibration), fitted
    # after std_scale on the validation series (model.evaluate.calibrate_horizons). Identity (no
    # change to the paths' std, the nominal quantile levels) until fitted, and for checkpoints
    # written before it existed.
    identity = HorizonCalibration.identity(config.n_features)
    module.register_buffer("horizon_std_factor", identity.std_factor)
    module.register_buffer("horizon_levels", identity.levels)
    module.lstm = StackedLSTM(
        config.n_features,
        config.hidden_size,
        config.num_layers,
        variant=config.variant,
        forget_bias=config.forget_bias,
        dropout=config.dropout,
    )
    module.head = nn.Linear(config.hidden_size, 2 * config.n_features)  # (mean, raw std)


class ForecastBounds(NamedTuple):
    """Per feature (float64, raw units): the largest |mean| and std of any forecast a model makes
    from inputs within ±``max_abs_input``, and the smallest std."""

    mean: Tensor
    std_max: Tensor
    std_min: Tensor


def head_bounds(
    head: nn.Linear, std_scale: Tensor, config: ForecasterConfig
) -> tuple[Tensor, Tensor, Tensor]:
    """build_body's head over every last-layer h in [-1, 1]^hidden (h = o * tanh(c), in every
    variant): the largest |mean| and the std's range, in the head's units (float64, per
    feature). |w . h + b| is at most sum |w| + |b|; softplus is increasing."""
    f = config.n_features
    reach = head.weight.detach().double().abs().sum(1) + head.bias.detach().double().abs()
    mean, raw_std = reach[:f].cpu(), reach[f:].cpu()
    scale = std_scale.detach().double().cpu()
    return (
        mean,
        (F.softplus(raw_std) + config.min_std) * scale,
        (F.softplus(-raw_std) + config.min_std) * scale,
    )


# Slack for float32 rounding between the bound (exact, float64) and what a round computes.
BOUND_SLACK = 1e-5


class PathForecasts(Generic[S]):
    """``sample_forecast`` for a forecaster of state type S: one that feeds one value per row in
    (``path_step``), repeats its state per path (``widen``) and holds the forecast's calibration
    (``horizon_std_factor``, ``horizon_levels``: build_body's)."""

    horizon_std_factor: Tensor
    horizon_levels: Tensor

    def path_step(self, value: Tensor, state: S) -> tuple[Tensor, Tensor, S]:
        """One value per row fed in: the next value's mean and std (B, F) and the state."""
        raise NotImplementedError

    def widen(self, state: S, paths: int) -> S:
        """Each row's state repeated ``paths`` times (``repeat_interleave``)."""
        raise NotImplementedError

    def join_state(self, lstm: LSTMState, stats: Tensor | None) -> S:
        """Its state from a session's (h, c) and kept statistics (``stats_width`` float64 values
        per row; None when it keeps none)."""
        raise NotImplementedError

    def sample_kept_forecast(
        self,
        next_mean: Tensor,
        next_std: Tensor,
        lstm: LSTMState,
        stats: Tensor | None,
        horizon: int,
        *,
        paths: int,
        seed: int,
    ) -> SampledForecast:
        """``sample_forecast`` from a state as a service keeps it: (h, c) and the statistics."""
        return self.sample_forecast(
            next_mean, next_std, self.join_state(lstm, stats), horizon, paths=paths, seed=seed
        )

    @property
    def horizon_calibration(self) -> HorizonCalibration:
        return HorizonCalibration(self.horizon_std_factor, self.horizon_levels)

    @torch.no_grad()
    def sample_forecast(
        self,
        next_mean: Tensor,
        next_std: Tensor,
        state: S,
        horizon: int,
        *,
        paths: int,
        seed: int,
    ) -> SampledForecast:
        """Forecast ``horizon`` future steps from ``paths`` sampled futures per row.

        Arguments as ``rollout``'s. Each path draws the next value from the Gaussian the model
        gives, feeds the draw back in as if observed and draws again, so the spread at step k
        holds the uncertainty of every step before it. Step 1 is the model's Gaussian itself
        (exact, no sampling); later steps are the paths' mean, std and quantiles. Each step's
        std and quantiles go through the model's ``horizon_calibration``. The same ``seed``
        gives the same answer for the same inputs (on one device, batch of one).
        """
        return sample_paths(
            self.path_step,
            next_mean,
            next_std,
            self.widen(state, paths),
            horizon,
            paths=paths,
            seed=seed,
            calibration=self.horizon_calibration,
        )


class LSTMForecaster(nn.Module, PathForecasts[LSTMState]):
    # Made by build_body: the statistics, the stack, the head, the std's calibration (and the
    # forecast's, declared by PathForecasts).
    input_mean: Tensor
    input_std: Tensor
    lstm: StackedLSTM
    head: nn.Linear
    std_scale: Tensor

    def __init__(self, config: ForecasterConfig, normalisation: Normalisation | None = None):
        super().__init__()
        if config.scaling != "global":  # model/scaling.py's (model.checkpoint.build_forecaster)
            raise ValueError("LSTMForecaster is the scaling='global' model")
        self.config = config
        norm = normalisation or Normalisation.identity(config.n_features)
        if len(norm.mean) != config.n_features or len(norm.std) != config.n_features:
            raise ValueError("normalisation must have one mean and one std per feature")
        if any(s <= 0 for s in norm.std):
            raise ValueError("normalisation std must be positive")
        self.normalisation = norm
        build_body(self, config, norm)
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

    # A session's state beyond the stack's (h, c), as a service keeps it: none here. The
    # running-scaled model (model/scaling.py) keeps its statistics, ``stats_width`` float64
    # values per session; ``join_state`` / ``split_state`` convert between a forecaster's state
    # and the pair (LSTMState, those values as (B, stats_width), or None when the width is 0).
    stats_width = 0
    # The first value of a series an anomaly score is given for: none precedes the first value's
    # forecast. (The running-scaled model's first forecasts are untrained: it says 8.)
    scored_from = 1

    def join_state(self, lstm: LSTMState, stats: Tensor | None) -> LSTMState:
        return lstm

    def split_state(self, state: LSTMState) -> tuple[LSTMState, Tensor | None]:
        return state, None

    def forecast_bounds(self, max_abs_input: float) -> ForecastBounds:
        """What no forecast goes beyond, whatever the inputs (``max_abs_input`` is unused: the
        stack's h is in [-1, 1] for any input, and the training set's statistics are fixed)."""
        mean, std_max, std_min = head_bounds(self.head, self.std_scale, self.config)
        loc = self.input_mean.detach().double().cpu()
        unit = self.input_std.detach().double().cpu()
        slack = 1 + BOUND_SLACK
        return ForecastBounds(
            (mean * unit + loc.abs()) * slack, std_max * unit * slack, std_min * unit / slack
        )

    def forward_normalised(
        self,
        x: Tensor,
        state: LSTMState | None = None,
        *,
        return_gates: bool = False,
        stack: StackEngine | None = None,
    ) -> Forecast:
        """Everything in normalised units: what training's loss is computed on. ``stack``: what
        runs the stack for this call (by default the engine, else the stack itself)."""
        z = (x - self.input_mean) / self.input_std
        run = stack if stack is not None else self.engine if self.engine is not None else self.lstm
        out, state, gates = run(z, state, return_gates=return_gates)
        mean, raw_std = self.head(out).chunk(2, dim=-1)  # (B, T, F) each
        std = (F.softplus(raw_std) + self.config.min_std) * self.std_scale
        return Forecast(mean, std, state, gates)

    def forward(
        self,
        x: Tensor,
        state: LSTMState | None = None,
        *,
        return_gates: bool = False,
        stack: StackEngine | None = None,
    ) -> Forecast:
        """(B, T, F) raw values -> the next value's mean and std after each step, in raw units."""
        mean, std, state, gates = self.forward_normalised(
            x, state, return_gates=return_gates, stack=stack
        )
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

    def path_step(self, value: Tensor, state: LSTMState) -> tuple[Tensor, Tensor, LSTMState]:
        mean, std, state, _ = self.forward(value.unsqueeze(1), state)
        return mean[:, 0], std[:, 0], state

    def widen(self, state: LSTMState, paths: int) -> LSTMState:
        return widen_lstm_state(state, paths)


def widen_lstm_state(state: LSTMState, paths: int) -> LSTMState:
    """Each row's state repeated ``paths`` times (repeat_interleave): (layers, B * paths, H)."""
    return LSTMState(
        state.h.repeat_interleave(paths, dim=1), state.c.repeat_interleave(paths, dim=1)
    )


class SampledForecast(NamedTuple):
    mean: Tensor  # (B, horizon, F), raw units
    std: Tensor  # (B, horizon, F)
    quantiles: Tensor  # (Q, B, horizon, F), QUANTILES' order
    paths: int


class HorizonCalibration(NamedTuple):
    """What turns the sampled paths of future step h into the std and quantiles reported.

    ``std_factor`` (CALIBRATED_HORIZONS, F): the reported std is the paths' std times it.
    ``levels`` (CALIBRATED_HORIZONS, Q, F): the level at which the paths' distribution is read
    for each of QUANTILES, so that, say, the 10% quantile reported is exceeded by 90% of the
    values on the series it was fitted on (recalibration per horizon, Kuleshov et al. 2018).
    Row h - 1 is step h's; steps beyond CALIBRATED_HORIZONS take the last row.
    """

    std_factor: Tensor
    levels: Tensor

    @classmethod
    def identity(cls, n_features: int) -> HorizonCalibration:
        """The paths as drawn: std unchanged, QUANTILES read at their own levels."""
        levels = torch.tensor(QUANTILES).view(1, -1, 1)
        return cls(
            torch.ones(CALIBRATED_HORIZONS, n_features),
            levels.expand(CALIBRATED_HORIZONS, -1, n_features).clone(),
        )

    def at(self, step: int) -> tuple[Tensor, Tensor]:
        """Future step ``step`` (1-based): its std factor (F,) and its levels (Q, F)."""
        row = min(step, len(self.std_factor)) - 1
        return self.std_factor[row], self.levels[row]


def draw_paths(
    step: Callable[[Tensor, S], tuple[Tensor, Tensor, S]],
    next_mean: Tensor,
    next_std: Tensor,
    wide_state: S,
    horizon: int,
    *,
    paths: int,
    seed: int,
) -> Iterator[Tensor]:
    """The sampled values of future steps 2..horizon, one (B, paths, F) tensor per step.

    ``next_mean``/``next_std`` (B, F) forecast the first future value; ``wide_state`` is the state
    after the last observed value, each row repeated ``paths`` times (``repeat_interleave``), and
    ``step(value, state) -> (mean, std, state)`` the model fed one value per row. Each path draws
    a value from the Gaussian, feeds it back in as if observed, and draws the next.
    """
    if horizon < 1 or paths < 2:
        raise ValueError("horizon must be at least 1 and paths at least 2")
    generator = torch.Generator(device=next_mean.device).manual_seed(seed)
    batch, features = next_mean.shape
    mean = next_mean.repeat_interleave(paths, dim=0)  # (B * paths, F)
    std = next_std.repeat_interleave(paths, dim=0)
    state = wide_state
    for k in range(horizon):
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        drawn = mean + std * noise  # (B * paths, F)
        if k > 0:
            yield drawn.view(batch, paths, features)
        if k + 1 < horizon:
            mean, std, state = step(drawn, state)


def sample_paths(
    step: Callable[[Tensor, S], tuple[Tensor, Tensor, S]],
    next_mean: Tensor,
    next_std: Tensor,
    wide_state: S,
    horizon: int,
    *,
    paths: int,
    seed: int,
    calibration: HorizonCalibration | None = None,
) -> SampledForecast:
    """Draw ``paths`` futures per row through ``step`` (as ``draw_paths``) and summarise each
    future step: its mean, and its std and QUANTILES through ``calibration`` (None: the paths as
    drawn). Step 1 is the Gaussian itself, its quantiles the Gaussian's at the calibrated levels.
    Each step is summarised as it is drawn, so memory holds one step of the paths, never the
    whole (paths, horizon, F).
    """
    features = next_mean.shape[1]
    cal = calibration or HorizonCalibration.identity(features)
    cal = HorizonCalibration(*(t.to(next_mean) for t in cal))
    factor, levels = cal.at(1)
    first_std = next_std * factor  # the fit keeps step 1's factor at 1: the step's own std
    means, stds = [next_mean], [first_std]
    qs = [next_mean + torch.special.ndtri(levels).unsqueeze(1) * first_std]  # (Q, B, F)
    draws = draw_paths(step, next_mean, next_std, wide_state, horizon, paths=paths, seed=seed)
    for k, per_row in enumerate(draws, start=2):  # (B, paths, F)
        factor, levels = cal.at(k)
        means.append(per_row.mean(dim=1))
        stds.append(per_row.std(dim=1) * factor)
        qs.append(quantiles_at(per_row, levels))  # (Q, B, F)
    return SampledForecast(
        torch.stack(means, dim=1), torch.stack(stds, dim=1), torch.stack(qs, dim=2), paths
    )


def quantiles_at(draws: Tensor, levels: Tensor) -> Tensor:
    """The quantiles of ``draws`` (B, P, F) along P at ``levels`` (Q, F), a level per quantile and
    feature: (Q, B, F). Linear interpolation between order statistics, as ``torch.quantile``
    (position level * (P - 1)), with one sort for every feature."""
    ordered = draws.sort(dim=1).values
    batch, paths, _ = ordered.shape
    position = levels * (paths - 1)  # (Q, F)
    lo = position.floor().clamp(0, paths - 1)
    frac = (position - lo).unsqueeze(0)  # (1, Q, F)
    index = lo.long().unsqueeze(0).expand(batch, -1, -1)  # (B, Q, F)
    below = ordered.gather(1, index)
    above = ordered.gather(1, (index + 1).clamp(max=paths - 1))
    return (below + frac * (above - below)).permute(1, 0, 2)


def level_of(draws: Tensor, value: Tensor) -> Tensor:
    """``quantiles_at``'s inverse: where ``value`` (B, F) falls among ``draws`` (B, P, F), the
    level l at which ``torch.quantile(draws, l)`` (linear interpolation) gives the value, 0 below
    the least draw and 1 above the greatest; so value >= quantile(draws, l) exactly when
    level >= l."""
    ordered = draws.sort(dim=1).values
    paths = ordered.shape[1]
    count = (ordered <= value.unsqueeze(1)).sum(dim=1)  # (B, F)
    j = (count - 1).clamp(0, paths - 2)
    lo = ordered.gather(1, j.unsqueeze(1)).squeeze(1)
    hi = ordered.gather(1, (j + 1).unsqueeze(1)).squeeze(1)
    frac = ((value - lo) / (hi - lo)).nan_to_num(0.0).clamp(0, 1)  # two equal draws: 0
    level = (j + frac) / (paths - 1)
    return torch.where(count == 0, 0.0, torch.where(count == paths, 1.0, level))


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
