"""The hand-written LSTM and its serving engine against nn.LSTM, ONNX Runtime and OpenVINO.

    python bench/model_bench.py [--quick] [--device cpu|cuda|all] [--shape served|wide|all]
                                [--runs 3] [--threads 1] [--candidates] [--record]

Two shapes, each with two layers: the served one (input 1, hidden 64; batch {1, 64, 256}) and a
wide one (input 64, hidden 256; batch {1, 64, 1024}), timesteps {1, 32, 256}; inference
(no_grad), one CPU thread unless ``--threads``. The contenders hold the same weights:
- ``ours``: the eager ``StackedLSTM`` (model/lstm.py), the reference and the training path;
- ``engine``: what the service runs: ``NativeLSTM`` (model/native.py) on a CPU, ``GraphedLSTM``
  (model/graphed.py: CUDA graphs at bucketed batch sizes, the pointwise part compiled) on a GPU,
  its build and capture time in the JSON (``engine_build_s``); ``nn.LSTM`` there is cuDNN;
- ``nn.LSTM``: oneDNN's fused RNN primitive on this CPU; ``nn.LSTM (ATen)`` the same module with
  oneDNN off (the ATen kernels our eager cell calls too);
- ``ORT`` and ``OpenVINO``: ``nn.LSTM`` exported to ONNX (``torch.onnx.export(dynamo=False)``,
  dynamic batch and time axes) and run by ONNX Runtime and OpenVINO (fp32 precision hint), one
  thread each; bench-only dependencies (the ``dev`` extra): a column is left out when its package
  is missing.
``--candidates`` adds, for the served shape at 1 and 32 timesteps, the engines measured before
choosing the native one: ``torch.compile`` of our stack (inductor) and our own stack exported to
ONNX and run by ONNX Runtime.

Contenders are timed interleaved, repeat by repeat, so machine noise hits them alike; the whole
table is measured ``--runs`` times and each cell is the median over runs of the per-run medians,
with the spread (min-max over runs) of the engine's ratios. Results go to
runs/bench/model_bench-<device>.json, or with ``--record`` to the committed bench/results/ that the
README quotes.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model import LSTMState, StackedLSTM
from model.graphed import GraphedLSTM
from model.native import NativeLSTM

LAYERS = 2
SHAPES: dict[str, tuple[int, int, tuple[int, ...]]] = {  # name: (input, hidden, batches)
    "served": (1, 64, (1, 64, 256)),
    "wide": (64, 256, (1, 64, 1024)),
}
STEPS = (1, 32, 256)
CANDIDATE_STEPS = (1, 32)
PEERS = ("nn.LSTM", "nn.LSTM (ATen)", "ORT", "OpenVINO")
RESULTS = Path(__file__).resolve().parent / "results"
# A run that is not a recording goes where git does not look, so it never rewrites the figures
# the README quotes.
RUNS = Path(__file__).resolve().parents[1] / "runs" / "bench"


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_interleaved(
    fns: dict[str, Callable[[], object]],
    device: str,
    budget_s: float,
    block: int = 1,
) -> dict[str, float]:
    """Median seconds per call of each fn, about ``budget_s`` in all.

    Contenders alternate every ``block`` calls: block 1 interleaves call by call (each call finds
    caches as the other contender left them); a larger block measures warm, back-to-back calls,
    as a server stepping the same model again and again sees them.
    """
    for fn in fns.values():  # warm up: allocator, oneDNN primitive cache, CUDA context
        fn()
        fn()
    sync(device)
    start = time.perf_counter()
    for fn in fns.values():
        fn()
    sync(device)
    one_round = time.perf_counter() - start
    repeats = max(3, min(200, int(budget_s / max(one_round, 1e-9))))
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(max(1, repeats // block)):
        for name, fn in fns.items():
            for _ in range(block):
                t0 = time.perf_counter()
                fn()
                sync(device)
                samples[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in samples.items()}


def onnx_bytes(module: nn.Module, args: tuple[Any, ...], dynamic_time: bool) -> bytes:
    """``module`` exported to ONNX with a dynamic batch (and time) axis. Pass it in eval mode:
    the exporter leaves every submodule in the wrapper's mode."""
    axes: dict[str, dict[int, str]] = {
        "x": {0: "batch", 1: "time"} if dynamic_time else {0: "batch"},
        "h0": {1: "batch"},
        "c0": {1: "batch"},
    }
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(
            module,
            args,
            buffer,  # type: ignore[arg-type]  # the TorchScript exporter writes to file objects
            input_names=["x", "h0", "c0"],
            output_names=["y", "hn", "cn"],
            dynamic_axes=axes,
            dynamo=False,
        )
    return buffer.getvalue()


