"""The GPU engine (model/graphed.py) against the eager StackedLSTM it stands in for.

On a CPU its programs run their bodies directly (``capture=False``): that checks the bucketing,
the padding rows, the chained pieces and the fallbacks. The capture into CUDA graphs, and the
compiled pointwise part on a GPU, are checked by the ``gpu`` tests at the end, where CUDA is.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import model.graphed as graphed
from model import ForecasterConfig, LSTMForecaster, LSTMState, Normalisation, StackedLSTM
from model.checkpoint import AnyForecaster, build_forecaster
from model.forecaster import KeptStep, step_kept
from model.graphed import (
    GraphedLSTM,
    GraphedSteps,
    GraphUnavailable,
    batch_bucket,
    buckets,
    step_pieces,
)
from model.native import build_engine
from service.sessions import StatePool

VARIANTS = ["standard", "peephole", "coupled"]
ATOL = 1e-6  # issue 14's bound for float32


def make(variant: str, input_size: int = 3, hidden: int = 13, layers: int = 2) -> StackedLSTM:
    torch.manual_seed(hidden * 100 + layers * 10 + len(variant))
    return StackedLSTM(input_size, hidden, layers, variant=variant).eval()  # type: ignore[arg-type]


def random_state(stack: StackedLSTM, batch: int) -> LSTMState:
    shape = (stack.num_layers, batch, stack.hidden_size)
    return LSTMState(torch.randn(shape), torch.randn(shape))


def assert_same(got: tuple[torch.Tensor, LSTMState], want: tuple[torch.Tensor, LSTMState]) -> None:
    torch.testing.assert_close(got[0], want[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(got[1].h, want[1].h, atol=ATOL, rtol=0)
    torch.testing.assert_close(got[1].c, want[1].c, atol=ATOL, rtol=0)


def test_buckets_cover_every_shape_with_few_programs() -> None:
    assert buckets(8) == [1, 2, 4, 8]
    assert [batch_bucket(b, 8) for b in (1, 2, 3, 5, 8)] == [1, 2, 4, 8, 8]
    for steps in range(1, 70):
        pieces = step_pieces(steps, 16)
        assert sum(pieces) == steps
        assert all(p in buckets(16) for p in pieces)
        assert pieces == sorted(pieces, reverse=True)
    assert step_pieces(37, 16) == [16, 16, 4, 1]
    with pytest.raises(ValueError, match="power of two"):
        GraphedLSTM(make("standard"), max_batch=6, fuse=False)


class ReplayedGraph:
    """A CUDA graph's replay on a CPU: the body runs again and its results are written, in place,
    into the tensors the capture returned, as a replay writes the same memory each time (what
    a program that ran its body directly, allocating new outputs, could not show: a result
    read after the next replay of its program; found in review)."""

    def __init__(self, program: graphed._Program) -> None:
        self.program = program

    def replay(self) -> None:
        for into, value in zip(self.program.outputs, self.program.body(), strict=True):
            into.copy_(value)


@pytest.fixture(params=["direct", "replayed"])
def replayed(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """Whether programs are 'captured' (``ReplayedGraph``) in this test: engines built in it
    set ``capture`` to this."""
    if request.param == "replayed":

        def capture(self: graphed._Program) -> None:
            self.graph = ReplayedGraph(self)

        monkeypatch.setattr(graphed._Program, "capture", capture)
    return bool(request.param == "replayed")


def engine_of(stack: StackedLSTM, replay: bool, **kwargs: int) -> GraphedLSTM:
    engine = GraphedLSTM(stack, fuse=False, **kwargs)  # type: ignore[arg-type]
    engine.capture = replay  # (set after the self-check, which then ran directly)
    return engine


@pytest.mark.parametrize("variant", VARIANTS)
def test_equals_the_eager_stack_at_every_batch_and_chunk(variant: str, replayed: bool) -> None:
    stack = make(variant)
    engine = engine_of(stack, replayed, max_batch=4, max_steps=8)
    engine.programs.clear()
    # Batches: one row, a padded bucket, exactly the largest, above it (pieces of 4 rows);
    # chunks: one step, a sum of three programs, above max_steps, three max_steps pieces.
    for batch, steps in itertools.product([1, 3, 4, 9], [1, 7, 19, 26]):
        x = torch.randn(batch, steps, stack.input_size)
        state = random_state(stack, batch)
        with torch.no_grad():
            want = stack(x, state)
            got = engine(x, state)
        assert got[2] is None
        assert_same((got[0], got[1]), (want[0], want[1]))
        assert got[0].shape == (batch, steps, stack.hidden_size)
    # Every call ran from 2 batch buckets x 4 lengths.
    assert set(engine.programs) == set(itertools.product([1, 4], [1, 2, 4, 8]))
    assert all((p.graph is not None) == replayed for p in engine.programs.values())


@pytest.mark.parametrize("variant", VARIANTS)
def test_chunks_equal_the_whole_through_it(variant: str, replayed: bool) -> None:
    stack = make(variant)
    engine = engine_of(stack, replayed, max_batch=8, max_steps=16)
    x = torch.randn(5, 41, stack.input_size)
    with torch.no_grad():
        whole, whole_state, _ = engine(x)
        state, outs = None, []
        for lo, hi in [(0, 1), (1, 8), (8, 9), (9, 30), (30, 41)]:
            out, state, _ = engine(x[:, lo:hi], state)
            outs.append(out)
        reference, reference_state, _ = stack(x)
    assert state is not None
    assert_same((torch.cat(outs, dim=1), state), (whole, whole_state))
    assert_same((whole, whole_state), (reference, reference_state))


def test_a_call_leaves_no_trace_in_the_next(replayed: bool) -> None:
    """Programs own their buffers: what a call returns is its own, a later call cannot change
    it, and rows padded in one call do not leak into another's."""
    stack = make("standard")
    engine = engine_of(stack, replayed, max_batch=8)
    x1, x2 = torch.randn(3, 2, 3), torch.randn(7, 2, 3)
    with torch.no_grad():
        out1, state1, _ = engine(x1)
        kept = out1.clone(), state1.h.clone()
        engine(x2)  # 7 rows: the 8-row bucket
        engine(x1 * 5)  # the same 4-row programs as the first call
        assert torch.equal(out1, kept[0]) and torch.equal(state1.h, kept[1])
        assert_same(engine(x1)[:2], stack(x1)[:2])


