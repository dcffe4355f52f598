"""The native serving engine (model/native.py) against the eager StackedLSTM it stands in for."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

import model.native as native
from model import ForecasterConfig, LSTMForecaster, LSTMState, StackedLSTM
from model.native import NativeLSTM, NativeUnavailable, build_engine

if native.shutil.which("g++") is None and native.shutil.which("c++") is None:
    pytest.skip("no C++ compiler: the native engine cannot be built here", allow_module_level=True)

# (input, hidden, layers): the served shape, the wide one, and sizes that are not a multiple of
# the vector width (padding), one layer and three.
SHAPES = [(1, 64, 2), (64, 256, 2), (3, 5, 1), (4, 13, 3), (2, 17, 2)]
BATCHES = [1, 3, 64]
CHUNKS = [1, 7, 33]
ATOL = 1e-6  # the bound for float32: outputs and states equal eager's to 1e-6


def make(variant: str, input_size: int, hidden: int, layers: int) -> StackedLSTM:
    torch.manual_seed(hidden * 100 + layers * 10 + len(variant))
    return StackedLSTM(input_size, hidden, layers, variant=variant).eval()  # type: ignore[arg-type]


def served_state(stack: StackedLSTM, batch: int) -> LSTMState:
    """A state as the pool holds one: reached by running the stack over a random history."""
    with torch.no_grad():
        _, state, _ = stack(torch.randn(batch, 20, stack.input_size) * 2)
    return state


@pytest.fixture(scope="module")
def engines() -> dict[tuple[str, int, int, int], tuple[StackedLSTM, NativeLSTM]]:
    built = {}
    for variant, (i, h, layers) in itertools.product(("standard", "peephole", "coupled"), SHAPES):
        stack = make(variant, i, h, layers)
        built[(variant, i, h, layers)] = (stack, NativeLSTM(stack))
    return built


@pytest.mark.parametrize("variant", ["standard", "peephole", "coupled"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("chunk", CHUNKS)
def test_equals_eager_outputs_and_states(
    engines: dict[tuple[str, int, int, int], tuple[StackedLSTM, NativeLSTM]],
    variant: str,
    shape: tuple[int, int, int],
    batch: int,
    chunk: int,
) -> None:
    stack, engine = engines[(variant, *shape)]
    torch.manual_seed(batch * 1000 + chunk)
    x = torch.randn(batch, chunk, shape[0]) * 2
    for state in (None, served_state(stack, batch)):
        with torch.no_grad():
            ref_out, ref_state, _ = stack(x, state)
            out, new_state, gates = engine(x, state)
        assert gates is None
        assert out.shape == ref_out.shape and new_state.h.shape == ref_state.h.shape
        torch.testing.assert_close(out, ref_out, atol=ATOL, rtol=0)
        torch.testing.assert_close(new_state.h, ref_state.h, atol=ATOL, rtol=0)
        torch.testing.assert_close(new_state.c, ref_state.c, atol=ATOL, rtol=0)


@pytest.mark.parametrize("variant", ["standard", "peephole", "coupled"])
@pytest.mark.parametrize("shape", [(1, 64, 2), (3, 5, 1), (4, 13, 3)], ids=str)
def test_chunks_equal_the_whole_sequence(
    engines: dict[tuple[str, int, int, int], tuple[StackedLSTM, NativeLSTM]],
    variant: str,
    shape: tuple[int, int, int],
) -> None:
    stack, engine = engines[(variant, *shape)]
    torch.manual_seed(1)
    x = torch.randn(3, 40, shape[0])
    with torch.no_grad():
        whole, whole_state, _ = engine(x)
        ref, ref_state, _ = stack(x)
        state, outs = None, []
        for piece in x.split([1, 7, 1, 19, 12], dim=1):
            out, state, _ = engine(piece, state)
            outs.append(out)
    assert state is not None
    chunks = torch.cat(outs, dim=1)
    torch.testing.assert_close(chunks, whole, atol=ATOL, rtol=0)
    torch.testing.assert_close(state.h, whole_state.h, atol=ATOL, rtol=0)
    torch.testing.assert_close(state.c, whole_state.c, atol=ATOL, rtol=0)
    torch.testing.assert_close(chunks, ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(state.c, ref_state.c, atol=ATOL, rtol=0)


def test_gate_traces_come_from_the_eager_stack() -> None:
    stack = make("peephole", 2, 9, 2)
    engine = NativeLSTM(stack)
    x = torch.randn(4, 6, 2)
    with torch.no_grad():
        out, state, gates = engine(x, return_gates=True)
        ref_out, ref_state, ref_gates = stack(x, return_gates=True)
        assert engine.handles(x, return_gates=False) and not engine.handles(x, return_gates=True)
    assert gates is not None and ref_gates is not None
    for name in ("forget", "input", "output"):
        torch.testing.assert_close(getattr(gates, name), getattr(ref_gates, name), atol=0, rtol=0)
    torch.testing.assert_close(out, ref_out, atol=0, rtol=0)
    torch.testing.assert_close(state.c, ref_state.c, atol=0, rtol=0)


def test_autograd_and_training_go_to_the_eager_stack() -> None:
    stack = make("standard", 2, 8, 2)
    engine = NativeLSTM(stack)
    x = torch.randn(2, 5, 2)
    out, _, _ = engine(x)  # grad enabled, parameters that want it: eager, differentiable
    assert out.requires_grad
    out.sum().backward()
    assert stack.cells[0].weight_hh.grad is not None
    stack.train()
    with torch.no_grad():
        assert not engine.handles(x, return_gates=False)  # dropout would apply in training
    stack.eval()
    with torch.no_grad():
        assert engine.handles(x, return_gates=False)
        assert not engine.handles(x.double(), return_gates=False)
        assert not engine.handles(torch.randn(2, 5, 3), return_gates=False)


def test_a_nan_input_gives_nan_outputs_as_eager() -> None:
    """The round runner refuses non-finite outputs: the engine must not turn a NaN into a
    number (its exp clamps the argument, and a NaN has to pass through the clamp)."""
    stack = make("standard", 1, 64, 2)
    engine = NativeLSTM(stack)
    x = torch.randn(2, 3, 1)
    x[1, 1, 0] = float("nan")
    with torch.no_grad():
        out, state, _ = engine(x)
        ref, ref_state, _ = stack(x)
    assert torch.isnan(out[1, 1:]).all() and torch.isnan(state.c[:, 1]).all()
    assert torch.isfinite(out[0]).all() and torch.isfinite(out[1, 0]).all()
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0, equal_nan=True)
    torch.testing.assert_close(state.h, ref_state.h, atol=ATOL, rtol=0, equal_nan=True)


def test_large_inputs_saturate_as_eager() -> None:
    stack = make("coupled", 1, 16, 2)
    engine = NativeLSTM(stack)
    x = torch.tensor([[[1e4], [-1e4], [1e30], [0.0]]])
    with torch.no_grad():
        out, state, _ = engine(x)
        ref, ref_state, _ = stack(x)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(state.c, ref_state.c, atol=ATOL, rtol=0)


def test_a_wrong_state_shape_is_refused() -> None:
    stack = make("standard", 1, 8, 2)
    engine = NativeLSTM(stack)
    with pytest.raises(ValueError, match="state of shape"):
        engine.forward(torch.randn(3, 1, 1), LSTMState(torch.zeros(2, 2, 8), torch.zeros(2, 2, 8)))


def test_the_self_check_catches_an_engine_that_differs() -> None:
    stack = make("standard", 1, 8, 2)
    engine = NativeLSTM(stack)
    engine.self_check()
    with torch.no_grad():
        engine._packed[0].add_(0.01)  # layer 0's input weights, as the kernel reads them
    with pytest.raises(NativeUnavailable, match="differs from the eager stack"):
        engine.self_check()


def test_forecaster_through_the_engine_equals_eager() -> None:
    config = ForecasterConfig(feature_names=("a", "b"), hidden_size=12, num_layers=2)
    model = LSTMForecaster(config).eval()
    x = torch.randn(5, 9, 2)
    with torch.no_grad():
        ref = model(x)
        model.use_engine(build_engine("native", model.lstm))
        assert isinstance(model.engine, NativeLSTM)
        got = model(x)
        horizon = model.rollout(got.mean[:, -1], got.std[:, -1], got.state, 4)
        model.use_engine(None)
        ref_horizon = model.rollout(ref.mean[:, -1], ref.std[:, -1], ref.state, 4)
    torch.testing.assert_close(got.mean, ref.mean, atol=ATOL, rtol=0)
    torch.testing.assert_close(got.std, ref.std, atol=ATOL, rtol=0)
    torch.testing.assert_close(got.state.c, ref.state.c, atol=ATOL, rtol=0)
    torch.testing.assert_close(horizon[0], ref_horizon[0], atol=ATOL, rtol=0)
    assert not any(k.startswith("engine") for k in model.state_dict())


def test_the_eager_engine_is_the_stack_itself_and_never_registers_twice() -> None:
    model = LSTMForecaster(ForecasterConfig(hidden_size=8, num_layers=1))
    keys = set(model.state_dict())
    model.use_engine(build_engine("eager", model.lstm))
    assert model.engine is None and set(model.state_dict()) == keys
    with pytest.raises(ValueError, match="unknown engine"):
        build_engine("onnx", model.lstm)


def test_auto_is_native_on_a_float32_cpu_and_eager_otherwise() -> None:
    stack = make("standard", 1, 8, 1)
    assert isinstance(build_engine("auto", stack), NativeLSTM)
    double = make("standard", 1, 8, 1).double()
    assert build_engine("auto", double) is double
    with pytest.raises(NativeUnavailable, match="float32 models on a CPU"):
        build_engine("native", double)


def test_the_build_is_cached_by_source_and_compiler(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = native._build(cache=tmp_path)
    assert first.parent == tmp_path and first.exists()
    built_at = first.stat().st_mtime_ns
    again = native._build(cache=tmp_path)
    assert again == first and first.stat().st_mtime_ns == built_at  # not rebuilt
    changed = tmp_path / "native_lstm.cpp"
    changed.write_text(native.SOURCE.read_text() + "\n// another source, another library\n")
    monkeypatch.setattr(native, "SOURCE", changed)
    assert native._build(cache=tmp_path) != first


def test_no_compiler_means_native_is_unavailable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(native.shutil, "which", lambda name: None)
    with pytest.raises(NativeUnavailable, match="no C\\+\\+ compiler"):
        native._build(cache=tmp_path)


def test_a_failed_build_says_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    broken = tmp_path / "broken.cpp"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(native, "SOURCE", broken)
    with pytest.raises(NativeUnavailable, match=r"building broken\.cpp failed"):
        native._build(cache=tmp_path)
    assert not list(tmp_path.glob("*.so"))


@pytest.mark.gpu
def test_on_cuda_native_is_refused() -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    stack = make("standard", 1, 8, 2).cuda()  # (auto serves the graphed engine: test_graphed)
    with pytest.raises(NativeUnavailable):
        build_engine("native", stack)


@pytest.mark.parametrize(
    "flags",
    [("-mno-avx512f",), ("-mno-avx",)],
    ids=["avx2-geometry", "sse-only"],
)
@pytest.mark.parametrize("variant", ["standard", "peephole", "coupled"])
def test_builds_for_smaller_vector_units_equal_eager(flags: tuple[str, ...], variant: str) -> None:
    """The kernel as a CPU without AVX-512 (8-wide vectors, 3-row blocks), or without AVX at all,
    builds it: -march=native picks the geometry, so this machine's build alone would not test it."""
    lib = native.library((*native.FLAGS, *flags))
    assert lib.lstm_vector_width() == 8
    for i, h, layers in [(1, 64, 2), (3, 13, 3)]:
        stack = make(variant, i, h, layers)
        engine = NativeLSTM(stack, lib)
        x = torch.randn(7, 9, i)
        state = served_state(stack, 7)
        with torch.no_grad():
            out, new_state, _ = engine(x, state)
            ref, ref_state, _ = stack(x, state)
        torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
        torch.testing.assert_close(new_state.h, ref_state.h, atol=ATOL, rtol=0)
        torch.testing.assert_close(new_state.c, ref_state.c, atol=ATOL, rtol=0)


