"""The forecaster, its checkpoints, training, and the shipped default model."""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from model import (
    CheckpointError,
    ForecasterConfig,
    LSTMForecaster,
    LSTMState,
    Normalisation,
    load_checkpoint,
    save_checkpoint,
)
from model.baselines import persistence_mse, seasonal_lag_mse, training_mean_mse
from model.checkpoint import HORIZON_KEYS, UNCALIBRATED_KEY
from model.data import SeriesSet, TooFewSeries, load_csv, split_by_series
from model.evaluate import (
    TWO_STD_MASS,
    calibrate_horizons,
    calibrate_std,
    calibration_report,
    format_tables,
    held_out,
    scale_free_report,
)
from model.forecaster import (
    CALIBRATED_HORIZONS,
    QUANTILES,
    Forecast,
    HorizonCalibration,
    SampledForecast,
    draw_paths,
    sample_paths,
)
from model.scaling import RunningScaleForecaster, RunningStats
from model.train import TrainSettings, evaluate, fit, running_scale_loss

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "models" / "acsf1-forecaster"


def small_model(variant: str = "standard", features: int = 2) -> LSTMForecaster:
    torch.manual_seed(0)
    names = tuple(f"f{i}" for i in range(features))
    norm = Normalisation(
        tuple(float(10 * i) for i in range(features)), tuple(float(i + 2) for i in range(features))
    )
    return LSTMForecaster(
        ForecasterConfig(names, hidden_size=8, num_layers=2, variant=variant), norm
    ).eval()  # type: ignore[arg-type]


def test_forecaster_outputs_raw_units_and_positive_std() -> None:
    model = small_model()
    x = torch.randn(3, 7, 2) * 3 + torch.tensor([0.0, 10.0])
    mean, std, state, gates = model(x)
    assert mean.shape == std.shape == (3, 7, 2)
    assert state.h.shape == (2, 3, 8) and gates is None
    assert bool((std > 0).all())
    z_mean, z_std, _, _ = model.forward_normalised(x)
    torch.testing.assert_close(mean, z_mean * torch.tensor([2.0, 3.0]) + torch.tensor([0.0, 10.0]))
    torch.testing.assert_close(std, z_std * torch.tensor([2.0, 3.0]))


@pytest.mark.parametrize("variant", ["standard", "peephole", "coupled"])
def test_forecaster_streams_exactly(variant: str) -> None:
    model = small_model(variant)
    x = torch.randn(2, 40, 2)
    with torch.no_grad():
        whole = model(x)
        state, means = None, []
        for lo, hi in [(0, 1), (1, 14), (14, 15), (15, 40)]:
            mean, _, state, _ = model(x[:, lo:hi], state)
            means.append(mean)
    torch.testing.assert_close(torch.cat(means, 1), whole.mean, atol=1e-6, rtol=0)


def test_rollout_feeds_its_own_means_back() -> None:
    model = small_model()
    x = torch.randn(1, 5, 2)
    with torch.no_grad():
        mean, std, state, _ = model(x)
        means, stds = model.rollout(mean[:, -1], std[:, -1], state, horizon=3)
        # Step by step by hand: the forecast for t+2 is the model's output on the mean for t+1.
        m2, _, s2, _ = model(mean[:, -1:], state)
        m3, _, _, _ = model(m2, s2)
    assert means.shape == stds.shape == (1, 3, 2)
    torch.testing.assert_close(means[:, 0], mean[:, -1])
    torch.testing.assert_close(means[:, 1], m2[:, 0])
    torch.testing.assert_close(means[:, 2], m3[:, 0])


@pytest.mark.parametrize("variant", ["standard", "peephole", "coupled"])
def test_checkpoint_round_trip_is_bit_identical(tmp_path: Path, variant: str) -> None:
    model = small_model(variant)
    ckpt = save_checkpoint(model, tmp_path, name="tiny", extra={"metrics": {"x": 1}})
    loaded = load_checkpoint(tmp_path)
    assert (loaded.name, loaded.version) == ("tiny", ckpt.version)
    assert loaded.card["metrics"] == {"x": 1}
    assert loaded.model.config == model.config
    x = torch.randn(2, 9, 2)
    with torch.no_grad():
        a, b = model(x), loaded.model(x)
    assert torch.equal(a.mean, b.mean) and torch.equal(a.std, b.std)
    assert torch.equal(a.state.c, b.state.c)
    assert not any(p.suffix in {".pt", ".pkl", ".bin"} for p in tmp_path.iterdir())


def test_corrupted_weights_are_refused(tmp_path: Path) -> None:
    save_checkpoint(small_model(), tmp_path, name="tiny")
    weights = tmp_path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x01  # one bit in the last weight
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupted"):
        load_checkpoint(tmp_path)


def test_mismatched_card_is_refused(tmp_path: Path) -> None:
    save_checkpoint(small_model(), tmp_path, name="tiny")
    card_path = tmp_path / "card.json"
    card = json.loads(card_path.read_text())
    card["config"]["hidden_size"] = 9
    card_path.write_text(json.dumps(card))
    with pytest.raises(CheckpointError, match=r"do not match.*expected \(36, 9\)"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c.update(format="other/9"), "format 'other/9'"),
        (lambda c: c["config"].update(colour="blue"), "unknown config keys"),
        (lambda c: c.pop("normalisation"), "describes no valid model"),
    ],
)
def test_bad_cards_are_refused(tmp_path: Path, edit, message: str) -> None:  # type: ignore[no-untyped-def]
    save_checkpoint(small_model(), tmp_path, name="tiny")
    card_path = tmp_path / "card.json"
    card = json.loads(card_path.read_text())
    edit(card)
    card_path.write_text(json.dumps(card))
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(tmp_path)


def test_missing_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"no card\.json"):
        load_checkpoint(tmp_path)
    save_checkpoint(small_model(), tmp_path, name="tiny")
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no model\.safetensors"):
        load_checkpoint(tmp_path)


