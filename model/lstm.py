"""The LSTM written from its gates: a cell (one timestep), a layer (the time loop), a stack.

The cell follows the classic description: a forget gate decides what to drop from the cell state,
an input gate and a candidate decide what to add, the cell state is updated
``c = forget_gate * c + input_gate * candidate``, and an output gate filters ``tanh(c)`` into the
hidden state. One fused matrix product computes every pre-activation, laid out in the same
(i, f, g, o) order as ``torch.nn.LSTM`` so weights copy both ways.

Variants that ``nn.LSTM`` cannot express:
- ``peephole``: the input and forget gates also see the previous cell state, the output gate the
  new one (Gers & Schmidhuber 2000), through one diagonal weight vector per gate;
- ``coupled``: the input gate is ``1 - forget_gate``, so the cell has three gate blocks (f, g, o).
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Variant = Literal["standard", "peephole", "coupled"]
VARIANTS: tuple[Variant, ...] = ("standard", "peephole", "coupled")


class LSTMState(NamedTuple):
    """Recurrent memory of a stack: ``h`` and ``c`` of shape (layers, batch, hidden)."""

    h: Tensor
    c: Tensor

    @staticmethod
    def zeros(
        layers: int,
        batch: int,
        hidden: int,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> LSTMState:
        shape = (layers, batch, hidden)
        return LSTMState(
            torch.zeros(shape, device=device, dtype=dtype),
            torch.zeros(shape, device=device, dtype=dtype),
        )


class GateTrace(NamedTuple):
    """Mean over hidden units of each gate's activation, each of shape (layers, batch, T)."""

    forget: Tensor
    input: Tensor
    output: Tensor