def test_gates_gradients_and_training_run_on_the_eager_stack() -> None:
    stack = make("peephole")
    engine = GraphedLSTM(stack, max_batch=4, fuse=False)
    x = torch.randn(2, 3, 3)
    with torch.no_grad():
        out, _, gates = engine(x, return_gates=True)
        assert gates is not None and gates.forget.shape == (2, 2, 3)
        assert not engine.handles(x.double(), False)
    out, _, _ = engine(x)  # grad enabled and the weights want it: eager, differentiable
    out.sum().backward()
    assert stack.cells[0].weight_hh.grad is not None
    stack.train()
    assert not engine.handles(x, False)


def test_refuses_what_it_cannot_serve() -> None:
    with pytest.raises(GraphUnavailable, match="float32"):
        GraphedLSTM(make("standard").double(), fuse=False)
    with pytest.raises(GraphUnavailable, match="CUDA"):
        GraphedLSTM(make("standard"), capture=True, fuse=False)
    with pytest.raises(GraphUnavailable, match="CUDA device"):
        build_engine("graphed", make("standard"))


def test_the_service_start_refuses_graphed_without_a_gpu() -> None:
    pytest.importorskip("bentoml", reason="the service start needs BentoML; a GPU image lacks it")
    from service.startup import model_engine

    model = LSTMForecaster(ForecasterConfig(hidden_size=8, num_layers=2)).eval()
    with pytest.raises(RuntimeError, match="LSTM_MODEL_ENGINE=graphed: the graphed engine runs"):
        model_engine("graphed", model)