def sine_set(n: int = 12, length: int = 120, seed: int = 0) -> SeriesSet:
    rng = np.random.default_rng(seed)
    t = np.arange(length)
    series = [
        (
            np.sin(2 * np.pi * t / 8 + rng.uniform(0, 6))[:, None] * 5
            + 20
            + rng.normal(0, 0.1, (length, 1))
        ).astype(np.float32)
        for _ in range(n)
    ]
    return SeriesSet("sines", ("v",), series, [f"s{i}" for i in range(n)], [""] * n)


def test_short_training_lowers_the_loss() -> None:
    data = sine_set()
    train, val, _ = split_by_series(data, seed=0)
    settings = TrainSettings(
        max_epochs=4,
        steps_per_epoch=25,
        lr=1e-2,
        window=32,
        batch_size=8,
        warmup=16,
        max_lag=16,
        patience=10,
        nll_beta=0.0,  # the plain NLL, so the training loss is the quantity checked
        progress=False,
    )
    config = ForecasterConfig(("v",), hidden_size=16, num_layers=1)
    untrained = LSTMForecaster(config, Normalisation((20.0,), (5.0,)))
    before = evaluate(untrained, val.series, warmup=16)["nll"]
    model, history = fit(train, val, config, settings)
    after = evaluate(model, val.series, warmup=16)["nll"]
    assert len(history) == 4
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert after < before - 0.5


def test_split_is_by_series_and_deterministic() -> None:
    data = sine_set(n=20)
    a = split_by_series(data, seed=3)
    b = split_by_series(data, seed=3)
    assert [s.ids for s in a] == [s.ids for s in b]
    ids = [set(s.ids) for s in a]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert set().union(*ids) == set(data.ids)
    with pytest.raises(TooFewSeries, match="2 series are too few"):
        split_by_series(sine_set(n=2))


def test_baselines_on_a_known_series() -> None:
    period = np.tile(np.array([0.0, 1.0, 4.0, 1.0], dtype=np.float32), 30)[:, None]
    assert seasonal_lag_mse([period], warmup=12, max_lag=12) == (0.0, [4])
    expected = np.mean((period[12:, 0] - period[11:-1, 0]) ** 2)
    assert persistence_mse([period], warmup=12) == pytest.approx(expected)
    assert training_mean_mse([period], 12, np.array([1.5])) == pytest.approx(
        np.mean((period[12:, 0] - 1.5) ** 2)
    )


def test_csv_long_format(tmp_path: Path) -> None:
    path = tmp_path / "meters.csv"
    path.write_text(
        "series_id,time,kw,volts\n"
        "b,2,3.0,230\nb,1,2.0,229\na,10,1.0,231\na,9,0.5,232\na,11,1.5,230\n"
    )
    data = load_csv(path)
    assert data.ids == ["a", "b"] and data.feature_names == ("kw", "volts")
    np.testing.assert_array_equal(data.series[0][:, 0], [0.5, 1.0, 1.5])  # ordered by time
    assert data.series[1].shape == (2, 2)
    with pytest.raises(ValueError, match="no column 'series'"):
        load_csv(path, id_col="series")
    # one (series, time) twice, "10" and "10.0" the same time: which comes first was arbitrary
    # and it was accepted silently (an outside test run)
    path.write_text("series_id,time,kw,volts\na,10,1.0,231\nb,10,2.0,229\na,10.0,1.5,230\n")
    with pytest.raises(
        ValueError, match=r"meters.csv:4: series 'a' has time '10.0' again \(line 2\)"
    ):
        load_csv(path)


def test_csv_times_are_ordered_as_instants_and_refused_when_they_cannot_be(
    tmp_path: Path,
) -> None:
    """ISO times were sorted as text: across a change of clocks (02:00+02:00, then 02:00+01:00)
    the rows came out of order, and a series mixing numbers and times, or times of no known
    form, was put in some order silently (an outside test run)."""
    from model.data import MAX_ABS_VALUE, read_long_csv
    from service.schemas import VALUE_CEILING

    assert MAX_ABS_VALUE == VALUE_CEILING  # what training takes is what the service takes
    path = tmp_path / "clocks.csv"
    path.write_text(
        "\ufeffseries_id,time,kw\n"  # a spreadsheet's byte-order mark
        "b,2026-10-25T02:30:00+01:00,4\n"
        "b,2026-10-25T02:00:00+01:00,3\n"
        "b,2026-10-25T02:30:00+02:00,2\n"
        "b,2026-10-25T02:00:00+02:00,1\n"
        "b,2026-10-24T23:30:00Z,0\n"
        "a,2026-01-02,2\na,2026-01-01 12:00,1\n"
    )
    values, rows = read_long_csv(path)
    assert values == ["kw"]
    assert [v for _, (v,) in rows["b"]] == [0, 1, 2, 3, 4]
    assert [t for t, _ in rows["a"]] == ["2026-01-01 12:00", "2026-01-02"]
    for body, says in [
        (
            "a,1,0\na,2026-01-01,1\n",
            r"clocks.csv:3: series 'a' has time '2026-01-01', an ISO "
            r"8601 time without one, after a number \(line 2\)",
        ),
        ("a,2026-01-01T00:00Z,0\na,2026-01-01T01:00,1\n", "after an ISO 8601 time with a UTC"),
        ("a,Jan 1,0\n", r"clocks.csv:2: time 'Jan 1' is neither a number nor an ISO 8601 time"),
        ("a,0,0\na,nan,1\n", r"clocks.csv:3: time 'nan' is neither"),
        ("a,inf,1\n", r"clocks.csv:2: time 'inf' is neither"),
        ("a,2026-01-01,0\na,2026-01-01,1\n", "has time '2026-01-01' again"),  # dates only
        ("a,0,\n", "clocks.csv:2: kw is no value"),
        ("a,0,2e15\n", r"clocks.csv:2: kw is '2e15': beyond ±1e\+15"),
    ]:
        path.write_text("series_id,time,kw\n" + body)
        with pytest.raises(ValueError, match=says):
            read_long_csv(path)
    for columns, says in [(["kw", "kw"], "name a column twice"), (["time"], "or time column")]:
        with pytest.raises(ValueError, match=says):
            read_long_csv(path, value_cols=columns)