def ort_session(model: bytes) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def openvino_request(model: bytes) -> Any:
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(
        core.read_model(model),
        "CPU",
        {"INFERENCE_NUM_THREADS": 1, "INFERENCE_PRECISION_HINT": "f32"},
    )
    return compiled.create_infer_request()


def have(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


class Tuple2Stack(nn.Module):
    """Our stack with nn.LSTM's calling convention, for export: (x, h0, c0) -> (y, hn, cn)."""

    def __init__(self, stack: StackedLSTM) -> None:
        super().__init__()
        self.stack = stack

    def forward(self, x: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor) -> Any:
        y, state, _ = self.stack(x, LSTMState(h0, c0))
        return y, state.h, state.c


class RefStack(nn.Module):
    def __init__(self, lstm: nn.LSTM) -> None:
        super().__init__()
        self.lstm = lstm

    def forward(self, x: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor) -> Any:
        y, (hn, cn) = self.lstm(x, (h0, c0))
        return y, hn, cn


class Models:
    """Every contender of one shape, built once: the same weights in each."""

    def __init__(self, shape: str, device: str, candidates: bool) -> None:
        input_size, hidden, _ = SHAPES[shape]
        torch.manual_seed(0)
        self.ref = nn.LSTM(input_size, hidden, LAYERS, batch_first=True).to(device).eval()
        self.ours = StackedLSTM.from_torch(self.ref).eval()
        self.device = device
        started = time.perf_counter()
        self.engine: Any = NativeLSTM(self.ours) if device == "cpu" else GraphedLSTM(self.ours)
        self.engine_build_s = time.perf_counter() - started
        self.ort = self.openvino = None
        self.compiled: Any = None
        self.ours_in_ort: dict[int, Any] = {}
        if device != "cpu":
            return
        x = torch.zeros(1, 1, input_size)
        h0 = torch.zeros(LAYERS, 1, hidden)
        exported = onnx_bytes(RefStack(self.ref).eval(), (x, h0, h0), dynamic_time=True)
        if have("onnxruntime"):
            self.ort = ort_session(exported)
        if have("openvino"):
            self.openvino = openvino_request(exported)
        if candidates and shape == "served":
            self.compiled = torch.compile(self.ours)
            if have("onnxruntime"):
                for steps in CANDIDATE_STEPS:  # our loop unrolls: one graph per chunk length
                    xs = torch.zeros(1, steps, input_size)
                    model = onnx_bytes(
                        Tuple2Stack(self.ours).eval(), (xs, h0, h0), dynamic_time=False
                    )
                    self.ours_in_ort[steps] = ort_session(model)

    def contenders(self, x: torch.Tensor, state: LSTMState) -> dict[str, Callable[[], Any]]:
        ours, ref, engine = self.ours, self.ref, self.engine
        fns: dict[str, Callable[[], Any]] = {"ours": lambda: ours(x, state)}
        if engine is not None:
            fns["engine"] = lambda: engine(x, state)
        fns["nn.LSTM"] = lambda: ref(x, tuple(state))
        if self.device != "cpu":
            return fns

        def ref_aten() -> object:
            with torch.backends.mkldnn.flags(enabled=False):
                return ref(x, tuple(state))

        fns["nn.LSTM (ATen)"] = ref_aten
        feeds = {"x": x.numpy(), "h0": state.h.numpy(), "c0": state.c.numpy()}
        if self.ort is not None:
            ort = self.ort
            fns["ORT"] = lambda: ort.run(None, feeds)
        if self.openvino is not None:
            request = self.openvino
            fns["OpenVINO"] = lambda: request.infer(feeds)
        steps = x.shape[1]
        if self.compiled is not None and steps in CANDIDATE_STEPS:
            compiled = self.compiled
            fns["ours, torch.compile"] = lambda: compiled(x, state)
        if steps in self.ours_in_ort:
            session = self.ours_in_ort[steps]
            fns["ours in ORT"] = lambda: session.run(None, feeds)
        return fns


def outputs_of(name: str, result: Any) -> np.ndarray:
    """A contender's outputs (B, T, hidden) as an array, whatever its calling convention."""
    if name == "OpenVINO":
        return np.asarray(next(iter(result.values())))
    first = result[0]
    return first.detach().numpy() if isinstance(first, torch.Tensor) else np.asarray(first)


def bench_device(
    device: str,
    shape: str,
    quick: bool,
    block: int,
    steps_list: tuple[int, ...],
    candidates: bool,
) -> list[dict[str, Any]]:
    """One run of one shape's table: a row per (batch, timesteps), median seconds per call."""
    models = Models(shape, device, candidates)
    input_size, hidden, batches = SHAPES[shape]
    rows = []
    for batch in batches:
        for steps in steps_list:
            if quick and batch * steps > 64 * 32:
                continue
            torch.manual_seed(batch * 1000 + steps)
            x = torch.randn(batch, steps, input_size, device=device)
            state = LSTMState(
                torch.randn(LAYERS, batch, hidden, device=device) * 0.5,
                torch.randn(LAYERS, batch, hidden, device=device) * 0.5,
            )
            fns = models.contenders(x, state)
            first_call_s = None
            if "engine" in fns:  # its first call at a shape builds (on a GPU: captures) programs
                with torch.no_grad():
                    started = time.perf_counter()
                    fns["engine"]()
                    sync(device)
                    first_call_s = time.perf_counter() - started
            with torch.no_grad():
                expected = models.ours(x, state)[0].cpu().numpy()
                diffs = {
                    name: float(np.abs(outputs_of(name, fn()) - expected).max())
                    for name, fn in fns.items()
                    if name != "ours"
                }
                medians = time_interleaved(fns, device, budget_s=0.5 if quick else 2.0, block=block)
            rows.append(
                {
                    "device": device,
                    "shape": shape,
                    "input": input_size,
                    "hidden": hidden,
                    "batch": batch,
                    "timesteps": steps,
                    "max_abs_diff": diffs,
                    "seconds": medians,
                    "engine_build_s": models.engine_build_s,
                    "engine_first_call_s": first_call_s,
                }
            )
    return rows


def summarise(runs: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per row: each contender's median over runs (ms), and the engine's ratios with their spread
    over runs (each run's ratio from its own interleaved medians)."""
    table = []
    for row_runs in zip(*runs, strict=True):
        first = row_runs[0]
        names = list(first["seconds"])
        row: dict[str, Any] = {k: first[k] for k in ("device", "shape", "batch", "timesteps")}
        row["runs"] = len(row_runs)
        row["max_abs_diff"] = {
            name: max(r["max_abs_diff"][name] for r in row_runs) for name in first["max_abs_diff"]
        }
        for name in names:
            row[f"{name} ms"] = statistics.median(r["seconds"][name] * 1e3 for r in row_runs)
        lead = "engine" if "engine" in names else "ours"
        ratios: dict[str, list[float]] = {}
        for r in row_runs:
            sec = r["seconds"]
            peers = {p: sec[p] for p in PEERS if p in sec}
            ratios.setdefault(f"{lead} / ours", []).append(sec[lead] / sec["ours"])
            for p, v in peers.items():
                ratios.setdefault(f"{lead} / {p}", []).append(sec[lead] / v)
            ratios.setdefault(f"{lead} / best peer", []).append(sec[lead] / min(peers.values()))
        for name, values in ratios.items():
            row[name] = statistics.median(values)
            row[f"{name} spread"] = [min(values), max(values)]
        peers_ms = {p: row[f"{p} ms"] for p in PEERS if f"{p} ms" in row}
        row["best peer"] = min(peers_ms, key=peers_ms.__getitem__)
        table.append(row)
    return table


def gpu_targets(table: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Issue 14's GPU targets against cuDNN (``nn.LSTM`` on CUDA): one step <= 0.25x at batch 1
    and <= 0.5x at 1024; sequences <= 1.0x at every batch."""
    checks = []
    for row in table:
        ratio = row.get("engine / nn.LSTM")
        if ratio is None:
            continue
        if row["timesteps"] == 1 and row["batch"] in (1, 1024):
            bound = 0.25 if row["batch"] == 1 else 0.5
        elif row["timesteps"] > 1:
            bound = 1.0
        else:
            continue
        lo, hi = row["engine / nn.LSTM spread"]
        checks.append(
            {
                "name": f"{row['shape']}, batch {row['batch']}, {row['timesteps']} steps: "
                f"engine <= {bound}x cuDNN",
                "measured": f"{ratio:.2f}x ({lo:.2f}-{hi:.2f})",
                "passed": ratio <= bound,
            }
        )
    return checks


def print_table(table: list[dict[str, Any]]) -> None:
    """Median ms per contender, then the engine's ratios with their spread over runs."""
    names = [k[:-3] for k in table[0] if k.endswith(" ms")]
    ratio_names = [k for k in table[0] if " / " in k and not k.endswith("spread")]
    print(" | ".join(["shape", "batch", "T", *names, *ratio_names]))
    for row in table:
        cells = [row["shape"], str(row["batch"]), str(row["timesteps"])]
        cells += [f"{row[f'{n} ms']:.4f}" if f"{n} ms" in row else "-" for n in names]
        for r in ratio_names:
            lo, hi = row[f"{r} spread"]
            cells.append(f"{row[r]:.2f} ({lo:.2f}-{hi:.2f})")
        print(" | ".join(cells), flush=True)


def machine() -> dict[str, object]:
    info: dict[str, object] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="all", choices=["cpu", "cuda", "all"])
    p.add_argument("--quick", action="store_true", help="small shapes only, short budget")
    p.add_argument(
        "--block",
        type=int,
        default=1,
        help="calls per contender before switching (1: interleaved; 20: warm)",
    )
    p.add_argument(
        "--steps",
        type=int,
        nargs="*",
        default=list(STEPS),
        help="timesteps to run (default: 1 32 256)",
    )
    p.add_argument("--shape", default="all", choices=[*SHAPES, "all"])
    p.add_argument(
        "--runs", type=int, default=None, help="whole tables measured (default 3, 1 with --quick)"
    )
    p.add_argument(
        "--threads", type=int, default=1, help="torch's CPU threads (default 1, as served)"
    )
    p.add_argument(
        "--candidates",
        action="store_true",
        help="add torch.compile of our stack and our stack in ONNX Runtime (served shape)",
    )
    p.add_argument(
        "--record",
        action="store_true",
        help="write to bench/results/ (what the README quotes) instead of runs/bench/",
    )
    args = p.parse_args()
    if args.runs is None:
        args.runs = 1 if args.quick else 3
    torch.set_num_threads(args.threads)
    # Printed whenever oneDNN is turned off and on again (the ATen column): noise here.
    warnings.filterwarnings("ignore", message="TF32 acceleration on top of oneDNN")
    results = RESULTS if args.record else RUNS
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    if "cuda" in devices and not torch.cuda.is_available():
        print("no CUDA device: CPU only")
        devices.remove("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 against fp32
    torch.backends.cudnn.allow_tf32 = False
    results.mkdir(parents=True, exist_ok=True)
    shapes = list(SHAPES) if args.shape == "all" else [args.shape]
    for device in devices:
        table: list[dict[str, Any]] = []
        for shape in shapes:
            input_size, hidden, _ = SHAPES[shape]
            print(f"\n{device}: {shape} (input {input_size}, hidden {hidden}, {LAYERS} layers)")
            runs = []
            for run in range(args.runs):
                started = time.perf_counter()
                runs.append(
                    bench_device(
                        device, shape, args.quick, args.block, tuple(args.steps), args.candidates
                    )
                )
                print(f"run {run + 1}/{args.runs}: {time.perf_counter() - started:.0f} s")
            rows = summarise(runs)
            print_table(rows)
            table += rows
        suffix = "" if args.block == 1 else f"-block{args.block}"
        suffix += "-candidates" if args.candidates else ""
        out = results / f"model_bench-{device}{suffix}.json"
        targets = gpu_targets(table) if device == "cuda" else []
        for check in targets:
            print(
                f"- {'pass' if check['passed'] else 'MISS'}  {check['name']}: {check['measured']}"
            )
        out.write_text(
            json.dumps(
                {
                    "machine": machine(),
                    "quick": args.quick,
                    "block": args.block,
                    "runs": args.runs,
                    "rows": table,
                    "targets": targets,
                },
                indent=2,
            )
            + "\n"
        )
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
