"""A batched round's tensor work, apart from the asyncio that schedules it (``service.batcher``).

The jobs a round holds (steps, forecasts, predictions), and ``RoundRunner``: it groups the steps
of different sessions by chunk length, gathers their states from the pool, runs one batched
forward per group and writes each job's result onto the job; later it scatters the accepted new
states back in one operation per group. Nothing here awaits: a round runs on the event loop when
it is small and in a worker thread when it is not, and the same code serves both.

One failing item fails alone: when a batched forward raises, the exception is logged once, with
its traceback, and the group's items are run one by one; an item that fails alone gets
``model_failure``.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch
from torch import Tensor

from model import LSTMState
from model.checkpoint import AnyForecaster
from model.forecaster import step_kept
from model.graphed import GraphedSteps
from model.native import NativeForecaster, StackEngine
from service.errors import ModelFailure
from service.results import ForecastOutputs, Outputs
from service.sessions import Session, StatePool
from service.state_blob import SessionState

log = logging.getLogger("lstm_sessions.batcher")

T = TypeVar("T")


@dataclass(slots=True, eq=False)
class Group:
    """The new states of one batched forward, kept whole so they scatter in one operation."""

    h: Tensor  # (layers, B, hidden)
    c: Tensor
    next_mean: Tensor  # (B, F)
    next_std: Tensor
    # The outputs as computed, (B, T, F) each, before they became each step's lists: a journal
    # (service/journal.py) writes a whole batch's from these at once.
    mean: Tensor | None = None
    std: Tensor | None = None
    z: Tensor | None = None
    x: Tensor | None = None  # (B, T, F): the chunks, for the sessions' windows
    pool: StatePool | None = None  # where they will go (a state for Redis: window_of)
    stats: Tensor | None = None  # (B, S) float64: the model's statistics, when it keeps any


@dataclass(slots=True)
class Computed:
    """A step's outputs and new state (row ``row`` of its group), not yet in the pool."""

    outputs: Outputs
    group: Group
    row: int

    def state(self, slot: int | None = None) -> SessionState:
        """The new state; with ``slot`` (where the session is, not yet scattered) its window
        too: the kept inputs and this chunk."""
        g, b = self.group, self.row
        window = None
        if slot is not None and g.pool is not None and g.x is not None:
            window = g.pool.window_of(slot, then=g.x[b])
        return SessionState(
            g.h[:, b].cpu(),
            g.c[:, b].cpu(),
            g.next_mean[b].cpu(),
            g.next_std[b].cpu(),
            window,
            None if g.stats is None else g.stats[b].cpu(),
        )


@dataclass
class BatchObserver:
    """Callbacks for metrics; the batcher itself knows nothing of Prometheus."""

    batch: Callable[[int], None] = lambda sessions: None
    queue_wait: Callable[[float], None] = lambda seconds: None
    model_time: Callable[[float], None] = lambda seconds: None
    timesteps: Callable[[int], None] = lambda n: None


@dataclass(eq=False)
class Job:
    """One request's share of a round. ``result`` is what the round made of it (a value, or the
    error to answer); ``settle`` answers the waiting caller, once, and is the only place that
    does."""

    enqueued: float = field(default_factory=time.perf_counter, init=False)
    future: asyncio.Future[Any] = field(init=False)
    result: Any = field(default=None, init=False)

    def settle(self, outcome: Any) -> None:
        if self.future.done():
            return
        if isinstance(outcome, BaseException):
            self.future.set_exception(outcome)
        else:
            self.future.set_result(outcome)

    def work(self) -> int:
        """Session-timesteps this job computes: what a round's time on the loop is measured by."""
        return 0


@dataclass(eq=False)
class StepJob(Job):
    session: Session
    x: np.ndarray  # (T, F) float32, C-contiguous, on the CPU: the round moves it to the device
    digest: bytes
    return_gates: bool
    block: StepBlock | None = None  # a step_many's: answered with the others of its request
    index: int = 0  # its place in the block

    def work(self) -> int:
        return int(self.x.shape[0])

    def settle(self, outcome: Any) -> None:
        if self.block is None:
            super().settle(outcome)
        else:
            self.block.settle(self.index, outcome)


