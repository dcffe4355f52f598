"""Per-series scaling: each series reaches the network in its own causal running units.

The global forecaster normalises every series by the training set's mean and std, so a series
a thousand times smaller than the training data looks constant to it, and one a thousand times
larger saturates it. ``RunningScaleForecaster`` instead keeps, per series, the count, mean and
sum of squared deviations of every value seen so far (``RunningStats``, Welford's update) and
feeds the network

    z_t = (x_t - mean_t) / scale_t,    scale_t = sqrt(var_t + (scale_floor * training std)^2)

where ``mean_t`` and ``var_t`` include ``x_t`` and nothing later: the forecast of ``x_{t+1}`` is
``mean_t + scale_t * mu`` with std ``scale_t * sigma``, ``(mu, sigma)`` the head's output. The
statistics are part of the state (``ScaledState``), so a series streamed in chunks gets exactly
what it gets whole; a service keeps them in every session's state beside (h, c)
(``stats_width``, ``split_state``, ``join_state``). The shipped model is one (half-life 16).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.forecaster import (
    BOUND_SLACK,
    ForecastBounds,
    ForecasterConfig,
    Normalisation,
    PathForecasts,
    build_body,
    head_bounds,
    widen_lstm_state,
)
from model.lstm import GateTrace, LSTMState, StackedLSTM

if TYPE_CHECKING:
    from model.native import StackEngine

# |z| beyond this reaches the network clipped: right after a constant start (std 0, the scale at
# its floor) the first change is thousands of scales away, and would saturate every gate.
INPUT_CLIP = 10.0
# Forecasts made from statistics of fewer values than this are not in the training loss (their
# scale, from a handful of values, makes the target arbitrary), so the first MIN_SCALE_COUNT
# values of a series are scored against forecasts the model never learnt to make: a service
# gives them no anomaly score (``scored_from``).
MIN_SCALE_COUNT = 8


class RunningStats(NamedTuple):
    """Per series: values seen, their mean and sum of squared deviations (float64)."""

    n: Tensor  # (B, 1): values seen
    mean: Tensor  # (B, F)
    m2: Tensor  # (B, F)

    @staticmethod
    def zeros(batch: int, features: int, *, device: torch.device | str = "cpu") -> RunningStats:
        z = torch.zeros(batch, features, dtype=torch.float64, device=device)
        return RunningStats(torch.zeros(batch, 1, dtype=torch.float64, device=device), z, z)

    @staticmethod
    def of(prefixes: Sequence[np.ndarray], features: int, decay: float = 1.0) -> RunningStats:
        """The statistics after each of ``prefixes`` (each (T_i, F), T_i may be 0).

        With ``decay`` < 1 they are exponentially weighted (``update``'s): the value j steps
        back weighs ``decay ** j``, ``n`` is the sum of the weights.
        """
        if decay < 1.0:
            return RunningStats._of_weighted(prefixes, features, decay)
        n = np.array([[len(p)] for p in prefixes], dtype=np.float64)
        mean = np.array(
            [p.mean(axis=0) if len(p) else np.zeros(features) for p in prefixes], np.float64
        )
        m2 = np.array(
            [
                ((p - p.mean(axis=0)) ** 2).sum(axis=0) if len(p) else np.zeros(features)
                for p in prefixes
            ],
            np.float64,
        )
        return RunningStats(torch.from_numpy(n), torch.from_numpy(mean), torch.from_numpy(m2))

    @staticmethod
    def _of_weighted(prefixes: Sequence[np.ndarray], features: int, decay: float) -> RunningStats:
        n = np.zeros((len(prefixes), 1))
        mean = np.zeros((len(prefixes), features))
        m2 = np.zeros((len(prefixes), features))
        for row, p in enumerate(prefixes):
            if len(p):
                w = decay ** np.arange(len(p) - 1, -1, -1, dtype=np.float64)[:, None]  # (T, 1)
                n[row] = w.sum()
                mean[row] = (w * p).sum(axis=0) / n[row]
                m2[row] = (w * (p - mean[row]) ** 2).sum(axis=0)
        return RunningStats(torch.from_numpy(n), torch.from_numpy(mean), torch.from_numpy(m2))

    def update(self, x: Tensor, decay: float = 1.0) -> tuple[RunningStats, Tensor, Tensor]:
        """Fold in ``x`` (B, T, F); also the mean and variance after each timestep (B, T, F).

        ``decay`` < 1 forgets: before each value, the weight of everything seen so far (``n``)
        and its squared deviations (``m2``) are multiplied by it, so the statistics follow a
        series whose level or scale moves (an appliance turned on); 1 keeps every value alike.

        Chan et al.'s parallel combination of the statistics so far with each prefix of the
        chunk, computed about a shift (the mean so far, or the first value of a fresh series)
        so float64 loses nothing to cancellation.
        """
        x = x.to(torch.float64)
        if decay < 1.0:
            return self._update_weighted(x, decay)
        steps = x.shape[1]
        shift = torch.where(self.n > 0, self.mean, x[:, 0])  # (B, F)
        d = x - shift.unsqueeze(1)  # (B, T, F)
        k = torch.arange(1, steps + 1, dtype=torch.float64, device=x.device).view(1, steps, 1)
        chunk_mean = d.cumsum(1) / k
        chunk_m2 = ((d * d).cumsum(1) - k * chunk_mean.square()).clamp_min(0.0)
        n0 = self.n.unsqueeze(1)  # (B, 1, 1)
        mean0 = (self.mean - shift).unsqueeze(1)  # (B, 1, F)
        n = n0 + k
        delta = chunk_mean - mean0
        mean = mean0 + delta * k / n
        m2 = self.m2.unsqueeze(1) + chunk_m2 + delta.square() * n0 * k / n
        mean = mean + shift.unsqueeze(1)
        after = RunningStats(n[:, -1], mean[:, -1], m2[:, -1])
        return after, mean, m2 / n

    def _update_weighted(self, x: Tensor, decay: float) -> tuple[RunningStats, Tensor, Tensor]:
        """Step by step (West's weighted update, the old weight ``decay * n``): a chunk gets
        exactly the arithmetic the same values get one by one, so chunks equal the whole."""
        n, mean, m2 = self
        means, variances = [], []
        for t in range(x.shape[1]):
            old = decay * n
            n = old + 1.0
            delta = x[:, t] - mean
            mean = mean + delta / n
            m2 = decay * m2 + delta.square() * old / n
            means.append(mean)
            variances.append(m2 / n)
        return RunningStats(n, mean, m2), torch.stack(means, 1), torch.stack(variances, 1)

    @staticmethod
    def width(features: int) -> int:
        """How many float64 values ``flat`` makes of one series' statistics."""
        return 1 + 2 * features

    def flat(self) -> Tensor:
        """(B, 1 + 2F) float64: n, the means, the squared deviations; what a session keeps."""
        return torch.cat([self.n, self.mean, self.m2], dim=1)

    @staticmethod
    def from_flat(values: Tensor) -> RunningStats:
        """``flat``'s inverse (float64, on the values' device)."""
        features = (values.shape[1] - 1) // 2
        values = values.to(torch.float64)
        return RunningStats(values[:, :1], values[:, 1 : 1 + features], values[:, 1 + features :])

    def repeat_interleave(self, repeats: int) -> RunningStats:
        return RunningStats(*(t.repeat_interleave(repeats, dim=0) for t in self))


class ScaledState(NamedTuple):
    lstm: LSTMState
    stats: RunningStats


class ScaledForecast(NamedTuple):
    mean: Tensor  # (B, T, F): the next value's mean; raw units from forward, scaled from
    std: Tensor  # forward_normalised
    state: ScaledState
    gates: GateTrace | None
    loc: Tensor  # (B, T, F): the running mean and scale each step was normalised by
    scale: Tensor


class RunningScaleForecaster(nn.Module, PathForecasts[ScaledState]):
    """The forecaster with ``scaling="running"``: same LSTM and head, its own units per series."""

    # Made by build_body: the statistics, the stack, the head, the std's calibration (and the
    # forecast's, declared by PathForecasts).
    input_mean: Tensor
    input_std: Tensor
    lstm: StackedLSTM
    head: nn.Linear
    std_scale: Tensor

    def __init__(self, config: ForecasterConfig, normalisation: Normalisation | None = None):
        super().__init__()
        if config.scaling != "running":
            raise ValueError("RunningScaleForecaster is the scaling='running' model")
        self.config = config
        norm = normalisation or Normalisation.identity(config.n_features)
        self.normalisation = norm
        # The training set's statistics: only its std is used, for the scale's floor and so NLLs
        # are reported in the same units as the global model's.
        build_body(self, config, norm)
        # What runs the stack's forward (LSTMForecaster's, model/native.py): None, eager.
        self.engine: StackEngine | None = None

    def use_engine(self, engine: StackEngine | None) -> None:
        """As ``LSTMForecaster.use_engine``: the stack's forward through ``engine``."""
        self.engine = None if engine is self.lstm else engine

    # The first value of a series an anomaly score is given for (LSTMForecaster's: 1, since no
    # forecast precedes the first value).
    scored_from = MIN_SCALE_COUNT

    @property
    def stats_width(self) -> int:
        """The float64 values a session keeps beside (h, c): its ``RunningStats``, flat."""
        return RunningStats.width(self.config.n_features)

    def join_state(self, lstm: LSTMState, stats: Tensor | None) -> ScaledState:
        """A session's state from its (h, c) and its kept statistics (B, stats_width)."""
        if stats is None:
            raise ValueError("a running-scaled session's state needs its statistics")
        return ScaledState(lstm, RunningStats.from_flat(stats))

    def split_state(self, state: ScaledState) -> tuple[LSTMState, Tensor | None]:
        return state.lstm, state.stats.flat()

    def zero_state(self, batch: int) -> ScaledState:
        device = self.input_std.device
        return ScaledState(
            self.lstm.zero_state(batch),
            RunningStats.zeros(batch, self.config.n_features, device=device),
        )

    def forecast_bounds(self, max_abs_input: float) -> ForecastBounds:
        """What no forecast goes beyond from inputs within ±``max_abs_input``: the running mean
        lies among the inputs, the running variance is at most (2 max_abs_input)^2 (as
        service.state_blob.check_stats holds it), the scale's floor is the configured one."""
        mean, std_max, std_min = head_bounds(self.head, self.std_scale, self.config)
        floor = self.config.scale_floor * self.input_std.detach().double().cpu()
        widest = ((2 * max_abs_input) ** 2 + floor.square()).sqrt()
        slack = 1 + BOUND_SLACK
        return ForecastBounds(
            (max_abs_input + widest * mean) * slack,
            widest * std_max * slack,
            floor * std_min / slack,
        )

    def forward_normalised(
        self,
        x: Tensor,
        state: ScaledState | None = None,
        *,
        return_gates: bool = False,
        stack: StackEngine | None = None,
    ) -> ScaledForecast:
        """Mean and std of the next value in the running units (``loc``, ``scale``) of each step
        (``stack``: as ``LSTMForecaster.forward_normalised``'s)."""
        if state is None:
            state = self.zero_state(x.shape[0])
        stats, loc64, var = state.stats.update(x, self.config.scale_decay)
        floor = self.config.scale_floor * self.input_std.to(torch.float64)
        loc = loc64.to(x.dtype)
        scale = (var + floor.square()).sqrt().to(x.dtype)  # (B, T, F)
        z = ((x - loc) / scale).clamp(-INPUT_CLIP, INPUT_CLIP)
        run = stack if stack is not None else self.engine if self.engine is not None else self.lstm
        out, lstm_state, gates = run(z, state.lstm, return_gates=return_gates)
        mean, raw_std = self.head(out).chunk(2, dim=-1)  # (B, T, F) each
        std = (F.softplus(raw_std) + self.config.min_std) * self.std_scale
        return ScaledForecast(mean, std, ScaledState(lstm_state, stats), gates, loc, scale)

    def forward(
        self,
        x: Tensor,
        state: ScaledState | None = None,
        *,
        return_gates: bool = False,
        stack: StackEngine | None = None,
    ) -> ScaledForecast:
        """(B, T, F) raw values -> the next value's mean and std after each step, raw units."""
        f = self.forward_normalised(x, state, return_gates=return_gates, stack=stack)
        return f._replace(mean=f.loc + f.scale * f.mean, std=f.scale * f.std)

    @torch.no_grad()
    def rollout(
        self, next_mean: Tensor, next_std: Tensor, state: ScaledState, horizon: int
    ) -> tuple[Tensor, Tensor]:
        """As ``LSTMForecaster.rollout``: the means fed back, the head's one-step std."""
        means, stds = [next_mean], [next_std]
        for _ in range(horizon - 1):
            f = self.forward(means[-1].unsqueeze(1), state)
            state = f.state
            means.append(f.mean[:, 0])
            stds.append(f.std[:, 0])
        return torch.stack(means, dim=1), torch.stack(stds, dim=1)

    def path_step(self, value: Tensor, state: ScaledState) -> tuple[Tensor, Tensor, ScaledState]:
        f = self.forward(value.unsqueeze(1), state)
        return f.mean[:, 0], f.std[:, 0], f.state

    def widen(self, state: ScaledState, paths: int) -> ScaledState:
        """Each row's state, statistics included, repeated ``paths`` times."""
        return ScaledState(
            widen_lstm_state(state.lstm, paths), state.stats.repeat_interleave(paths)
        )
