"""Train a forecaster on real data and compare it with baselines on held-out series.

    python -m model.train                      # ACSF1, into runs/acsf1-forecaster
    python -m model.train --csv my.csv         # your data, into runs/my
    python -m model.train --csv my.csv --out models/mine --name mine

Split by series (appliance) when there are enough: validation and test series are never seen in
training. With too few series (one meter, one sensor), split by time: the last 15% of each
series tests, the 15% before it validates. The card says which split was used. Every series
needs more than --warmup timesteps (each held-out part streams --warmup steps before it is
scored). Training samples random windows, minimises the Gaussian NLL of the next value, and stops
early on the validation NLL (whole validation series streamed from a zero state, as the service
does). The std is then calibrated on the validation series (one factor per feature, so that the
one-step mean ± 2 std covers 95.45% of them), and so is the sampled forecast, per future step
up to 32 (its std and its quantile levels: model.evaluate.calibrate_horizons), before the test
series are scored. An existing
--out is never overwritten without --force.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import random
import re
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm import tqdm

from model import pick_device
from model.baselines import persistence_mse, seasonal_lag_mse, training_mean_mse
from model.checkpoint import AnyForecaster, Checkpoint, build_forecaster, save_checkpoint
from model.data import (
    SeriesSet,
    TooFewSeries,
    indices_by_length,
    load_acsf1,
    load_csv,
    split_series,
)
from model.evaluate import (
    NothingToCalibrate,
    calibrate_horizons,
    calibrate_std,
    calibration_report,
    format_tables,
    scale_free_report,
)
from model.forecaster import ForecasterConfig, LSTMForecaster, Normalisation, gaussian_nll
from model.scaling import MIN_SCALE_COUNT, RunningScaleForecaster, RunningStats


@dataclass(frozen=True)
class TrainSettings:
    seed: int = 0
    window: int = 128  # truncated BPTT length; ACSF1's cycles are far shorter
    batch_size: int = 32
    lr: float = 3e-3
    # beta-NLL (Seitzer et al. 2022): with plain NLL (0) confident points starved the mean's
    # gradient; on ACSF1's test appliances MSE went 0.076 -> 0.060, NLL -1.7 -> -2.5.
    nll_beta: float = 0.5
    grad_clip: float = 1.0  # LSTMs on spiky power data occasionally blow a gradient up
    # scaling="running": targets beyond this many running scales count as this far (0: as they
    # are); a series switched on from near zero lands thousands of scales away, and those few
    # steps, unforeseeable, ruled the loss
    target_clip: float = 0.0
    max_epochs: int = 40
    steps_per_epoch: int = 50
    patience: int = 10  # epochs without a better validation NLL before stopping (NLL is noisy)
    warmup: int = 96  # timesteps each series is streamed before it is scored
    max_lag: int = 96  # seasonal-lag baseline searches lags 1..max_lag
    device: str = "auto"
    # One CPU thread, whatever OMP_NUM_THREADS says (0: torch's default, one per core). Measured
    # on a shared 2-core machine, examples/meters.csv, the default model (batch 32, window 128),
    # 10 training steps each: 185 ms a step on 1 thread, 120 ms on 2 (load ~2 from others); with
    # a busy loop on one core besides, 277 ms on 1 thread and 4,250 ms on 2: OpenMP's threads
    # wait for each other at every op, and one waits for the busy core (a first epoch was
    # reported at 282 s that way, against 7 s on one thread). One thread is never the disaster.
    threads: int = 1
    split: Literal["auto", "series", "time"] = "auto"  # auto: by series, by time if too few
    progress: bool = True


class TrainingError(ValueError):
    """Data or settings training cannot use; raised before anything is written."""


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[int]:
    """Run with ``n`` intra-op threads (0: leave torch's choice); yield the count in force."""
    before = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(n)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def check_settings(settings: TrainSettings) -> None:
    """Refuse settings that would only fail after training (or score nothing)."""
    if settings.warmup < 1:
        raise TrainingError(f"--warmup must be at least 1 (got {settings.warmup})")
    if not 1 <= settings.max_lag <= settings.warmup:
        raise TrainingError(
            f"--max-lag must be between 1 and --warmup ({settings.warmup}), so every lag of the "
            f"seasonal baseline is scored on the same steps (got {settings.max_lag})"
        )
    for name in ("window", "batch_size", "max_epochs", "steps_per_epoch", "patience"):
        if getattr(settings, name) < 1:
            raise TrainingError(f"--{name.replace('_', '-')} must be at least 1")
    if settings.threads < 0:
        raise TrainingError("--threads must be 0 (torch's default) or more")


def check_lengths(data: SeriesSet, warmup: int) -> None:
    """Every series must outlast the warmup: a held-out series is scored from step ``warmup``
    on, and one with nothing left to score made NaN metrics (and kept the untrained weights)."""
    needed = warmup + 1
    short = [(sid, len(s)) for sid, s in zip(data.ids, data.series, strict=True) if len(s) < needed]
    if short:
        sid, length = min(short, key=lambda item: item[1])
        raise TrainingError(
            f"{data.name}: {len(short)} of {len(data.series)} series are shorter than the "
            f"{needed} timesteps training needs (--warmup {warmup} streamed before scoring, then "
            f"at least one scored step); the shortest, {sid!r}, has {length}. Give longer "
            f"series, or lower --warmup (and --max-lag)"
        )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def normalisation_of(data: SeriesSet) -> Normalisation:
    values = np.concatenate(data.series).astype(np.float64)
    std = np.maximum(values.std(axis=0), 1e-6)
    return Normalisation(tuple(values.mean(axis=0).tolist()), tuple(std.tolist()))


def sample_windows(
    data: SeriesSet, window: int, batch: int, rng: np.random.Generator
) -> np.ndarray:
    """(batch, window + 1, F) random windows, series chosen in proportion to their length."""
    return sample_windows_at(data, window, batch, rng)[0]


def sample_windows_at(
    data: SeriesSet, window: int, batch: int, rng: np.random.Generator
) -> tuple[np.ndarray, list[np.ndarray]]:
    """``sample_windows`` and, for each window, the part of its series before it."""
    lengths = np.array([len(s) for s in data.series])
    window = min(window, int(lengths.min()) - 1)
    chosen = rng.choice(len(lengths), size=batch, p=lengths / lengths.sum())
    out, before = [], []
    for i in chosen:
        start = rng.integers(0, lengths[i] - window)
        out.append(data.series[i][start : start + window + 1])
        before.append(data.series[i][:start])
    return np.stack(out), before


@torch.no_grad()
def stream_predictions(
    model: AnyForecaster,
    series: list[np.ndarray],
) -> list[tuple[np.ndarray, np.ndarray]]:
    """For each series, (mean, std) of shape (T, F) where output t forecasts value t + 1.

    Series of equal length stream together in one batch, each from a zero state.
    """
    model.eval()
    device = next(model.parameters()).device
    results: list[tuple[np.ndarray, np.ndarray]] = [(np.empty(0), np.empty(0))] * len(series)
    for indices in indices_by_length(series):
        batch = torch.from_numpy(np.stack([series[i] for i in indices])).to(device)
        f = model(batch)
        for row, i in enumerate(indices):
            results[i] = (f.mean[row].cpu().numpy(), f.std[row].cpu().numpy())
    return results


def evaluate(
    model: AnyForecaster,
    series: list[np.ndarray],
    warmup: int,
) -> dict[str, float]:
    """One-step MSE (raw units) and Gaussian NLL (normalised units) over steps warmup..T-1."""
    sq_errors, nlls = [], []
    std_scale = model.input_std.cpu().numpy()
    for s, (mean, std) in zip(series, stream_predictions(model, series), strict=True):
        target, m, sd = s[warmup:], mean[warmup - 1 : -1], std[warmup - 1 : -1]
        sq_errors.append((target - m) ** 2)
        z_sd = sd / std_scale
        z_err = (target - m) / std_scale
        nlls.append(0.5 * (np.log(2 * np.pi * z_sd**2) + (z_err / z_sd) ** 2))
    return {
        "mse": float(np.concatenate(sq_errors).mean()),
        "nll": float(np.concatenate(nlls).mean()),
    }


def fit(
    train: SeriesSet,
    val: SeriesSet,
    config: ForecasterConfig,
    settings: TrainSettings,
) -> tuple[AnyForecaster, list[dict[str, float]]]:
    """Train with early stopping on validation NLL; return the best model and the history."""
    seed_everything(settings.seed)
    device = pick_device(settings.device)
    model = build_forecaster(config, normalisation_of(train)).to(device)
    optimiser = torch.optim.Adam(model.parameters(), lr=settings.lr)
    # Cosine decay to lr/30: late epochs refine instead of bouncing around the spiky NLL.
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimiser, T_max=settings.max_epochs * settings.steps_per_epoch, eta_min=settings.lr / 30
    )
    rng = np.random.default_rng(settings.seed)
    best_nll, best_state, stale = math.inf, copy.deepcopy(model.state_dict()), 0
    history: list[dict[str, float]] = []
    bar = tqdm(
        range(settings.max_epochs), desc="epochs", disable=not settings.progress, file=sys.stderr
    )
    for epoch in bar:
        model.train()
        losses = []
        for _ in range(settings.steps_per_epoch):
            batch, before = sample_windows_at(train, settings.window, settings.batch_size, rng)
            windows = torch.from_numpy(batch).to(device)
            if isinstance(model, LSTMForecaster):
                mean, std, _, _ = model.forward_normalised(windows[:, :-1])
                target = (windows[:, 1:] - model.input_mean) / model.input_std
                loss = gaussian_nll(mean, std, target, settings.nll_beta)
            else:
                loss = running_scale_loss(
                    model, windows, before, settings.nll_beta, settings.target_clip
                )
            optimiser.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
            optimiser.step()
            schedule.step()
            losses.append(loss.item())
        scores = evaluate(model, val.series, settings.warmup)
        history.append(
            {
                "epoch": epoch,
                "train_loss": float(np.mean(losses)),  # beta-NLL when nll_beta > 0
                "val_nll": scores["nll"],
                "val_mse": scores["mse"],
            }
        )
        bar.set_postfix(
            train_loss=f"{np.mean(losses):.3f}",
            val_nll=f"{scores['nll']:.3f}",
            val_mse=f"{scores['mse']:.4f}",
        )
        if scores["nll"] < best_nll:
            best_nll, best_state, stale = scores["nll"], copy.deepcopy(model.state_dict()), 0
        else:
            stale += 1
            if stale >= settings.patience:
                break
    model.load_state_dict(best_state)
    return model.eval(), history


