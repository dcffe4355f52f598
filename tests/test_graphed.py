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
from model import ForecasterConfig, LSTMForecaster, LSTMState, StackedLSTM
from model.graphed import GraphedLSTM, GraphUnavailable, batch_bucket, buckets, step_pieces
from model.native import build_engine

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


@pytest.mark.parametrize("variant", VARIANTS)
def test_equals_the_eager_stack_at_every_batch_and_chunk(variant: str) -> None:
    stack = make(variant)
    engine = GraphedLSTM(stack, max_batch=4, max_steps=8, fuse=False)
    # Batches: one row, a padded bucket, exactly the largest, above it (pieces of 4 rows);
    # chunks: one step, a sum of three programs, above max_steps.
    for batch, steps in itertools.product([1, 3, 4, 9], [1, 7, 19]):
        x = torch.randn(batch, steps, stack.input_size)
        state = random_state(stack, batch)
        with torch.no_grad():
            want = stack(x, state)
            got = engine(x, state)
        assert got[2] is None
        assert_same((got[0], got[1]), (want[0], want[1]))
        assert got[0].shape == (batch, steps, stack.hidden_size)
    # Every call (and the self-check's 3 rows x 5 steps) ran from 2 batch buckets x 4 lengths.
    assert set(engine.shapes()) == set(itertools.product([1, 4], [1, 2, 4, 8]))


@pytest.mark.parametrize("variant", VARIANTS)
def test_chunks_equal_the_whole_through_it(variant: str) -> None:
    stack = make(variant)
    engine = GraphedLSTM(stack, max_batch=8, max_steps=16, fuse=False)
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


def test_a_call_leaves_no_trace_in_the_next() -> None:
    """Programs own their buffers: what a call returns is its own, a later call cannot change
    it, and rows padded in one call do not leak into another's."""
    stack = make("standard")
    engine = GraphedLSTM(stack, max_batch=8, fuse=False)
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
    engine._failed[(8, 2)] -= graphed.RETRY_CAPTURE_S
    engine.capture = False  # (a CPU: the retried program runs uncaptured)
    with torch.no_grad():
        assert_same(engine(x)[:2], want[:2])
    assert (8, 2) in engine.programs and not engine._failed


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


# On a GPU: the programs captured into CUDA graphs.

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.mark.gpu
@cuda
def test_on_cuda_auto_serves_captured_programs() -> None:
    stack = make("standard", 1, 64, 2).cuda()
    engine = build_engine("auto", stack, max_batch=256)
    assert isinstance(engine, GraphedLSTM) and engine.capture
    assert engine.fused, "torch.compile (Triton) did not compile the pointwise part: see the log"
    assert set(engine.shapes()) >= {(b, 1) for b in buckets(256)}
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
