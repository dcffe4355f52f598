"""The serving engine of the stacked LSTM: its inference forward as one native call on the CPU.

``StackedLSTM`` (model/lstm.py) is the reference and the training path; it runs a Python loop of
torch ops per timestep, and each op's dispatch costs more than the arithmetic at the served sizes.
``NativeLSTM`` runs the same equations (model/native_lstm.cpp: the time loop, the matrix products
and the gates, every variant) in one call per chunk, and answers what the eager stack answers:
outputs and final state, equal to float32 rounding (tests/test_native.py holds it to 1e-6).

Whatever it cannot do it hands to the eager stack, so a caller never has to ask: gate traces,
autograd, a module in training mode (dropout), another device or dtype. The source is compiled on
first use with the C++ compiler found on the machine (``CXX``, else ``g++``, else ``c++``) and the
library cached by a hash of the source, the flags, the compiler and the CPU (in the directory the
caller names, else ``$XDG_CACHE_HOME/lstm-sessions`` or ``~/.cache/lstm-sessions``), so a start
after the first loads it in milliseconds. No compiler, no engine: ``NativeUnavailable``.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from model.lstm import VARIANTS, GateTrace, LSTMState, StackedLSTM
from model.scaling import INPUT_CLIP

if TYPE_CHECKING:
    from model.checkpoint import AnyForecaster

SOURCE = Path(__file__).with_name("native_lstm.cpp")
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC")
ENGINES = ("auto", "eager", "native", "graphed")


class NativeUnavailable(RuntimeError):
    """The native engine cannot run here: no compiler, a failed build, or a failed self-check."""


class StackEngine(Protocol):
    """What runs a stack's forward: ``StackedLSTM`` itself, or an engine standing in for it."""

    def __call__(
        self, x: Tensor, state: LSTMState | None = None, *, return_gates: bool = False
    ) -> tuple[Tensor, LSTMState, GateTrace | None]: ...


def default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "lstm-sessions"


def _compiler() -> str:
    for name in (os.environ.get("CXX"), "g++", "c++"):
        if name and (path := shutil.which(name)):
            return path
    raise NativeUnavailable("no C++ compiler found (CXX, g++, c++): the native engine needs one")


