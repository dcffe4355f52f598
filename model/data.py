"""Series data for training and evaluation: ACSF1 from sktime, or a user's long-format CSV.

A ``SeriesSet`` is a list of (T_i, F) float32 arrays with ids. Splits are by series (appliance)
when there are enough of them, so validation and test series are never seen in training; with
too few (one meter, one sensor), by time: each series' last parts are held out.
"""

from __future__ import annotations

import csv
import hashlib
import math
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np


@dataclass(frozen=True)
class SeriesSet:
    name: str
    feature_names: tuple[str, ...]
    series: list[np.ndarray]  # each (T_i, F), float32
    ids: list[str]
    groups: list[str]  # a class label per series, used to stratify splits ("" when unknown)

    def __post_init__(self) -> None:
        if not self.series:
            raise ValueError(f"{self.name}: no series")
        n_features = len(self.feature_names)
        for sid, s in zip(self.ids, self.series, strict=True):
            if s.ndim != 2 or s.shape[1] != n_features or s.shape[0] < 2:
                raise ValueError(
                    f"{self.name}: series {sid!r} has shape {s.shape}; expected "
                    f"(T >= 2, {n_features})"
                )
            if not np.isfinite(s).all():
                raise ValueError(f"{self.name}: series {sid!r} has NaN or infinite values")

    def subset(self, indices: list[int], name: str) -> SeriesSet:
        return SeriesSet(
            name,
            self.feature_names,
            [self.series[i] for i in indices],
            [self.ids[i] for i in indices],
            [self.groups[i] for i in indices],
        )

    def fingerprint(self) -> str:
        """SHA-256 over ids, feature names and values: names exactly the data a model saw."""
        h = hashlib.sha256()
        h.update("\0".join(self.feature_names).encode())
        for sid, s in zip(self.ids, self.series, strict=True):
            h.update(sid.encode() + b"\0")
            h.update(np.ascontiguousarray(s, dtype="<f4").tobytes())
        return h.hexdigest()


def load_acsf1() -> SeriesSet:
    """The UCR ACSF1 appliance power data sktime ships: 200 appliances x 1460 readings."""
    from sktime.datasets import load_acsf1 as sktime_load_acsf1

    X, y = sktime_load_acsf1(return_X_y=True, return_type="numpy3D")  # (200, 1, 1460)
    series = [np.ascontiguousarray(x.T, dtype=np.float32) for x in X]  # (1460, 1) each
    return SeriesSet(
        "ACSF1",
        ("power",),
        series,
        [f"acsf1-{i:03d}" for i in range(len(series))],
        [str(label) for label in y],
    )


# The largest |value| a model is trained on or streamed (the service's VALUE_CEILING: float32
# keeps everything derived from it finite; tests/test_forecaster.py holds the two equal).
MAX_ABS_VALUE = 1e15

TimeKey = tuple[int, float]  # (its kind: 0 a number, 1 a time with a UTC offset, 2 one without)
TIME_KINDS = ("a number", "an ISO 8601 time with a UTC offset", "an ISO 8601 time without one")