def test_example_csv_trains_end_to_end(tmp_path: Path) -> None:
    from model.train import main

    out = tmp_path / "meters"
    code = main(
        [
            "--csv",
            str(ROOT / "examples" / "meters.csv"),
            "--out",
            str(out),
            "--name",
            "meters",
            "--hidden-size",
            "8",
            "--num-layers",
            "1",
            "--max-epochs",
            "2",
            "--steps-per-epoch",
            "3",
            "--window",
            "24",
            "--warmup",
            "24",
            "--max-lag",
            "24",
            "--no-progress",
        ]
    )
    assert code in (0, 1)  # two epochs need not beat the baselines; the run must complete
    card = load_checkpoint(out).card
    assert card["config"]["feature_names"] == ["kwh"]
    calibration = card["training"]["std_calibration"]  # fitted on validation, in the weights
    assert load_checkpoint(out).model.std_scale.tolist() == calibration["std_scale"] != [1.0]
    # The forecast's calibration: too few validation origins here to fit it, so none
    forecast = card["training"]["horizon_calibration"]
    assert "fewer than the 100 it needs" in forecast["not_fitted"]
    assert torch.equal(load_checkpoint(out).model.horizon_std_factor, torch.ones(32, 1))
    assert set(card["metrics"]["one_step_mse"]) == {
        "model",
        "persistence",
        "seasonal_lag_oracle",
        "training_mean",
    }


def test_shipped_model_beats_the_baselines_and_the_readme_says_so() -> None:
    ckpt = load_checkpoint(SHIPPED)
    mse = ckpt.card["metrics"]["one_step_mse"]
    assert ckpt.card["metrics"]["beats_all_baselines"]
    assert all(mse["model"] < v for k, v in mse.items() if k != "model")
    readme = (ROOT / "README.md").read_text()
    for value in mse.values():
        assert f"{value:.4f}" in readme, "README's baseline table is not the shipped card's"
    assert ckpt.version in readme


def test_shipped_model_reproduces_its_test_score() -> None:
    """The card's test MSE is what the shipped weights give on the test appliances it names."""
    pytest.importorskip("sktime")
    from model.data import load_acsf1

    ckpt = load_checkpoint(SHIPPED)
    data = load_acsf1()
    assert data.fingerprint() == ckpt.card["data"]["fingerprint_sha256"]
    test_ids = set(ckpt.card["data"]["test_ids"])
    test = [s for sid, s in zip(data.ids, data.series, strict=True) if sid in test_ids]
    warmup = ckpt.card["training"]["settings"]["warmup"]
    scores = evaluate(ckpt.model, test, warmup)
    assert scores["mse"] == pytest.approx(ckpt.card["metrics"]["one_step_mse"]["model"], rel=1e-4)
    # and its std: the calibrated one the card was scored with (the MSE does not see the std)
    assert ckpt.model.std_scale.tolist() == ckpt.card["training"]["std_calibration"]["std_scale"]
    assert scores["nll"] == pytest.approx(ckpt.card["metrics"]["model_nll"], rel=1e-4)


def test_readme_carries_the_shipped_cards_scale_free_and_calibration_tables() -> None:
    metrics = load_checkpoint(SHIPPED).card["metrics"]
    tables = format_tables(metrics["scale_free"], metrics["calibration"])
    readme = (ROOT / "README.md").read_text()
    assert tables in readme, "README's scale-free tables are not the shipped card's"


def test_shipped_model_reproduces_its_scale_free_scores() -> None:
    """The card's per-series table is what the shipped weights give on its test series."""
    pytest.importorskip("sktime")
    from model.data import load_acsf1

    ckpt = load_checkpoint(SHIPPED)
    train, test = held_out(ckpt.card, load_acsf1())
    warmup = ckpt.card["training"]["settings"]["warmup"]
    max_lag = ckpt.card["training"]["settings"]["max_lag"]
    train_mean = np.concatenate(train.series).mean(axis=0)
    report = scale_free_report(ckpt.model, test.series, train_mean, warmup, max_lag)
    card = ckpt.card["metrics"]["scale_free"]
    assert report["model_beats_on_series"] == card["model_beats_on_series"]
    for kind in ("nmse", "mase"):
        for name, quartiles in card[kind].items():
            assert report[kind][name] == pytest.approx(quartiles, rel=1e-4, abs=1e-7)


@pytest.mark.slow
def test_shipped_model_reproduces_its_calibration() -> None:
    pytest.importorskip("sktime")
    from model.data import load_acsf1

    ckpt = load_checkpoint(SHIPPED)
    _, test = held_out(ckpt.card, load_acsf1())
    warmup = ckpt.card["training"]["settings"]["warmup"]
    report = calibration_report(ckpt.model, test.series, warmup)
    card = ckpt.card["metrics"]["calibration"]
    assert report["origins"] == card["origins"]
    for h, coverage in card["coverage"].items():
        assert report["coverage"][h] == pytest.approx(coverage, abs=1e-3)


def test_shipped_card_has_no_pickle_and_a_version_from_its_weights(tmp_path: Path) -> None:
    shutil.copytree(SHIPPED, tmp_path / "m")
    card = json.loads((tmp_path / "m" / "card.json").read_text())
    assert re.fullmatch(r"[0-9a-f]{12}", card["version"])
    assert card["weights_sha256"].startswith(card["version"])
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["card.json", "model.safetensors"]


