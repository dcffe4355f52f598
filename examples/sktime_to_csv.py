"""Write one of the UCR data sets sktime ships as the long-format CSV ``model.train --csv`` reads.

    python examples/sktime_to_csv.py plaid runs/plaid.csv

PLAID: 1074 appliance current recordings of 100 to 1344 readings, magnitudes from 1e-5 to 1e2
(unlike ACSF1, not normalised per series): the second data set the README's scale-free table
uses. Any ``sktime.datasets.load_<name>`` with univariate series works the same way.
"""

from __future__ import annotations

import csv
import importlib
import sys
from pathlib import Path

import numpy as np


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    name, out = argv[0], Path(argv[1])
    loader = getattr(importlib.import_module("sktime.datasets"), f"load_{name}")
    X, _ = loader(return_X_y=True)  # nested pandas: one series per row
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["series_id", "time", "value"])
        for i in range(len(X)):
            values = np.asarray(X.iloc[i, 0], dtype=np.float64)
            for t, v in enumerate(values):
                w.writerow([f"{name}-{i:04d}", t, repr(float(v))])
    print(f"wrote {len(X)} series to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