def read_long_csv(
    path: str | Path,
    *,
    id_col: str = "series_id",
    time_col: str = "time",
    value_cols: list[str] | None = None,
) -> tuple[list[str], dict[str, list[tuple[str, list[float]]]]]:
    """Long format: one row per (series, time), one or more value columns.

    Returns the value column names and, per series id (sorted), its rows as (time, values)
    ordered by time: numbers numerically, ISO 8601 times as instants (``+02:00`` and ``+01:00``
    across a change of clocks in their order, not as text). A series' times are all of one
    kind. ValueError, naming the file and line, for anything else: a time of neither kind, one
    (series, time) twice, a value that is not a finite number within ±MAX_ABS_VALUE.
    """
    path = Path(path)
    with path.open(newline="", encoding="utf-8-sig") as f:  # -sig: a spreadsheet's BOM
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        for col in (id_col, time_col):
            if col not in header:
                raise ValueError(f"{path}: no column {col!r} (columns: {header})")
        values = value_cols or [c for c in header if c not in (id_col, time_col)]
        missing = [c for c in values if c not in header]
        if missing or not values:
            raise ValueError(f"{path}: value columns {missing or values} not found in {header}")
        # (both were accepted: a model of two features both the one column; an outside run)
        if len(set(values)) < len(values):
            raise ValueError(f"{path}: value columns {values} name a column twice")
        if {id_col, time_col} & set(values):
            raise ValueError(
                f"{path}: value columns {values} include the series id or time column "
                f"({id_col!r}, {time_col!r})"
            )
        keyed: dict[str, list[tuple[TimeKey, str, list[float]]]] = defaultdict(list)
        seen: dict[tuple[str, TimeKey], int] = {}  # (series, time) -> its line
        first_kind: dict[str, tuple[int, int]] = {}  # series -> (its times' kind, first line)
        for line, row in enumerate(reader, start=2):
            numbers = [value_at(path, line, row, c) for c in values]
            series, time = row[id_col], row[time_col]
            key = time_key(time)
            if key is None:
                raise ValueError(
                    f"{path}:{line}: time {time!r} is neither a number nor an ISO 8601 time "
                    f"({time_col})"
                )
            kind, first = first_kind.setdefault(series, (key[0], line))
            if kind != key[0]:
                raise ValueError(
                    f"{path}:{line}: series {series!r} has time {time!r}, {TIME_KINDS[key[0]]}, "
                    f"after {TIME_KINDS[kind]} (line {first}): one kind of time per series"
                )
            if (series, key) in seen:  # which comes first was arbitrary (accepted silently)
                raise ValueError(
                    f"{path}:{line}: series {series!r} has time {time!r} again "
                    f"(line {seen[series, key]}): each (series, time) must be one row"
                )
            seen[series, key] = line
            keyed[series].append((key, time, numbers))
    return values, {
        i: [(time, v) for _, time, v in sorted(keyed[i], key=lambda r: r[0])] for i in sorted(keyed)
    }


def value_at(path: Path, line: int, row: dict[str, Any], column: str) -> float:
    """Row ``line``'s value in ``column``, a finite number within ±MAX_ABS_VALUE."""
    raw = row[column]
    try:
        value = float(raw)
    except (TypeError, ValueError):
        what = "no value" if raw in (None, "") else f"{raw!r}, not a number"
        raise ValueError(f"{path}:{line}: {column} is {what}") from None
    if not math.isfinite(value):  # float() reads "nan" and "inf"; no model takes them
        raise ValueError(f"{path}:{line}: {column} is {raw!r}: values must be finite")
    if abs(value) > MAX_ABS_VALUE:
        raise ValueError(
            f"{path}:{line}: {column} is {raw!r}: beyond ±{MAX_ABS_VALUE:g}, which the service "
            "refuses"
        )
    return value


def time_key(time: str | None) -> TimeKey | None:
    """A time's place in its series (None: neither a number nor an ISO 8601 time): a number as
    itself, an ISO 8601 time as its instant (seconds; one without an offset as if it were UTC,
    comparable only to others without)."""
    if time is None:  # a short row
        return None
    try:
        number = float(time)
    except ValueError:
        pass
    else:  # nan sorted nowhere and equalled nothing: the series' order was arbitrary (a review)
        return (0, number) if math.isfinite(number) else None
    try:
        at = datetime.fromisoformat(time.strip())
    except ValueError:
        return None
    if at.tzinfo is None:
        return (2, at.replace(tzinfo=UTC).timestamp())
    return (1, at.timestamp())


def load_csv(
    path: str | Path,
    *,
    id_col: str = "series_id",
    time_col: str = "time",
    value_cols: list[str] | None = None,
) -> SeriesSet:
    """A long-format CSV (see ``read_long_csv``) as a SeriesSet."""
    values, rows = read_long_csv(path, id_col=id_col, time_col=time_col, value_cols=value_cols)
    series = [np.array([v for _, v in r], dtype=np.float32) for r in rows.values()]
    ids = list(rows)
    return SeriesSet(Path(path).stem, tuple(values), series, ids, [""] * len(ids))


class TooFewSeries(ValueError):
    """Too few series (per group) to hold whole series out for validation and test."""


class TooShortToSplit(ValueError):
    """A series too short to give every part of a split the timesteps it needs."""


@dataclass(frozen=True)
class Split:
    """Train, validation and test sets, and how they were made (for the model card)."""

    by: Literal["series", "time"]
    train: SeriesSet
    validation: SeriesSet
    test: SeriesSet
    description: dict[str, Any] = field(default_factory=dict)


