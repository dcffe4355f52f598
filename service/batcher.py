"""The micro-batcher: the only caller of the model while the service runs.

Handlers submit jobs and await them. One worker task takes whatever is pending (up to
``max_batch``), groups the steps of different sessions by chunk length, gathers their states from
the pool, runs one batched forward per group, scatters the states back and does each session's
bookkeeping (``t``, the last applied step) before answering. So a handler that goes away mid-step
can never leave a state advanced without its ``t``.

Where a round runs: a small one on a CPU (``inline_work``) on the event loop itself; measured on 2
cores, handing it to a thread cost more (the hop, and GIL hand-offs that stall the loop up to the
5 ms switch interval) than the few hundred microseconds it holds the loop. A large round, and any
on a GPU (where waiting releases the GIL), runs in a worker thread so the loop keeps parsing
requests, which fills the next batch.

Never two steps of one session in one batch: a session's lock admits one job at a time, and the
worker defers any duplicate to the next round all the same. One failing item fails alone: when a
batched forward raises, its items are retried one by one.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import Tensor

from model import LSTMForecaster, LSTMState
from service.errors import ModelFailure, ShuttingDown
from service.results import Outputs, StepDone
from service.sessions import AppliedStep, Session, StatePool
from service.state_blob import SessionState

T = TypeVar("T")


@dataclass(slots=True)
class _Group:
    """The new states of one batched forward, kept whole so they scatter in one operation."""

    h: Tensor  # (layers, B, hidden)
    c: Tensor
    next_mean: Tensor  # (B, F)
    next_std: Tensor


@dataclass(slots=True)
class _Computed:
    """A step's outputs and new state (row ``row`` of its group), not yet in the pool."""

    outputs: Outputs
    group: _Group
    row: int

    def state(self) -> SessionState:
        g, b = self.group, self.row
        return SessionState(
            g.h[:, b].cpu(), g.c[:, b].cpu(), g.next_mean[b].cpu(), g.next_std[b].cpu()
        )


@dataclass
class Commit:
    """What a persister is asked to store: the step ``seq -> t`` of a session, atomically."""

    session: Session
    seq: int  # t before the step: the persister applies it only if the stored t is still this
    t: int
    state: SessionState
    digest: bytes
    outputs: Outputs


Persister = Callable[[list[Commit]], Awaitable[list[BaseException | None]]]


@dataclass
class BatchObserver:
    """Callbacks for metrics; the batcher itself knows nothing of Prometheus."""

    batch: Callable[[int], None] = lambda sessions: None
    queue_wait: Callable[[float], None] = lambda seconds: None
    model_time: Callable[[float], None] = lambda seconds: None
    timesteps: Callable[[int], None] = lambda n: None


@dataclass(eq=False)
class _Job:
    enqueued: float = field(default_factory=time.perf_counter, init=False)
    future: asyncio.Future[Any] = field(init=False)


@dataclass(eq=False)
class _StepJob(_Job):
    session: Session
    x: Tensor  # (T, F) on the CPU: the worker thread moves it to the device
    digest: bytes
    return_gates: bool


@dataclass(eq=False)
class _ForecastJob(_Job):
    session: Session
    horizon: int


@dataclass(eq=False)
class _PredictJob(_Job):
    x: Tensor
    return_gates: bool


def inputs_digest(x: Tensor) -> bytes:
    if x.device.type == "cpu" and x.is_contiguous():
        return hashlib.blake2b(x.numpy().data, digest_size=16).digest()  # no copy
    return hashlib.blake2b(x.detach().cpu().contiguous().numpy().tobytes(), digest_size=16).digest()


