"""Scale-free accuracy and calibration of a trained forecaster on its held-out series.

    python -m model.evaluate --model models/acsf1-forecaster
    python -m model.evaluate --model runs/mine --csv mine.csv     # a model trained on a CSV

A pooled MSE is dominated by the series of largest magnitude. Here every held-out series counts
once: its one-step MSE over its own variance (nMSE; the training mean scores about 1) and its
MASE (mean absolute error over that of persistence on the same steps, so persistence scores 1),
for the model and for each baseline; the table gives the median and quartiles over series and
on how many series the model beats each baseline. Calibration: from forecast origins spread over
each held-out series, the share of actual values inside the sampled forecast's mean ± 2 std and
inside its 10-90% quantiles, at several horizons (and, for comparison, inside ± 2 std of
``rollout``, which feeds back means only). The test series are the card's: the split is made
again with the card's seed and checked against the card's ids.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from model.checkpoint import CARD_FILE, AnyForecaster, CheckpointError, load_checkpoint
from model.data import SeriesSet, load_acsf1, load_csv, split_series
from model.forecaster import (
    CALIBRATED_HORIZONS,
    QUANTILES,
    LSTMForecaster,
    draw_paths,
    level_of,
)
from model.lstm import LSTMState
from model.scaling import RunningStats, ScaledState

PREDICTORS = ("model", "persistence", "training_mean", "seasonal_lag_oracle")
HORIZONS = (1, 4, 16)
PATHS = 200  # the service's default (service/schemas.py DEFAULT_PATHS)
# Steps between forecast origins: a prime, so origins fall on every phase of a cycle (at 32 all
# of ACSF1's origins sat on one phase of its 4-step cycle: horizon 1 covered 99.1%, not 97.3%).
ORIGIN_STRIDE = 13


@torch.no_grad()
def one_step_gaussians(
    model: AnyForecaster, series: list[np.ndarray]
) -> list[tuple[np.ndarray, np.ndarray]]:
    """For each series (T, F), the one-step forecasts' mean and std (T, F) each: row t forecasts
    value t + 1."""
    model.eval()
    device = model.std_scale.device
    out = []
    for s in series:
        f = model(torch.from_numpy(s).unsqueeze(0).to(device))
        out.append((f.mean[0].cpu().numpy(), f.std[0].cpu().numpy()))
    return out


def one_step_forecasts(model: AnyForecaster, series: list[np.ndarray]) -> list[np.ndarray]:
    """For each series (T, F), the one-step mean forecasts (T, F): row t forecasts value t + 1."""
    return [mean for mean, _ in one_step_gaussians(model, series)]


# A Gaussian's mass within 2 std of its mean, erf(sqrt(2)): what mean ± 2 std should cover.
TWO_STD_MASS = 0.9545


class NothingToCalibrate(ValueError):
    """No series is longer than the warmup: no one-step error to fit the std's factor on."""


@torch.no_grad()
def calibrate_std(model: AnyForecaster, series: list[np.ndarray], warmup: int) -> dict[str, Any]:
    """Scale the model's std per feature so that, on ``series`` (the validation series), the
    one-step mean ± 2 std covers ``TWO_STD_MASS`` of the values from ``warmup`` on.

    The head's Gaussian is fitted by a beta-NLL, and the errors are heavy-tailed: a std wide
    enough for the tails is too wide for most steps (mean ± 2 std covered 97-98% of the test
    values). The factor is the 95.45th percentile of |error| / std over 2; it joins the weights
    (``std_scale``), so step, predict, anomaly_z and the sampled paths all use it.
    """
    if warmup < 1:
        raise ValueError(f"warmup must be at least 1, got {warmup}")
    ratios = [
        np.abs(s[warmup:] - mean[warmup - 1 : -1]) / std[warmup - 1 : -1]
        for s, (mean, std) in zip(series, one_step_gaussians(model, series), strict=True)
    ]
    pooled = np.concatenate(ratios) if ratios else np.empty((0, model.config.n_features))
    if not len(pooled):  # (steps, F)
        raise NothingToCalibrate(f"no series is longer than the warmup ({warmup} timesteps)")
    factor = np.quantile(pooled, TWO_STD_MASS, axis=0) / 2.0
    if not (np.isfinite(factor).all() and (factor > 0).all()):
        raise ValueError(f"the std's calibration came out {factor.tolist()}")
    model.std_scale.mul_(torch.from_numpy(factor).to(model.std_scale))
    return {
        "std_scale": model.std_scale.tolist(),
        "fitted_on": f"validation one-step errors, steps {warmup}..T-1 ({len(pooled)} per feature)",
        "rule": "mean ± 2 std covers 95.45% of them (the 95.45th percentile of |error| / std "
        "over 2)",
    }