def running_scale_loss(
    model: RunningScaleForecaster,
    windows: torch.Tensor,
    before: list[np.ndarray],
    beta: float,
    target_clip: float = 0.0,
) -> torch.Tensor:
    """The NLL in each step's running units, the statistics carried from the series' start."""
    stats = RunningStats.of(before, windows.shape[-1], model.config.scale_decay)
    state = model.zero_state(windows.shape[0])._replace(
        stats=RunningStats(*(t.to(windows.device) for t in stats))
    )
    f = model.forward_normalised(windows[:, :-1], state)
    target = (windows[:, 1:] - f.loc) / f.scale
    if target_clip > 0:
        target = target.clamp(-target_clip, target_clip)
    seen = torch.tensor([len(b) for b in before], device=windows.device)  # n is a weight if decayed
    counted = seen.view(-1, 1) + torch.arange(
        1, windows.shape[1], device=windows.device
    )  # (B, T): values in the statistics after each input step
    keep = counted >= MIN_SCALE_COUNT
    return gaussian_nll(f.mean[keep], f.std[keep], target[keep], beta)


def unless_unscorable(report: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """The report, or why the test series cannot give it (all constant; all too short for the
    longest calibration horizon): short series still train, and the card says what is missing."""
    try:
        return report()
    except ValueError as e:
        return {"not_scored": str(e)}


def test_report(
    model: AnyForecaster,
    train: SeriesSet,
    test: SeriesSet,
    settings: TrainSettings,
) -> dict[str, Any]:
    """The model against persistence, the best seasonal lag and the training mean, on test."""
    lag_mse, lags = seasonal_lag_mse(test.series, settings.warmup, settings.max_lag)
    train_mean = np.concatenate(train.series).mean(axis=0)
    scores = evaluate(model, test.series, settings.warmup)
    mse = {
        "model": scores["mse"],
        "persistence": persistence_mse(test.series, settings.warmup),
        "seasonal_lag_oracle": lag_mse,
        "training_mean": training_mean_mse(test.series, settings.warmup, train_mean),
    }
    return {
        "one_step_mse": mse,
        "scale_free": unless_unscorable(
            lambda: scale_free_report(
                model, test.series, train_mean, settings.warmup, settings.max_lag
            )
        ),
        "calibration": unless_unscorable(
            lambda: calibration_report(model, test.series, settings.warmup)
        ),
        "model_nll": scores["nll"],
        "beats_all_baselines": all(mse["model"] < v for k, v in mse.items() if k != "model"),
        "scored_steps": f"{settings.warmup}..T-1 of each test series",
        "seasonal_lags_chosen": lags,
    }


def train_and_save(
    data: SeriesSet,
    out: Path,
    name: str,
    config: ForecasterConfig,
    settings: TrainSettings,
) -> Checkpoint:
    """Split, train, score against the baselines, save; nothing is written unless all worked."""
    check_settings(settings)
    check_lengths(data, settings.warmup)
    try:
        split = split_series(
            data, by=settings.split, seed=settings.seed, min_part=settings.warmup + 1
        )
    except TooFewSeries as e:  # only when --split series was asked for
        raise TrainingError(f"{e}; --split time (or auto) splits each series in time") from e
    except ValueError as e:  # too short to split by time
        raise TrainingError(str(e)) from e
    train, val, test = split.train, split.validation, split.test
    with torch_threads(settings.threads) as threads:
        started = time.perf_counter()
        model, history = fit(train, val, config, settings)
        seconds = time.perf_counter() - started
        try:
            std_calibration = calibrate_std(model, val.series, settings.warmup)
        except NothingToCalibrate as e:  # no validation step: the head's std as trained
            std_calibration = {"std_scale": model.std_scale.tolist(), "not_fitted": str(e)}
        try:
            horizon_calibration = calibrate_horizons(model, val.series, settings.warmup)
        except NothingToCalibrate as e:  # validation series too short: the paths as drawn
            horizon_calibration = {"not_fitted": str(e)}
        report = test_report(model, train, test, settings)
    report["split"] = split.by  # served in /v1/model's metrics: how held-out the scores are
    scores = [report["model_nll"], *report["one_step_mse"].values()]
    if not all(math.isfinite(v) for v in scores):
        raise TrainingError(f"training produced non-finite scores {scores}; nothing was saved")
    extra = {
        "data": {
            "source": data.name,
            "fingerprint_sha256": data.fingerprint(),
            "split": split.description,
            "series": {"train": len(train.ids), "validation": len(val.ids), "test": len(test.ids)},
            "test_ids": test.ids,
            "validation_ids": val.ids,
        },
        "training": {
            "settings": {k: v for k, v in vars(settings).items() if k != "progress"},
            "epochs_run": len(history),
            "best_val_nll": min(h["val_nll"] for h in history),
            "seconds": round(seconds, 1),
            "threads": threads,
            "torch": torch.__version__,
            "history": history,
            "std_calibration": std_calibration,
            "horizon_calibration": horizon_calibration,
        },
        "metrics": report,
    }
    return save_checkpoint(model.cpu(), out, name=name, extra=extra)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The module docstring as written, and every option's default after its help (an option
    without one says in its help what happens when it is unset)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" in text or action.default in (None, argparse.SUPPRESS):
            return text
        if action.default is False:
            return f"{text} (default: off)"
        return f"{text} (default: %(default)s)"