def cell_update(
    gates: Tensor, c: Tensor, variant: Variant, peephole: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The pointwise part of a timestep, from the pre-activations ``gates`` (B, blocks * H) and
    the previous cell state: the new ``h`` and ``c``, and the forget, input and output gates.

    Everything of the cell but its two matrix products; the GPU engine (model/graphed.py)
    compiles this function into one kernel, so both run the same gates.
    """
    if variant == "coupled":
        f_pre, g_pre, o_pre = gates.chunk(3, dim=-1)
        forget_gate = torch.sigmoid(f_pre)
        input_gate = 1.0 - forget_gate
    else:
        i_pre, f_pre, g_pre, o_pre = gates.chunk(4, dim=-1)
        if peephole is not None:
            i_pre = i_pre + peephole[0] * c
            f_pre = f_pre + peephole[1] * c
        input_gate = torch.sigmoid(i_pre)
        forget_gate = torch.sigmoid(f_pre)
    candidate = torch.tanh(g_pre)
    c = forget_gate * c + input_gate * candidate
    if peephole is not None:
        o_pre = o_pre + peephole[2] * c
    output_gate = torch.sigmoid(o_pre)
    h = output_gate * torch.tanh(c)
    return h, c, forget_gate, input_gate, output_gate


class LSTMCell(nn.Module):
    """One timestep of an LSTM layer: ``(x, h, c) -> (h, c)``.

    ``project_input`` and ``step`` are split so a layer can project a whole chunk of inputs in one
    matrix product and run only the recurrent product inside its time loop; ``forward`` does both
    for a single timestep.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        variant: Variant = "standard",
        forget_bias: float = 1.0,
    ) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown LSTM variant {variant!r}; expected one of {VARIANTS}")
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.variant = variant
        self.forget_bias = forget_bias
        blocks = 3 if variant == "coupled" else 4  # coupled has no input-gate block
        self.weight_ih = nn.Parameter(torch.empty(blocks * hidden_size, input_size))
        self.weight_hh = nn.Parameter(torch.empty(blocks * hidden_size, hidden_size))
        # One bias: nn.LSTM's bias_ih + bias_hh add up before any nonlinearity.
        self.bias = nn.Parameter(torch.empty(blocks * hidden_size))
        if variant == "peephole":
            # Diagonal peephole weights for the input, forget and output gates, in that order.
            self.peephole = nn.Parameter(torch.empty(3, hidden_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.hidden_size)  # nn.LSTM's initialisation
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)
        with torch.no_grad():
            self.forget_bias_slice().fill_(self.forget_bias)

    def forget_bias_slice(self) -> Tensor:
        block = 0 if self.variant == "coupled" else 1  # (f, g, o) vs (i, f, g, o)
        return self.bias[block * self.hidden_size : (block + 1) * self.hidden_size]

    def project_input(self, x: Tensor) -> Tensor:
        """The input's share of every pre-activation: (..., input) -> (..., blocks * hidden)."""
        return F.linear(x, self.weight_ih, self.bias)

    def step(
        self,
        x_proj: Tensor,
        h: Tensor,
        c: Tensor,
        trace: list[Tensor] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Advance one timestep from the projected input; append (f, i, o) means to ``trace``."""
        gates = torch.addmm(x_proj, h, self.weight_hh.t())  # (B, blocks * H)
        peephole = self.peephole if self.variant == "peephole" else None
        h, c, forget_gate, input_gate, output_gate = cell_update(gates, c, self.variant, peephole)
        if trace is not None:
            trace.append(
                torch.stack(
                    [forget_gate.mean(-1), input_gate.mean(-1), output_gate.mean(-1)], dim=-1
                )
            )
        return h, c


class LSTMLayer(nn.Module):
    """A cell run over time: (B, T, input) -> (B, T, hidden)."""

    cell: LSTMCell

    def __init__(self, cell: LSTMCell) -> None:
        super().__init__()
        self.cell = cell

    def forward(
        self,
        x: Tensor,
        h: Tensor,
        c: Tensor,
        trace: list[Tensor] | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        x_proj = self.cell.project_input(x)  # (B, T, blocks * H): one product for the chunk
        outputs = []
        for t in range(x.shape[1]):
            h, c = self.cell.step(x_proj[:, t], h, c, trace)
            outputs.append(h)
        return torch.stack(outputs, dim=1), h, c  # (B, T, H)


class StackedLSTM(nn.Module):
    """Layers stacked on each other, with dropout between them while training."""

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        *,
        variant: Variant = "standard",
        forget_bias: float = 1.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be at least 1, got {num_layers}")
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.variant: Variant = variant
        self.layers = nn.ModuleList(
            LSTMLayer(
                LSTMCell(input_size if k == 0 else hidden_size, hidden_size, variant, forget_bias)
            )
            for k in range(num_layers)
        )
        self.dropout = nn.Dropout(dropout)

    @property
    def cell_layers(self) -> list[LSTMLayer]:
        return [cast(LSTMLayer, layer) for layer in self.layers]

    @property
    def cells(self) -> list[LSTMCell]:
        return [layer.cell for layer in self.cell_layers]

    def plain_inference(self, x: Tensor, return_gates: bool) -> bool:
        """Whether a forward of ``x`` is plain inference that a serving engine may stand in
        for: no gate traces, eval mode, no gradient wanted, a non-empty float32 (B, T, input)."""
        return (
            not return_gates
            and x.dtype is torch.float32
            and x.dim() == 3
            and x.shape[2] == self.input_size
            and x.numel() > 0
            and not self.training
            and not (
                torch.is_grad_enabled()
                and (x.requires_grad or any(p.requires_grad for p in self.parameters()))
            )
        )

    def zero_state(self, batch: int) -> LSTMState:
        p = self.cells[0].weight_hh
        return LSTMState.zeros(
            self.num_layers, batch, self.hidden_size, device=p.device, dtype=p.dtype
        )

    def forward(
        self,
        x: Tensor,
        state: LSTMState | None = None,
        *,
        return_gates: bool = False,
    ) -> tuple[Tensor, LSTMState, GateTrace | None]:
        """(B, T, input) -> outputs (B, T, hidden), final state, and gate means if asked."""
        if state is None:
            state = self.zero_state(x.shape[0])
        hs, cs, traces = [], [], []
        out = x
        for k, layer in enumerate(self.cell_layers):
            if k > 0:
                out = self.dropout(out)
            trace: list[Tensor] | None = [] if return_gates else None
            out, h, c = layer(out, state.h[k], state.c[k], trace)
            hs.append(h)
            cs.append(c)
            if trace is not None:
                traces.append(torch.stack(trace, dim=1))  # (B, T, 3)
        gates = None
        if return_gates:
            stacked = torch.stack(traces)  # (layers, B, T, 3)
            gates = GateTrace(stacked[..., 0], stacked[..., 1], stacked[..., 2])
        return out, LSTMState(torch.stack(hs), torch.stack(cs)), gates

    @classmethod
    def from_torch(cls, lstm: nn.LSTM) -> StackedLSTM:
        """A standard StackedLSTM holding a copy of ``lstm``'s weights."""
        if lstm.bidirectional or lstm.proj_size or not lstm.bias:
            raise ValueError(
                "from_torch copies unidirectional nn.LSTMs with biases and no projection only"
            )
        ours = cls(lstm.input_size, lstm.hidden_size, lstm.num_layers, dropout=lstm.dropout)
        reference = next(lstm.parameters())
        ours = ours.to(device=reference.device, dtype=reference.dtype)
        with torch.no_grad():
            for k, cell in enumerate(ours.cells):
                cell.weight_ih.copy_(getattr(lstm, f"weight_ih_l{k}"))
                cell.weight_hh.copy_(getattr(lstm, f"weight_hh_l{k}"))
                cell.bias.copy_(getattr(lstm, f"bias_ih_l{k}") + getattr(lstm, f"bias_hh_l{k}"))
        return ours

    def to_torch(self) -> nn.LSTM:
        """A batch-first ``nn.LSTM`` holding a copy of these weights (standard variant only)."""
        if self.variant != "standard":
            raise ValueError(f"nn.LSTM cannot express the {self.variant!r} variant")
        p = self.cells[0].weight_hh
        lstm = nn.LSTM(
            self.input_size,
            self.hidden_size,
            self.num_layers,
            batch_first=True,
            dropout=self.dropout.p,
            device=p.device,
            dtype=p.dtype,
        )
        with torch.no_grad():
            for k, cell in enumerate(self.cells):
                getattr(lstm, f"weight_ih_l{k}").copy_(cell.weight_ih)
                getattr(lstm, f"weight_hh_l{k}").copy_(cell.weight_hh)
                getattr(lstm, f"bias_ih_l{k}").copy_(cell.bias)
                getattr(lstm, f"bias_hh_l{k}").zero_()
        return lstm