def _quartiles(values: np.ndarray) -> dict[str, float]:
    q1, median, q3 = np.percentile(values, [25, 50, 75])
    return {"q1": float(q1), "median": float(median), "q3": float(q3)}


def scale_free_report(
    model: AnyForecaster,
    test: list[np.ndarray],
    train_mean: np.ndarray,
    warmup: int,
    max_lag: int,
) -> dict[str, Any]:
    """Per-series nMSE and MASE of the model and the baselines, over steps warmup..T-1."""
    forecasts = one_step_forecasts(model, test)
    nmse: dict[str, list[float]] = {p: [] for p in PREDICTORS}
    mase: dict[str, list[float]] = {p: [] for p in PREDICTORS}
    skipped = 0
    for s, mean in zip(test, forecasts, strict=True):
        target = s[warmup:].astype(np.float64)
        variance = target.var(axis=0)
        naive_mae = np.abs(target - s[warmup - 1 : -1]).mean(axis=0)
        if (variance <= 0).any() or (naive_mae <= 0).any():
            skipped += 1  # constant on the scored steps: no scale to measure errors in
            continue
        lags = [s[warmup - lag : len(s) - lag] for lag in range(1, max_lag + 1)]
        best_lag = min(lags, key=lambda p: float(((target - p) ** 2).mean()))
        predictions = {
            "model": mean[warmup - 1 : -1],
            "persistence": s[warmup - 1 : -1],
            "training_mean": np.broadcast_to(train_mean, target.shape),
            "seasonal_lag_oracle": best_lag,
        }
        for name, p in predictions.items():
            err = target - p
            nmse[name].append(float(((err**2).mean(axis=0) / variance).mean()))
            mase[name].append(float((np.abs(err).mean(axis=0) / naive_mae).mean()))
    if not nmse["model"]:
        raise ValueError("every test series is constant on its scored steps")
    model_nmse = np.array(nmse["model"])
    return {
        "series": len(model_nmse),
        "series_skipped_constant": skipped,
        "nmse": {p: _quartiles(np.array(v)) for p, v in nmse.items()},
        "mase": {p: _quartiles(np.array(v)) for p, v in mase.items()},
        "model_beats_on_series": {
            p: int((model_nmse < np.array(nmse[p])).sum()) for p in PREDICTORS if p != "model"
        },
        "definition": "nMSE: a series' one-step MSE over its variance, both over the scored "
        "steps; MASE: its MAE over persistence's on the same steps; beats: lower nMSE",
    }


def _cat_states(states: list[Any]) -> Any:
    if isinstance(states[0], ScaledState):
        lstm = _cat_states([s.lstm for s in states])
        stats = RunningStats(
            *(torch.cat(t, dim=0) for t in zip(*(s.stats for s in states), strict=True))
        )
        return ScaledState(lstm, stats)
    return LSTMState(torch.cat([s.h for s in states], 1), torch.cat([s.c for s in states], 1))


class Origins(NamedTuple):
    """Forecast origins on one series and what a session would hold at each of them."""

    at: list[int]  # o: the origin's state has seen values 0..o-1
    next_mean: Tensor  # (origins, F): the forecast of value o
    next_std: Tensor
    state: Any  # (batched over origins)
    actual: np.ndarray  # (origins, far, F): values o..o+far-1