class StepBlock:
    """The steps of one step_many request, queued as one entry and answered through one future
    (``future``: each step's outcome, in the block's order, once all are settled): a future, a
    queue entry and a wake-up per item cost more than the item's step. A round takes a block's
    steps as its own jobs, and may leave some of them to the next (``LSTM_MAX_BATCH``); each
    step is settled once, as any job is."""

    __slots__ = ("future", "jobs", "outcomes", "pending")

    _UNSETTLED: Any = object()

    def __init__(self, jobs: list[StepJob]) -> None:
        self.jobs = list(jobs)  # its own list: the caller's keeps the jobs (and their locks)
        for index, job in enumerate(jobs):
            job.block, job.index = self, index
        self.outcomes: list[Any] = [self._UNSETTLED] * len(jobs)
        self.pending = len(jobs)
        self.future: asyncio.Future[list[Any]]

    def settle(self, index: int, outcome: Any) -> None:
        if self.outcomes[index] is not self._UNSETTLED:
            return
        self.outcomes[index] = outcome
        self.pending -= 1
        if self.pending == 0:
            self.jobs = []  # its jobs point at it: no cycle left for the garbage collector
            if not self.future.done():
                self.future.set_result(self.outcomes)


@dataclass(eq=False)
class ForecastJob(Job):
    session: Session
    horizon: int
    paths: int
    seed: int

    def work(self) -> int:
        return self.horizon * self.paths


@dataclass(eq=False)
class PredictJob(Job):
    x: Tensor
    return_gates: bool

    def work(self) -> int:
        return int(self.x.shape[0])


@dataclass(eq=False)
class BurnInJob(Job):
    """A migration's replay: the model over a session's kept inputs from a zero state; its
    result is the state that leaves (no session is touched)."""

    x: Tensor  # (k, F), k >= 1

    def work(self) -> int:
        return int(self.x.shape[0])


def replay(model: AnyForecaster, windows: list[Tensor], device: torch.device) -> list[SessionState]:
    """The states ``model`` reaches over each window (k, F) from a zero state, windows of one
    length at a time in one batched forward: a migration's replay. Each state keeps its window."""
    out: list[SessionState | None] = [None] * len(windows)
    by_length: dict[int, list[int]] = defaultdict(list)
    for i, w in enumerate(windows):
        by_length[w.shape[0]].append(i)
    with torch.no_grad():
        for indices in by_length.values():
            x = torch.stack([windows[i] for i in indices]).to(device)  # (B, k, F)
            f = model(x, None)
            mean, std = f.mean, f.std
            if not (torch.isfinite(mean).all() and torch.isfinite(std).all()):
                raise FloatingPointError("non-finite model output")
            lstm, stats = model.split_state(f.state)
            h, c = lstm.h.cpu(), lstm.c.cpu()
            kept = None if stats is None else stats.cpu()
            last_mean, last_std = mean[:, -1].cpu(), std[:, -1].cpu()
            for b, i in enumerate(indices):
                out[i] = SessionState(
                    h[:, b],
                    c[:, b],
                    last_mean[b],
                    last_std[b],
                    windows[i].cpu(),
                    None if kept is None else kept[b],
                )
    return [s for s in out if s is not None]


def inputs_digest(x: np.ndarray) -> bytes:
    """A chunk's digest (its float32 bytes): what a retry's inputs are compared by."""
    if not x.flags.c_contiguous:
        x = np.ascontiguousarray(x)
    return hashlib.blake2b(x.data, digest_size=16).digest()


def as_chunk(x: Tensor | np.ndarray) -> np.ndarray:
    """A chunk as a step job holds it: a (T, F) float32 C-contiguous array on the CPU."""
    if isinstance(x, Tensor):
        x = x.detach().cpu().numpy()
    return np.ascontiguousarray(x, dtype=np.float32)