def test_sample_forecast_is_the_paths_drawn_by_hand() -> None:
    """Step 1 is the model's Gaussian; later steps summarise draws fed back as observations."""
    model = small_model()
    x = torch.randn(1, 5, 2)
    with torch.no_grad():
        mean, std, state, _ = model(x)
        f = model.sample_forecast(mean[:, -1], std[:, -1], state, 3, paths=64, seed=11)
        # The same draws by hand, from the equations: y1 ~ N(m1, s1), (m2, s2) = model(y1), ...
        g = torch.Generator().manual_seed(11)
        m, s = mean[:, -1].repeat(64, 1), std[:, -1].repeat(64, 1)
        h = LSTMState(state.h.repeat(1, 64, 1), state.c.repeat(1, 64, 1))
        draws = []
        for _ in range(3):
            y = m + s * torch.randn(m.shape, generator=g)
            draws.append(y)
            m3, s3, h, _ = model(y.unsqueeze(1), h)
            m, s = m3[:, 0], s3[:, 0]
    assert f.mean.shape == f.std.shape == (1, 3, 2) and f.quantiles.shape == (3, 1, 3, 2)
    torch.testing.assert_close(f.mean[:, 0], mean[:, -1])
    torch.testing.assert_close(f.std[:, 0], std[:, -1])
    torch.testing.assert_close(f.quantiles[1, :, 0], mean[:, -1])  # the Gaussian's median
    torch.testing.assert_close(f.quantiles[2, :, 0], mean[:, -1] + 1.2815516 * std[:, -1])
    for k in (1, 2):
        torch.testing.assert_close(f.mean[0, k], draws[k].mean(0))
        torch.testing.assert_close(f.std[0, k], draws[k].std(0))
        torch.testing.assert_close(
            f.quantiles[:, 0, k], torch.quantile(draws[k], torch.tensor(QUANTILES), dim=0)
        )
    again = model.sample_forecast(mean[:, -1], std[:, -1], state, 3, paths=64, seed=11)
    other = model.sample_forecast(mean[:, -1], std[:, -1], state, 3, paths=64, seed=12)
    assert torch.equal(again.mean, f.mean) and not torch.equal(other.mean[:, 1:], f.mean[:, 1:])


def test_sampled_spread_grows_where_errors_compound() -> None:
    """Through a random walk's one-step forecast ('the last value, std 1'), the k-step std is
    sqrt(k) and the 10-90% interval +-1.28 sqrt(k); feeding back means would keep std 1."""

    def walk(value: torch.Tensor, state: None) -> tuple[torch.Tensor, torch.Tensor, None]:
        return value, torch.ones_like(value), state

    f = sample_paths(walk, torch.zeros(1, 1), torch.ones(1, 1), None, 9, paths=4000, seed=0)
    for k in (1, 4, 9):
        assert float(f.std[0, k - 1, 0]) == pytest.approx(math.sqrt(k), rel=0.05)
        assert float(f.quantiles[2, 0, k - 1, 0]) == pytest.approx(1.2816 * math.sqrt(k), rel=0.08)
        assert abs(float(f.mean[0, k - 1, 0])) < 0.1 * math.sqrt(k)


