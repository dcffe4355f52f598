"""The hand-written LSTM against nn.LSTM, float64 references of its variants, and streaming."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from model import LSTMState, StackedLSTM

SIZES = [  # (input, hidden, layers, batch)
    (3, 5, 1, 1),
    (8, 16, 2, 4),
    (4, 32, 3, 1),
    (16, 7, 3, 5),
]


@pytest.mark.parametrize(("input_size", "hidden", "layers", "batch"), SIZES)
def test_matches_torch_lstm_outputs_state_and_gradients(
    input_size: int,
    hidden: int,
    layers: int,
    batch: int,
) -> None:
    torch.manual_seed(hidden * 10 + layers)
    ref = nn.LSTM(input_size, hidden, layers, batch_first=True)
    ours = StackedLSTM.from_torch(ref)
    x = torch.randn(batch, 9, input_size)
    h0 = torch.randn(layers, batch, hidden)
    c0 = torch.randn(layers, batch, hidden)
    x_ref, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()

    out_ref, (h_ref, c_ref) = ref(x_ref, (h0, c0))
    out_ours, state, _ = ours(x_ours, LSTMState(h0, c0))
    torch.testing.assert_close(out_ours, out_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(state.h, h_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(state.c, c_ref, atol=1e-5, rtol=0)

    # A loss that touches outputs and both final states, so every path gets a gradient.
    weights = torch.randn_like(out_ref)
    ((out_ref * weights).sum() + h_ref.sum() + c_ref.square().sum()).backward()
    ((out_ours * weights).sum() + state.h.sum() + state.c.square().sum()).backward()
    assert x_ours.grad is not None and x_ref.grad is not None
    torch.testing.assert_close(x_ours.grad, x_ref.grad, atol=1e-5, rtol=0)
    for k, layer in enumerate(ours.layers):
        cell = layer.cell
        torch.testing.assert_close(
            cell.weight_ih.grad, getattr(ref, f"weight_ih_l{k}").grad, atol=1e-5, rtol=0
        )
        torch.testing.assert_close(
            cell.weight_hh.grad, getattr(ref, f"weight_hh_l{k}").grad, atol=1e-5, rtol=0
        )
        # Our single bias stands for bias_ih + bias_hh: each receives the same gradient.
        torch.testing.assert_close(
            cell.bias.grad, getattr(ref, f"bias_ih_l{k}").grad, atol=1e-5, rtol=0
        )


def test_to_torch_round_trip_gives_the_same_function() -> None:
    torch.manual_seed(1)
    ours = StackedLSTM(6, 12, 2)
    ref = ours.to_torch()
    x = torch.randn(3, 11, 6)
    out_ref, (_, c_ref) = ref(x)
    out_ours, state, _ = ours(x)
    torch.testing.assert_close(out_ours, out_ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(state.c, c_ref, atol=1e-6, rtol=0)
    back = StackedLSTM.from_torch(ref)
    torch.testing.assert_close(back(x)[0], out_ours, atol=0, rtol=0)


def test_to_torch_refuses_variants_it_cannot_express() -> None:
    with pytest.raises(ValueError, match="peephole"):
        StackedLSTM(2, 3, 1, variant="peephole").to_torch()


def test_forget_bias_is_initialised() -> None:
    for variant in ("standard", "peephole", "coupled"):
        cell = StackedLSTM(2, 4, 1, variant=variant, forget_bias=2.5).layers[0].cell
        assert torch.equal(cell.forget_bias_slice(), torch.full((4,), 2.5))


def reference_step_float64(
    variant: str,
    cell: nn.Module,
    x: torch.Tensor,
    h: torch.Tensor,
    c: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One timestep written straight from the equations, gate by gate, in float64."""
    H = h.shape[-1]
    W_x = cell.weight_ih.detach().double()
    W_h = cell.weight_hh.detach().double()
    b = cell.bias.detach().double()

    def pre(block: int) -> torch.Tensor:  # W·[h, x] + b for one gate block
        rows = slice(block * H, (block + 1) * H)
        return x @ W_x[rows].T + h @ W_h[rows].T + b[rows]

    if variant == "coupled":  # blocks (f, g, o)
        f = torch.sigmoid(pre(0))
        i = 1 - f
        g = torch.tanh(pre(1))
        c_new = f * c + i * g
        o = torch.sigmoid(pre(2))
    else:  # peephole, blocks (i, f, g, o)
        p = cell.peephole.detach().double()
        i = torch.sigmoid(pre(0) + p[0] * c)
        f = torch.sigmoid(pre(1) + p[1] * c)
        g = torch.tanh(pre(2))
        c_new = f * c + i * g
        o = torch.sigmoid(pre(3) + p[2] * c_new)
    return o * torch.tanh(c_new), c_new


