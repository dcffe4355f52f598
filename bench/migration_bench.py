"""What migration by replay costs in forecast accuracy: the window a session keeps, W, against a
replay of its whole history.

    python bench/migration_bench.py --new DIR [--old DIR] [--at 700] [--horizon 100] [--record]

A session streams a held-out ACSF1 appliance through the old model (``--old``, default the
shipped one) up to ``--at`` steps, then moves to the new model (``--new``, a checkpoint directory:
a retrained version) the service's way: the new model run from a zero state over the last W inputs
(``LSTM_MIGRATION_WINDOW``), then onward. The reference is the state the new model would have had
after the whole history. Scored: the MSE (normalised units, as the card's) of the new model's
one-step forecasts over the next ``--horizon`` steps, each W against the full replay, on every
held-out appliance; and the first of those steps, where a short window shows most. Also the
replay's own time per session at each W (one thread).

Prints a table; writes runs/bench/migration_bench.json (``--record``: bench/results/).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model import load_checkpoint  # noqa: E402
from model.checkpoint import AnyForecaster  # noqa: E402
from model.data import load_acsf1  # noqa: E402

RESULTS = ROOT / "bench" / "results"
RUNS = ROOT / "runs" / "bench"
WINDOWS = (16, 64, 128, 256, 1024)


def forecasts_after(
    new: AnyForecaster, history: np.ndarray, future: np.ndarray, w: int | None
) -> np.ndarray:
    """The new model's one-step means for ``future`` after a replay of the last ``w`` inputs of
    ``history`` (None: all of it), in raw units."""
    kept = history if w is None else history[-w:]
    with torch.no_grad():
        burn = new(torch.from_numpy(kept)[None])
        # The forecast for future[0] is the replay's last; then each next from the stream.
        ahead = new(torch.from_numpy(future[:-1])[None], burn.state)
    means = torch.cat([burn.mean[:, -1:], ahead.mean], dim=1)
    return means[0, :, 0].numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old", type=Path, default=ROOT / "models" / "acsf1-forecaster")
    parser.add_argument("--new", type=Path, required=True, help="the new version's checkpoint")
    parser.add_argument("--at", type=int, default=1200, help="history length at the migration")
    parser.add_argument("--horizon", type=int, default=100, help="steps scored after it")
    parser.add_argument("--record", action="store_true", help="write bench/results/")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    old, new = load_checkpoint(args.old), load_checkpoint(args.new)
    new_model = new.model.eval()
    wanted = set(old.card["data"]["test_ids"])
    data = load_acsf1()
    series = [s for sid, s in zip(data.ids, data.series, strict=True) if str(sid) in wanted]
    norm = new_model.normalisation
    mean, std = np.array(norm.mean, dtype=np.float32), np.array(norm.std, dtype=np.float32)
    keys = [*(str(w) for w in WINDOWS), "full"]
    rows: dict[str, list[float]] = {k: [] for k in keys}
    first: dict[str, list[float]] = {k: [] for k in rows}
    times: dict[str, list[float]] = {k: [] for k in rows}
    for values in series:
        values = values.astype(np.float32)
        if len(values) < args.at + args.horizon:
            continue
        history, future = values[: args.at], values[args.at : args.at + args.horizon]
        target = (future[:, 0] - mean[0]) / std[0]
        for key in rows:
            w = None if key == "full" else int(key)
            started = time.perf_counter()
            got = forecasts_after(new_model, history, future, w)
            times[key].append(time.perf_counter() - started)
            err = ((got - mean[0]) / std[0] - target) ** 2
            rows[key].append(float(err.mean()))
            first[key].append(float(err[:10].mean()))
    full = statistics.fmean(rows["full"])
    table: list[dict[str, Any]] = []
    print(
        f"{len(rows['full'])} held-out appliances, migrated at t = {args.at}, "
        f"next {args.horizon} steps"
    )
    print(
        f"{'window':>8} {'MSE':>8} {'vs full':>8} {'first 10':>9} {'vs full':>8} {'replay ms':>10}"
    )
    for key in rows:
        mse, head = statistics.fmean(rows[key]), statistics.fmean(first[key])
        entry = {
            "window": key,
            "mse": mse,
            "ratio_to_full": mse / full,
            "mse_first_10": head,
            "first_10_ratio_to_full": head / statistics.fmean(first["full"]),
            "replay_ms_median": 1000 * statistics.median(times[key]),
        }
        table.append(entry)
        print(
            f"{key:>8} {mse:8.4f} {entry['ratio_to_full']:8.3f} {head:9.4f} "
            f"{entry['first_10_ratio_to_full']:8.3f} {entry['replay_ms_median']:10.2f}"
        )
    out = args.out or (RESULTS if args.record else RUNS) / "migration_bench.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "old": f"{old.name}:{old.version}",
                "new": f"{new.name}:{new.version}",
                "at": args.at,
                "horizon": args.horizon,
                "appliances": len(rows["full"]),
                "rows": table,
            },
            indent=2,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
