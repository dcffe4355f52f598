"""The micro-batcher: the only caller of the model while the service runs.

Handlers submit jobs and await them. One worker task takes whatever is pending (up to
``max_batch``), has ``RoundRunner`` (``service.rounds``: the tensor work) compute it, persists
the new states (with Redis), has them scattered into the pool and does each session's
bookkeeping (``t``, the last applied step) before answering. So a handler that goes away
mid-step can never leave a state advanced without its ``t``.

Where a round runs: a small one on a CPU (``inline_work``) on the event loop itself; measured on 2
cores, handing it to a thread cost more (the hop, and GIL hand-offs that stall the loop up to the
5 ms switch interval) than the few hundred microseconds it holds the loop. A large round, and any
on a GPU (where waiting releases the GIL), runs in a worker thread so the loop keeps parsing
requests, which fills the next batch.

Never two steps of one session in one batch: a session's lock admits one job at a time, and the
worker defers any duplicate to the next round all the same. Every job is answered through its
``settle``, once: with its result, its error, or ``shutting_down`` when the batcher is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
from torch import Tensor

from model.checkpoint import AnyForecaster
from model.native import StackEngine
from service.errors import ModelFailure, ShuttingDown
from service.results import ForecastOutputs, Outputs, StepDone
from service.rounds import (
    BatchObserver,
    BurnInJob,
    Computed,
    ForecastJob,
    Job,
    PredictJob,
    RoundRunner,
    StepBlock,
    StepJob,
    as_chunk,
    inputs_digest,
)
from service.sessions import AppliedStep, Session, StatePool
from service.state_blob import SessionState

log = logging.getLogger("lstm_sessions.batcher")

__all__ = [
    "BatchObserver",
    "Commit",
    "MicroBatcher",
    "Persister",
    "StepBlock",
    "StepJob",
    "inputs_digest",
]


@dataclass
class Commit:
    """What a persister is asked to store: the step ``seq -> t`` of a session, atomically."""

    session: Session
    seq: int  # t before the step: the persister applies it only if the stored t is still this
    t: int
    digest: bytes
    computed: Computed  # its outputs, and its new state as a row of its batch (Computed.group)

    @property
    def state(self) -> SessionState:
        """The new state, its window too (read from the pool, where it is not yet)."""
        return self.computed.state(self.session.slot)

    @property
    def outputs(self) -> Outputs:
        return self.computed.outputs


Persister = Callable[[list[Commit]], Awaitable[list[BaseException | None]]]

STOPPING = "the service is stopping: retry the request (with the same seq)"


class MicroBatcher:
    def __init__(
        self,
        model: AnyForecaster,
        pool: StatePool,
        *,
        max_batch: int = 256,
        wait_s: float = 0.0,
        observer: BatchObserver | None = None,
        persist: Persister | None = None,
        inline_work: int = 0,
        gather_passes: int = 8,
        stack_engine: StackEngine | None = None,
    ) -> None:
        self.runner = RoundRunner(model, pool, observer or BatchObserver(), stack_engine)
        self.observer = self.runner.observer
        self.max_batch = max_batch
        self.wait_s = wait_s
        self.persist = persist  # None: the pool is the only copy (the embedded store)
        # Rounds of at most this many session-timesteps run on the event loop itself; larger ones
        # (and every round on a GPU, whose waits release the GIL) in a worker thread.
        self.inline_work = inline_work if self.runner.device.type == "cpu" else 0
        self.gather_passes = gather_passes
        self._queue: asyncio.Queue[Job | StepBlock] | None = None
        self._worker: asyncio.Task[None] | None = None
        self._deferred: list[Job] = []  # a session's second job in a round: the next one's
        self._overflow: list[Job] = []  # a block's steps past LSTM_MAX_BATCH: the next round's
        self._round_jobs: list[Job] = []  # the jobs of the round in flight
        self._closed = False

    # --- what handlers call -------------------------------------------------------------------

    async def step(
        self, session: Session, x: Tensor | np.ndarray, *, return_gates: bool = False
    ) -> StepDone:
        """Apply one chunk (T, F) to a session; call with the session's lock held."""
        chunk = as_chunk(x)
        return await self._submit(StepJob(session, chunk, inputs_digest(chunk), return_gates))

    def submit_step(
        self, session: Session, x: Tensor | np.ndarray, *, return_gates: bool = False
    ) -> asyncio.Future[StepDone]:
        """``step`` without waiting: the future of its result. The caller must keep the
        session's lock until that future is done, even if the caller is cancelled."""
        chunk = as_chunk(x)
        return self._enqueue(StepJob(session, chunk, inputs_digest(chunk), return_gates))

    def submit_steps(self, jobs: list[StepJob]) -> asyncio.Future[list[Any]]:
        """Steps of distinct sessions (each job's ``x`` a chunk as ``as_chunk`` makes it, its
        ``digest`` that chunk's), queued as one block: the future of each one's outcome, in
        order (a ``StepDone``, or the error to answer). The caller holds every one's lock until
        that future is done, even if the caller is cancelled."""
        block = StepBlock(jobs)
        self._enqueue(block)
        return block.future

    async def forecast(
        self, session: Session, horizon: int, *, paths: int, seed: int
    ) -> ForecastOutputs:
        return await self._submit(ForecastJob(session, horizon, paths, seed))

    async def predict(self, x: Tensor, *, return_gates: bool = False) -> Outputs:
        return await self._submit(PredictJob(x, return_gates))

    async def burn_in(self, x: Tensor) -> SessionState:
        """The state after ``x`` (k, F) from a zero state, batched with the round's other work:
        a migration's replay (its result carries ``x`` as its window)."""
        result = await self._submit(BurnInJob(x))
        if isinstance(result, BaseException):
            raise result
        return cast(SessionState, result)

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
        unanswered = [*self._round_jobs, *self._deferred, *self._overflow]
        while self._queue is not None and not self._queue.empty():
            self._take(self._queue.get_nowait(), unanswered)
        for job in unanswered:
            job.settle(ShuttingDown(STOPPING))
        self._round_jobs, self._deferred, self._overflow = [], [], []

    def _enqueue(self, job: Job | StepBlock) -> asyncio.Future[Any]:
        if self._closed:
            raise ShuttingDown(STOPPING)
        loop = asyncio.get_running_loop()
        if self._queue is None:
            self._queue = asyncio.Queue()
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._run(), name="micro-batcher")
        job.future = loop.create_future()
        self._queue.put_nowait(job)
        return job.future

    async def _submit(self, job: Job) -> Any:
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

    @staticmethod
    def _take(entry: Job | StepBlock, jobs: list[Job]) -> list[Job]:
        """A queue entry's jobs onto ``jobs``: a block's steps, or the job itself."""
        if isinstance(entry, StepBlock):
            jobs.extend(entry.jobs)
        else:
            jobs.append(entry)
        return jobs

    async def _run(self) -> None:
        assert self._queue is not None
        while True:
            jobs = [*self._deferred, *self._overflow] or self._take(await self._queue.get(), [])
            self._deferred, self._overflow = [], []
            self._round_jobs = jobs  # the round adds to this list: close() sees them all
            try:
                await self._round(jobs)
            except Exception as e:  # never leave a caller waiting: fail what is unanswered
                # (a block's steps past the round's limit were not in it: they run next)
                log.exception("a batch round failed; its %d requests answer 500", len(jobs))
                failure = ModelFailure(f"the batcher failed: {type(e).__name__}")
                for job in [*jobs, *self._deferred]:
                    job.settle(failure)
                self._deferred = []

    async def _round(self, jobs: list[Job]) -> None:
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
            self._take(self._queue.get_nowait(), jobs)
        if len(jobs) > self.max_batch:  # a block went past the limit: the rest go next
            self._overflow = jobs[self.max_batch :]
            del jobs[self.max_batch :]
        batch: list[Job] = []
        busy: set[Session] = set()
        for job in jobs:  # at most one job per session per round
            session = job.session if isinstance(job, StepJob | ForecastJob) else None
            (self._deferred if session in busy else batch).append(job)
            if session is not None:
                busy.add(session)
        # One observation per round, of its longest wait: a write per job cost as much as the job.
        self.observer.queue_wait(time.perf_counter() - min(job.enqueued for job in batch))
        if sum(job.work() for job in batch) <= self.inline_work:
            self.runner.compute(batch)  # small: a thread hop and GIL hand-offs cost more
        else:
            await asyncio.to_thread(self.runner.compute, batch)
        steps = [j for j in batch if isinstance(j, StepJob) and isinstance(j.result, Computed)]
        if steps:
            await self._commit(steps)
        for job in batch:
            job.settle(job.result)

    async def _commit(self, steps: list[StepJob]) -> None:
        """Persist new states (one round trip for the batch), then write the pool and do each
        session's bookkeeping; each job's ``result`` becomes its answer.

        A state reaches the pool, and ``t`` moves, only once the persister accepted it; a step it
        refused answers with the persister's error and leaves the session as it was.
        """
        verdicts: list[BaseException | None] = [None] * len(steps)
        if self.persist is not None:
            commits = []
            for job in steps:
                c: Computed = job.result
                t = job.session.t
                commits.append(Commit(job.session, t, t + len(c.outputs.mean), job.digest, c))
            verdicts = await self.persist(commits)
        accepted = [(job, job.result) for job, v in zip(steps, verdicts, strict=True) if v is None]
        self.runner.scatter(accepted)
        for job, verdict in zip(steps, verdicts, strict=True):
            job.result = verdict if verdict is not None else self._apply(job, job.result.outputs)

    @staticmethod
    def _apply(job: StepJob, outputs: Outputs) -> StepDone:
        """Bookkeeping of an applied step, on the event loop, before anyone is answered."""
        session = job.session
        seq = session.t
        session.t += len(outputs.mean)
        done = StepDone(session.t, outputs)
        session.last_step = AppliedStep(seq, job.digest, done)
        return done