@pytest.mark.parametrize("variant", ["peephole", "coupled"])
@pytest.mark.parametrize("layers", [1, 2])
def test_variants_match_float64_equations(variant: str, layers: int) -> None:
    torch.manual_seed(7)
    ours = StackedLSTM(3, 6, layers, variant=variant)  # type: ignore[arg-type]
    with torch.no_grad():  # non-trivial peepholes and biases
        for p in ours.parameters():
            p.uniform_(-0.8, 0.8)
    x = torch.randn(2, 10, 3)
    out32, state32, _ = ours(x)

    ref_in = x.double()
    hs, cs = [], []
    for layer in ours.layers:
        h = torch.zeros(2, 6, dtype=torch.float64)
        c = torch.zeros(2, 6, dtype=torch.float64)
        outs = []
        for t in range(ref_in.shape[1]):
            h, c = reference_step_float64(variant, layer.cell, ref_in[:, t], h, c)
            outs.append(h)
        ref_in = torch.stack(outs, 1)
        hs.append(h)
        cs.append(c)
    torch.testing.assert_close(out32.double(), ref_in, atol=1e-6, rtol=0)
    torch.testing.assert_close(state32.c.double(), torch.stack(cs), atol=1e-6, rtol=0)
    # In float64 the model and the equations agree to rounding.
    out64, state64, _ = ours.double()(x.double())
    torch.testing.assert_close(out64, ref_in, atol=1e-12, rtol=0)
    torch.testing.assert_close(state64.h, torch.stack(hs), atol=1e-12, rtol=0)


@pytest.mark.parametrize("variant", ["standard", "peephole", "coupled"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_streaming_in_random_chunks_equals_one_pass(variant: str, seed: int) -> None:
    """The property the service rests on: carrying (h, c) across chunks changes nothing."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = StackedLSTM(4, 16, 2, variant=variant).eval()  # type: ignore[arg-type]
    x = torch.randn(3, 97, 4, generator=gen)
    with torch.no_grad():
        whole, final, _ = model(x)
        state, pieces, t = None, [], 0
        while t < x.shape[1]:
            size = int(torch.randint(1, 20, (1,), generator=gen))
            out, state, _ = model(x[:, t : t + size], state)
            pieces.append(out)
            t += size
    assert state is not None
    torch.testing.assert_close(torch.cat(pieces, 1), whole, atol=1e-6, rtol=0)
    torch.testing.assert_close(state.h, final.h, atol=1e-6, rtol=0)
    torch.testing.assert_close(state.c, final.c, atol=1e-6, rtol=0)


@pytest.mark.parametrize("variant", ["standard", "peephole", "coupled"])
def test_gate_trace_is_inspectable_and_changes_nothing(variant: str) -> None:
    torch.manual_seed(3)
    model = StackedLSTM(2, 8, 3, variant=variant).eval()  # type: ignore[arg-type]
    x = torch.randn(4, 5, 2)
    plain, plain_state, none = model(x)
    traced, traced_state, gates = model(x, return_gates=True)
    assert none is None and gates is not None
    torch.testing.assert_close(traced, plain, atol=0, rtol=0)
    torch.testing.assert_close(traced_state.c, plain_state.c, atol=0, rtol=0)
    for g in gates:
        assert g.shape == (3, 4, 5)  # (layers, batch, T)
        assert bool(((g > 0) & (g < 1)).all())
    if variant == "coupled":
        torch.testing.assert_close(gates.input, 1 - gates.forget)
    # The trace is the real activation: recompute layer 0's first forget gate by hand.
    cell = model.layers[0].cell
    pre = cell.project_input(x[:, 0])
    block = 0 if variant == "coupled" else 1
    f = torch.sigmoid(pre[:, block * 8 : (block + 1) * 8])  # h0 = c0 = 0: no recurrent term
    torch.testing.assert_close(gates.forget[0, :, 0], f.mean(-1))


@pytest.mark.gpu
def test_cuda_matches_cpu() -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    torch.manual_seed(0)
    model = StackedLSTM(8, 32, 2)
    x = torch.randn(4, 20, 8)
    cpu_out, cpu_state, _ = model(x)
    torch.backends.cuda.matmul.allow_tf32 = False  # compare fp32 with fp32
    gpu_out, gpu_state, _ = model.cuda()(x.cuda())
    torch.testing.assert_close(gpu_out.cpu(), cpu_out, atol=1e-5, rtol=0)
    torch.testing.assert_close(gpu_state.c.cpu(), cpu_state.c, atol=1e-5, rtol=0)