# BentoML's rule for a tag's name: the trained model is imported into its store under it.
NAME = re.compile(r"[a-z0-9]([-._a-z0-9]*[a-z0-9])?")


def default_name(csv: Path | None) -> str:
    """The CSV's stem as a model name BentoML accepts (``My Meters.csv`` -> ``my-meters``)."""
    if csv is None:
        return "acsf1-forecaster"
    name = re.sub(r"[^-._a-z0-9]+", "-", csv.stem.lower()).strip("-._")[:63]
    return name or "model"


# The command line's settings for --scaling running when none are given: what won on ACSF1 and
# PLAID (README, "Series of any magnitude") and trained the shipped model.
RUNNING_HALFLIFE = 16.0
RUNNING_TARGET_CLIP = 10.0


def running_default(value: float | None, scaling: str, recommended: float) -> float:
    """An option of the running scaling: as given, else ``recommended`` for it (0 for global)."""
    if value is not None:
        return value
    return recommended if scaling == "running" else 0.0


def parser() -> argparse.ArgumentParser:
    d = TrainSettings()
    c = ForecasterConfig(("x",))
    p = argparse.ArgumentParser(
        prog="python -m model.train", description=__doc__, formatter_class=HelpFormatter
    )
    data = p.add_argument_group("data")
    data.add_argument(
        "--csv",
        type=Path,
        default=None,
        help="long-format CSV to train on (one row per series and time); unset: ACSF1",
    )
    data.add_argument("--id-col", default="series_id", help="the CSV's series id column")
    data.add_argument(
        "--time-col", default="time", help="the CSV's time column (numbers or ISO 8601)"
    )
    data.add_argument(
        "--value-cols",
        default=None,
        help="comma-separated value columns, the model's features; unset: all other columns",
    )
    data.add_argument(
        "--split",
        default=d.split,
        choices=["auto", "series", "time"],
        help="hold out whole series, or each series' last 15%%+15%% in time; auto: by series, "
        "by time when there are too few series (under 3)",
    )
    out = p.add_argument_group("output")
    out.add_argument(
        "--name",
        default=None,
        help="model name, the tag's name in the model store; unset: the CSV's file name "
        "(acsf1-forecaster without --csv)",
    )
    out.add_argument(
        "--out",
        type=Path,
        default=None,
        help="checkpoint directory to write; unset: runs/NAME (git-ignored)",
    )
    out.add_argument(
        "--force",
        action="store_true",
        help="replace an existing checkpoint in --out (without it, a training run never "
        "overwrites one, the shipped models/acsf1-forecaster included)",
    )
    m = p.add_argument_group("model")
    m.add_argument("--hidden-size", type=int, default=c.hidden_size, help="LSTM units per layer")
    m.add_argument("--num-layers", type=int, default=c.num_layers, help="stacked LSTM layers")
    m.add_argument(
        "--scaling",
        default="running",
        choices=["global", "running"],
        help="running (the shipped model's): each series in its own causal running mean and "
        "std, kept in its session, whatever its magnitude; global: every series in the "
        "training set's units",
    )
    m.add_argument(
        "--scale-halflife",
        type=float,
        default=None,
        help="with --scaling running: the half-life in timesteps of a value's weight in the "
        f"running mean and std (0: every value since the series' start alike; unset: "
        f"{RUNNING_HALFLIFE:g})",
    )
    m.add_argument(
        "--variant",
        default=c.variant,
        choices=["standard", "peephole", "coupled"],
        help="LSTM gates: standard, peephole (gates see the cell), coupled (input = 1 - forget)",
    )
    t = p.add_argument_group("training")
    t.add_argument("--max-epochs", type=int, default=d.max_epochs, help="epochs at most")
    t.add_argument(
        "--steps-per-epoch", type=int, default=d.steps_per_epoch, help="batches per epoch"
    )
    t.add_argument(
        "--window", type=int, default=d.window, help="timesteps per training window (BPTT)"
    )
    t.add_argument(
        "--patience",
        type=int,
        default=d.patience,
        help="epochs without a better validation NLL before stopping",
    )
    t.add_argument(
        "--nll-beta", type=float, default=d.nll_beta, help="beta-NLL weight (0: plain NLL)"
    )
    t.add_argument(
        "--target-clip",
        type=float,
        default=None,
        help="with --scaling running: train on targets clipped to this many running scales "
        f"(0: unclipped; unset: {RUNNING_TARGET_CLIP:g})",
    )
    t.add_argument(
        "--warmup",
        type=int,
        default=d.warmup,
        help="timesteps each held-out series streams before it is scored; every series needs "
        "more than this",
    )
    t.add_argument(
        "--max-lag",
        type=int,
        default=d.max_lag,
        help="the seasonal baseline tries lags 1..MAX_LAG (at most --warmup)",
    )
    t.add_argument("--seed", type=int, default=d.seed, help="seed of the split and the training")
    t.add_argument(
        "--device", default=d.device, help="auto (CUDA when available), cpu, cuda, cuda:N"
    )
    t.add_argument(
        "--threads",
        type=int,
        default=d.threads,
        help="torch CPU threads, whatever OMP_NUM_THREADS says (0: torch's default); more "
        "than one was up to 15x slower on a 2-core machine with another process busy",
    )
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def fail(message: str) -> int:
    print(f"python -m model.train: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    name = args.name or default_name(args.csv)
    if not NAME.fullmatch(name) or len(name) > 63:
        return fail(
            f"--name {name!r}: a model name is lowercase letters, digits, '-', '_' and '.', "
            f"63 at most, starting and ending with a letter or digit"
        )
    out: Path = args.out or Path("runs") / name
    if out.exists() and not out.is_dir():
        return fail(f"--out {out} is a file, not a checkpoint directory")
    if out.is_dir() and any(out.iterdir()) and not args.force:
        return fail(
            f"--out {out} already holds files (a trained model?); pass --force to replace "
            f"them, or choose another --out"
        )
    try:
        if args.csv:
            value_cols = args.value_cols.split(",") if args.value_cols else None
            data = load_csv(
                args.csv, id_col=args.id_col, time_col=args.time_col, value_cols=value_cols
            )
        else:
            data = load_acsf1()
        config = ForecasterConfig(
            feature_names=data.feature_names,
            hidden_size=args.hidden_size,
            num_layers=args.num_layers,
            variant=args.variant,
            scaling=args.scaling,
            scale_halflife=running_default(args.scale_halflife, args.scaling, RUNNING_HALFLIFE),
        )
        settings = TrainSettings(
            seed=args.seed,
            max_epochs=args.max_epochs,
            steps_per_epoch=args.steps_per_epoch,
            window=args.window,
            patience=args.patience,
            nll_beta=args.nll_beta,
            target_clip=running_default(args.target_clip, args.scaling, RUNNING_TARGET_CLIP),
            warmup=args.warmup,
            max_lag=args.max_lag,
            device=args.device,
            threads=args.threads,
            split=args.split,
            progress=not args.no_progress,
        )
        ckpt = train_and_save(data, out, name, config, settings)
    except (OSError, ValueError) as e:  # the data or settings: nothing was written
        return fail(str(e))
    mse = ckpt.card["metrics"]["one_step_mse"]
    split = ckpt.card["data"]["split"]["by"]
    print(f"saved {ckpt.name}:{ckpt.version} to {out} (split by {split})")
    print("one-step MSE on held-out test series:")
    for k, v in mse.items():
        print(f"  {k:20s} {v:.5f}")
    metrics = ckpt.card["metrics"]
    scale_free, calibration = metrics["scale_free"], metrics["calibration"]
    if "not_scored" in scale_free or "not_scored" in calibration:
        why = scale_free.get("not_scored") or calibration.get("not_scored")
        print(f"\nno scale-free or calibration table: {why}")
    else:
        print("\nscale-free, per test series, and calibration of the sampled forecast:")
        print(format_tables(scale_free, calibration))
    print(f"next: python -m service.model_registry import {out}")
    if not ckpt.card["metrics"]["beats_all_baselines"]:
        print("the model does NOT beat every baseline", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
