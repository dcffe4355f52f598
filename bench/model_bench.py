"""The hand-written LSTM against torch.nn.LSTM with the same weights (a benchmark, not a test).

    python bench/model_bench.py [--quick] [--device cpu|cuda|all] [--record]

Hidden 256, 2 layers, input 64; batch {1, 64, 1024} x timesteps {1, 32, 256}; inference
(no_grad). Implementations are timed interleaved, repeat by repeat, so machine noise hits them
alike; the table shows medians and the ratio ours / nn.LSTM. On CPU nn.LSTM dispatches to oneDNN's
fused RNN primitive; the column "nn.LSTM (ATen)" is the same module with oneDNN turned off, i.e.
the same ATen kernels our cell calls. Results go to runs/bench/model_bench-<device>.json, or with
``--record`` to the committed bench/results/ that the README quotes.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model import LSTMState, StackedLSTM

HIDDEN, LAYERS, INPUT = 256, 2, 64
BATCHES = (1, 64, 1024)
STEPS = (1, 32, 256)
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


def contenders(
    ours: StackedLSTM,
    ref: nn.LSTM,
    x: torch.Tensor,
    state: LSTMState,
    device: str,
) -> dict[str, Callable[[], object]]:
    fns: dict[str, Callable[[], object]] = {
        "ours": lambda: ours(x, state),
        "nn.LSTM": lambda: ref(x, tuple(state)),
    }
    if device == "cpu":

        def ref_aten() -> object:
            with torch.backends.mkldnn.flags(enabled=False):
                return ref(x, tuple(state))

        fns["nn.LSTM (ATen)"] = ref_aten
    return fns


def bench_device(
    device: str,
    quick: bool,
    block: int = 1,
    steps_list: tuple[int, ...] = STEPS,
) -> list[dict[str, object]]:
    torch.manual_seed(0)
    ref = nn.LSTM(INPUT, HIDDEN, LAYERS, batch_first=True).to(device).eval()
    ours = StackedLSTM.from_torch(ref).eval()
    rows = []
    for batch in BATCHES:
        for steps in steps_list:
            if quick and batch * steps > 64 * 32:
                continue
            x = torch.randn(batch, steps, INPUT, device=device)
            h0 = torch.zeros(LAYERS, batch, HIDDEN, device=device)
            c0 = torch.zeros_like(h0)

            fns = contenders(ours, ref, x, LSTMState(h0, c0), device)
            with torch.no_grad():
                worst = (ours(x, LSTMState(h0, c0))[0] - ref(x, (h0, c0))[0]).abs().max().item()
                medians = time_interleaved(fns, device, budget_s=0.5 if quick else 3.0, block=block)
            row: dict[str, object] = {
                "device": device,
                "batch": batch,
                "timesteps": steps,
                "max_abs_diff": worst,
                **{f"{k} ms": v * 1e3 for k, v in medians.items()},
                "ours / nn.LSTM": medians["ours"] / medians["nn.LSTM"],
            }
            if device == "cpu":
                row["ours / nn.LSTM (ATen)"] = medians["ours"] / medians["nn.LSTM (ATen)"]
            rows.append(row)
            print_row(row, header=len(rows) == 1)
    return rows


def print_row(row: dict[str, object], header: bool) -> None:
    cols = [k for k in row if k not in ("device", "max_abs_diff")]
    if header:
        print(" | ".join(f"{c:>22s}" for c in cols))
    cells = []
    for c in cols:
        v = row[c]
        cells.append(f"{v:>22.3f}" if isinstance(v, float) else f"{v!s:>22s}")
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
    p.add_argument(
        "--record",
        action="store_true",
        help="write to bench/results/ (what the README quotes) instead of runs/bench/",
    )
    args = p.parse_args()
    results = RESULTS if args.record else RUNS
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    if "cuda" in devices and not torch.cuda.is_available():
        print("no CUDA device: CPU only")
        devices.remove("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 against fp32
    torch.backends.cudnn.allow_tf32 = False
    results.mkdir(parents=True, exist_ok=True)
    for device in devices:
        print(f"\n{device}: hidden {HIDDEN}, {LAYERS} layers, input {INPUT}, median ms per call")
        rows = bench_device(device, args.quick, args.block, tuple(args.steps))
        suffix = "" if args.block == 1 else f"-block{args.block}"
        out = results / f"model_bench-{device}{suffix}.json"
        out.write_text(
            json.dumps(
                {"machine": machine(), "quick": args.quick, "block": args.block, "rows": rows},
                indent=2,
            )
            + "\n"
        )
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