@torch.no_grad()
def forecast_origins(
    model: AnyForecaster, series: list[np.ndarray], warmup: int, far: int, stride: int
) -> Iterator[tuple[int, Origins]]:
    """For each series long enough (its index, its origins): origins at warmup, warmup + stride,
    ... while ``far`` future values still lie in the series; each origin's state comes from
    streaming the series up to it, as a session would."""
    model.eval()
    for index, s in enumerate(series):
        at = list(range(warmup, len(s) - far + 1, stride))
        if not at:
            continue
        x = torch.from_numpy(s).unsqueeze(0).to(model.std_scale.device)
        state: Any = None
        states, means, stds, done = [], [], [], 0
        for o in at:
            f = model(x[:, done:o], state)
            state, done = f.state, o
            states.append(state)
            means.append(f.mean[:, -1])
            stds.append(f.std[:, -1])
        actual = np.stack([s[o : o + far] for o in at])
        yield index, Origins(at, torch.cat(means), torch.cat(stds), _cat_states(states), actual)


# Fewer forecast origins than this fit nothing: each 10% tail needs values enough to place its
# level (at 18 origins the 10% quantile was read above the paths' median).
MIN_ORIGINS = 100


@torch.no_grad()
def calibrate_horizons(
    model: AnyForecaster,
    series: list[np.ndarray],
    warmup: int,
    *,
    paths: int = PATHS,
    stride: int = ORIGIN_STRIDE,
    seed: int = 0,
) -> dict[str, Any]:
    """Fit the sampled forecast's calibration per future step (``HorizonCalibration``) on
    ``series`` (the validation series), after ``calibrate_std``.

    From forecast origins spread over the series, future step h's paths are drawn as a forecast
    draws them. Its std factor (h >= 2; step 1 keeps the one-step std, fitted by
    ``calibrate_std``) makes mean ± 2 std cover ``TWO_STD_MASS`` of the values, as
    ``calibrate_std``'s rule does; its levels are where the values fall in the paths' own
    distribution (``level_of``; step 1: the Gaussian's CDF), so that
    reading the paths at level ``quantile(those shares, p)`` gives a p-quantile that the values
    fall below a share p of the time (Kuleshov et al. 2018). One would do for every step if
    errors compounded as the model's Gaussians say; on ACSF1 they do not (mean ± 2 std covered
    97.6% at step 4 and 95.5% at 1 and 16).
    """
    far = CALIBRATED_HORIZONS
    ratios: list[list[np.ndarray]] = [[] for _ in range(far)]
    shares: list[list[np.ndarray]] = [[] for _ in range(far)]
    origins_total = 0
    # Either forecaster's step (their states differ): one callable type for mypy.
    step: Callable[[Tensor, Any], tuple[Tensor, Tensor, Any]] = model.path_step
    for index, o in forecast_origins(model, series, warmup, far, stride):
        origins_total += len(o.at)
        y1 = torch.from_numpy(o.actual[:, 0]).to(o.next_mean)
        shares[0].append(torch.special.ndtr((y1 - o.next_mean) / o.next_std).cpu().numpy())
        draws = draw_paths(
            step,
            o.next_mean,
            o.next_std,
            model.widen(o.state, paths),
            far,
            paths=paths,
            seed=seed + index,
        )
        for h, per_row in enumerate(draws, start=2):  # (origins, paths, F)
            y = torch.from_numpy(o.actual[:, h - 1]).to(per_row).unsqueeze(1)
            spread = per_row.std(dim=1)
            ratios[h - 1].append(((y[:, 0] - per_row.mean(dim=1)).abs() / spread).cpu().numpy())
            shares[h - 1].append(level_of(per_row, y[:, 0]).cpu().numpy())
    if origins_total < MIN_ORIGINS:
        raise NothingToCalibrate(
            f"{origins_total} forecast origins (every {stride} steps from the warmup, on series "
            f"of at least warmup + {far} timesteps), fewer than the {MIN_ORIGINS} it needs"
        )
    features = model.config.n_features
    factor = np.ones((far, features))
    factor[1:] = [np.quantile(np.concatenate(r), TWO_STD_MASS, axis=0) / 2.0 for r in ratios[1:]]
    levels = np.stack([np.quantile(np.concatenate(u), QUANTILES, axis=0) for u in shares])
    # Kept half a path inside (0, 1): ``paths`` draws cannot place a level closer to either end.
    margin = 0.5 / paths
    levels = np.maximum.accumulate(levels.clip(margin, 1 - margin), axis=1)
    if not (np.isfinite(factor).all() and (factor > 0).all()):
        raise ValueError(f"the forecast's std factors came out {factor.tolist()}")
    model.horizon_std_factor.copy_(torch.from_numpy(factor))
    model.horizon_levels.copy_(torch.from_numpy(levels))
    return {
        "horizons": far,
        "std_factor": model.horizon_std_factor.tolist(),
        "levels": {str(q): model.horizon_levels[:, i].tolist() for i, q in enumerate(QUANTILES)},
        "fitted_on": f"validation series, {origins_total} forecast origins every {stride} steps "
        f"from step {warmup}, {paths} paths each",
        "rule": "per future step h: mean ± 2 std covers 95.45% (step 1: the one-step std "
        "unchanged), and the q-quantile is read at the level the values fall below a share q of "
        f"the time; steps beyond {far} take step {far}'s",
    }


