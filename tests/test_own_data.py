"""A user's own data, as the README says it: train on a CSV, import, serve, stream.

Unit tests of training's refusals (short series, an existing --out), the time split of a single
series, the thread count and --help; then, in the slow tier, the one model store every entry
point shares and the README's own-data commands run as written in a copy of the checkout.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from model import load_checkpoint
from model.data import SeriesSet
from tests.servers import free_port, server_env

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "models" / "acsf1-forecaster"

# Options that make a training run take seconds; warmup 24 so 200-step series are long enough.
TINY_SIZE = ["--hidden-size", "8", "--num-layers", "1", "--max-epochs", "1"]
TINY_SIZE += ["--steps-per-epoch", "2", "--window", "16", "--no-progress"]
TINY = [*TINY_SIZE, "--warmup", "24", "--max-lag", "24"]


def write_meters(path: Path, *, series: int, length: int, seed: int = 0) -> Path:
    """Hourly meters with a daily cycle, in the README's long format."""
    rng = np.random.default_rng(seed)
    lines = ["series_id,time,kwh"]
    for i in range(series):
        phase = rng.uniform(0, 2 * np.pi)
        for t in range(length):
            kwh = 1.0 + 0.5 * math.sin(2 * math.pi * t / 24 + phase) + rng.normal(0, 0.05)
            day, hour = divmod(t, 24)
            lines.append(f"meter-{i:02d},2026-01-{1 + day:02d}T{hour:02d}:00:00,{kwh:.4f}")
    path.write_text("\n".join(lines) + "\n")
    return path


def train(args: list[str]) -> int:
    from model.train import main

    return main(args)


# --- refusals: nothing is written --------------------------------------------------------


