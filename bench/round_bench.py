"""One batched round of steps as a server runs it, in process: the shipped model, its pool, the
round's compute and scatter (service/rounds.py's ``RoundRunner``), without HTTP or asyncio.

    python bench/round_bench.py [--device cpu|cuda|all] [--runs 3] [--record]

B sessions (B in {1, 64, 256}, and 1024 on a GPU) each step one chunk of T values (T in {1, 13})
per round. The contenders run the same model over the same pool, each round written back into
it, timed interleaved round by round (``model_bench.time_interleaved``):
- ``eager``: the forecaster's torch ops with the eager stack (``LSTM_MODEL_ENGINE=eager``);
- on a CPU, ``native``: what ``auto`` serves there (the array path, model/native.py);
- on a GPU, ``graphed engine``: the stack from the engine's CUDA graphs, the rest of the round
  (the pool's gather, normalisation and running statistics, the head, the scores) as torch ops
  around it; and ``graphed round``: what ``auto`` serves there, the round's steps from CUDA graphs
  that gather from the pool and run the whole forecaster (model/graphed.py's ``GraphedSteps``).
Each cell is the median over runs of the per-run medians (ms a round), with the spread (min-max
over runs) of the served contender's ratio to eager. Results go to
runs/bench/round_bench-<device>.json, or with ``--record`` to bench/results/.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))  # the device machine runs it from a checkout, uninstalled

from model_bench import RESULTS, RUNS, machine, sync, time_interleaved  # noqa: E402

from model import load_checkpoint  # noqa: E402
from model.graphed import GraphedLSTM, GraphedSteps  # noqa: E402
from model.native import build_engine  # noqa: E402
from service.rounds import BatchObserver, RoundRunner, StepJob, inputs_digest  # noqa: E402
from service.sessions import SessionStore, StatePool, StoreLimits  # noqa: E402

# One value, and a chunk of 13: three chained pieces (8 + 4 + 1) on a GPU.
STEPS = (1, 13)
SHIPPED = ROOT / "models" / "acsf1-forecaster"


def runner_for(device: str, kind: str, batch: int) -> tuple[RoundRunner, list[StepJob]]:
    """A runner of ``kind`` over a pool of ``batch`` sessions (each well past its first values,
    so every value is scored), and a round's jobs, one per session."""
    checkpoint = load_checkpoint(SHIPPED, device=device)
    model, config = checkpoint.model.eval(), checkpoint.model.config
    pool = StatePool.for_model(model, batch, device, window=16)
    store = SessionStore(pool, StoreLimits(batch, 600, 600, evict_when_full=False, tombstones=1))
    sessions = [store.create(f"s{k}") for k in range(batch)]
    max_batch = 1 << (batch - 1).bit_length()
    stack_engine: Any = model.lstm
    if kind == "native":
        stack_engine = build_engine("native", model.lstm, max_batch=max_batch)
    elif kind.startswith("graphed"):
        stack_engine = build_engine("graphed", model.lstm, max_batch=max_batch)
        assert isinstance(stack_engine, GraphedLSTM)
    if kind == "graphed engine":  # the runner without its captured steps (nor their capture)
        with mock.patch.object(GraphedSteps, "of", return_value=None):
            runner = RoundRunner(model, pool, BatchObserver(), stack_engine)
    else:
        runner = RoundRunner(model, pool, BatchObserver(), stack_engine)
    if kind == "graphed round" and runner.graphed is None:
        raise RuntimeError("the round's graphed steps could not be built here: see the log")
    for s in sessions:
        s.t = 100
    x = np.full((1, config.n_features), 0.5, np.float32)
    jobs = [StepJob(s, x, inputs_digest(x), False) for s in sessions]
    return runner, jobs


def round_of(runner: RoundRunner, jobs: list[StepJob], steps: int) -> Callable[[], None]:
    """One round: every session steps ``steps`` values, and the new states go into the pool."""
    rng = np.random.default_rng(0)
    values = (rng.standard_normal((len(jobs), steps, 1)) + 100).astype(np.float32)
    for job, x in zip(jobs, values, strict=True):
        job.x = x
        job.digest = inputs_digest(x)

    def run() -> None:
        runner.compute(jobs)  # type: ignore[arg-type]
        runner.scatter([(job, job.result) for job in jobs])

    return run


def contenders(device: str) -> list[str]:
    return ["eager", "native"] if device == "cpu" else ["eager", "graphed engine", "graphed round"]