@pytest.mark.parametrize("features", [1, 2])
def test_running_stats_are_the_series_mean_and_variance_in_any_chunking(features: int) -> None:
    x = torch.randn(3, 50, features, dtype=torch.float64) * 1e4 + 1e6  # far from zero
    stats, means, variances = RunningStats.zeros(3, features).update(x)
    for t in (0, 1, 17, 49):
        prefix = x[:, : t + 1]
        torch.testing.assert_close(means[:, t], prefix.mean(1))
        torch.testing.assert_close(variances[:, t], prefix.var(1, unbiased=False))
    chunked = RunningStats.zeros(3, features)
    for lo, hi in [(0, 1), (1, 20), (20, 21), (21, 50)]:
        chunked, _, _ = chunked.update(x[:, lo:hi])
    for a, b in zip(chunked, stats, strict=True):
        torch.testing.assert_close(a, b)
    of = RunningStats.of([s.numpy() for s in x], features)
    for a, b in zip(of, stats, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("features", [1, 2])
def test_decayed_running_stats_weigh_the_past_by_its_age_in_any_chunking(features: int) -> None:
    """scale_halflife > 0: the value j steps back weighs decay**j, and chunking changes nothing."""
    decay = ForecasterConfig(scaling="running", scale_halflife=6.0).scale_decay
    assert decay == pytest.approx(0.5 ** (1 / 6))
    x = torch.randn(3, 60, features, dtype=torch.float64) * 1e3 + 1e5
    stats, means, variances = RunningStats.zeros(3, features).update(x, decay)
    for t in (0, 1, 17, 59):
        w = decay ** torch.arange(t, -1, -1, dtype=torch.float64).view(1, -1, 1)
        mean = (w * x[:, : t + 1]).sum(1) / w.sum(1)
        var = (w * (x[:, : t + 1] - mean.unsqueeze(1)) ** 2).sum(1) / w.sum(1)
        torch.testing.assert_close(means[:, t], mean)
        torch.testing.assert_close(variances[:, t], var)
    chunked, pieces = RunningStats.zeros(3, features), []
    for lo, hi in [(0, 1), (1, 20), (20, 21), (21, 60)]:
        chunked, m, _ = chunked.update(x[:, lo:hi], decay)
        pieces.append(m)
    assert torch.equal(torch.cat(pieces, 1), means)  # the same arithmetic, bit for bit
    of = RunningStats.of([s.numpy() for s in x], features, decay)
    for a, b in zip(of, stats, strict=True):
        torch.testing.assert_close(a, b)
    # A level shift: the decayed mean follows it, the cumulative one lags by half of it.
    shift = torch.cat([torch.zeros(1, 100, 1), torch.full((1, 100, 1), 1e3)], 1).double()
    _, followed, _ = RunningStats.zeros(1, 1).update(shift, decay)
    _, cumulative, _ = RunningStats.zeros(1, 1).update(shift)
    assert float(followed[0, -1, 0]) > 999.0 and float(cumulative[0, -1, 0]) == pytest.approx(500.0)


def running_model(features: int = 2, halflife: float = 0.0) -> RunningScaleForecaster:
    torch.manual_seed(0)
    names = tuple(f"f{i}" for i in range(features))
    config = ForecasterConfig(
        names, hidden_size=8, num_layers=2, scaling="running", scale_halflife=halflife
    )
    return RunningScaleForecaster(
        config, Normalisation((0.0,) * features, (1.0,) * features)
    ).eval()


@pytest.mark.parametrize("halflife", [0.0, 5.0])
def test_running_scale_streams_exactly_and_ignores_magnitude(halflife: float) -> None:
    model = running_model(halflife=halflife)
    x = torch.randn(2, 40, 2)
    with torch.no_grad():
        whole = model(x)
        state, means = None, []
        for lo, hi in [(0, 1), (1, 14), (14, 15), (15, 40)]:
            f = model(x[:, lo:hi], state)
            state = f.state
            means.append(f.mean)
        torch.testing.assert_close(torch.cat(means, 1), whole.mean, atol=1e-6, rtol=0)
        # The same series a thousand times larger and shifted: the same forecast, scaled back.
        big = model(x * 1000.0 + 5000.0)
    torch.testing.assert_close(
        big.mean[:, 1:], whole.mean[:, 1:] * 1000.0 + 5000.0, rtol=1e-4, atol=1e-2
    )
    torch.testing.assert_close(big.std[:, 1:], whole.std[:, 1:] * 1000.0, rtol=1e-4, atol=1e-3)


def test_target_clip_bounds_the_loss_of_a_series_switched_on() -> None:
    """A series near zero that jumps a thousandfold: unclipped, the few steps after the jump rule
    the running-scaled model's loss; clipped, each counts as at most target_clip scales away."""
    model = running_model(features=1, halflife=8.0)
    quiet = np.random.default_rng(0).normal(0.0, 1e-3, size=(1, 40, 1))
    on = np.concatenate([quiet, 5.0 + quiet], axis=1)[:, :64]
    windows = torch.from_numpy(on.astype(np.float32))
    before = [np.zeros((0, 1), dtype=np.float32)]
    with torch.no_grad():
        unclipped = float(running_scale_loss(model, windows, before, 0.5))
        clipped = float(running_scale_loss(model, windows, before, 0.5, target_clip=10.0))
        calm = float(
            running_scale_loss(model, torch.from_numpy(quiet.astype(np.float32)), before, 0.5)
        )
    assert unclipped > 100 * clipped
    assert clipped < 100 * max(calm, 1.0)


def test_a_running_scale_checkpoint_loads_for_serving_and_its_state_splits_and_joins(
    tmp_path: Path,
) -> None:
    """load_checkpoint serves it; a state split into (h, c) and the flat statistics a session
    keeps, and joined again, continues the series exactly."""
    model = running_model(halflife=4.0)
    save_checkpoint(model, tmp_path / "m", name="m")
    loaded = load_checkpoint(tmp_path / "m").model
    assert isinstance(loaded, RunningScaleForecaster)
    x = torch.randn(3, 9, 2)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).mean, model(x).mean, atol=0, rtol=0)
        first = loaded(x[:, :4])
        lstm, stats = loaded.split_state(first.state)
        assert stats is not None and stats.shape == (3, loaded.stats_width) == (3, 5)
        assert stats.dtype == torch.float64
        rest = loaded(x[:, 4:], loaded.join_state(lstm, stats.clone()))
        whole = loaded(x)
    assert torch.equal(torch.cat([first.mean, rest.mean], 1), whole.mean)
    assert small_model().stats_width == 0


def test_scale_free_report_scores_every_series_in_its_own_units() -> None:
    """Two series a million apart in magnitude count the same; persistence's MASE is 1."""
    model = small_model(features=1)
    t = np.arange(300, dtype=np.float32)
    wave = np.sin(2 * np.pi * t / 6).reshape(-1, 1)
    series = [wave * 1e-3, wave * 1e3 + 50.0, np.cos(t / 7).reshape(-1, 1).astype(np.float32)]
    report = scale_free_report(model, series, np.zeros(1), warmup=24, max_lag=12)
    assert report["series"] == 3 and report["series_skipped_constant"] == 0
    assert report["mase"]["persistence"] == {"q1": 1.0, "median": 1.0, "q3": 1.0}
    # the first two are one series scaled: the oracle's lag 6 repeats them exactly
    assert report["nmse"]["seasonal_lag_oracle"]["q1"] == pytest.approx(0.0, abs=1e-9)
    # the training mean 0 against a mean-50 series: nMSE 1 + 50^2 / var; the others about 1
    var = float(series[1][24:].var())
    assert report["nmse"]["training_mean"]["q3"] == pytest.approx(
        (1 + (1 + 2500 / var)) / 2, rel=1e-3
    )
    assert set(report["model_beats_on_series"]) == {
        "persistence",
        "training_mean",
        "seasonal_lag_oracle",
    }
    assert all(0 <= n <= 3 for n in report["model_beats_on_series"].values())
    constant = [np.ones((100, 1), np.float32)]
    with pytest.raises(ValueError, match="constant"):
        scale_free_report(model, constant, np.zeros(1), warmup=24, max_lag=12)


def test_calibration_report_counts_the_origins_it_scores() -> None:
    model = small_model(features=1)
    series = [np.random.default_rng(0).normal(size=(120, 1)).astype(np.float32)]
    report = calibration_report(model, series, 24, horizons=(1, 4), paths=50, stride=13)
    # origins 24, 37, ... while origin + 4 <= 120: 24..115 -> 8 origins
    assert report["origins"] == len(range(24, 117, 13)) and report["series"] == 1
    for h in ("1", "4"):
        assert set(report["coverage"][h]) == {"sampled_2std", "sampled_q10_q90", "rollout_2std"}
        assert all(0.0 <= v <= 1.0 for v in report["coverage"][h].values())
    # horizon 1 is the one-step Gaussian for both: sampled and rolled-forward agree there
    c1 = report["coverage"]["1"]
    assert c1["sampled_2std"] == c1["rollout_2std"]


def random_walks(features: int, n: int = 6, length: int = 200) -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    return [
        np.cumsum(rng.standard_t(3, size=(length, features)), axis=0).astype(np.float32)
        for _ in range(n)
    ]