def test_a_pointwise_part_that_fails_compiled_runs_eager(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(fn: object, **_: object) -> object:
        def run(*args: object) -> object:
            raise RuntimeError("no backend for this device")

        return run

    monkeypatch.setattr(torch, "compile", broken)
    stack = make("coupled")
    with caplog.at_level("WARNING", logger="model.graphed"):
        engine = GraphedLSTM(stack, max_batch=4)
    assert not engine.fused
    assert "no backend for this device" in caplog.text
    x = torch.randn(3, 6, 3)
    with torch.no_grad():
        assert_same(engine(x)[:2], stack(x)[:2])


def test_a_capture_that_fails_while_serving_runs_that_call_eager(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    stack = make("standard")
    engine = GraphedLSTM(stack, max_batch=8, fuse=False)
    engine.capture = True  # as on a GPU, where a new shape is captured at its first call

    def out_of_memory(self: object) -> None:
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(graphed._Program, "capture", out_of_memory)
    x = torch.randn(6, 2, 3)
    with torch.no_grad(), caplog.at_level("WARNING", logger="model.graphed"):
        got = engine(x)
        want = stack(x)
    assert "capturing the (8, 2) program failed: CUDA out of memory" in caplog.text
    assert (8, 2) not in engine.programs
    torch.testing.assert_close(got[0], want[0], atol=0, rtol=0)
    # For a minute that shape runs eager without trying (or saying so) again; then it tries.
    caplog.clear()
    with torch.no_grad(), caplog.at_level("WARNING", logger="model.graphed"):
        torch.testing.assert_close(engine(x)[0], want[0], atol=0, rtol=0)
    assert caplog.text == ""
    monkeypatch.undo()
    engine._programs.failed[(8, 2)] -= graphed.RETRY_CAPTURE_S
    engine.capture = False  # (a CPU: the retried program runs uncaptured)
    with torch.no_grad():
        assert_same(engine(x)[:2], want[:2])
    assert (8, 2) in engine.programs and not engine._programs.failed


@pytest.mark.slow
def test_the_compiled_pointwise_part_equals_the_written_gates() -> None:
    """``torch.compile`` of ``cell_update`` (inductor; C++ on a CPU, Triton on a GPU): the
    fused kernel computes the gates as written, to 1e-6, for every variant; engines in one
    process share its compiled entries, and the third still compiles (with dynamo's default
    limit of 8 entries the coupled one ran unfused, found by review)."""
    for variant in VARIANTS:
        stack = make(variant)
        engine = GraphedLSTM(stack, max_batch=16, max_steps=8)
        if not engine.fused and variant == VARIANTS[0]:
            pytest.skip("torch.compile cannot compile here")
        assert engine.fused, variant
        for batch in (1, 6, 16):
            x = torch.randn(batch, 11, 3)
            state = random_state(stack, batch)
            with torch.no_grad():
                assert_same(engine(x, state)[:2], stack(x, state)[:2])


# A round's steps as programs (GraphedSteps): the pool's gather, the whole forecaster, the scores.


def forecaster(scaling: str, variant: str = "standard") -> AnyForecaster:
    torch.manual_seed(7)
    config = ForecasterConfig(
        feature_names=("a", "b"),
        hidden_size=9,
        variant=variant,  # type: ignore[arg-type]
        scaling=scaling,  # type: ignore[arg-type]
        scale_halflife=4.0 if scaling == "running" else 0.0,
    )
    return build_forecaster(config, Normalisation([10.0, -3.0], [2.0, 0.5])).eval()


def pool_for(model: AnyForecaster, capacity: int = 12, device: str = "cpu") -> StatePool:
    """A pool whose rows hold states a few chunks in: random (h, c), forecasts and statistics."""
    config = model.config
    pool = StatePool.for_model(model, capacity, device)
    pool.h.normal_()
    pool.c.normal_()
    pool.next_mean.normal_()
    pool.next_std.uniform_(0.5, 2.0)
    if model.stats_width:
        x = torch.randn(capacity, 6, config.n_features, device=device) * 3 + 5
        pool.stats.copy_(model.zero_state(capacity).stats.update(x, config.scale_decay)[0].flat())
    return pool


def eager_steps(model: AnyForecaster, pool: StatePool, slots: torch.Tensor, x: torch.Tensor):
    return step_kept(
        model,
        x,
        pool.gather(slots),
        pool.gather_stats(slots),
        pool.next_mean.index_select(0, slots),
        pool.next_std.index_select(0, slots),
    )


def assert_same_steps(got: KeptStep | None, want: KeptStep) -> None:
    """The stack's states to ``ATOL``; the forecasts, in raw units (tens here), to float32's
    rounding of them too; the scores, each a forecast's error over its std, to 1e-5."""
    assert got is not None
    for a, b in [(got.mean, want.mean), (got.std, want.std)]:
        torch.testing.assert_close(a, b, atol=ATOL, rtol=1e-6)
    torch.testing.assert_close(got.z, want.z, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.lstm.h, want.lstm.h, atol=ATOL, rtol=0)
    torch.testing.assert_close(got.lstm.c, want.lstm.c, atol=ATOL, rtol=0)
    if want.stats is None:
        assert got.stats is None
    else:
        assert got.stats is not None
        torch.testing.assert_close(got.stats, want.stats, atol=1e-12, rtol=0)


@pytest.mark.parametrize(("scaling", "variant"), [("global", "peephole"), ("running", "coupled")])
def test_graphed_steps_gather_from_the_pool_and_equal_the_eager_steps(
    scaling: str, variant: str, replayed: bool
) -> None:
    model = forecaster(scaling, variant)
    engine = engine_of(model.lstm, replayed, max_batch=4, max_steps=8)
    model.use_engine(engine)
    pool = pool_for(model)
    steps = GraphedSteps.of(model, pool)
    assert steps is not None  # its self-check passed
    # Batches: one row, a padded bucket, the largest; chunks: one value, three chained
    # pieces (4 + 2 + 1), above max_steps (8 + 8 + 2 + 1), one program three times (8 x 3 + 2).
    for batch, length in itertools.product([1, 3, 4], [1, 7, 19, 26]):
        slots = torch.randperm(pool.capacity)[:batch]
        x = torch.randn(batch, length, 2) * 2 + torch.tensor([10.0, -3.0])
        assert_same_steps(steps(slots, x), eager_steps(model, pool, slots, x))
    assert (4, 1, True) in steps.programs and (4, 2, False) in steps.programs
    assert all((p.graph is not None) == replayed for p in steps.programs.values())
    # A program reads the pool's rows at each run, not those of its first.
    slots, x = torch.tensor([2, 5]), torch.randn(2, 1, 2)
    before = steps(slots, x)
    pool.h[:, 5] += 1.0
    after = steps(slots, x)
    assert before is not None and after is not None
    torch.testing.assert_close(after.mean[0], before.mean[0], atol=0, rtol=0)
    assert not torch.allclose(after.mean[1], before.mean[1])
    assert_same_steps(after, eager_steps(model, pool, slots, x))
    # Above the engine's largest bucket: not its to run.
    assert steps(torch.arange(5), torch.randn(5, 1, 2)) is None


def test_graphed_steps_stream_chunks_as_the_whole(replayed: bool) -> None:
    """Each chunk's new state scattered into the pool, as a round does: the chunks' outputs and
    final state are the whole sequence's, and what a call returned stays as it was."""
    model = forecaster("running")
    model.use_engine(engine_of(model.lstm, replayed, max_batch=4, max_steps=8))
    pool = pool_for(model)
    steps = GraphedSteps.of(model, pool)
    assert steps is not None
    slots = torch.tensor([3, 0, 7])
    x = torch.randn(3, 40, 2) * 2 + 10
    whole = eager_steps(model, pool, slots, x)
    means, zs, kept, t = [], [], [], 0
    for size in (1, 5, 8, 9, 1, 16):
        got = steps(slots, x[:, t : t + size])
        assert got is not None
        pool.scatter(slots, got.lstm, got.mean[:, -1], got.std[:, -1], got.stats)
        means.append(got.mean)
        zs.append(got.z)
        kept.append((got.mean.clone(), got.lstm.h.clone()))
        t += size
    for got_mean, (mean, _) in zip(means, kept, strict=True):
        assert torch.equal(got_mean, mean)
    assert torch.equal(pool.gather(slots).h, kept[-1][1])
    torch.testing.assert_close(torch.cat(means, 1), whole.mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat(zs, 1), whole.z, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(pool.gather(slots).h, whole.lstm.h, atol=1e-5, rtol=0)


def test_graphed_steps_that_cannot_capture_leave_the_round_eager(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    model = forecaster("global")
    engine = GraphedLSTM(model.lstm, max_batch=8, fuse=False)
    model.use_engine(engine)
    pool = pool_for(model)
    steps = GraphedSteps.of(model, pool)
    assert steps is not None
    engine.capture = True  # as on a GPU

    def out_of_memory(self: object) -> None:
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(graphed._Program, "capture", out_of_memory)
    slots, x = torch.tensor([1, 2, 3]), torch.randn(3, 2, 2)
    with caplog.at_level("WARNING", logger="model.graphed"):
        assert steps(slots, x) is None
    assert "capturing the (4, 2, True) program failed: CUDA out of memory" in caplog.text
    # For a minute that shape is not tried again, nor said again; the round runs eager.
    caplog.clear()
    with caplog.at_level("WARNING", logger="model.graphed"):
        assert steps(slots, x) is None
    assert caplog.text == ""
    # GraphedSteps.of where no program can be captured (its self-check's): none, said why.
    with caplog.at_level("WARNING", logger="model.graphed"):
        assert GraphedSteps.of(model, pool) is None
    assert "a round's steps run eager around the engine" in caplog.text

    # Where only the largest bucket cannot (memory, say): the others are kept, that one is
    # said and tried again at its first round.
    def largest_fails(self: graphed._Program) -> None:
        if self.inputs[0].shape[0] == 8:
            raise RuntimeError("CUDA out of memory")
        self.graph = ReplayedGraph(self)

    monkeypatch.setattr(graphed._Program, "capture", largest_fails)
    caplog.clear()
    with caplog.at_level("WARNING", logger="model.graphed"):
        steps = GraphedSteps.of(model, pool)
    assert steps is not None
    assert {key[0] for key in steps.programs} == {1, 2, 4}
    assert "capturing the (8, 1, True) program failed" in caplog.text
    # The models whose stack runs elsewhere have none.
    model.use_engine(None)
    assert GraphedSteps.of(model, pool) is None


# On a GPU: the programs captured into CUDA graphs.

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.mark.gpu
@cuda
def test_on_cuda_auto_serves_captured_programs() -> None:
    stack = make("standard", 1, 64, 2).cuda()
    engine = build_engine("auto", stack, max_batch=256)
    assert isinstance(engine, GraphedLSTM) and engine.capture
    assert engine.fused, "torch.compile (Triton) did not compile the pointwise part: see the log"
    assert set(engine.programs) >= {(b, 1) for b in buckets(256)}
    assert all(p.graph is not None for p in engine.programs.values())


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("variant", VARIANTS)
def test_on_cuda_the_graphs_equal_the_eager_stack(variant: str) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    stack = make(variant, 1, 64, 2).cuda()
    engine = GraphedLSTM(stack, max_batch=1024, max_steps=256)
    assert engine.capture
    for batch, steps in itertools.product([1, 3, 64, 1000, 1500], [1, 7, 256, 300]):
        x = torch.randn(batch, steps, 1, device="cuda")
        shape = (2, batch, 64)
        state = LSTMState(torch.randn(shape, device="cuda"), torch.randn(shape, device="cuda"))
        with torch.no_grad():
            assert_same(engine(x, state)[:2], stack(x, state)[:2])
    assert all(p.graph is not None for p in engine.programs.values())


@pytest.mark.gpu
@cuda
def test_on_cuda_a_replay_reads_this_calls_inputs_and_chunks_equal_the_whole() -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    stack = make("peephole", 1, 64, 2).cuda()
    engine = GraphedLSTM(stack, max_batch=64, max_steps=64)
    x = torch.randn(5, 100, 1, device="cuda")
    with torch.no_grad():
        whole, whole_state, _ = engine(x)
        first = whole.clone()
        other, _, _ = engine(x + 1)
        assert not torch.allclose(other, first)  # the graph read the new inputs
        assert torch.equal(whole, first)  # and left the earlier result alone
        state, outs = None, []
        for lo, hi in [(0, 1), (1, 33), (33, 100)]:
            out, state, _ = engine(x[:, lo:hi], state)
            outs.append(out)
    assert state is not None
    assert_same((torch.cat(outs, dim=1), state), (whole, whole_state))


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("scaling", ["global", "running"])
def test_on_cuda_the_graphed_steps_gather_in_the_graph_and_equal_the_eager_steps(
    scaling: str,
) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    model = forecaster(scaling).cuda()
    pool = pool_for(model, capacity=80, device="cuda")
    model.use_engine(GraphedLSTM(model.lstm, max_batch=64, max_steps=64))
    steps = GraphedSteps.of(model, pool)
    assert steps is not None and steps.programs
    assert all(p.graph is not None for p in steps.programs.values())
    # Chunks: one value, 4 + 2 + 1, 64 + 32 + 4, one program three times (64 x 3 + 8).
    for batch, length in itertools.product([1, 3, 64], [1, 7, 100, 200]):
        slots = torch.randperm(pool.capacity, device="cuda")[:batch]
        x = torch.randn(batch, length, 2, device="cuda") * 2 + 10
        with torch.no_grad():
            assert_same_steps(steps(slots, x), eager_steps(model, pool, slots, x))
    # The replay reads the pool as it is now.
    slots, x = torch.tensor([2, 5], device="cuda"), torch.randn(2, 1, 2, device="cuda")
    with torch.no_grad():
        before = steps(slots, x)
        pool.h[:, 5] += 1.0
        after = steps(slots, x)
        assert before is not None and after is not None
        assert not torch.allclose(after.mean[1], before.mean[1])
        assert_same_steps(after, eager_steps(model, pool, slots, x))