class RoundRunner:
    """The model and the pool, as a round sees them."""

    def __init__(
        self,
        model: AnyForecaster,
        pool: StatePool,
        observer: BatchObserver,
        stack_engine: StackEngine | None = None,
    ) -> None:
        self.model = model.eval()
        # The stack runs through the engine the service chose (model/native.py; None: eager);
        # what an engine cannot do (gate traces) it hands to the eager stack itself.
        self.model.use_engine(stack_engine)
        self.pool = pool
        self.device = pool.h.device
        self.observer = observer
        # A CPU round with the native engine runs on numpy arrays end to end (model/native.py's
        # NativeForecaster, the pool's PoolArrays): at the batches a server forms, the ~30 torch
        # ops of a round cost several times the model's arithmetic.
        self.arrays = NativeForecaster.of(self.model) if pool.arrays is not None else None
        # With the graphed engine (a GPU) a round's steps run from CUDA graphs that gather the
        # sessions' states from the pool, run the whole forecaster and score each value.
        self.graphed = GraphedSteps.of(self.model, pool)

    def compute(self, batch: list[Job]) -> None:
        """Each job's ``result``: a step's ``Computed`` (not in the pool yet), a forecast's
        means and stds, a prediction's ``Outputs``, or the ModelFailure to answer."""
        groups: dict[tuple[int, bool], list[StepJob]] = defaultdict(list)
        burn_ins: dict[int, list[BurnInJob]] = defaultdict(list)
        for job in batch:
            if isinstance(job, StepJob):
                groups[(job.x.shape[0], job.return_gates)].append(job)
            elif isinstance(job, BurnInJob):
                burn_ins[job.x.shape[0]].append(job)
        with torch.no_grad():
            for group in groups.values():
                for job, out in zip(group, self._isolate(self._steps, group), strict=True):
                    job.result = out
            for same_length in burn_ins.values():
                replayed = self._isolate(self._burn_in, same_length)
                for burn_in, state in zip(same_length, replayed, strict=True):
                    burn_in.result = state
            for job in batch:
                if isinstance(job, ForecastJob):
                    job.result = self._guard(functools.partial(self._forecast, job))
                elif isinstance(job, PredictJob):
                    job.result = self._guard(functools.partial(self._predict, job))

    def scatter(self, accepted: list[tuple[StepJob, Computed]]) -> None:
        """The accepted steps' new states into the pool: one write per batched forward."""
        by_group: dict[Group, tuple[list[int], list[int]]] = {}
        for job, computed in accepted:
            rows, slots = by_group.setdefault(computed.group, ([], []))
            rows.append(computed.row)
            slots.append(job.session.slot)
        for group, (rows, slots) in by_group.items():
            h, c, mean, std, x = group.h, group.c, group.next_mean, group.next_std, group.x
            stats = group.stats
            if len(rows) < mean.shape[0]:  # some were refused: scatter the others' rows only
                keep = torch.tensor(rows, device=self.device)
                h, c = h.index_select(1, keep), c.index_select(1, keep)
                mean, std = mean.index_select(0, keep), std.index_select(0, keep)
                x = None if x is None else x.index_select(0, keep)
                stats = None if stats is None else stats.index_select(0, keep)
            target = torch.tensor(slots, device=self.device)
            self.pool.scatter(target, LSTMState(h, c), mean, std, stats)
            if x is not None:
                self.pool.record(target, x)

    def _isolate(self, run: Callable[[list[T]], list[Any]], jobs: list[T]) -> list[Any]:
        try:
            return run(jobs)
        except Exception:
            log.exception(
                "a batched forward of %d items failed; running them one by one", len(jobs)
            )
            if len(jobs) == 1:
                return [ModelFailure("the model failed on this input")]
            return [
                self._guard(functools.partial(lambda j: run([j])[0], job), quiet=True)
                for job in jobs
            ]

    @staticmethod
    def _guard(fn: Callable[[], Any], *, quiet: bool = False) -> Any:
        try:
            return fn()
        except Exception as e:
            if quiet:  # its batch's traceback is logged already
                log.warning("the model failed on one input: %s: %s", type(e).__name__, e)
            else:
                log.exception("the model failed on one input")
            return ModelFailure("the model failed on this input")

    def _steps(self, jobs: list[StepJob]) -> list[Computed]:
        if self.arrays is not None and not jobs[0].return_gates and self.arrays.handles():
            return self._steps_on_arrays(jobs, self.arrays)
        started = time.perf_counter()
        slots = torch.tensor([j.session.slot for j in jobs], device=self.device)
        x = torch.from_numpy(np.stack([j.x for j in jobs])).to(self.device)  # (B, T, F)
        step = None
        if self.graphed is not None and self.graphed.handles(jobs[0].return_gates):
            step = self.graphed(slots, x)  # gathered from the pool inside a CUDA graph
        if step is None:
            step = step_kept(
                self.model,
                x,
                self.pool.gather(slots),
                self.pool.gather_stats(slots),
                self.pool.next_mean.index_select(0, slots),  # (B, F)
                self.pool.next_std.index_select(0, slots),
                return_gates=jobs[0].return_gates,
            )
        mean, std, z = step.mean, step.std, step.z
        if not (torch.isfinite(mean).all() and torch.isfinite(std).all()):
            raise FloatingPointError("non-finite model output")
        unscored = self._unscored(jobs, x.shape[1])
        if any(unscored):  # one masked write for the batch (a write per row: a launch each)
            first = torch.tensor(unscored, device=self.device).unsqueeze(1)  # (B, 1)
            mask = torch.arange(x.shape[1], device=self.device) < first  # (B, T)
            z.masked_fill_(mask.unsqueeze(-1), float("nan"))
        self.observer.model_time(time.perf_counter() - started)
        self.observer.batch(len(jobs))
        self.observer.timesteps(x.shape[0] * x.shape[1])
        h, c = step.lstm
        group = Group(h, c, mean[:, -1], std[:, -1], mean, std, z, x, self.pool, step.stats)
        # One conversion per tensor for the whole batch: per-row views and tolist() calls cost
        # more than the model's step at these sizes.
        means, stds, zs = mean.tolist(), std.tolist(), z.tolist()
        gate_lists = self._gate_lists(step.gates)
        return [
            Computed(
                self._outputs(
                    means[b],
                    stds[b],
                    zs[b],
                    unscored=unscored[b],
                    gates=gate_lists,
                    row=b,
                ),
                group,
                b,
            )
            for b in range(len(jobs))
        ]

    def _unscored(self, jobs: list[StepJob], steps: int) -> list[int]:
        """How many of each step's first values get no anomaly score: those before the model's
        ``scored_from`` (the first value of a session, which no forecast precedes; a running-
        scaled model's first 8, whose forecasts it was not trained on). Their z is NaN in the
        batch's tensor (what a journal writes; ``sessions.pack_step``'s convention too)."""
        first = self.model.scored_from
        return [max(0, min(steps, first - j.session.t)) for j in jobs]

    def _steps_on_arrays(self, jobs: list[StepJob], model: NativeForecaster) -> list[Computed]:
        """``_steps`` on numpy arrays (a CPU, the native engine, no gate traces): the same
        values, float32 rounding apart, and the same Group of tensors (views of the arrays)."""
        started = time.perf_counter()
        pool = self.pool.arrays
        assert pool is not None
        slots = np.array([j.session.slot for j in jobs])
        x = np.stack([j.x for j in jobs])  # (B, T, F)
        h, c, prev_mean, prev_std = pool.gather(slots)
        kept = pool.stats[slots] if model.stats_width else None
        mean, std, hn, cn, stats = model(x, h, c, kept)
        if not (np.isfinite(mean).all() and np.isfinite(std).all()):
            raise FloatingPointError("non-finite model output")
        mean, std = np.ascontiguousarray(mean), np.ascontiguousarray(std)
        # The forecast each value is scored against: the pool's for the first, then the chunk's.
        before_mean = np.concatenate([prev_mean[:, None], mean[:, :-1]], axis=1)  # (B, T, F)
        before_std = np.concatenate([prev_std[:, None], std[:, :-1]], axis=1)
        z = (x - before_mean) / before_std
        unscored = self._unscored(jobs, x.shape[1])
        for b, k in enumerate(unscored):
            if k:
                z[b, :k] = np.nan
        self.observer.model_time(time.perf_counter() - started)
        self.observer.batch(len(jobs))
        self.observer.timesteps(x.shape[0] * x.shape[1])
        t = torch.from_numpy
        group = Group(
            t(hn),
            t(cn),
            t(mean[:, -1]),
            t(std[:, -1]),
            t(mean),
            t(std),
            t(z),
            t(x),
            self.pool,
            None if stats is None else t(stats),
        )
        means, stds, zs = mean.tolist(), std.tolist(), z.tolist()
        return [
            Computed(
                self._outputs(means[b], stds[b], zs[b], unscored=unscored[b], gates=None, row=b),
                group,
                b,
            )
            for b in range(len(jobs))
        ]

    def _burn_in(self, jobs: list[BurnInJob]) -> list[SessionState]:
        """One batched forward over kept inputs of one length, from zero states."""
        return replay(self.model, [j.x for j in jobs], self.device)

    def _forecast(self, job: ForecastJob) -> ForecastOutputs:
        slot = torch.tensor([job.session.slot], device=self.device)
        f = self.model.sample_kept_forecast(
            self.pool.next_mean[slot],
            self.pool.next_std[slot],
            self.pool.gather(slot),
            self.pool.gather_stats(slot),
            job.horizon,
            paths=job.paths,
            seed=job.seed,
        )
        p10, p50, p90 = f.quantiles[:, 0].tolist()  # (3, horizon, F): QUANTILES' order
        return ForecastOutputs(f.mean[0].tolist(), f.std[0].tolist(), p10, p50, p90)

    def _predict(self, job: PredictJob) -> Outputs:
        if self.arrays is not None and not job.return_gates and self.arrays.handles():
            return self._predict_on_arrays(job, self.arrays)
        started = time.perf_counter()
        x = job.x.unsqueeze(0).to(self.device)  # (1, T, F)
        f = self.model(x, None, return_gates=job.return_gates)
        mean, std, gates = f.mean, f.std, f.gates
        z = torch.cat(
            [torch.full_like(x[:, :1], float("nan")), (x[:, 1:] - mean[:, :-1]) / std[:, :-1]],
            dim=1,
        )
        self.observer.model_time(time.perf_counter() - started)
        return self._outputs(
            mean[0].tolist(),
            std[0].tolist(),
            z[0].tolist(),
            unscored=min(x.shape[1], self.model.scored_from),
            gates=self._gate_lists(gates),
            row=0,
        )

    def _predict_on_arrays(self, job: PredictJob, model: NativeForecaster) -> Outputs:
        """``_predict`` as a step's round computes it (``_steps_on_arrays``): a session stepped
        with the values in one chunk and a prediction over them answer the same numbers (other
        chunkings differ by float32 rounding: the head's product rounds by its shape)."""
        started = time.perf_counter()
        x = job.x.numpy()[None]  # (1, T, F)
        layers, hidden = self.pool.h.shape[0], self.pool.h.shape[2]
        zeros = np.zeros((layers, 1, hidden), np.float32)
        none_seen = np.zeros((1, model.stats_width)) if model.stats_width else None
        mean, std, _, _, _ = model(x, zeros, zeros, none_seen)
        z = np.concatenate(
            [np.full_like(x[:, :1], np.nan), (x[:, 1:] - mean[:, :-1]) / std[:, :-1]], axis=1
        )
        self.observer.model_time(time.perf_counter() - started)
        return self._outputs(
            mean[0].tolist(),
            std[0].tolist(),
            z[0].tolist(),
            unscored=min(x.shape[1], self.model.scored_from),
            gates=None,
            row=0,
        )

    @staticmethod
    def _gate_lists(gates: Any) -> dict[str, list[Any]] | None:
        """Each gate's (layers, B, T) trace as nested lists, or None."""
        if gates is None:
            return None
        return {name: getattr(gates, name).tolist() for name in ("forget", "input", "output")}

    @staticmethod
    def _outputs(
        mean: list[list[float]],
        std: list[list[float]],
        z: list[list[float]],
        *,
        unscored: int,
        gates: dict[str, list[Any]] | None,
        row: int,
    ) -> Outputs:
        """Row ``row``'s outputs, from lists of the whole batch's (T, F) rows; its first
        ``unscored`` values get no anomaly score (``_unscored``)."""
        anomaly: list[list[float] | None] = list(z)
        for k in range(unscored):
            anomaly[k] = None
        gate_rows = None
        if gates is not None:
            gate_rows = {name: [layer[row] for layer in trace] for name, trace in gates.items()}
        return Outputs(mean, std, anomaly, gate_rows)