def two_std_coverage(model: LSTMForecaster, series: list[np.ndarray], warmup: int) -> np.ndarray:
    inside = []
    with torch.no_grad():
        for s in series:
            f = model(torch.from_numpy(s).unsqueeze(0))
            mean, std = f.mean[0].numpy(), f.std[0].numpy()
            inside.append(np.abs(s[warmup:] - mean[warmup - 1 : -1]) <= 2 * std[warmup - 1 : -1])
    return np.concatenate(inside).mean(axis=0)


def test_the_std_is_calibrated_so_two_std_covers_a_gaussians_mass_per_feature() -> None:
    model, warmup = small_model(features=2), 24
    series = random_walks(2)
    before = two_std_coverage(model, series, warmup)
    x = torch.from_numpy(series[0]).unsqueeze(0)
    with torch.no_grad():
        std_before = model(x).std
    result = calibrate_std(model, series, warmup)
    steps = sum(len(s) - warmup for s in series)
    after = two_std_coverage(model, series, warmup)
    assert np.abs(before - TWO_STD_MASS).max() > 0.05  # an untrained model is far off
    assert np.abs(after - TWO_STD_MASS).max() <= 2 / steps  # a quantile: within a step or two
    factor = torch.tensor(result["std_scale"])
    assert torch.equal(model.std_scale, factor) and (factor != 1).all()
    with torch.no_grad():  # every std the model gives is scaled, the means untouched
        torch.testing.assert_close(model(x).std, std_before * factor, rtol=1e-6, atol=0)
    calibrate_std(model, series, warmup)  # fitted again: already calibrated, it stays so
    torch.testing.assert_close(model.std_scale, factor, rtol=1e-3, atol=0)


def without_the_factor(
    directory: Path, card_format: str | None, keys: tuple[str, ...] = (UNCALIBRATED_KEY,)
) -> str:
    """Rewrite a checkpoint's weights without ``keys`` (std_scale) and rehash its card (its format
    set too, unless None); returns the new weights' SHA-256. A /1 one lacks the forecast's
    calibration as well."""
    from safetensors.torch import load_file, save_file

    if card_format == "lstm-forecaster/1":
        keys = (*keys, *HORIZON_KEYS)
    weights = load_file(str(directory / "model.safetensors"))
    for key in keys:
        del weights[key]
    save_file(weights, str(directory / "model.safetensors"))
    card = json.loads((directory / "card.json").read_text())
    digest = hashlib.sha256((directory / "model.safetensors").read_bytes()).hexdigest()
    card.update(weights_sha256=digest, version=digest[:12])
    if card_format is not None:
        card["format"] = card_format
    (directory / "card.json").write_text(json.dumps(card))
    return digest


def test_the_calibration_is_in_the_weights_and_a_checkpoint_without_it_loads_uncalibrated(
    tmp_path: Path,
) -> None:
    model = small_model()
    plain = save_checkpoint(model, tmp_path / "plain", name="tiny")
    calibrate_std(model, random_walks(2), 24)
    calibrated = save_checkpoint(model, tmp_path / "calibrated", name="tiny")
    assert calibrated.version != plain.version  # other answers, another version
    loaded = load_checkpoint(tmp_path / "calibrated").model
    assert torch.equal(loaded.std_scale, model.std_scale)
    # A checkpoint written before the calibration existed: no std_scale in its weights.
    old = tmp_path / "old"
    shutil.copytree(tmp_path / "plain", old)
    digest = without_the_factor(old, card_format="lstm-forecaster/1")
    ckpt = load_checkpoint(old)
    assert ckpt.version == digest[:12] and torch.equal(ckpt.model.std_scale, torch.ones(2))
    x = torch.randn(1, 5, 2)
    with torch.no_grad():
        assert torch.equal(ckpt.model(x).std, load_checkpoint(tmp_path / "plain").model(x).std)