@torch.no_grad()
def calibration_report(
    model: AnyForecaster,
    test: list[np.ndarray],
    warmup: int,
    *,
    horizons: tuple[int, ...] = HORIZONS,
    paths: int = PATHS,
    stride: int = ORIGIN_STRIDE,
    seed: int = 0,
) -> dict[str, Any]:
    """Coverage of the sampled ±2 std and 10-90% intervals (and rollout's ±2 std) per horizon,
    from the origins of ``forecast_origins``."""
    far = max(horizons)
    inside: dict[str, dict[int, list[np.ndarray]]] = {
        k: {h: [] for h in horizons} for k in ("sampled_2std", "sampled_q10_q90", "rollout_2std")
    }
    origins_total = series_used = 0
    for index, o in forecast_origins(model, test, warmup, far, stride):
        series_used += 1
        origins_total += len(o.at)
        sampled = model.sample_forecast(
            o.next_mean, o.next_std, o.state, far, paths=paths, seed=seed + index
        )
        roll_mean, roll_std = model.rollout(o.next_mean, o.next_std, o.state, far)
        m, sd = sampled.mean.cpu().numpy(), sampled.std.cpu().numpy()
        q10, q90 = sampled.quantiles[0].cpu().numpy(), sampled.quantiles[2].cpu().numpy()
        rm, rs = roll_mean.cpu().numpy(), roll_std.cpu().numpy()
        for h in horizons:
            y = o.actual[:, h - 1]
            inside["sampled_2std"][h].append(np.abs(y - m[:, h - 1]) <= 2 * sd[:, h - 1])
            inside["sampled_q10_q90"][h].append((y >= q10[:, h - 1]) & (y <= q90[:, h - 1]))
            inside["rollout_2std"][h].append(np.abs(y - rm[:, h - 1]) <= 2 * rs[:, h - 1])
    if not origins_total:
        raise ValueError(f"no test series is longer than warmup + {far} timesteps")
    return {
        "paths": paths,
        "seed": seed,
        "origin_stride": stride,
        "series": series_used,
        "origins": origins_total,
        "coverage": {
            str(h): {k: float(np.concatenate(v[h]).mean()) for k, v in inside.items()}
            for h in horizons
        },
        "targets": {"sampled_2std": "90-97% (a Gaussian: 95.4%)", "sampled_q10_q90": "80%"},
    }