def _cpu_flags() -> str:
    """The CPU's feature flags: -march=native builds for them, so they are part of the key."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


_lock = threading.Lock()
_libraries: dict[tuple[str, ...], ctypes.CDLL] = {}


def library(flags: tuple[str, ...] = FLAGS, cache: Path | None = None) -> ctypes.CDLL:
    """The built kernel, compiled once per source, flags, compiler and CPU into ``cache``
    (default: ``default_cache()``), then loaded from there."""
    with _lock:
        if flags not in _libraries:
            _libraries[flags] = _load(_build(flags, cache))
        return _libraries[flags]


def _build(flags: tuple[str, ...] = FLAGS, cache: Path | None = None) -> Path:
    compiler = _compiler()
    source = SOURCE.read_bytes()
    try:
        version = subprocess.run(
            [compiler, "--version"], capture_output=True, check=True, timeout=30
        ).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise NativeUnavailable(f"the C++ compiler {compiler} does not run: {e}") from e
    key = hashlib.sha256(
        b"\0".join([source, " ".join(flags).encode(), version, _cpu_flags().encode()])
    ).hexdigest()[:24]
    target = (cache or default_cache()) / f"native_lstm-{key}.so"
    if target.exists():
        if _trusted(target):
            return target
        # Loading a library runs its code: one someone else could have written is not loaded.
        target = Path(tempfile.mkdtemp(prefix="lstm-native-")) / target.name
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        if not os.access(target.parent, os.W_OK):
            raise PermissionError(f"{target.parent} is not writable")
    except OSError:  # no writable cache (a read-only home): this process builds its own copy
        target = Path(tempfile.mkdtemp(prefix="lstm-native-")) / target.name
    # Built beside the target and renamed into place: a concurrent start never loads half a file.
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        try:
            subprocess.run(
                [compiler, *flags, "-o", str(built), str(SOURCE)],
                capture_output=True,
                check=True,
                timeout=300,
            )
        except subprocess.CalledProcessError as e:
            raise NativeUnavailable(
                f"building {SOURCE.name} failed: {e.stderr.decode(errors='replace')[-2000:]}"
            ) from e
        except (OSError, subprocess.SubprocessError) as e:
            raise NativeUnavailable(f"building {SOURCE.name} failed: {e}") from e
        os.replace(built, target)
    return target


def _trusted(path: Path) -> bool:
    """Whether a cached library is ours alone: owned by this user, writable by no one else, in a
    directory no one else can write to."""
    for p in (path, path.parent):
        st = p.stat()
        if st.st_uid != os.getuid() or st.st_mode & 0o022:
            return False
    return True


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))  # CDLL releases the GIL during each call
    ptr, i = ctypes.c_void_p, ctypes.c_int
    lib.lstm_forward.argtypes = [i, i, i, i, i, i, *([ptr] * 10)]
    lib.lstm_forward.restype = i
    lib.lstm_vector_width.restype = i
    return lib


class NativeLSTM:
    """``StackedLSTM``'s inference forward in one native call; the eager stack for the rest.

    The weights are packed (transposed, grouped by hidden units, padded to the vector width)
    when the engine is built: an engine serves the weights it was built from. Build another
    after changing them.
    """

    def __init__(self, stack: StackedLSTM, lib: ctypes.CDLL | None = None) -> None:
        self.stack = stack
        self.lib = library() if lib is None else lib
        self.width = int(self.lib.lstm_vector_width())
        H = stack.hidden_size
        self.hidden = H
        self.padded = -(-H // self.width) * self.width  # Hp
        self.variant = VARIANTS.index(stack.variant)
        self.blocks = 3 if stack.variant == "coupled" else 4
        self.device = stack.cells[0].weight_hh.device
        self.on_cpu = self.device.type == "cpu"
        self.input_size = stack.input_size
        self._pack()
        self.self_check()

    def _pack(self) -> None:
        H, Hp, G = self.hidden, self.padded, self.blocks

        width = self.width

        def grouped(w: Tensor, k_pad: int = 0) -> Tensor:
            """(G * H, K) -> (Hp / width, G, width, K + k_pad): for each group of ``width``
            hidden units, its G gates' rows; zeros for the padding units and inputs."""
            blocks = F.pad(w.detach().float().reshape(G, H, -1), (0, k_pad))
            blocks = F.pad(blocks.movedim(1, -1), (0, Hp - H)).movedim(-1, 1)  # (G, Hp, K)
            return blocks.reshape(G, Hp // width, width, -1).transpose(0, 1)

        w_ih, w_hh, bias, peephole = [], [], [], []
        for k, cell in enumerate(self.stack.cells):
            # The layer below's output is padded to Hp: zero weights for its padding.
            wi = grouped(cell.weight_ih, Hp - H if k > 0 else 0)
            w_ih.append(wi.reshape(G * Hp, -1).t().contiguous().cpu())  # (K, G * Hp)
            wh = grouped(cell.weight_hh, Hp - H)  # (Hp / width, G, width, Hp)
            w_hh.append(wh.permute(0, 3, 1, 2).contiguous().cpu())  # (Hp / width, Hp, G, width)
            bias.append(grouped(cell.bias.unsqueeze(1)).reshape(-1).contiguous().cpu())
            if self.variant == VARIANTS.index("peephole"):
                peephole.append(
                    F.pad(cell.peephole.detach().float(), (0, Hp - H)).contiguous().cpu()
                )
        packed = [*w_ih, *w_hh, *bias, *peephole]
        self._packed = packed  # keeps the memory the pointer arrays point into alive
        layers = self.stack.num_layers

        def pointers(ts: list[Tensor]) -> ctypes.Array[ctypes.c_void_p]:
            return (ctypes.c_void_p * layers)(*[t.data_ptr() for t in ts] if ts else [])

        self._w_ih, self._w_hh, self._bias = pointers(w_ih), pointers(w_hh), pointers(bias)
        self._peephole = pointers(peephole)

    def handles(self, x: Tensor, return_gates: bool) -> bool:
        """Whether this call runs natively; the eager stack answers every other."""
        return x.is_cpu and self.on_cpu and self.stack.plain_inference(x, return_gates)

    def __call__(
        self, x: Tensor, state: LSTMState | None = None, *, return_gates: bool = False
    ) -> tuple[Tensor, LSTMState, GateTrace | None]:
        if not self.handles(x, return_gates):
            return self.stack(x, state, return_gates=return_gates)
        out, new_state = self.forward(x, state)
        return out, new_state, None

    def forward(self, x: Tensor, state: LSTMState | None = None) -> tuple[Tensor, LSTMState]:
        """(B, T, input) float32 CPU -> outputs (B, T, hidden) and the final state."""
        B, T, _ = x.shape
        L, H, Hp = self.stack.num_layers, self.hidden, self.padded
        x = x.transpose(0, 1)  # (T, B, input): the kernel runs time-major
        if not x.is_contiguous():  # a copy unless B or T is 1
            x = x.contiguous()
        if state is None:
            h0 = c0 = torch.zeros(L, B, Hp)
        else:
            h0, c0 = self._state_in(state.h, B), self._state_in(state.c, B)
        out = torch.empty(T, B, Hp)
        hn, cn = torch.empty(L, B, Hp), torch.empty(L, B, Hp)
        status = self.lib.lstm_forward(
            L,
            B,
            T,
            x.shape[2],
            Hp,
            self.variant,
            x.data_ptr(),
            self._w_ih,
            self._w_hh,
            self._bias,
            self._peephole,
            h0.data_ptr(),
            c0.data_ptr(),
            out.data_ptr(),
            hn.data_ptr(),
            cn.data_ptr(),
        )
        if status:
            raise RuntimeError(f"lstm_forward refused its arguments (status {status})")
        out = out.transpose(0, 1)  # (B, T, Hp), a view
        if Hp != H:
            return out[..., :H], LSTMState(hn[..., :H], cn[..., :H])
        return out, LSTMState(hn, cn)

    def forward_arrays(
        self, x: np.ndarray, h0: np.ndarray, c0: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``forward`` on numpy arrays, time-major: x (T, B, input) and h0, c0 (layers, B,
        hidden), float32; outputs (T, B, hidden), hn, cn. No torch op: at batch 1 each one's
        dispatch cost more than the step (a server's round calls this, ``NativeForecaster``)."""
        T, B, K = x.shape
        L, H, Hp = self.stack.num_layers, self.hidden, self.padded
        if self.input_size != K or h0.shape != (L, B, H) or c0.shape != (L, B, H):
            raise ValueError(f"x {x.shape}, h0 {h0.shape}, c0 {c0.shape} for {L} x {H} units")
        x = np.ascontiguousarray(x, dtype=np.float32)
        if Hp != H:
            h0, c0 = _padded(h0, Hp), _padded(c0, Hp)
        else:
            h0 = np.ascontiguousarray(h0, dtype=np.float32)
            c0 = np.ascontiguousarray(c0, dtype=np.float32)
        out = np.empty((T, B, Hp), np.float32)
        hn, cn = np.empty((L, B, Hp), np.float32), np.empty((L, B, Hp), np.float32)
        status = self.lib.lstm_forward(
            L,
            B,
            T,
            K,
            Hp,
            self.variant,
            x.ctypes.data,
            self._w_ih,
            self._w_hh,
            self._bias,
            self._peephole,
            h0.ctypes.data,
            c0.ctypes.data,
            out.ctypes.data,
            hn.ctypes.data,
            cn.ctypes.data,
        )
        if status:
            raise RuntimeError(f"lstm_forward refused its arguments (status {status})")
        if Hp != H:
            return out[..., :H], hn[..., :H], cn[..., :H]
        return out, hn, cn

    def _state_in(self, s: Tensor, batch: int) -> Tensor:
        expected = (self.stack.num_layers, batch, self.hidden)
        if s.shape != expected:
            raise ValueError(f"state of shape {tuple(s.shape)}, expected {expected}")
        if s.dtype is not torch.float32 or not s.is_cpu or not s.is_contiguous():
            s = s.to("cpu", torch.float32).contiguous()
        return F.pad(s, (0, self.padded - self.hidden)) if self.padded != self.hidden else s

    @torch.no_grad()
    def self_check(self, atol: float = 1e-5) -> None:
        """The engine against the eager stack on a small random input, before it serves."""
        if self.device.type != "cpu":
            return
        generator = torch.Generator().manual_seed(0)
        L, H = self.stack.num_layers, self.hidden
        x = torch.randn(3, 5, self.stack.input_size, generator=generator)
        state = LSTMState(
            torch.randn(L, 3, H, generator=generator), torch.randn(L, 3, H, generator=generator)
        )
        was_training = self.stack.training
        self.stack.eval()
        try:
            ref_out, ref_state, _ = self.stack(x, state)
        finally:
            self.stack.train(was_training)
        out, new_state = self.forward(x, state)
        worst = max(
            (out - ref_out).abs().max().item(),
            (new_state.h - ref_state.h).abs().max().item(),
            (new_state.c - ref_state.c).abs().max().item(),
        )
        if not worst <= atol:
            raise NativeUnavailable(f"the native engine differs from the eager stack by {worst}")


def _padded(s: np.ndarray, width: int) -> np.ndarray:
    out = np.zeros((*s.shape[:-1], width), np.float32)
    out[..., : s.shape[-1]] = s
    return out


def _softplus(x: np.ndarray) -> np.ndarray:
    """torch's ``F.softplus`` (beta 1, threshold 20) in numpy: x itself above the threshold."""
    return np.where(x > 20.0, x, np.log1p(np.exp(np.minimum(x, 20.0))))


class NativeForecaster:
    """A forecaster's forward without gates, on numpy arrays: normalise (by the training set's
    statistics, or a running-scaled model's running ones), the stack through a ``NativeLSTM``,
    the head, softplus, back to raw units; what a server's round calls on a CPU.

    Around a batch-1 step the forecaster's torch ops (normalisation, the head, softplus, each
    dispatched for a few values) cost several times the native stack itself; here they are numpy
    operations on the same float32 values, and the head one torch call. Equal to the
    forecaster's outputs to float32 rounding (tests/test_native.py). Like the engine, it serves
    the stack's weights it was built from."""

    def __init__(self, model: AnyForecaster, engine: NativeLSTM) -> None:
        if engine.stack is not model.lstm:
            raise ValueError("the engine was built for another stack")
        self.model, self.engine = model, engine
        self.features = model.config.n_features
        self.in_mean = model.input_mean.detach().cpu().numpy().astype(np.float32)
        self.in_std = model.input_std.detach().cpu().numpy().astype(np.float32)
        # The head as the forecaster runs it (torch's own product, one call; numpy's BLAS would
        # round differently and run its own thread pool): its weights, detached.
        self.w, self.b = model.head.weight.detach(), model.head.bias.detach()
        self.min_std = np.float32(model.config.min_std)
        self.std_scale = model.std_scale.detach().cpu().numpy().astype(np.float32)
        # A running-scaled model (model/scaling.py): its statistics' update, in float64.
        self.stats_width = model.stats_width
        self.decay = model.config.scale_decay
        floor = model.config.scale_floor * model.input_std.detach().cpu().double().numpy()
        self.floor2 = np.square(floor)

    @staticmethod
    def of(model: AnyForecaster) -> NativeForecaster | None:
        """The array path of ``model`` when its stack runs through a NativeLSTM, else None."""
        engine = model.engine
        return NativeForecaster(model, engine) if isinstance(engine, NativeLSTM) else None

    def handles(self) -> bool:
        """Whether it may answer now: the model in eval mode (no dropout)."""
        return not self.model.training

    def __call__(
        self, x: np.ndarray, h0: np.ndarray, c0: np.ndarray, stats: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
        """x (B, T, F) raw values, h0, c0 (layers, B, hidden) and, for a running-scaled model,
        ``stats`` (B, stats_width) float64 -> the next value's mean and std after each step
        (B, T, F) in raw units, the final hn, cn and statistics (None for the global model)."""
        B, T, F_ = x.shape
        if self.stats_width:
            if stats is None:
                raise ValueError("a running-scaled model needs each row's statistics")
            loc, scale, stats = self._running(x, stats)
            z = np.clip((x - loc) / scale, -INPUT_CLIP, INPUT_CLIP)
        else:
            loc, scale = self.in_mean, self.in_std
            z = (x - loc) / scale
        out, hn, cn = self.engine.forward_arrays(z.transpose(1, 0, 2), h0, c0)  # (T, B, H)
        head = F.linear(torch.from_numpy(out.reshape(T * B, -1)), self.w, self.b).numpy()
        head = head.reshape(T, B, 2 * F_).transpose(1, 0, 2)  # (B, T, 2F)
        mean = loc + scale * head[..., :F_]
        std = scale * ((_softplus(head[..., F_:]) + self.min_std) * self.std_scale)
        return mean, std, hn, cn, stats

    def _running(
        self, x: np.ndarray, stats: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``RunningStats.update`` step by step (West's weighted update; Welford's when nothing
        decays), float64: each step's running mean and scale (B, T, F) as float32, and the
        statistics after the chunk. The same arithmetic whatever the chunking."""
        F_ = self.features
        n, mean, m2 = stats[:, :1], stats[:, 1 : 1 + F_], stats[:, 1 + F_ :]
        steps = x.shape[1]
        means = np.empty(x.shape, np.float64)
        variances = np.empty(x.shape, np.float64)
        values = x.astype(np.float64)
        for t in range(steps):
            old = self.decay * n
            n = old + 1.0
            delta = values[:, t] - mean
            mean = mean + delta / n
            m2 = self.decay * m2 + np.square(delta) * old / n
            means[:, t], variances[:, t] = mean, m2 / n
        scale = np.sqrt(variances + self.floor2).astype(np.float32)
        return means.astype(np.float32), scale, np.concatenate([n, mean, m2], axis=1)


def build_engine(
    name: str, stack: StackedLSTM, cache: Path | None = None, max_batch: int | None = None
) -> StackEngine:
    """The engine called ``name`` for ``stack``: ``eager`` (the stack itself), ``native``
    (``NativeUnavailable`` when it cannot run here), ``graphed`` (model/graphed.py: CUDA graphs,
    its one-timestep programs captured up to ``max_batch`` rows; ``GraphUnavailable`` when it
    cannot run here), or ``auto``: native on a CPU, graphed on a GPU, where it can run (float32,
    a compiler or CUDA, its self-check passed), else eager."""
    if name not in ENGINES:
        raise ValueError(f"unknown engine {name!r}; expected one of {ENGINES}")
    if name == "eager":
        return stack
    device = stack.cells[0].weight_hh.device.type
    if name == "graphed" or (name == "auto" and device == "cuda"):
        from model.graphed import GraphUnavailable, graphed_engine

        try:
            return graphed_engine(stack, max_batch)
        except GraphUnavailable:
            if name == "graphed":
                raise
            return stack
    native_here = device == "cpu" and stack.cells[0].weight_hh.dtype == torch.float32
    if name == "native" and not native_here:
        raise NativeUnavailable("the native engine runs float32 models on a CPU only")
    if not native_here:
        return stack
    try:
        return NativeLSTM(stack, library(cache=cache))
    except NativeUnavailable:
        if name == "native":
            raise
        return stack
