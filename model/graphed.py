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
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from model.lstm import GateTrace, LSTMState, StackedLSTM, Variant, cell_update

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
    """The stack's forward at one (batch, steps) shape over buffers of its own.

    ``x``, ``h0`` and ``c0`` are written before a run; ``out``, ``hn`` and ``cn`` hold its
    results until the next run of the same program.
    """

    def __init__(self, engine: GraphedLSTM, batch: int, steps: int) -> None:
        stack, device = engine.stack, engine.device
        L, H = stack.num_layers, stack.hidden_size
        self.engine = engine
        self.batch, self.steps = batch, steps
        self.x = torch.zeros(batch, steps, stack.input_size, device=device)
        self.h0 = torch.zeros(L, batch, H, device=device)
        self.c0 = torch.zeros(L, batch, H, device=device)
        self.graph: Any = None
        self.out, self.hn, self.cn = self.body()

    def body(self) -> tuple[Tensor, Tensor, Tensor]:
        """The eager stack's inference forward, layer by layer, timestep by timestep."""
        engine = self.engine
        out = self.x
        hs, cs = [], []
        for k, cell in enumerate(engine.stack.cells):
            x_proj = cell.project_input(out)  # (B, T, blocks * H)
            w_hh_t = cell.weight_hh.t()
            h, c = self.h0[k], self.c0[k]
            steps = []
            for t in range(self.steps):
                gates = torch.addmm(x_proj[:, t], h, w_hh_t)
                h, c = engine.pointwise(gates, c, engine.peephole[k])
                steps.append(h)
            out = torch.stack(steps, dim=1)
            hs.append(h)
            cs.append(c)
        return out, torch.stack(hs), torch.stack(cs)

    def capture(self) -> None:
        """Capture ``body`` into a CUDA graph over this program's buffers (after warm-up runs on
        a side stream, as CUDA graphs need: cuBLAS's workspace, the compiled kernels' loading).

        ``thread_local``: other threads (the event loop's scatter, another version's rounds) may
        go on using CUDA meanwhile. The current stream is restored even when the capture fails.
        cuBLAS's workspaces are cleared first, so this graph allocates its own in its private
        pool rather than use one that another graph's pool owns (as inductor's CUDA graph trees
        do)."""
        device = self.engine.device
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
                self.out, self.hn, self.cn = self.body()
            self.graph = graph

    def run(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            self.out, self.hn, self.cn = self.body()


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
        self.programs: dict[tuple[int, int], _Program] = {}
        self._lock = threading.Lock()
        self._failed: dict[tuple[int, int], float] = {}  # shape -> when its capture failed
        try:
            self.self_check()
        except Exception as e:
            if self.fused:
                # A compiled pointwise part that cannot run, or be captured, here (a backend
                # missing at run time, a kernel that differs): the programs again, eager.
                log.warning("graphed engine: the compiled pointwise part failed (%s); eager", e)
                self.pointwise, self.fused = _pointwise(stack.variant, False)
                self.programs.clear()
                self._failed.clear()
                self.self_check()
            else:
                raise

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
            program.x[:b].copy_(x[:, start : start + steps])
            program.h0[:, :b].copy_(h)
            program.c0[:, :b].copy_(c)
            program.run()
            outs.append(program.out[:b].clone())
            h, c = program.hn[:, :b], program.cn[:, :b]
            start += steps
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
        return out, h.clone(), c.clone()

    def program(self, batch: int, steps: int) -> _Program:
        """The program of one (bucket batch, steps) shape: built and captured on first use, then
        kept; ``GraphUnavailable`` when that fails (and for ``RETRY_CAPTURE_S`` after)."""
        key = (batch, steps)
        program = self.programs.get(key)
        if program is not None:
            return program
        failed = self._failed.get(key)
        if failed is not None and time.monotonic() - failed < RETRY_CAPTURE_S:
            raise _RecentlyFailed(f"the {key} program's capture failed less than a minute ago")
        try:
            program = _Program(self, batch, steps)
            if self.capture:
                program.capture()
        except Exception as e:
            self._failed[key] = time.monotonic()
            raise GraphUnavailable(f"capturing the {key} program failed: {e}") from e
        self._failed.pop(key, None)
        self.programs[key] = program
        return program

    def shapes(self) -> Iterator[tuple[int, int]]:
        return iter(sorted(self.programs))

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
