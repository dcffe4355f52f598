"""The session engine on a GPU, in process: the shipped model, its pool and rounds on CUDA, the
stack through the graphed engine (model/graphed.py), as a server on a GPU runs them.

No server: the device machine these run on has no BentoML. What they hold is what the CPU tiers
hold (tests/test_engine.py, test_running_scaled.py): chunks equal the whole, a retry is answered
once, step_many equals its steps, a blob exported on the GPU continues on the CPU.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import torch

from model import load_checkpoint
from model.graphed import GraphedLSTM
from model.native import StackEngine, build_engine
from service.backends import EmbeddedBackend
from service.batcher import MicroBatcher
from service.engine import Engine, EngineLimits
from service.schemas import Step
from service.sessions import SessionStore, StatePool, StoreLimits
from tests.conftest import SHIPPED

# Each test runs on the CPU too (the native engine there, and the graphed one with its programs
# run uncaptured: the round's GraphedSteps), so its own logic is checked where no GPU is; the
# cuda case is the one that matters.
DEVICES = [
    "cpu",
    "cpu-graphed",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
        ],
    ),
]

VALUES = [float(v) for v in torch.linspace(0, 6, 40).sin() * 3 + 100]


def engine_on(where: str, graphed: bool = True) -> Engine:
    device, _, kind = where.partition("-")
    checkpoint = load_checkpoint(SHIPPED, device=device)
    model, config = checkpoint.model.eval(), checkpoint.model.config
    pool = StatePool.for_model(model, 64, device, window=16)
    store = SessionStore(pool, StoreLimits(64, 600, 600, evict_when_full=False, tombstones=10))
    backend = EmbeddedBackend(store)
    stack_engine: StackEngine = model.lstm
    if kind == "graphed":
        stack_engine = GraphedLSTM(model.lstm, max_batch=64, capture=False, fuse=False)
    elif graphed:
        stack_engine = build_engine("auto", model.lstm, max_batch=64)
    if device == "cuda" and graphed:
        assert isinstance(stack_engine, GraphedLSTM) and stack_engine.capture
    batcher = MicroBatcher(model, pool, max_batch=64, stack_engine=stack_engine)
    if graphed and (device == "cuda" or kind == "graphed"):  # the rounds' captured steps
        steps = batcher.runner.graphed
        assert steps is not None and steps.programs
        assert all((p.graph is not None) == (device == "cuda") for p in steps.programs.values())
    return Engine(
        backend,
        batcher,
        model=(checkpoint.name, checkpoint.version),
        n_features=config.n_features,
        limits=EngineLimits(max_chunk=64, max_predict_len=256, max_many=64, max_horizon=16),
    )


def step(sid: str, rows: list[float], seq: int | None = None) -> Step:
    return Step(session_id=sid, inputs=[[v] for v in rows], seq=seq)


def means(reply: dict[str, Any]) -> list[float]:
    return [o["mean"][0] for o in reply["outputs"]]


@pytest.mark.parametrize("device", DEVICES)
def test_chunks_equal_the_whole_and_a_retry_is_answered_once(device: str) -> None:
    async def scenario() -> None:
        engine = engine_on(device)
        sid = (await engine.create(None, None)).session_id
        whole = await engine.predict([[v] for v in VALUES], False)
        got: list[float] = []
        scored: list[bool] = []
        t = 0
        for size in (1, 5, 16, 5, 13):
            reply = await engine.step(step(sid, VALUES[t : t + size], seq=t))
            assert await engine.step(step(sid, VALUES[t : t + size], seq=t)) == reply
            t += size
            got += means(reply)
            scored += [o["anomaly_z"] is not None for o in reply["outputs"]]
        # The running-scaled model scores no value before its 8th (in a chunk that spans it too).
        assert scored == [False] * 8 + [True] * (len(VALUES) - 8)
        assert t == len(VALUES)
        assert got == pytest.approx([m[0] for m in whole.mean], rel=1e-5, abs=1e-5)
        if device != "cpu":  # the steps ran from the round's programs: 13 = 8 + 4 + 1, 5 = 4 + 1
            programs = engine.batcher.runner.graphed.programs  # type: ignore[union-attr]
            assert {(1, 16, True), (1, 8, True), (1, 4, False), (1, 1, False)} <= set(programs)
        forecast = await engine.forecast(sid, 16, paths=64, seed=1)
        assert len(forecast.means) == 16
        assert forecast == await engine.forecast(sid, 16, paths=64, seed=1)
        await engine.batcher.close()

    asyncio.run(scenario())


@pytest.mark.parametrize("device", DEVICES)
def test_step_many_equals_the_cpu_and_a_blob_moves_to_it(device: str) -> None:
    async def scenario() -> None:
        gpu, cpu = engine_on(device), engine_on("cpu", graphed=False)
        ids = [f"s{k}" for k in range(20)]
        for e in (gpu, cpu):
            for sid in ids:
                await e.create(sid, None)
        for t in range(0, 12, 3):
            items = [
                step(sid, [v + k for v in VALUES[t : t + 3]], seq=t) for k, sid in enumerate(ids)
            ]
            on_gpu = await gpu.step_many(items)
            on_cpu = await cpu.step_many(items)
            for a, b in zip(on_gpu, on_cpu, strict=True):
                assert a["ok"] and b["ok"]
                assert means(a["result"]) == pytest.approx(means(b["result"]), rel=1e-5, abs=1e-5)
        # A session exported on the GPU continues on the CPU exactly.
        _, blob = await gpu.export("s3")
        await cpu.import_blob(blob, "s3-moved", None)
        rest = VALUES[12:20]
        a = await gpu.step(step("s3", [v + 3 for v in rest], seq=12))
        b = await cpu.step(step("s3-moved", [v + 3 for v in rest], seq=12))
        assert means(a) == pytest.approx(means(b), rel=1e-5, abs=1e-5)
        await gpu.batcher.close()
        await cpu.batcher.close()

    asyncio.run(scenario())


@pytest.mark.parametrize("device", DEVICES)
def test_a_round_with_and_without_gate_traces_agrees(device: str) -> None:
    """One round holding steps with gate traces (the eager stack's) and without (the round's
    programs where the engine is graphed): the same values for both sessions, and the traces."""

    async def scenario() -> None:
        engine = engine_on(device)
        for sid in ("plain", "traced"):
            await engine.create(sid, None)
        rows = [[v] for v in VALUES[:12]]
        plain, traced = await asyncio.gather(
            engine.step(Step(session_id="plain", inputs=rows, seq=0)),
            engine.step(Step(session_id="traced", inputs=rows, seq=0, return_gates=True)),
        )
        assert plain["gates"] is None and traced["gates"] is not None
        assert means(plain) == pytest.approx(means(traced), rel=1e-5, abs=1e-5)
        await engine.batcher.close()

    asyncio.run(scenario())
