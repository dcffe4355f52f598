"""Shared set-up. Every test run gets its own BentoML home and Prometheus directory, never the
user's: both are read once, when bentoml and prometheus_client are first imported."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
os.environ["BENTOML_HOME"] = tempfile.mkdtemp(prefix="bentoml-home-")
os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="prom-")
# In-process services must not snapshot into the checkout.
os.environ["LSTM_SNAPSHOT_PATH"] = os.path.join(tempfile.mkdtemp(prefix="snap-"), "s.snapshot")

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "models" / "acsf1-forecaster"


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    from tests.servers import REPORT

    lines = config.stash.get(REPORT, [])
    if lines:
        terminalreporter.section("reported by the tests")
        for line in lines:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def held_out_series() -> list[np.ndarray]:
    """The shipped model's held-out ACSF1 test appliances, (1460, 1) each."""
    pytest.importorskip("sktime")
    from model import load_checkpoint
    from model.data import load_acsf1

    card = load_checkpoint(SHIPPED).card
    data = load_acsf1()
    wanted = set(card["data"]["test_ids"])
    return [s for sid, s in zip(data.ids, data.series, strict=True) if sid in wanted]


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[Any]:
    """A real redis-server of the test's own (skipped locally without one, failing under CI)."""
    from tests.servers import RedisServer

    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def asgi_client() -> Iterator[Any]:
    """One in-process app for the whole run: BentoML registers its metrics once per process."""
    from starlette.testclient import TestClient

    from service.service import LSTMSessions

    with TestClient(LSTMSessions.to_asgi()) as client:
        yield client