def format_tables(scale_free: dict[str, Any], calibration: dict[str, Any]) -> str:
    """The two tables as Markdown, as the README quotes them."""
    n = scale_free["series"]
    names = {
        "model": "**LSTM forecaster (ours)**",
        "persistence": "persistence (last value)",
        "training_mean": "training mean",
        "seasonal_lag_oracle": "best seasonal lag per series (oracle)",
    }
    lines = [
        f"| predictor ({n} test series) | nMSE median [q1, q3] | MASE median [q1, q3] "
        "| model better (nMSE) on |",
        "| --- | --- | --- | --- |",
    ]
    for p in PREDICTORS:
        a, b = scale_free["nmse"][p], scale_free["mase"][p]
        beats = "" if p == "model" else f"{scale_free['model_beats_on_series'][p]} of {n}"
        lines.append(
            f"| {names[p]} | {a['median']:.4f} [{a['q1']:.4f}, {a['q3']:.4f}] "
            f"| {b['median']:.3f} [{b['q1']:.3f}, {b['q3']:.3f}] | {beats} |"
        )
    lines += [
        "",
        f"| horizon | ± 2 std, sampled ({calibration['paths']} paths) | 10-90%, sampled "
        "| ± 2 std, means rolled forward (old) |",
        "| --- | --- | --- | --- |",
    ]
    # By horizon: a card's JSON keys come back sorted as strings ("1", "16", "4").
    for h, c in sorted(calibration["coverage"].items(), key=lambda item: int(item[0])):
        lines.append(
            f"| {h} | {c['sampled_2std']:.1%} | {c['sampled_q10_q90']:.1%} "
            f"| {c['rollout_2std']:.1%} |"
        )
    lines.append(
        f"({calibration['origins']} forecast origins on {calibration['series']} test series, "
        f"every {calibration['origin_stride']} steps from the warmup)"
    )
    return "\n".join(lines)


def held_out(card: dict[str, Any], data: SeriesSet) -> tuple[SeriesSet, SeriesSet]:
    """The card's training and test sets, split again as training split them."""
    if data.fingerprint() != card["data"]["fingerprint_sha256"]:
        raise ValueError(f"{data.name} is not the data this model was trained on (fingerprint)")
    settings = card["training"]["settings"]
    # Cards written before the split was recorded were split by series (ACSF1's).
    by = card["data"].get("split", {}).get("by") or card["metrics"].get("split", "series")
    split = split_series(
        data,
        by=by,
        seed=settings["seed"],
        min_part=settings["warmup"] + 1,
    )
    if split.test.ids != card["data"]["test_ids"]:
        raise ValueError("the split made again does not give the card's test series")
    return split.train, split.test


def evaluate_checkpoint(
    model: AnyForecaster, card: dict[str, Any], data: SeriesSet
) -> dict[str, Any]:
    train, test = held_out(card, data)
    settings = card["training"]["settings"]
    train_mean = np.concatenate(train.series).mean(axis=0)
    return {
        "scale_free": scale_free_report(
            model, test.series, train_mean, settings["warmup"], settings["max_lag"]
        ),
        "calibration": calibration_report(model, test.series, settings["warmup"]),
    }


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m model.evaluate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", type=Path, required=True, help="checkpoint directory")
    p.add_argument("--csv", type=Path, default=None, help="the CSV the model was trained on")
    p.add_argument("--id-col", default="series_id")
    p.add_argument("--time-col", default="time")
    p.add_argument("--value-cols", default=None, help="comma-separated, as given to training")
    p.add_argument(
        "--write-card",
        action="store_true",
        help="write the results into the card's metrics (scale_free, calibration)",
    )
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        ckpt = load_checkpoint(args.model)
        if args.csv:
            cols = args.value_cols.split(",") if args.value_cols else None
            data = load_csv(args.csv, id_col=args.id_col, time_col=args.time_col, value_cols=cols)
        elif ckpt.card["data"]["source"] == "ACSF1":
            data = load_acsf1()
        else:
            raise ValueError(f"trained on {ckpt.card['data']['source']!r}: pass its --csv")
        results = evaluate_checkpoint(ckpt.model, ckpt.card, data)
    except (OSError, ValueError, KeyError, CheckpointError) as e:
        print(f"python -m model.evaluate: {e}", file=sys.stderr)
        return 2
    kind = (
        "" if isinstance(ckpt.model, LSTMForecaster) else f" (scaling {ckpt.model.config.scaling})"
    )
    print(f"{ckpt.name}:{ckpt.version}{kind} on {data.name}'s held-out test series\n")
    print(format_tables(results["scale_free"], results["calibration"]))
    if args.write_card:
        path = args.model / CARD_FILE
        card = json.loads(path.read_text())
        card["metrics"].update(results)
        path.write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
        print(f"\nwrote scale_free and calibration into {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