def split_series(
    data: SeriesSet,
    *,
    by: Literal["auto", "series", "time"] = "auto",
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 0,
    min_part: int = 2,
) -> Split:
    """By series when there are enough (``auto``), else by time; ``min_part`` timesteps at
    least in each held-out part of a time split."""
    fractions = {"validation": val_fraction, "test": test_fraction}
    if by != "time":
        try:
            train, val, test = split_by_series(
                data, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed
            )
        except TooFewSeries:
            if by == "series":
                raise
        else:
            return Split(
                "series",
                train,
                val,
                test,
                {"by": "series", "fractions": fractions, "seed": seed, "stratified": "group"},
            )
    train, val, test, ranges = split_by_time(
        data, val_fraction=val_fraction, test_fraction=test_fraction, min_part=min_part
    )
    why = "asked for" if by == "time" else f"{len(data.series)} series: too few to split by series"
    return Split(
        "time",
        train,
        val,
        test,
        {"by": "time", "why": why, "fractions": fractions, "ranges": ranges},
    )


def time_split_sizes(length: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    """(validation, test) timesteps cut from the end of a series of ``length``."""
    return int(length * val_fraction), int(length * test_fraction)


def time_split_min_length(min_part: int, val_fraction: float, test_fraction: float) -> int:
    """The shortest series whose train, validation and test parts all hold ``min_part``."""
    length = math.ceil(min_part / min(val_fraction, test_fraction))
    while True:
        n_val, n_test = time_split_sizes(length, val_fraction, test_fraction)
        if min(n_val, n_test, length - n_val - n_test) >= min_part:
            return length
        length += 1


def split_by_time(
    data: SeriesSet,
    *,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    min_part: int = 2,
) -> tuple[SeriesSet, SeriesSet, SeriesSet, dict[str, dict[str, list[int]]]]:
    """Each series cut in time: its first part trains, the next validates, the last tests.

    Also returns, per series id, each part's [start, stop) timesteps. Held-out parts are later in
    time than anything trained on, so the scores say how the model does on the series' future.
    """
    needed = time_split_min_length(min_part, val_fraction, test_fraction)
    parts: dict[str, list[np.ndarray]] = {"train": [], "validation": [], "test": []}
    ranges: dict[str, dict[str, list[int]]] = {}
    for sid, s in zip(data.ids, data.series, strict=True):
        if len(s) < needed:
            raise TooShortToSplit(
                f"{data.name}: series {sid!r} has {len(s)} timesteps; split by time into "
                f"train, validation ({val_fraction:.0%}) and test ({test_fraction:.0%}) parts "
                f"of at least {min_part} timesteps each, a series needs at least {needed}"
            )
        n_val, n_test = time_split_sizes(len(s), val_fraction, test_fraction)
        cuts = [0, len(s) - n_val - n_test, len(s) - n_test, len(s)]
        ranges[sid] = {}
        for name, lo, hi in zip(parts, cuts, cuts[1:], strict=False):
            parts[name].append(s[lo:hi])
            ranges[sid][name] = [lo, hi]
    sets = [
        SeriesSet(name, data.feature_names, series, list(data.ids), list(data.groups))
        for name, series in parts.items()
    ]
    return sets[0], sets[1], sets[2], ranges


def split_by_series(
    data: SeriesSet,
    *,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 0,
) -> tuple[SeriesSet, SeriesSet, SeriesSet]:
    """Train / validation / test sets of whole series, stratified by group, deterministic."""
    rng = np.random.default_rng(seed)
    by_group: dict[str, list[int]] = defaultdict(list)
    for i, g in enumerate(data.groups):
        by_group[g].append(i)
    train, val, test = [], [], []
    for g in sorted(by_group):
        members = [by_group[g][j] for j in rng.permutation(len(by_group[g]))]
        n_val = max(1, round(val_fraction * len(members))) if len(members) >= 3 else 0
        n_test = max(1, round(test_fraction * len(members))) if len(members) >= 3 else 0
        val += members[:n_val]
        test += members[n_val : n_val + n_test]
        train += members[n_val + n_test :]
    if not (train and val and test):
        raise TooFewSeries(
            f"{data.name}: {len(data.series)} series are too few to split into "
            "train, validation and test"
        )
    return (
        data.subset(sorted(train), "train"),
        data.subset(sorted(val), "validation"),
        data.subset(sorted(test), "test"),
    )


def indices_by_length(series: list[np.ndarray]) -> list[list[int]]:
    """Indices of equal-length series, grouped, so evaluation can stream each group at once."""
    by_len: dict[int, list[int]] = defaultdict(list)
    for i, s in enumerate(series):
        by_len[len(s)].append(i)
    return [by_len[t] for t in sorted(by_len)]