class MicroBatcher:
    def __init__(
        self,
        model: LSTMForecaster,
        pool: StatePool,
        *,
        max_batch: int = 256,
        wait_s: float = 0.0,
        observer: BatchObserver | None = None,
        persist: Persister | None = None,
        inline_work: int = 0,
        gather_passes: int = 8,
    ) -> None:
        self.model = model.eval()
        self.pool = pool
        self.device = pool.h.device
        self.max_batch = max_batch
        self.wait_s = wait_s
        self.observer = observer or BatchObserver()
        self.persist = persist  # None: the pool is the only copy (the embedded store)
        # Rounds of at most this many session-timesteps run on the event loop itself; larger ones
        # (and every round on a GPU, whose waits release the GIL) in a worker thread.
        self.inline_work = inline_work if self.device.type == "cpu" else 0
        self.gather_passes = gather_passes
        self._queue: asyncio.Queue[_Job] | None = None
        self._worker: asyncio.Task[None] | None = None
        self._deferred: list[_Job] = []
        self._round_jobs: list[_Job] = []  # the jobs of the round in flight
        self._closed = False

    # --- what handlers call -------------------------------------------------------------------

    async def step(self, session: Session, x: Tensor, *, return_gates: bool = False) -> StepDone:
        """Apply one chunk to a session; call with the session's lock held."""
        return await self._submit(_StepJob(session, x, inputs_digest(x), return_gates))

    def submit_step(
        self, session: Session, x: Tensor, *, return_gates: bool = False
    ) -> asyncio.Future[StepDone]:
        """``step`` without waiting: the future of its result. The caller must keep the
        session's lock until that future is done, even if the caller is cancelled."""
        return self._enqueue(_StepJob(session, x, inputs_digest(x), return_gates))

    async def forecast(
        self, session: Session, horizon: int
    ) -> tuple[list[list[float]], list[list[float]]]:
        return await self._submit(_ForecastJob(session, horizon))

    async def predict(self, x: Tensor, *, return_gates: bool = False) -> Outputs:
        return await self._submit(_PredictJob(x, return_gates))

    async def close(self) -> None:
        """Stop the worker, leaving no caller waiting: every job not answered yet (queued,
        deferred, or in the round that was running) fails with ``shutting_down``, and later
        submissions are refused the same way."""
        self._closed = True
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None
        unanswered = [*self._round_jobs, *self._deferred]
        while self._queue is not None and not self._queue.empty():
            unanswered.append(self._queue.get_nowait())
        stopping = ShuttingDown("the service is stopping: retry the request (with the same seq)")
        for job in unanswered:
            if not job.future.done():
                job.future.set_exception(stopping)
        self._round_jobs, self._deferred = [], []

    def _enqueue(self, job: _Job) -> asyncio.Future[Any]:
        if self._closed:
            raise ShuttingDown("the service is stopping: retry the request (with the same seq)")
        loop = asyncio.get_running_loop()
        if self._queue is None:
            self._queue = asyncio.Queue()
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._run(), name="micro-batcher")
        job.future = loop.create_future()
        self._queue.put_nowait(job)
        return job.future

    async def _submit(self, job: _Job) -> Any:
        self._enqueue(job)
        try:
            return await asyncio.shield(job.future)
        except asyncio.CancelledError:
            # The caller went away: still wait for the job, however often we are cancelled, so
            # the session's lock (held by the caller) is not released while its step is in flight.
            while not job.future.done():
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait({job.future})
            raise

    # --- the worker --------------------------------------------------------------------------

    async def _run(self) -> None:
        assert self._queue is not None
        while True:
            jobs = self._deferred or [await self._queue.get()]
            self._deferred = []
            self._round_jobs = jobs  # the round adds to this list: close() sees them all
            try:
                await self._round(jobs)
            except Exception as e:  # never leave a caller waiting: fail what is unanswered
                failure = ModelFailure(f"the batcher failed: {type(e).__name__}")
                for job in [*jobs, *self._deferred]:
                    if not job.future.done():
                        job.future.set_exception(failure)
                self._deferred = []

    async def _round(self, jobs: list[_Job]) -> None:
        """Run one round: gather, compute, persist, scatter, answer."""
        assert self._queue is not None
        if self.wait_s:
            await asyncio.sleep(self.wait_s)
        # Let requests already being handled reach the queue: yield to the loop while it keeps
        # bringing jobs (a few passes at most). Without this, a round starts with the first job
        # and, under load, batches hold one or two sessions.
        for _ in range(self.gather_passes):
            before = self._queue.qsize()
            await asyncio.sleep(0)
            if self._queue.qsize() == before or self._queue.qsize() + len(jobs) >= self.max_batch:
                break
        while len(jobs) < self.max_batch and not self._queue.empty():
            jobs.append(self._queue.get_nowait())
        batch: list[_Job] = []
        seen: set[int] = set()
        for job in jobs:  # at most one job per session per round
            key = id(job.session) if isinstance(job, _StepJob | _ForecastJob) else id(job)
            (self._deferred if key in seen else batch).append(job)
            seen.add(key)
        # One observation per round, of its longest wait: a write per job cost as much as the job.
        self.observer.queue_wait(time.perf_counter() - min(job.enqueued for job in batch))
        if self._work(batch) <= self.inline_work:
            results = self._compute(batch)  # small: a thread hop and GIL hand-offs cost more
        else:
            results = await asyncio.to_thread(self._compute, batch)
        steps = [
            (job, r)
            for job, r in zip(batch, results, strict=True)
            if isinstance(job, _StepJob) and isinstance(r, _Computed)
        ]
        if steps:
            results = await self._commit(steps, batch, results)
        for job, result in zip(batch, results, strict=True):
            if job.future.done():
                continue
            if isinstance(result, BaseException):
                job.future.set_exception(result)
            else:
                job.future.set_result(result)

    async def _commit(
        self,
        steps: list[tuple[_StepJob, _Computed]],
        batch: list[_Job],
        results: list[Any],
    ) -> list[Any]:
        """Persist new states (one round trip for the batch), then write the pool and answer.

        A state reaches the pool, and ``t`` moves, only once the persister accepted it; a step it
        refused answers with the persister's error and leaves the session as it was.
        """
        verdicts: list[BaseException | None] = [None] * len(steps)
        if self.persist is not None:
            commits = [
                Commit(
                    job.session,
                    job.session.t,
                    job.session.t + len(c.outputs.mean),
                    c.state(),
                    job.digest,
                    c.outputs,
                )
                for job, c in steps
            ]
            verdicts = await self.persist(commits)
        accepted = [(job, c) for (job, c), v in zip(steps, verdicts, strict=True) if v is None]
        by_group: dict[int, tuple[_Group, list[int], list[int]]] = {}
        for step_job, computed in accepted:
            _, rows, slots = by_group.setdefault(id(computed.group), (computed.group, [], []))
            rows.append(computed.row)
            slots.append(step_job.session.slot)
        for group, rows, slots in by_group.values():
            h, c, mean, std = group.h, group.c, group.next_mean, group.next_std
            if len(rows) < mean.shape[0]:  # some were refused: scatter the others' rows only
                keep = torch.tensor(rows, device=self.device)
                h, c = h.index_select(1, keep), c.index_select(1, keep)
                mean, std = mean.index_select(0, keep), std.index_select(0, keep)
            target = torch.tensor(slots, device=self.device)
            self.pool.scatter(target, LSTMState(h, c), mean, std)
        by_job = {id(job): (c, v) for (job, c), v in zip(steps, verdicts, strict=True)}
        out = []
        for job, result in zip(batch, results, strict=True):
            if isinstance(job, _StepJob) and id(job) in by_job:
                computed, verdict = by_job[id(job)]
                result = verdict if verdict is not None else self._apply(job, computed.outputs)
            out.append(result)
        return out

    @staticmethod
    def _work(batch: list[_Job]) -> int:
        """Session-timesteps a round computes: the measure of how long it holds the loop."""
        work = 0
        for job in batch:
            if isinstance(job, _StepJob | _PredictJob):
                work += job.x.shape[0]
            elif isinstance(job, _ForecastJob):
                work += job.horizon
        return work

    @staticmethod
    def _apply(job: _StepJob, outputs: Outputs) -> StepDone:
        """Bookkeeping of an applied step, on the event loop, before anyone is answered."""
        session = job.session
        seq = session.t
        session.t += len(outputs.mean)
        done = StepDone(session.t, outputs)
        session.last_step = AppliedStep(seq, job.digest, done)
        return done

    def _compute(self, batch: list[_Job]) -> list[Any]:
        results: dict[int, Any] = {}
        groups: dict[tuple[int, bool], list[_StepJob]] = defaultdict(list)
        for job in batch:
            if isinstance(job, _StepJob):
                groups[(job.x.shape[0], job.return_gates)].append(job)
        index = {id(job): i for i, job in enumerate(batch)}
        with torch.no_grad():
            for group in groups.values():
                for job, out in zip(group, self._isolate(self._steps, group), strict=True):
                    results[index[id(job)]] = out
            for i, job in enumerate(batch):
                if isinstance(job, _ForecastJob):
                    results[i] = self._guard(functools.partial(self._forecast, job))
                elif isinstance(job, _PredictJob):
                    results[i] = self._guard(functools.partial(self._predict, job))
        return [results[i] for i in range(len(batch))]

    def _isolate(self, run: Callable[[list[T]], list[Any]], jobs: list[T]) -> list[Any]:
        try:
            return run(jobs)
        except Exception:
            if len(jobs) == 1:
                return [ModelFailure("the model failed on this input")]
            return [self._guard(functools.partial(lambda j: run([j])[0], job)) for job in jobs]

    @staticmethod
    def _guard(fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception:
            return ModelFailure("the model failed on this input")

    def _steps(self, jobs: list[_StepJob]) -> list[_Computed]:
        started = time.perf_counter()
        slots = torch.tensor([j.session.slot for j in jobs], device=self.device)
        x = torch.stack([j.x for j in jobs]).to(self.device)  # (B, T, F), off the event loop
        state = self.pool.gather(slots)
        prev_mean = self.pool.next_mean.index_select(0, slots)  # (B, F)
        prev_std = self.pool.next_std.index_select(0, slots)
        mean, std, new_state, gates = self.model(x, state, return_gates=jobs[0].return_gates)
        if not (torch.isfinite(mean).all() and torch.isfinite(std).all()):
            raise FloatingPointError("non-finite model output")
        # The forecast each value is scored against: the pool's for the first, then the chunk's.
        before_mean = torch.cat([prev_mean.unsqueeze(1), mean[:, :-1]], dim=1)  # (B, T, F)
        before_std = torch.cat([prev_std.unsqueeze(1), std[:, :-1]], dim=1)
        z = (x - before_mean) / before_std
        self.observer.model_time(time.perf_counter() - started)
        self.observer.batch(len(jobs))
        self.observer.timesteps(x.shape[0] * x.shape[1])
        group = _Group(new_state.h, new_state.c, mean[:, -1], std[:, -1])
        # One conversion per tensor for the whole batch: per-row views and tolist() calls cost
        # more than the model's step at these sizes.
        means, stds, zs = mean.tolist(), std.tolist(), z.tolist()
        gate_lists = self._gate_lists(gates)
        return [
            _Computed(
                self._outputs(
                    means[b],
                    stds[b],
                    zs[b],
                    first_scored=jobs[b].session.t > 0,
                    gates=gate_lists,
                    row=b,
                ),
                group,
                b,
            )
            for b in range(len(jobs))
        ]

    def _forecast(self, job: _ForecastJob) -> tuple[list[list[float]], list[list[float]]]:
        slot = torch.tensor([job.session.slot], device=self.device)
        state = self.pool.gather(slot)
        means, stds = self.model.rollout(
            self.pool.next_mean[slot], self.pool.next_std[slot], state, job.horizon
        )
        return means[0].tolist(), stds[0].tolist()

    def _predict(self, job: _PredictJob) -> Outputs:
        started = time.perf_counter()
        x = job.x.unsqueeze(0).to(self.device)  # (1, T, F)
        mean, std, _, gates = self.model(x, None, return_gates=job.return_gates)
        z = torch.cat(
            [torch.full_like(x[:, :1], float("nan")), (x[:, 1:] - mean[:, :-1]) / std[:, :-1]],
            dim=1,
        )
        self.observer.model_time(time.perf_counter() - started)
        return self._outputs(
            mean[0].tolist(),
            std[0].tolist(),
            z[0].tolist(),
            first_scored=False,
            gates=self._gate_lists(gates),
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
        first_scored: bool,
        gates: dict[str, list[Any]] | None,
        row: int,
    ) -> Outputs:
        """Row ``row``'s outputs, from lists of the whole batch's (T, F) rows."""
        anomaly: list[list[float] | None] = list(z)
        if not first_scored:
            anomaly[0] = None
        gate_rows = None
        if gates is not None:
            gate_rows = {name: [layer[row] for layer in trace] for name, trace in gates.items()}
        return Outputs(mean, std, anomaly, gate_rows)