def test_the_calibration_table_runs_by_horizon_whatever_order_the_card_keeps() -> None:
    metrics = load_checkpoint(SHIPPED).card["metrics"]
    coverage = metrics["calibration"]["coverage"]
    shuffled = {h: coverage[h] for h in sorted(coverage)}  # "1", "16", "4": JSON's sorted keys
    table = format_tables(metrics["scale_free"], {**metrics["calibration"], "coverage": shuffled})
    rows = [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ")]
    horizons = [int(r) for r in rows if r.isdigit()]
    assert horizons == sorted(horizons) == sorted(int(h) for h in coverage)


def test_the_running_scaled_model_calibrates_its_std_too() -> None:
    model = running_model()
    x = torch.randn(2, 40, 2)
    with torch.no_grad():
        before = model(x)
        model.std_scale.copy_(torch.tensor([0.5, 2.0]))
        after = model(x)
    torch.testing.assert_close(after.mean, before.mean, rtol=0, atol=0)
    torch.testing.assert_close(after.std, before.std * torch.tensor([0.5, 2.0]), rtol=1e-6, atol=0)


@pytest.mark.parametrize("factor", [0.0, -1.0, float("nan"), float("inf")])
def test_a_checkpoint_whose_std_factor_is_not_positive_is_refused(
    tmp_path: Path, factor: float
) -> None:
    model = small_model()
    model.std_scale.fill_(factor)
    save_checkpoint(model, tmp_path, name="tiny")
    with pytest.raises(CheckpointError, match="std_scale"):
        load_checkpoint(tmp_path)


def test_a_calibrated_checkpoint_lacking_its_factor_is_refused(tmp_path: Path) -> None:
    """Only a /1 checkpoint (written before the factor existed) may lack it."""
    save_checkpoint(small_model(), tmp_path, name="tiny")
    without_the_factor(tmp_path, card_format=None)
    with pytest.raises(CheckpointError, match="std_scale"):
        load_checkpoint(tmp_path)


def test_calibrating_on_nothing_says_so() -> None:
    from model.evaluate import NothingToCalibrate

    with pytest.raises(NothingToCalibrate, match="warmup"):
        calibrate_std(small_model(), [np.zeros((10, 2), np.float32)], warmup=24)
    with pytest.raises(ValueError, match="warmup must be"):
        calibrate_std(small_model(), random_walks(2), warmup=0)


def test_a_checkpoints_files_are_readable_as_any_file_written_here(tmp_path: Path) -> None:
    """safetensors wrote the weights 0600: an image built by make image (a non-root user) could
    not read a model trained here (found when the retrained shipped model broke make image)."""
    save_checkpoint(small_model(), tmp_path, name="tiny")
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes["model.safetensors"] == modes["card.json"], modes


def forecast_of(
    model: LSTMForecaster, x: torch.Tensor, horizon: int, paths: int, seed: int
) -> tuple[Forecast, SampledForecast]:
    with torch.no_grad():
        f = model(x)
        return f, model.sample_forecast(
            f.mean[:, -1], f.std[:, -1], f.state, horizon, paths=paths, seed=seed
        )


def test_a_forecast_reports_its_paths_through_the_calibration_of_each_step() -> None:
    """The std is the paths' spread times the step's factor; each quantile is the paths read at
    the step's level (step 1: the Gaussian's); steps past CALIBRATED_HORIZONS take the last."""
    model = small_model()
    horizon = CALIBRATED_HORIZONS + 3
    steps = torch.arange(1, CALIBRATED_HORIZONS + 1, dtype=torch.float32)
    factor = (1 + steps / 10).view(-1, 1).repeat(1, 2)  # (H, F), a different factor per step
    levels = torch.tensor([[0.2, 0.45, 0.85], [0.05, 0.5, 0.7]]).T  # (Q, F): per feature
    levels = levels.expand(CALIBRATED_HORIZONS, -1, -1).clone()
    levels[-1] = torch.tensor([[0.3, 0.3], [0.6, 0.5], [0.7, 0.95]])  # the last step's own
    x = torch.randn(1, 5, 2)
    f, plain = forecast_of(model, x, horizon, paths=64, seed=3)
    model.horizon_std_factor.copy_(factor)
    model.horizon_levels.copy_(levels)
    _, calibrated = forecast_of(model, x, horizon, paths=64, seed=3)
    draws = list(
        draw_paths(
            model.path_step,
            f.mean[:, -1],
            f.std[:, -1],
            model.widen(f.state, 64),
            horizon,
            paths=64,
            seed=3,
        )
    )  # steps 2..horizon, (1, 64, F) each
    torch.testing.assert_close(calibrated.mean, plain.mean, rtol=0, atol=0)  # means untouched
    # step 1: the Gaussian, its std times step 1's factor (1.1 here; the fit keeps it at 1)
    gaussian = torch.distributions.Normal(f.mean[0, -1], f.std[0, -1] * factor[0])
    torch.testing.assert_close(calibrated.std[0, 0], f.std[0, -1] * factor[0])
    torch.testing.assert_close(calibrated.quantiles[:, 0, 0], gaussian.icdf(levels[0]))
    for k in (2, 7, CALIBRATED_HORIZONS, horizon):
        row = min(k, CALIBRATED_HORIZONS) - 1
        drawn = draws[k - 2][0]  # (64, F)
        torch.testing.assert_close(calibrated.std[0, k - 1], drawn.std(0) * factor[row])
        torch.testing.assert_close(plain.std[0, k - 1], drawn.std(0))
        for feature in (0, 1):
            torch.testing.assert_close(
                calibrated.quantiles[:, 0, k - 1, feature],
                torch.quantile(drawn[:, feature], levels[row, :, feature]),
            )


def test_calibrating_the_horizons_brings_each_step_to_its_aim_on_the_series_it_saw() -> None:
    """On the series fitted (same origins, same paths), mean ± 2 std covers a Gaussian's 95.45%
    at every step and the 10-90% quantiles 80%, though the model, untrained, was far off;
    step 1 keeps the one-step std (calibrated first, as training does)."""
    model, warmup = small_model(), 24
    series = random_walks(2, n=4, length=warmup + CALIBRATED_HORIZONS + 13 * 40)
    calibrate_std(model, series, warmup)
    horizons = (1, 2, 5, CALIBRATED_HORIZONS)  # the longest: the fit's own origins
    before = calibration_report(model, series, warmup, horizons=horizons, paths=50)
    result = calibrate_horizons(model, series, warmup, paths=50)
    after = calibration_report(model, series, warmup, horizons=horizons, paths=50)
    origins = after["origins"]
    assert origins == before["origins"] >= 4 * 40
    assert result["horizons"] == CALIBRATED_HORIZONS
    assert torch.equal(model.horizon_std_factor[0], torch.ones(2))
    assert torch.equal(model.horizon_std_factor, torch.tensor(result["std_factor"]))
    was = before["coverage"]
    assert max(abs(was[h]["sampled_2std"] - TWO_STD_MASS) for h in ("2", "5", "32")) > 0.02
    assert max(abs(c["sampled_q10_q90"] - 0.8) for c in was.values()) > 0.05
    for h in map(str, horizons):
        if h != "1":  # step 1: calibrate_std's business, not this one's
            assert after["coverage"][h]["sampled_2std"] == pytest.approx(TWO_STD_MASS, abs=0.01)
        assert after["coverage"][h]["sampled_q10_q90"] == pytest.approx(0.8, abs=0.03)
        assert after["coverage"][h]["rollout_2std"] == before["coverage"][h]["rollout_2std"]
    levels = model.horizon_levels
    assert ((levels > 0) & (levels < 1)).all() and (levels.diff(dim=1) >= 0).all()


def test_a_checkpoint_keeps_the_forecasts_calibration_and_one_without_it_loads_as_drawn(
    tmp_path: Path,
) -> None:
    model, warmup = small_model(), 24
    series = random_walks(2, n=2, length=warmup + CALIBRATED_HORIZONS + 13 * 50)
    plain = save_checkpoint(model, tmp_path / "plain", name="tiny")
    calibrate_horizons(model, series, warmup, paths=20)
    calibrated = save_checkpoint(model, tmp_path / "calibrated", name="tiny")
    assert calibrated.version != plain.version  # other answers, another version
    loaded = load_checkpoint(tmp_path / "calibrated").model
    for key in HORIZON_KEYS:
        assert torch.equal(getattr(loaded, key), getattr(model, key))
    # A /2 checkpoint, written before the forecast's calibration existed.
    old = tmp_path / "old"
    shutil.copytree(tmp_path / "plain", old)
    digest = without_the_factor(old, card_format="lstm-forecaster/2", keys=HORIZON_KEYS)
    ckpt = load_checkpoint(old)
    identity = HorizonCalibration.identity(2)
    assert ckpt.version == digest[:12]
    assert torch.equal(ckpt.model.horizon_std_factor, identity.std_factor)
    assert torch.equal(ckpt.model.horizon_levels, identity.levels)
    # A /3 one that lacks it is refused, and so is a /2 one that holds it.
    shutil.copytree(tmp_path / "calibrated", tmp_path / "broken")
    without_the_factor(tmp_path / "broken", card_format=None, keys=HORIZON_KEYS[1:])
    with pytest.raises(CheckpointError, match=r"/3 checkpoint holds .*: no horizon_levels"):
        load_checkpoint(tmp_path / "broken")
    shutil.copytree(tmp_path / "calibrated", tmp_path / "mislabelled")
    without_the_factor(tmp_path / "mislabelled", card_format="lstm-forecaster/2", keys=())
    with pytest.raises(CheckpointError, match="/2 checkpoint holds no forecast calibration"):
        load_checkpoint(tmp_path / "mislabelled")


@pytest.mark.parametrize(
    ("key", "index", "value"),
    [
        ("horizon_std_factor", (5, 1), 0.0),
        ("horizon_std_factor", (5, 1), float("nan")),
        ("horizon_levels", (5, 0, 1), 0.0),  # the 10% level at 0, the others in order
        ("horizon_levels", (5, 2, 1), 1.0),  # the 90% level at 1
        ("horizon_levels", (5, 1, 1), 0.05),  # the 50% level below the 10% one
    ],
)
def test_a_checkpoint_whose_forecast_calibration_cannot_apply_is_refused(
    tmp_path: Path, key: str, index: tuple[int, ...], value: float
) -> None:
    model = small_model()
    getattr(model, key)[index] = value
    save_checkpoint(model, tmp_path, name="tiny")
    with pytest.raises(CheckpointError, match=key):
        load_checkpoint(tmp_path)


def test_level_of_is_where_torch_quantile_reads_a_value() -> None:
    """value >= quantile(draws, l) exactly when l <= level_of(draws, value): its inverse, ties and
    values outside the draws included."""
    from model.forecaster import level_of

    draws = torch.randn(4, 50, 2, dtype=torch.float64)
    for level in (0.0, 0.03, 0.1, 0.5, 0.77, 1.0):
        q = torch.quantile(draws, level, dim=1)  # (4, 2)
        assert torch.allclose(level_of(draws, q), torch.full_like(q, level), atol=1e-9)
        assert (level_of(draws, q + 1e-9) >= level).all()
    draws[0, :5, 0] = 0.25  # tied draws: a value equal to them is read at the last of them
    below, above = draws.amin(dim=1) - 1, draws.amax(dim=1) + 1
    assert (level_of(draws, below) == 0).all() and (level_of(draws, above) == 1).all()
    assert (level_of(draws, torch.full((4, 2), 0.25))[0, 0]).item() == pytest.approx(
        float((draws[0, :, 0] < 0.25).sum() + 4) / 49
    )  # among ties: the last of them


def test_quantiles_at_levels_per_feature_are_torch_quantiles() -> None:
    from model.forecaster import quantiles_at

    draws = torch.randn(5, 200, 3)
    levels = torch.tensor([[0.0, 0.1, 0.2], [0.5, 0.55, 0.6], [0.9, 0.97, 1.0]])
    expected = torch.stack(
        [torch.quantile(draws[:, :, f], levels[:, f], dim=1) for f in range(3)], dim=-1
    )
    torch.testing.assert_close(quantiles_at(draws, levels), expected)


def test_the_shipped_models_forecast_calibration_is_its_cards() -> None:
    ckpt = load_checkpoint(SHIPPED)
    fitted = ckpt.card["training"]["horizon_calibration"]
    assert ckpt.model.horizon_std_factor.tolist() == fitted["std_factor"]
    for i, q in enumerate(QUANTILES):
        assert ckpt.model.horizon_levels[:, i].tolist() == fitted["levels"][str(q)]
    assert (ckpt.model.horizon_std_factor[1:] != 1).any()  # fitted, not the identity


def test_the_running_scaled_model_calibrates_its_forecast_too() -> None:
    """Its paths carry their own running statistics (its widen and path_step); the fit and the
    forecast go through the same calibration."""
    model, warmup = running_model(), 24
    series = random_walks(2, n=2, length=warmup + CALIBRATED_HORIZONS + 13 * 50)
    x = torch.from_numpy(series[0][:30]).unsqueeze(0)
    with torch.no_grad():
        f = model(x)
        before = model.sample_forecast(f.mean[:, -1], f.std[:, -1], f.state, 6, paths=40, seed=1)
    calibrate_horizons(model, series, warmup, paths=40)
    with torch.no_grad():
        after = model.sample_forecast(f.mean[:, -1], f.std[:, -1], f.state, 6, paths=40, seed=1)
    factor = model.horizon_std_factor[:6]
    assert (factor[1:] != 1).all()
    torch.testing.assert_close(after.mean, before.mean, rtol=0, atol=0)
    torch.testing.assert_close(after.std, before.std * factor, rtol=1e-5, atol=0)
    assert not torch.equal(after.quantiles[:, :, 1:], before.quantiles[:, :, 1:])  # the levels
