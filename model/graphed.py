"""The GPU serving engine: the stack's inference forward replayed from captured CUDA graphs.

On a GPU a step at the served sizes is bound by kernel launches, not by arithmetic: the eager
stack launches about ten kernels per layer and timestep, each costing more than its work, and the
Python loop between them more still (``../shared/NOTES.md``, an H200: 390 µs for one eager step at
batch 1 against cuDNN's 148; the same step captured in a CUDA graph with the pointwise part fused,
27 µs). So this engine runs the stack as *programs*: one per (batch, steps) shape, each the whole
time loop of every layer over static input and state buffers, captured once into a CUDA graph and
then replayed, the pointwise part of each cell (``model.lstm.cell_update``, the gates as written)
compiled into one kernel by ``torch.compile`` where that works.

Shapes are bucketed so a few programs serve every call:
- a batch runs in the program of the next power of two (rows are independent in every op, so the
  padding rows change nothing); a batch above ``max_batch`` runs in pieces of ``max_batch``;
- a chunk of T timesteps runs as the powers of two that sum to T, largest first, each piece's
  final state the next one's initial state (the same timesteps, the same order: a chunk equals the
  whole and any other split of it); above ``max_steps``, in pieces of ``max_steps``.
Programs are captured when first needed and kept (``warm`` captures some ahead, as the service
does at start for the one-timestep step at every batch bucket). Where no CUDA is, or with
``capture=False``, a program runs its body directly over the same buffers: the bucketing, the
padding and the chaining are what the CPU tests check; the capture itself is checked on a GPU only
(``tests/test_graphed.py``, marked ``gpu``).

Gate traces (``return_gates``), training, gradients and anything but float32 run on the eager
stack, as with the native engine. Calls are serialised (one lock): programs own their buffers.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor

from model.forecaster import KeptStep, step_kept
from model.lstm import GateTrace, LSTMState, StackedLSTM, Variant, cell_update

if TYPE_CHECKING:
    from model.checkpoint import AnyForecaster
    from model.native import StackEngine

log = logging.getLogger(__name__)

MAX_BATCH = 1024
MAX_STEPS = 256
# A shape whose capture failed runs eager for this long before it is tried again.
RETRY_CAPTURE_S = 60.0
# Every engine compiles the same pointwise function; dynamo keeps a compiled entry per variant,
# batch (static, then dynamic) and stride pattern, and with fullgraph=True the default limit of
# 8 entries is an error, not a fallback: a few engines in one process (model versions, tests)
# reach it.
RECOMPILE_LIMIT = 64
# One capture at a time in a process (engines of several model versions share the GPU): a
# capture must not interleave with another.
_CAPTURING = threading.Lock()

Pointwise = Callable[[Tensor, Tensor, "Tensor | None"], tuple[Tensor, Tensor]]


class GraphUnavailable(RuntimeError):
    """The graphed engine cannot run here: no CUDA, a failed capture, or a failed self-check."""


class _RecentlyFailed(GraphUnavailable):
    """A shape whose capture failed within ``RETRY_CAPTURE_S``: eager, without trying again."""


def buckets(limit: int) -> list[int]:
    """The powers of two up to ``limit`` (itself a power of two)."""
    return [1 << k for k in range(limit.bit_length()) if 1 << k <= limit]


def batch_bucket(batch: int, max_batch: int) -> int:
    """The program batch a batch of ``batch`` rows (at most ``max_batch``) runs in."""
    return min(max_batch, 1 << (batch - 1).bit_length())


def step_pieces(steps: int, max_steps: int) -> list[int]:
    """The chunk lengths T timesteps run as: ``max_steps`` pieces, then T's binary digits."""
    pieces = [max_steps] * (steps // max_steps)
    rest = steps % max_steps
    pieces += [1 << k for k in reversed(range(rest.bit_length())) if rest >> k & 1]
    return pieces


def _pointwise(variant: Variant, fuse: bool) -> tuple[Pointwise, bool]:
    """The cell's pointwise part for ``variant`` (h, c only), compiled when ``fuse``; whether it
    is. The compiled one is tried once here, so a backend that cannot compile is known early."""

    def update(gates: Tensor, c: Tensor, peephole: Tensor | None) -> tuple[Tensor, Tensor]:
        h, c, *_ = cell_update(gates, c, variant, peephole)
        return h, c

    if not fuse:
        return update, False
    try:
        dynamo = torch._dynamo.config
        for name in ("recompile_limit", "cache_size_limit"):  # the name moved between versions
            if hasattr(dynamo, name):
                setattr(dynamo, name, max(getattr(dynamo, name), RECOMPILE_LIMIT))
        return torch.compile(update, fullgraph=True), True
    except Exception as e:  # torch.compile raises many kinds; eager is always right
        log.warning("graphed engine: the cell's pointwise part runs eager: %s", e)
        return update, False


class _Program:
    """A computation at one shape over buffers of its own: ``inputs`` are written before a run,
    ``outputs`` hold its results until the next run of the same program. ``body`` computes the
    outputs from the inputs, op by op; ``capture`` records that into a CUDA graph, replayed
    since."""

    def __init__(self, inputs: tuple[Tensor, ...], body: Callable[..., tuple[Tensor, ...]]) -> None:
        self.inputs = inputs
        self._body = body
        self.graph: Any = None
        self.outputs = self.body()

    def body(self) -> tuple[Tensor, ...]:
        return self._body(*self.inputs)

    def capture(self) -> None:
        """Capture ``body`` into a CUDA graph over this program's buffers (after warm-up runs on
        a side stream, as CUDA graphs need: cuBLAS's workspace, the compiled kernels' loading).

        ``thread_local``: other threads (the event loop's scatter, another version's rounds) may
        go on using CUDA meanwhile. The current stream is restored even when the capture fails.
        cuBLAS's workspaces are cleared first, so this graph allocates its own in its private
        pool rather than use one that another graph's pool owns (as inductor's CUDA graph trees
        do)."""
        device = self.inputs[0].device
        with _CAPTURING, torch.cuda.stream(torch.cuda.current_stream(device)):
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(2):
                    self.body()
            torch.cuda.current_stream(device).wait_stream(side)
            clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
            if clear is not None:
                clear()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                self.outputs = self.body()
            self.graph = graph

    def run(self) -> tuple[Tensor, ...]:
        if self.graph is not None:
            self.graph.replay()
        else:
            self.outputs = self.body()
        return self.outputs


class _Programs:
    """Programs by shape: each made (built and, on a GPU, captured) on its first use and kept.
    A shape whose making failed raises ``GraphUnavailable``, then ``_RecentlyFailed`` until
    ``RETRY_CAPTURE_S`` have passed, when it is tried again."""

    def __init__(self) -> None:
        self.built: dict[Hashable, _Program] = {}
        self.failed: dict[Hashable, float] = {}  # shape -> when its capture failed

    def get(self, key: Hashable, make: Callable[[], _Program]) -> _Program:
        program = self.built.get(key)
        if program is not None:
            return program
        failed = self.failed.get(key)
        if failed is not None and time.monotonic() - failed < RETRY_CAPTURE_S:
            raise _RecentlyFailed(f"the {key} program's capture failed less than a minute ago")
        try:
            program = make()
        except Exception as e:
            self.failed[key] = time.monotonic()
            raise GraphUnavailable(f"capturing the {key} program failed: {e}") from e
        self.failed.pop(key, None)
        self.built[key] = program
        return program


class GraphedLSTM:
    """``StackedLSTM``'s inference forward from bucketed, captured programs; the eager stack for
    the rest. An engine serves the weights it was built with in place: programs read the
    stack's parameters, so changing them in place is seen; replacing them is not (build another).
    """

    def __init__(
        self,
        stack: StackedLSTM,
        *,
        max_batch: int = MAX_BATCH,
        max_steps: int = MAX_STEPS,
        capture: bool | None = None,
        fuse: bool = True,
    ) -> None:
        for name, limit in (("max_batch", max_batch), ("max_steps", max_steps)):
            if limit < 1 or limit & (limit - 1):
                raise ValueError(f"{name} must be a power of two, got {limit}")
        self.stack = stack
        p = stack.cells[0].weight_hh
        self.device = p.device
        self.dtype = p.dtype
        self.capture = self.device.type == "cuda" if capture is None else capture
        if self.capture and self.device.type != "cuda":
            raise GraphUnavailable("CUDA graphs need the stack on a CUDA device")
        if self.dtype is not torch.float32:
            raise GraphUnavailable(f"the graphed engine runs float32 stacks, not {self.dtype}")
        self.max_batch, self.max_steps = max_batch, max_steps
        self.pointwise, self.fused = _pointwise(stack.variant, fuse)
        self.peephole: list[Tensor | None] = [
            cell.peephole if stack.variant == "peephole" else None for cell in stack.cells
        ]
        self._programs = _Programs()
        self._lock = threading.Lock()
        try:
            self.self_check()
        except Exception as e:
            if self.fused:
                # A compiled pointwise part that cannot run, or be captured, here (a backend
                # missing at run time, a kernel that differs): the programs again, eager.
                log.warning("graphed engine: the compiled pointwise part failed (%s); eager", e)
                self.pointwise, self.fused = _pointwise(stack.variant, False)
                self._programs = _Programs()
                self.self_check()
            else:
                raise

    @property
    def programs(self) -> dict[Hashable, _Program]:
        """The stack's programs built so far, by (bucket batch, steps)."""
        return self._programs.built

    def handles(self, x: Tensor, return_gates: bool) -> bool:
        """Whether this call runs from the programs; the eager stack answers every other."""
        return x.device == self.device and self.stack.plain_inference(x, return_gates)

    def __call__(
        self, x: Tensor, state: LSTMState | None = None, *, return_gates: bool = False
    ) -> tuple[Tensor, LSTMState, GateTrace | None]:
        if not self.handles(x, return_gates):
            return self.stack(x, state, return_gates=return_gates)
        try:
            out, new_state = self.forward(x, state)
        except _RecentlyFailed:
            return self.stack(x, state)  # said when it failed
        except GraphUnavailable as e:
            # A shape first met while serving whose capture failed (memory, say): this call
            # runs eager, and the next one of that shape tries again.
            log.warning("graphed engine: %s; this call ran eager", e)
            return self.stack(x, state)
        return out, new_state, None

    @torch.no_grad()
    def forward(self, x: Tensor, state: LSTMState | None = None) -> tuple[Tensor, LSTMState]:
        """(B, T, input) float32 on the engine's device -> outputs (B, T, hidden), final state."""
        B = x.shape[0]
        L, H = self.stack.num_layers, self.stack.hidden_size
        if state is None:
            state = LSTMState.zeros(L, B, H, device=self.device)
        elif state.h.shape != (L, B, H) or state.c.shape != (L, B, H):
            raise ValueError(f"state of shape {tuple(state.h.shape)}, expected {(L, B, H)}")
        outs, hs, cs = [], [], []
        with self._lock:
            for lo in range(0, B, self.max_batch):
                hi = min(B, lo + self.max_batch)
                out, h, c = self._rows(x[lo:hi], state.h[:, lo:hi], state.c[:, lo:hi])
                outs.append(out)
                hs.append(h)
                cs.append(c)
        if len(outs) == 1:
            return outs[0], LSTMState(hs[0], cs[0])
        return torch.cat(outs), LSTMState(torch.cat(hs, dim=1), torch.cat(cs, dim=1))

    def _rows(self, x: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """At most ``max_batch`` rows through the programs of their bucket, piece by piece."""
        b = x.shape[0]
        bucket = batch_bucket(b, self.max_batch)
        outs = []
        start = 0
        for steps in step_pieces(x.shape[1], self.max_steps):
            program = self.program(bucket, steps)
            x_in, h_in, c_in = program.inputs
            x_in[:b].copy_(x[:, start : start + steps])
            h_in[:, :b].copy_(h)
            c_in[:, :b].copy_(c)
            out, hn, cn = program.run()
            outs.append(out[:b].clone())
            h, c = hn[:, :b], cn[:, :b]
            start += steps
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
        return out, h.clone(), c.clone()

    def program(self, batch: int, steps: int) -> _Program:
        """The program of one (bucket batch, steps) shape: built and captured on first use, then
        kept; ``GraphUnavailable`` when that fails (and for ``RETRY_CAPTURE_S`` after)."""

        def make() -> _Program:
            L, H = self.stack.num_layers, self.stack.hidden_size
            inputs = (
                torch.zeros(batch, steps, self.stack.input_size, device=self.device),
                torch.zeros(L, batch, H, device=self.device),
                torch.zeros(L, batch, H, device=self.device),
            )
            return self._made(_Program(inputs, self._body))

        return self._programs.get((batch, steps), make)

    def _made(self, program: _Program) -> _Program:
        """``program``, captured when this engine captures."""
        if self.capture:
            program.capture()
        return program

    def _body(self, x: Tensor, h0: Tensor, c0: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        out, state, _ = self.unrolled(x, LSTMState(h0, c0))
        return out, state.h, state.c

    def unrolled(
        self, x: Tensor, state: LSTMState | None = None, *, return_gates: bool = False
    ) -> tuple[Tensor, LSTMState, GateTrace | None]:
        """The eager stack's inference forward as the programs compute it, layer by layer,
        timestep by timestep, with this engine's pointwise part: what a program captures, and
        what runs the stack inside a caller's own program (``GraphedSteps``)."""
        if return_gates:
            raise ValueError("the graphed engine has no gate traces")
        if state is None:
            state = self.stack.zero_state(x.shape[0])
        out = x
        hs, cs = [], []
        for k, cell in enumerate(self.stack.cells):
            x_proj = cell.project_input(out)  # (B, T, blocks * H)
            w_hh_t = cell.weight_hh.t()
            h, c = state.h[k], state.c[k]
            steps = []
            for t in range(x.shape[1]):
                gates = torch.addmm(x_proj[:, t], h, w_hh_t)
                h, c = self.pointwise(gates, c, self.peephole[k])
                steps.append(h)
            out = torch.stack(steps, dim=1)
            hs.append(h)
            cs.append(c)
        return out, LSTMState(torch.stack(hs), torch.stack(cs)), None

    @torch.no_grad()
    def warm(self, batches: list[int] | None = None, steps: tuple[int, ...] = (1,)) -> None:
        """Capture the programs of these batch buckets (every one by default) and chunk
        lengths ahead of their first call."""
        with self._lock:
            for batch in buckets(self.max_batch) if batches is None else batches:
                for n in steps:
                    self.program(batch_bucket(batch, self.max_batch), n)

    @torch.no_grad()
    def self_check(self, atol: float = 1e-5) -> None:
        """The engine against the eager stack on a small random input (3 rows: a padded bucket;
        5 timesteps: three chained pieces), before it serves."""
        generator = torch.Generator().manual_seed(0)
        L, H = self.stack.num_layers, self.stack.hidden_size
        x = torch.randn(3, 5, self.stack.input_size, generator=generator).to(self.device)
        state = LSTMState(
            torch.randn(L, 3, H, generator=generator).to(self.device),
            torch.randn(L, 3, H, generator=generator).to(self.device),
        )
        was_training = self.stack.training
        self.stack.eval()
        try:
            ref_out, ref_state, _ = self.stack(x, state)
            out, new_state = self.forward(x, state)
        finally:
            self.stack.train(was_training)
        worst = max(
            (out - ref_out).abs().max().item(),
            (new_state.h - ref_state.h).abs().max().item(),
            (new_state.c - ref_state.c).abs().max().item(),
        )
        if not worst <= atol:
            raise GraphUnavailable(f"the graphed engine differs from the eager stack by {worst}")


def graphed_engine(stack: StackedLSTM, max_batch: int | None = None) -> GraphedLSTM:
    """The engine a server runs on a GPU: captured programs, the one-timestep ones for every
    batch bucket up to ``max_batch`` (the batcher's limit) captured now, before it serves."""
    if stack.cells[0].weight_hh.device.type != "cuda":
        raise GraphUnavailable("the graphed engine runs on a CUDA device (none holds this stack)")
    limit = MAX_BATCH if max_batch is None else 1 << (max(1, max_batch) - 1).bit_length()
    try:
        engine = GraphedLSTM(stack, max_batch=limit)
        engine.warm()
    except GraphUnavailable:
        raise
    except Exception as e:  # a capture or a compile that fails here: eager serves instead
        raise GraphUnavailable(f"building the graphed engine failed: {e}") from e
    return engine


class StateRows(Protocol):
    """Where a service keeps its sessions' states, one row (slot) each, in tensors that are
    written in place and never replaced (service/sessions.py's ``StatePool``)."""

    h: Tensor  # (layers, capacity, hidden)
    c: Tensor
    stats: Tensor  # (capacity, stats_width) float64: a running-scaled model's statistics
    next_mean: Tensor  # (capacity, F): the forecast made for each session's next value
    next_std: Tensor


class GraphedSteps:
    """A round's steps (``model.forecaster.step_kept``) from captured programs on a GPU: each
    gathers its rows' states from ``rows`` by slot, runs the whole forecaster (normalisation or
    the running statistics, the stack, the head) and scores each value, all inside one CUDA
    graph; around the engine's stack programs those were about forty kernel launches a round
    for the shipped model at one value (counted from the code, not profiled), each costing more
    than its work, and its running statistics' ten more per further value.

    The engine's bucketing: batches in the program of the next power of two (padding rows gather
    whatever slot their buffer last held, and are dropped), chunks as power-of-two pieces, the
    first gathering from ``rows``, each later one starting from the piece before. Writing the new
    states back stays with the caller (``StatePool.scatter``), after the persister accepted them.
    ``__call__`` answers None where a program cannot be made (its capture failed): the caller
    runs the step eagerly, through the engine's stack programs."""

    def __init__(self, model: AnyForecaster, engine: GraphedLSTM, rows: StateRows) -> None:
        if engine.stack is not model.lstm:
            raise ValueError("the engine was built for another stack")
        self.model, self.engine, self.rows = model, engine, rows
        self._programs = _Programs()
        self._lock = threading.Lock()

    @staticmethod
    def of(model: AnyForecaster, rows: StateRows) -> GraphedSteps | None:
        """The captured steps of ``model`` over ``rows`` when its stack runs through a
        ``GraphedLSTM``, checked against the eager steps and, on a GPU, the one-timestep
        programs captured; None otherwise, or where that fails (said in the log)."""
        engine = model.engine
        if not isinstance(engine, GraphedLSTM):
            return None
        steps = GraphedSteps(model, engine, rows)
        started = time.perf_counter()
        try:
            steps.self_check()
            if engine.capture:
                steps.warm()
        except Exception as e:  # eager steps are always right
            log.warning("graphed steps: %s; a round's steps run eager around the engine", e)
            return None
        log.info(
            "graphed steps: %d programs %s in %.2f s",
            len(steps.programs),
            "captured" if engine.capture else "built (uncaptured)",
            time.perf_counter() - started,
        )
        return steps

    @property
    def programs(self) -> dict[Hashable, _Program]:
        """The programs built so far, by (bucket batch, steps, whether it gathers)."""
        return self._programs.built

    def handles(self, return_gates: bool) -> bool:
        return not return_gates and not self.model.training

    @torch.no_grad()
    def __call__(self, slots: Tensor, x: Tensor) -> KeptStep | None:
        """``step_kept`` for the sessions at ``slots`` (B,) over chunks ``x`` (B, T, F), their
        states and last forecasts read from ``rows``; None where no program can run it."""
        if x.shape[0] > self.engine.max_batch:
            return None
        try:
            with self._lock:
                return self._pieces(slots, x)
        except _RecentlyFailed:
            return None  # said when it failed
        except GraphUnavailable as e:
            log.warning("graphed steps: %s; this round's steps ran eager", e)
            return None

    def _pieces(self, slots: Tensor, x: Tensor) -> KeptStep:
        b, T = x.shape[0], x.shape[1]
        bucket = batch_bucket(b, self.engine.max_batch)
        # Each piece's values are copied out as soon as it ran: a chunk of more than two
        # max_steps pieces replays one program several times, over the same output buffers.
        mean_out, std_out, z_out = (torch.empty_like(x) for _ in range(3))
        outputs: tuple[Tensor, ...] = ()
        start = 0
        for steps in step_pieces(T, self.engine.max_steps):
            program = self.program(bucket, steps, gathers=not outputs)
            if not outputs:
                slots_in, x_in = program.inputs
                slots_in[:b].copy_(slots)
            else:  # from the piece before: its state, its last forecast
                x_in, *state_in = program.inputs
                mean, std, _, h, c, stats = outputs
                after = (h, c, stats, mean[:, -1], std[:, -1])
                for into, value in zip(state_in, after, strict=True):
                    into.copy_(value)
            x_in[:b].copy_(x[:, start : start + steps])
            outputs = program.run()
            for into, value in zip((mean_out, std_out, z_out), outputs[:3], strict=True):
                into[:, start : start + steps].copy_(value[:b])
            start += steps
        _, _, _, h, c, stats = outputs
        kept = stats[:b].clone() if self.model.stats_width else None
        state = LSTMState(h[:, :b].clone(), c[:, :b].clone())
        return KeptStep(mean_out, std_out, z_out, state, kept, None)

    def program(self, batch: int, steps: int, *, gathers: bool) -> _Program:
        """The program of one (bucket batch, steps) shape: the first piece of a chunk
        (``gathers``: its inputs the slots and the values) or a later one (the values and the
        state after the piece before)."""
        device = self.engine.device
        L, H = self.model.lstm.num_layers, self.model.lstm.hidden_size
        F_, S = self.model.config.n_features, self.rows.stats.shape[1]

        def make() -> _Program:
            x = torch.zeros(batch, steps, F_, device=device)
            if gathers:
                slots = torch.zeros(batch, dtype=torch.long, device=device)
                return self.engine._made(_Program((slots, x), self._gathered))
            state = (
                torch.zeros(L, batch, H, device=device),
                torch.zeros(L, batch, H, device=device),
                torch.zeros(batch, S, dtype=torch.float64, device=device),
                torch.zeros(batch, F_, device=device),
                torch.ones(batch, F_, device=device),
            )
            return self.engine._made(_Program((x, *state), self._chained))

        return self._programs.get((batch, steps, gathers), make)

    def _gathered(
        self, slots: Tensor, x: Tensor, stack: StackEngine | None = None
    ) -> tuple[Tensor, ...]:
        rows = self.rows
        if self.model.stats_width:
            stats = rows.stats.index_select(0, slots)
        else:  # none kept: an empty (B, 0), gathering nothing
            stats = torch.empty((x.shape[0], 0), dtype=torch.float64, device=x.device)
        return self._chained(
            x,
            rows.h.index_select(1, slots),
            rows.c.index_select(1, slots),
            stats,
            rows.next_mean.index_select(0, slots),
            rows.next_std.index_select(0, slots),
            stack,
        )

    def _chained(
        self,
        x: Tensor,
        h: Tensor,
        c: Tensor,
        stats: Tensor,
        prev_mean: Tensor,
        prev_std: Tensor,
        stack: StackEngine | None = None,
    ) -> tuple[Tensor, ...]:
        """A piece's outputs (mean, std, z, h, c, stats): ``step_kept`` with the stack run by
        ``stack``, by default the engine's unrolled ops (what a program captures)."""
        kept = stats if self.model.stats_width else None
        run = self.engine.unrolled if stack is None else stack
        step = step_kept(self.model, x, LSTMState(h, c), kept, prev_mean, prev_std, stack=run)
        stats_after = stats if step.stats is None else step.stats
        return step.mean, step.std, step.z, step.lstm.h, step.lstm.c, stats_after

    @torch.no_grad()
    def warm(self, batches: list[int] | None = None, steps: tuple[int, ...] = (1,)) -> None:
        """Make the gathering programs of these batch buckets (every one by default) and chunk
        lengths ahead of their first round. One that fails is said in the log and left to be
        tried at its first round (``RETRY_CAPTURE_S`` on); the others are kept."""
        with self._lock:
            for batch in buckets(self.engine.max_batch) if batches is None else batches:
                for n in steps:
                    bucket = batch_bucket(batch, self.engine.max_batch)
                    try:
                        self.program(bucket, n, gathers=True)
                    except GraphUnavailable as e:
                        log.warning("graphed steps: %s; that shape runs eager for now", e)

    @torch.no_grad()
    def self_check(self, tolerance: float = 1e-5) -> None:
        """The programs against the eager steps (the eager stack, not the engine's programs) on
        3 rows (a padded bucket) of 5 values (two chained pieces) from slots 0 and 1 of
        ``rows`` as they are, before any round: each difference at most ``tolerance`` times
        the larger of 1 and the value."""
        capacity = self.rows.h.shape[1]
        slots = torch.tensor([0, min(1, capacity - 1), 0], device=self.engine.device)
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(3, 5, self.model.config.n_features, generator=generator) + 1.0
        x = x.to(self.engine.device)
        mean, std, z, h, c, stats = self._gathered(slots, x, stack=self.model.lstm)
        got = self(slots, x)
        if got is None:
            raise GraphUnavailable("its programs could not be made")
        pairs = [(got.mean, mean), (got.std, std), (got.lstm.h, h), (got.lstm.c, c)]
        pairs.append((got.z.nan_to_num(), z.nan_to_num()))
        if got.stats is not None:
            pairs.append((got.stats.float(), stats.float()))
        # Relative to the values' size above 1: the forecasts are in the series' raw units.
        worst = max(((a - b).abs() / (1 + b.abs())).max().item() for a, b in pairs)
        if not worst <= tolerance:
            raise GraphUnavailable(f"the graphed steps differ from the eager ones by {worst}")