def test_series_shorter_than_training_needs_are_refused_and_nothing_is_saved(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    csv = write_meters(tmp_path / "short.csv", series=6, length=50)
    out = tmp_path / "out"
    # the default --warmup (96) leaves nothing to score in a 50-step series
    code = train(["--csv", str(csv), "--out", str(out), *TINY_SIZE])
    err = capsys.readouterr().err
    assert code == 2
    assert "97 timesteps" in err and "has 50" in err and "--warmup" in err
    assert "Traceback" not in err
    assert not out.exists()


def test_a_single_series_too_short_to_split_in_time_names_the_length(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from model.data import time_split_min_length

    csv = write_meters(tmp_path / "one.csv", series=1, length=100)
    out = tmp_path / "out"
    assert train(["--csv", str(csv), "--out", str(out), *TINY]) == 2
    err = capsys.readouterr().err
    assert f"at least {time_split_min_length(25, 0.15, 0.15)}" in err and "by time" in err
    assert not out.exists()


def test_a_run_never_overwrites_a_checkpoint_without_force(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "acsf1-forecaster"
    shutil.copytree(SHIPPED, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    csv = write_meters(tmp_path / "m.csv", series=4, length=200)
    assert train(["--csv", str(csv), "--out", str(out), *TINY]) == 2
    assert "--force" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert train(["--csv", str(csv), "--out", str(out), "--force", *TINY]) in (0, 1)
    assert load_checkpoint(out).card["name"] == "m"


def test_the_default_out_is_under_runs_named_after_the_csv(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    csv = write_meters(tmp_path / "My Meters.csv", series=4, length=200)
    assert train(["--csv", str(csv), *TINY]) in (0, 1)
    card = load_checkpoint(tmp_path / "runs" / "my-meters").card
    assert card["name"] == "my-meters"
    assert not (tmp_path / "models").exists()


def test_make_train_still_replaces_the_shipped_model() -> None:
    # --no-print-directory: under `make test` this make is a sub-make, which would announce
    # the directories it enters and leaves around the recipe
    done = subprocess.run(
        ["make", "--no-print-directory", "-n", "train"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    [recipe] = [line for line in done.stdout.splitlines() if "model.train" in line]
    assert "-m model.train" in recipe
    assert "--out models/acsf1-forecaster" in recipe and "--name acsf1-forecaster" in recipe
    assert "--force" in recipe and "--threads 1" in recipe


# --- the time split ----------------------------------------------------------------------


def test_split_by_time_cuts_each_series_in_order() -> None:
    from model.data import split_by_time, split_series

    values = np.arange(700, dtype=np.float32)[:, None]
    data = SeriesSet("one", ("v",), [values], ["meter"], [""])
    train_set, val, test, ranges = split_by_time(data, min_part=97)
    assert ranges == {"meter": {"train": [0, 490], "validation": [490, 595], "test": [595, 700]}}
    np.testing.assert_array_equal(
        np.concatenate([train_set.series[0], val.series[0], test.series[0]]), values
    )
    split = split_series(data)  # one series: too few to split by series
    assert split.by == "time" and split.description["ranges"] == ranges
    assert "too few" in split.description["why"]


def test_a_single_long_series_trains_split_by_time_and_the_card_says_so(
    tmp_path: Path,
) -> None:
    csv = write_meters(tmp_path / "sensor.csv", series=1, length=400)
    out = tmp_path / "out"
    assert train(["--csv", str(csv), "--out", str(out), *TINY]) in (0, 1)
    card = json.loads((out / "card.json").read_text())
    split = card["data"]["split"]
    assert split["by"] == "time" and card["metrics"]["split"] == "time"
    assert split["ranges"] == {
        "meter-00": {"train": [0, 280], "validation": [280, 340], "test": [340, 400]}
    }
    assert card["data"]["series"] == {"train": 1, "validation": 1, "test": 1}
    assert all(math.isfinite(v) for v in card["metrics"]["one_step_mse"].values())


def test_a_split_by_series_asked_of_one_series_says_what_to_do(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    csv = write_meters(tmp_path / "one.csv", series=1, length=400)
    assert train(["--csv", str(csv), "--out", str(tmp_path / "o"), "--split", "series", *TINY]) == 2
    assert "--split time" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_enough_series_are_still_split_by_series(tmp_path: Path) -> None:
    csv = write_meters(tmp_path / "m.csv", series=6, length=200)
    out = tmp_path / "out"
    assert train(["--csv", str(csv), "--out", str(out), *TINY]) in (0, 1)
    card = load_checkpoint(out).card
    assert card["data"]["split"]["by"] == "series" and card["metrics"]["split"] == "series"
    held_out = set(card["data"]["test_ids"]) | set(card["data"]["validation_ids"])
    assert len(held_out) == 2 and card["data"]["series"]["train"] == 4


# --- threads -----------------------------------------------------------------------------


@pytest.mark.parametrize(("asked", "expected"), [([], 1), (["--threads", "2"], 2)])
def test_training_picks_its_thread_count_whatever_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, asked: list[str], expected: int
) -> None:
    import model.train

    seen: list[int] = []
    fit = model.train.fit

    def spy(*args: object, **kwargs: object) -> object:
        seen.append(torch.get_num_threads())
        return fit(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(model.train, "fit", spy)
    before = torch.get_num_threads()
    torch.set_num_threads(3)  # what OMP_NUM_THREADS unset gives on a 3-core machine
    try:
        csv = write_meters(tmp_path / "m.csv", series=4, length=200)
        out = tmp_path / "out"
        assert train(["--csv", str(csv), "--out", str(out), *TINY, *asked]) in (0, 1)
        assert seen == [expected]
        assert load_checkpoint(out).card["training"]["threads"] == expected
        assert torch.get_num_threads() == 3  # the caller's setting is given back
    finally:
        torch.set_num_threads(before)


# --- --help ------------------------------------------------------------------------------


def help_text(
    capsys: pytest.CaptureFixture[str], run: Callable[[list[str]], int], argv: list[str]
) -> str:
    with pytest.raises(SystemExit) as exited:
        run(argv)
    assert exited.value.code == 0
    return " ".join(capsys.readouterr().out.split())


def test_training_help_documents_every_option_and_its_default(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from client.cli import main as cli_main
    from model.train import main as train_main
    from model.train import parser as train_parser

    for text in (
        help_text(capsys, train_main, ["--help"]),
        help_text(capsys, cli_main, ["train", "--help"]),
    ):
        actions = [a for a in train_parser()._actions if "--help" not in a.option_strings]
        listed = text.split(" options: ", 1)[1]  # past the usage line
        # each option's own help runs from its name to the next option's (they are in order)
        starts = [listed.index(f" {a.option_strings[-1]} ") for a in actions]
        assert starts == sorted(starts)
        for action, lo, hi in zip(actions, starts, [*starts[1:], len(listed)], strict=True):
            option, own = action.option_strings[-1], listed[lo:hi]
            assert action.help and action.help.split()[0] in own, option
            if action.default is None:
                assert "unset" in own, f"{option} says nothing of its default"
            elif action.default is False:
                assert "(default: off)" in own, option
            else:
                assert f"(default: {action.default})" in own, option


# --- one model store ---------------------------------------------------------------------


def test_the_store_is_the_checkouts_unless_bentoml_home_is_set(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from service.model_registry import default_store

    monkeypatch.delenv("BENTOML_HOME")
    assert default_store() == ROOT / "bentoml_home"
    monkeypatch.setenv("BENTOML_HOME", str(tmp_path / "elsewhere"))
    assert default_store() == tmp_path / "elsewhere"


def checkout_copy(where: Path, csv_rows: tuple[int, int] | None = None) -> Path:
    """A checkout of this code elsewhere (its own default store), sharing this one's venv."""
    ignore = shutil.ignore_patterns("__pycache__")
    for part in ("model", "service", "client", "models"):
        shutil.copytree(ROOT / part, where / part, ignore=ignore)
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy2(ROOT / name, where / name)
    os.utime(where / "pyproject.toml", (0, 0))  # older than the venv's stamp: make installs nothing
    (where / ".venv").symlink_to(ROOT / ".venv")
    (where / "examples").mkdir()
    if csv_rows:
        write_meters(where / "examples" / "meters.csv", series=csv_rows[0], length=csv_rows[1])
    return where


def user_env(tmp_path: Path) -> dict[str, str]:
    """A user's environment: no BENTOML_HOME, and a HOME of the test's (should ~/bentoml be
    used by mistake, it is not the real one)."""
    env = server_env({"HOME": str(tmp_path / "home")})
    env.pop("BENTOML_HOME", None)
    return env


@pytest.mark.slow
def test_every_entry_point_uses_the_one_store_and_names_it(tmp_path: Path) -> None:
    from model import ForecasterConfig, LSTMForecaster, save_checkpoint

    co = checkout_copy(tmp_path / "checkout")
    store = co / "bentoml_home"
    torch.manual_seed(0)
    model = LSTMForecaster(ForecasterConfig(("a",), hidden_size=4, num_layers=1))
    ckpt = save_checkpoint(model, tmp_path / "ckpt", name="tiny-store")
    env = user_env(tmp_path)
    py = str(ROOT / ".venv" / "bin" / "python")

    done = subprocess.run(
        [py, "-m", "service.model_registry", "import", str(tmp_path / "ckpt")],
        cwd=co,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"tiny-store:{ckpt.version}"
    assert str(store) in done.stderr
    assert (store / "models" / "tiny-store" / ckpt.version / "card.json").is_file()
    assert not (tmp_path / "home" / "bentoml").exists()

    where = subprocess.run(
        [py, "-m", "service.model_registry", "store"],
        cwd=co,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert where.stdout.strip() == str(store)

    # bentoml serve, as lstm-serve starts it: a tag the store lacks is refused naming the store
    bentoml = str(ROOT / ".venv" / "bin" / "bentoml")
    refused = subprocess.run(
        [bentoml, "serve", "service.service:LSTMSessions", "--port", str(free_port())],
        cwd=co,
        env={**env, "LSTM_MODEL_TAG": "tiny-store:000000000000"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert f"no model 'tiny-store:000000000000' in the model store {store}" in (
        refused.stdout + refused.stderr
    )


# --- the README's own-data section, as written --------------------------------------------


def readme_own_data_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- own-data -->\s*```sh\n(.*?)```", readme, re.DOTALL)
    assert block, "README lost its own-data block"
    return [line.split("  #")[0].strip() for line in block.group(1).splitlines() if line.strip()]


@contextlib.contextmanager
def started(command: str, cwd: Path, env: dict[str, str], log: Path) -> Iterator[None]:
    """A shell command that starts a server; stopped with every process it started."""
    import psutil

    with log.open("wb") as out:
        proc = subprocess.Popen(
            command,
            shell=True,
            cwd=cwd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        seen: set[psutil.Process] = set()
        try:
            yield
        finally:
            with contextlib.suppress(psutil.NoSuchProcess):
                seen.update(psutil.Process(proc.pid).children(recursive=True))
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)  # make, the CLI and the arbiter
            _, alive = psutil.wait_procs([*seen], timeout=15)
            for p in alive:  # BentoML's workers run in sessions of their own
                with contextlib.suppress(psutil.NoSuchProcess):
                    p.kill()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)


@pytest.mark.slow
def test_readme_own_data_section_works_as_written(tmp_path: Path) -> None:
    if shutil.which("make") is None:
        if os.environ.get("CI"):
            pytest.fail("make is missing under CI: .ci/run must install it")
        pytest.skip("make is not installed")
    train_cmd, import_cmd, serve_cmd = readme_own_data_commands()
    assert train_cmd.startswith(".venv/bin/python -m model.train --csv examples/meters.csv")
    assert import_cmd.startswith(".venv/bin/python -m service.model_registry import ")
    assert serve_cmd.endswith("make serve")
    # A fresh checkout of this code, with its own examples/meters.csv (small) and no store yet.
    co = checkout_copy(tmp_path / "checkout", csv_rows=(4, 200))
    env = user_env(tmp_path)

    def run(command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            command, shell=True, cwd=co, env=env, capture_output=True, text=True, timeout=300
        )

    trained = run(f"{train_cmd} {' '.join(TINY)}")  # only the size options added
    assert trained.returncode in (0, 1), trained.stderr  # 1: a tiny run need not beat baselines
    saved = re.search(r"saved (meters):([0-9a-f]{12}) to (\S+)", trained.stdout)
    assert saved, trained.stdout
    version = saved.group(2)

    imported = run(import_cmd)
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.strip() == f"meters:{version}"
    assert str(co / "bentoml_home") in imported.stderr

    port = free_port()
    log = tmp_path / "serve.log"
    with started(f"{serve_cmd} PORT={port}", co, env, log):  # the port, so tests never collide
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.3)
        card = httpx.post(f"{url}/v1/model", json={}, timeout=10).json()
        assert (card["name"], card["version"], card["features"]) == ("meters", version, ["kwh"])
        assert card["metrics"]["split"] == "series"

        from client import LSTMClient

        with LSTMClient(url) as api, api.session() as session:
            outputs = list(session.stream([[[1.0], [1.2]], [[0.9]], [[1.1], [1.3], [1.0]]]))
        assert len(outputs) == 6
        assert all(math.isfinite(o["mean"][0]) and o["std"][0] > 0 for o in outputs)
    assert not (tmp_path / "home" / "bentoml").exists()