def bench_device(device: str, budget_s: float) -> list[dict[str, Any]]:
    batches = (1, 64, 256) if device == "cpu" else (1, 64, 256, 1024)
    rows = []
    for batch in batches:
        built, build_s, cuda_mib = {}, {}, {}
        for kind in contenders(device):
            sync(device)
            allocated = torch.cuda.memory_allocated() if device == "cuda" else 0
            started = time.perf_counter()
            built[kind] = runner_for(device, kind, batch)  # on a GPU: its programs captured
            sync(device)
            build_s[kind] = time.perf_counter() - started
            if device == "cuda":
                cuda_mib[kind] = (torch.cuda.memory_allocated() - allocated) / 2**20
        for steps in STEPS:
            fns: dict[str, Callable[[], object]] = {
                kind: round_of(r, jobs, steps) for kind, (r, jobs) in built.items()
            }
            seconds = time_interleaved(fns, device, budget_s)
            # The contenders agree: the means of their last round (each from its own pool).
            means = {k: np.array(jobs[0].result.outputs.mean) for k, (_, jobs) in built.items()}
            spread = max(float(np.abs(m - means["eager"]).max()) for m in means.values())
            rows.append(
                {
                    "device": device,
                    "batch": batch,
                    "timesteps": steps,
                    "seconds": seconds,
                    "max_abs_diff": spread,
                    "build_s": build_s,
                    "cuda_mib": cuda_mib,
                }
            )
            sync(device)
    return rows


def summarise(runs: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    table = []
    for row_runs in zip(*runs, strict=True):
        first = row_runs[0]
        names = list(first["seconds"])
        served = names[-1]
        row: dict[str, Any] = {k: first[k] for k in ("device", "batch", "timesteps")}
        row["runs"] = len(row_runs)
        row["served"] = served
        row["max_abs_diff"] = max(r["max_abs_diff"] for r in row_runs)
        # Building each contender (the model loaded, a pool, on a GPU the programs captured):
        # the slowest of the runs, and the GPU memory it kept.
        row["build_s"] = {k: max(r["build_s"][k] for r in row_runs) for k in names}
        row["cuda_mib"] = {k: max(r["cuda_mib"][k] for r in row_runs) for k in first["cuda_mib"]}
        for name in names:
            row[f"{name} ms"] = statistics.median(r["seconds"][name] * 1e3 for r in row_runs)
        for name in names[1:]:
            ratios = [r["seconds"][name] / r["seconds"]["eager"] for r in row_runs]
            row[f"{name} / eager"] = statistics.median(ratios)
            row[f"{name} / eager spread"] = [min(ratios), max(ratios)]
        if row["device"] == "cuda":
            ratios = [r["seconds"][served] / r["seconds"]["graphed engine"] for r in row_runs]
            row["graphed round / graphed engine"] = statistics.median(ratios)
            row["graphed round / graphed engine spread"] = [min(ratios), max(ratios)]
        table.append(row)
    return table


def print_table(table: list[dict[str, Any]]) -> None:
    names = [k[:-3] for k in table[0] if k.endswith(" ms")]
    ratios = [k for k in table[0] if " / " in k and not k.endswith("spread")]
    header = ["device", "batch", "T", *(f"{n} ms" for n in names), *ratios]
    header += ["build s", "GPU MiB", "max diff"]
    print(" | ".join(header))
    for row in table:
        cells = [row["device"], str(row["batch"]), str(row["timesteps"])]
        cells += [f"{row[f'{n} ms']:.3f}" for n in names]
        for r in ratios:
            lo, hi = row[f"{r} spread"]
            cells.append(f"{row[r]:.2f} ({lo:.2f}-{hi:.2f})")
        cells.append(" / ".join(f"{row['build_s'][n]:.2f}" for n in names))
        cells.append(" / ".join(f"{v:.0f}" for v in row["cuda_mib"].values()) or "-")
        cells.append(f"{row['max_abs_diff']:.1e}")
        print(" | ".join(cells), flush=True)


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="all", choices=["cpu", "cuda", "all"])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--budget", type=float, default=1.5, help="seconds per cell and run")
    p.add_argument("--record", action="store_true", help="write bench/results/ (the README's)")
    args = p.parse_args()
    torch.set_num_threads(1)  # as served (LSTM_TORCH_THREADS)
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    if "cuda" in devices and not torch.cuda.is_available():
        if args.device == "cuda":
            print("no CUDA device", file=sys.stderr)
            return 2
        devices.remove("cuda")
    out_dir = RESULTS if args.record else RUNS
    out_dir.mkdir(parents=True, exist_ok=True)
    for device in devices:
        torch.backends.cuda.matmul.allow_tf32 = False
        path = out_dir / f"round_bench-{device}.json"
        runs: list[list[dict[str, Any]]] = []
        for k in range(args.runs):  # the table so far written after each run: a timeout keeps it
            with torch.no_grad():
                runs.append(bench_device(device, args.budget))
            table = summarise(runs)
            print(f"\n{device}: a round of B sessions' steps, ms (ratios over {k + 1} runs)")
            print_table(table)
            doc = {"machine": machine(), "runs": len(runs), "rows": table}
            path.write_text(json.dumps(doc, indent=1) + "\n")
            print(f"wrote {path}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