def test_an_unusable_cache_builds_a_private_copy(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    built = native._build(cache=blocker / "cache")  # cannot be a directory
    assert built.exists() and not built.is_relative_to(blocker)
    stack = make("standard", 1, 8, 1)
    engine = NativeLSTM(stack, native._load(built))  # its constructor's self-check passed
    x = torch.randn(2, 3, 1)
    with torch.no_grad():
        torch.testing.assert_close(engine(x)[0], stack(x)[0], atol=ATOL, rtol=0)


def test_the_service_start_falls_back_on_auto_and_refuses_on_native(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from service.startup import model_engine

    model = LSTMForecaster(ForecasterConfig(hidden_size=8, num_layers=2)).eval()
    assert isinstance(model_engine("auto", model), NativeLSTM)
    assert model_engine("eager", model) is model.lstm
    # A machine without a compiler (and nothing built in this process yet):
    monkeypatch.setattr(native, "_libraries", {})
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(native.shutil, "which", lambda name: None)
    with caplog.at_level("WARNING", logger="lstm_sessions"):
        assert model_engine("auto", model) is model.lstm
    assert "model engine: eager, the native engine cannot run here: no C++ compiler" in caplog.text
    with pytest.raises(RuntimeError, match="LSTM_MODEL_ENGINE=native: no C\\+\\+ compiler"):
        model_engine("native", model)


def test_a_cached_library_others_could_write_is_not_loaded(tmp_path: Path) -> None:
    first = native._build(cache=tmp_path)
    assert native._build(cache=tmp_path) == first
    first.chmod(0o777)  # writable by anyone: someone else's code could be in it
    rebuilt = native._build(cache=tmp_path)
    assert rebuilt != first and rebuilt.name == first.name and rebuilt.exists()
    first.chmod(0o755)
    tmp_path.chmod(0o777)
    assert native._build(cache=tmp_path) != first


def forecaster(variant: str, features: int, hidden: int, layers: int) -> LSTMForecaster:
    from model import Normalisation

    torch.manual_seed(hidden + 7 * layers + features)
    config = ForecasterConfig(
        feature_names=tuple(f"f{k}" for k in range(features)),
        hidden_size=hidden,
        num_layers=layers,
        variant=variant,  # type: ignore[arg-type]
    )
    norm = Normalisation(tuple(range(features)), tuple(0.5 + k for k in range(features)))
    model = LSTMForecaster(config, norm).eval()
    model.std_scale.copy_(torch.linspace(0.7, 1.3, features))  # a calibrated std, per feature
    return model


@pytest.mark.parametrize("variant", ["standard", "peephole", "coupled"])
@pytest.mark.parametrize("shape", [(1, 64, 2), (3, 5, 1), (2, 17, 2)], ids=str)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("chunk", [1, 7])
def test_the_array_forecaster_equals_the_forecaster(
    variant: str, shape: tuple[int, int, int], batch: int, chunk: int
) -> None:
    """NativeForecaster (numpy in, numpy out: a server's round) against LSTMForecaster.forward,
    eager, from a zero state and from a served one."""
    from model.native import NativeForecaster

    features, hidden, layers = shape
    model = forecaster(variant, features, hidden, layers)
    arrays = NativeForecaster(model, NativeLSTM(model.lstm))
    x = torch.randn(batch, chunk, features) * 3 + 1
    for state in (model.zero_state(batch), served_state(model.lstm, batch)):
        with torch.no_grad():
            ref = model(x, state)
        mean, std, hn, cn, stats = arrays(x.numpy(), state.h.numpy(), state.c.numpy())
        assert stats is None
        assert mean.dtype == std.dtype == hn.dtype == np.float32
        torch.testing.assert_close(torch.from_numpy(mean), ref.mean, atol=ATOL, rtol=0)
        torch.testing.assert_close(torch.from_numpy(std), ref.std, atol=ATOL, rtol=0)
        torch.testing.assert_close(torch.from_numpy(hn), ref.state.h, atol=ATOL, rtol=0)
        torch.testing.assert_close(torch.from_numpy(cn), ref.state.c, atol=ATOL, rtol=0)


def test_the_array_forecaster_passes_nan_and_large_values_as_the_forecaster() -> None:
    from model.native import NativeForecaster

    model = forecaster("standard", 1, 64, 2)
    with torch.no_grad():  # a head whose raw std crosses softplus's threshold (20) both ways
        model.head.bias[1] = 19.0
    arrays = NativeForecaster(model, NativeLSTM(model.lstm))
    x = torch.tensor([[[0.5], [float("nan")], [1.0]], [[1e4], [-1e4], [3.0]]])
    state = model.zero_state(2)
    with torch.no_grad():
        ref = model(x, state)
    mean, std, _, cn, _ = arrays(x.numpy(), state.h.numpy(), state.c.numpy())
    assert np.isnan(mean[0, 1:]).all() and np.isfinite(mean[1]).all()
    torch.testing.assert_close(torch.from_numpy(mean), ref.mean, atol=ATOL, rtol=0, equal_nan=True)
    torch.testing.assert_close(torch.from_numpy(std), ref.std, atol=1e-5, rtol=1e-6, equal_nan=True)
    torch.testing.assert_close(torch.from_numpy(cn), ref.state.c, atol=ATOL, rtol=0, equal_nan=True)


@pytest.mark.parametrize("halflife", [0.0, 6.0])
def test_the_array_forecaster_of_a_running_scaled_model_equals_it_in_any_chunking(
    halflife: float,
) -> None:
    """A running-scaled model (model/scaling.py) on arrays: its statistics updated in numpy,
    float64, equal to the model's torch forward, and the same bits whatever the chunking."""
    from model import Normalisation
    from model.native import NativeForecaster
    from model.scaling import RunningScaleForecaster, RunningStats

    torch.manual_seed(3)
    config = ForecasterConfig(
        ("a", "b"), hidden_size=16, num_layers=2, scaling="running", scale_halflife=halflife
    )
    model = RunningScaleForecaster(config, Normalisation((0.0, 0.0), (2.0, 3.0))).eval()
    arrays = NativeForecaster(model, NativeLSTM(model.lstm))
    x = torch.randn(3, 20, 2) * torch.tensor([1.0, 1000.0]) + torch.tensor([5.0, -4000.0])
    with torch.no_grad():
        ref = model(x)
    h = np.zeros((2, 3, 16), np.float32)
    state = (h, h.copy(), np.zeros((3, model.stats_width)))
    whole = arrays(x.numpy(), *state)
    torch.testing.assert_close(torch.from_numpy(whole[0]), ref.mean, atol=0, rtol=1e-5)
    torch.testing.assert_close(torch.from_numpy(whole[1]), ref.std, atol=0, rtol=1e-5)
    assert whole[4] is not None
    torch.testing.assert_close(
        torch.from_numpy(whole[4]), ref.state.stats.flat(), atol=0, rtol=1e-12
    )
    means = []
    for lo, hi in [(0, 1), (1, 8), (8, 9), (9, 20)]:
        mean, _, hn, cn, stats = arrays(x[:, lo:hi].numpy(), *state)
        state = (hn, cn, stats)
        means.append(mean)
    # the head's product may round by its shape (float32); the statistics are the same bits
    np.testing.assert_allclose(np.concatenate(means, axis=1), whole[0], rtol=1e-6, atol=0)
    assert np.array_equal(state[2], whole[4]) and isinstance(ref.state.stats, RunningStats)


def test_the_array_forecaster_needs_the_engine_of_its_stack_and_eval_mode() -> None:
    from model.native import NativeForecaster

    model, other = forecaster("standard", 1, 8, 1), forecaster("standard", 1, 8, 1)
    with pytest.raises(ValueError, match="another stack"):
        NativeForecaster(model, NativeLSTM(other.lstm))
    assert NativeForecaster.of(model) is None  # eager: no array path
    model.use_engine(NativeLSTM(model.lstm))
    arrays = NativeForecaster.of(model)
    assert arrays is not None and arrays.handles()
    model.train()
    assert not arrays.handles()
