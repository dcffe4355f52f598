"""``lstm-serve``: serve, train, stream a CSV through a session, benchmark.

lstm-serve serve --port 3000
lstm-serve train --csv my.csv --out models/mine --name mine
lstm-serve stream examples/meters.csv --out forecasts.csv
lstm-serve bench
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from client.client import LSTMClient

ROOT = Path(__file__).resolve().parents[1]


def serve(args: argparse.Namespace) -> int:
    """Import the shipped model into BentoML's store if needed, then become the server.

    The process is replaced by ``bentoml serve`` (exec), so its pid is the server's: a SIGTERM or
    Ctrl-C to it stops the whole server cleanly (snapshot written), and its exit code is the
    server's. A child process would have died alone, leaving the server serving, orphaned.
    """
    from model.checkpoint import CheckpointError
    from service.model_registry import import_checkpoint

    with socket.socket() as probe:
        # As the server's own socket does: sockets of a crashed server still in TIME-WAIT (or
        # FIN-WAIT) then do not block the port, while a listening one still does.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((args.host, args.port))
        except OSError as e:
            print(
                f"lstm-serve: cannot listen on {args.host}:{args.port} ({e.strerror}): another "
                f"server (an earlier `make serve`?) holds the port; stop it, or pick another "
                f"port: `make serve PORT=3001` or `lstm-serve serve --port 3001`",
                file=sys.stderr,
            )
            return 2
    if args.model_dir is not None:  # the server imports and serves LSTM_MODEL_DIR's
        os.environ["LSTM_MODEL_DIR"] = str(args.model_dir.resolve())
    model_dir = Path(os.environ.get("LSTM_MODEL_DIR") or ROOT / "models" / "acsf1-forecaster")
    if not os.environ.get("LSTM_MODEL_TAG"):
        try:
            import_checkpoint(model_dir)
        except (CheckpointError, OSError) as e:
            print(
                f"lstm-serve: cannot import the model in {model_dir} ({e}); pass "
                f"--model-dir a checkpoint directory (model.safetensors + card.json), or run "
                f"`make train`",
                file=sys.stderr,
            )
            return 2
    bentoml = Path(sys.executable).with_name("bentoml")
    command = [
        str(bentoml),
        "serve",
        "service.service:LSTMSessions",
        "--host",
        args.host,
        "--port",
        str(args.port),
    ]
    sys.stdout.flush()
    sys.stderr.flush()
    os.chdir(ROOT)
    os.execv(bentoml, command)


class StreamError(Exception):
    """What stops ``lstm-serve stream``, said in one line: the CSV, the options or the service."""

    def __init__(self, message: str, status: int = 2) -> None:
        super().__init__(message)
        self.status = status


def csv_header(args: argparse.Namespace) -> list[str]:
    """The CSV's column names, once its id and time columns are known to be there."""
    try:
        with args.file.open(newline="", encoding="utf-8-sig") as f:  # as read_long_csv reads
            header = next(csv.reader(f), [])
    except (OSError, UnicodeDecodeError) as e:
        raise StreamError(f"cannot read {args.file}: {getattr(e, 'strerror', None) or e}") from e
    for option, col in (("--id-col", args.id_col), ("--time-col", args.time_col)):
        if col not in header:
            raise StreamError(
                f"{args.file} has no column {col!r} ({option}); its columns: "
                f"{', '.join(header) or 'none'}"
            )
    return header


def value_columns(
    args: argparse.Namespace, header: list[str], features: list[str]
) -> list[str] | None:
    """The value columns to read (None: all but the id and time), checked against the header."""
    value_cols = args.value_cols.split(",") if args.value_cols else None
    if value_cols is None and len(features) > 1:
        value_cols = features  # the model's feature order, matched by column name
    elif value_cols is not None and sorted(value_cols) == sorted(features):
        # The model's features named in another order: read in the model's (sent as typed, each
        # column went in as another feature; found by an outside test run).
        value_cols = features
    missing = [c for c in value_cols or [] if c not in header]
    if missing:
        how = (
            "--value-cols" if args.value_cols else "the model's features; choose with --value-cols"
        )
        raise StreamError(
            f"{args.file} has no column {', '.join(map(repr, missing))} ({how}); "
            f"its columns: {', '.join(header)}"
        )
    return value_cols


def stream(args: argparse.Namespace) -> int:
    """Stream every series of a long-format CSV through its own session; write the outputs."""
    try:
        return stream_csv(args)
    except StreamError as e:
        print(f"lstm-serve: {e}", file=sys.stderr)
        return e.status


def stream_csv(args: argparse.Namespace) -> int:
    import httpx

    from client.client import APIError, LSTMClient
    from model.data import read_long_csv

    if args.chunk < 1:
        raise StreamError("--chunk must be at least 1")
    header = csv_header(args)
    try:
        # One retry: a service not running at --url is said at once, not after a restart's wait.
        probing = LSTMClient(
            args.url, timeout_s=args.timeout, api_key=args.api_key, retries=1, connect_retries=1
        )
        with probing as probe:
            card = probe.model()
    except APIError as e:
        if e.status in (401, 403):  # a setup error, not a server down (an outside test run)
            raise StreamError(
                f"the service at {args.url} refused the request ({e}): pass its key with "
                "--api-key or LSTM_API_KEY"
            ) from e
        raise StreamError(
            f"cannot read the model card at {args.url} ({e}): is the service "
            "running there (`make serve`)? choose it with --url",
            1,
        ) from e
    except httpx.HTTPError as e:
        raise StreamError(
            f"cannot read the model card at {args.url} ({e}): is the service "
            "running there (`make serve`)? choose it with --url",
            1,
        ) from e
    features = list(card["features"])
    if args.chunk > card["limits"]["max_chunk"]:
        raise StreamError(
            f"--chunk {args.chunk} is over the service's limit of "
            f"{card['limits']['max_chunk']:.0f} timesteps"
        )
    value_cols = value_columns(args, header, features)
    try:
        values, rows = read_long_csv(
            args.file, id_col=args.id_col, time_col=args.time_col, value_cols=value_cols
        )
    except ValueError as e:  # a value that is not a number, with its file and line
        raise StreamError(str(e)) from e
    if len(values) != len(features):
        raise StreamError(
            f"the CSV gives {len(values)} value columns {values}; the model takes "
            f"{len(features)} ({features}): choose them with --value-cols"
        )
    if values != features:
        # Counts match, so the service accepts every row; names that differ usually mean data
        # unlike the model's own, and forecasts no better than guessing.
        print(
            f"lstm-serve: warning: the CSV's value columns {values} are not the features of "
            f"{card['name']}:{card['version']} {features}: its forecasts suit only data like "
            "the data it was trained on",
            file=sys.stderr,
        )
    with LSTMClient(args.url, timeout_s=args.timeout, api_key=args.api_key) as api:
        if args.keep:
            for series_id in rows:
                with service_errors(series_id, args.url):
                    refuse_if_taken(api, series_id)
        write_outputs(api, values, rows, args)
    return 0


@contextlib.contextmanager
def service_errors(series_id: str, url: str) -> Iterator[None]:
    """The service's refusal (4xx: exit 2) or failure (5xx, no answer: exit 1) as a StreamError."""
    import httpx

    from client.client import APIError

    try:
        yield
    except APIError as e:
        raise StreamError(
            f"series {series_id!r}: the service answered {e}", 2 if e.status < 500 else 1
        ) from e
    except httpx.HTTPError as e:
        raise StreamError(f"series {series_id!r}: {url} failed ({e})", 1) from e


def refuse_if_taken(api: LSTMClient, series_id: str) -> None:
    """A kept series streams into the session of its own id: one there already is refused before
    ``--out`` is opened (a second ``--keep`` run truncated the first's output, then met a 409
    session_exists; found by an outside test run)."""
    from client.client import APIError

    try:
        api.attach(series_id)
    except APIError as e:
        if e.status == 404:
            return
        raise
    raise StreamError(
        f"series {series_id!r}: a session of that id exists already (kept by an earlier "
        "--keep run?): delete it, or stream without --keep"
    )


def write_outputs(
    api: LSTMClient,
    values: list[str],
    rows: dict[str, list[tuple[str, list[float]]]],
    args: argparse.Namespace,
) -> None:
    """Stream every series, writing its outputs to ``--out`` (or standard output) as they come."""
    from tqdm import tqdm

    try:
        out: TextIO = open(args.out, "w", newline="") if args.out else sys.stdout  # noqa: SIM115
    except OSError as e:
        raise StreamError(f"cannot write {args.out}: {e.strerror}") from e
    try:
        writer = csv.writer(out)
        writer.writerow(
            [
                args.id_col,
                args.time_col,
                *values,
                *(f"mean_{v}" for v in values),
                *(f"std_{v}" for v in values),
                *(f"anomaly_z_{v}" for v in values),
            ]
        )
        total = sum(len(r) for r in rows.values())
        with tqdm(total=total, unit="step", file=sys.stderr, disable=args.quiet) as bar:
            for series_id, series in rows.items():
                with service_errors(series_id, args.url):
                    stream_series(api, series_id, series, args, writer, bar.update)
    finally:
        if args.out:
            out.close()


def stream_series(
    api: LSTMClient,
    series_id: str,
    series: list[tuple[str, list[float]]],
    args: argparse.Namespace,
    writer: Any,
    progress: Callable[[int], object],
) -> None:
    session_id = series_id if args.keep else None  # kept sessions keep the series' id
    with api.session(session_id, keep=args.keep) as session:
        for lo in range(0, len(series), args.chunk):
            chunk = series[lo : lo + args.chunk]
            outputs = session.step([v for _, v in chunk])["outputs"]
            for (time, value), o in zip(chunk, outputs, strict=True):
                z = o["anomaly_z"] or [""] * len(value)
                writer.writerow([series_id, time, *value, *o["mean"], *o["std"], *z])
            progress(len(chunk))


def models(args: argparse.Namespace) -> int:
    """One admin call on the model versions; prints the versions held after it."""
    import httpx

    if args.action != "list" and not args.tag:
        print(f"lstm-serve: models {args.action} needs a tag (name:version)", file=sys.stderr)
        return 2
    headers = {"authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    route = "/v1/admin/models" + ("" if args.action == "list" else f"/{args.action}")
    body = {} if args.action == "list" else {"tag": args.tag}
    try:
        answer = httpx.post(args.url + route, json=body, headers=headers, timeout=120)
    except httpx.HTTPError as e:
        print(f"lstm-serve: {args.url} failed ({e}): is the service running?", file=sys.stderr)
        return 1
    reply = answer.json()
    if answer.status_code != 200:
        error = reply.get("error", {})
        print(
            f"lstm-serve: {answer.status_code} {error.get('code')}: {error.get('message')}",
            file=sys.stderr,
        )
        return 2 if answer.status_code < 500 else 1
    if args.action == "unload":
        print(f"unloaded {reply['tag']}")
        return 0
    for model in reply["models"]:
        mark = "*" if model["active"] else " "
        print(f"{mark} {model['tag']}  sessions={model['sessions']}  device={model['device']}")
    return 0


def keys(args: argparse.Namespace) -> int:
    """A new key's line appended to the key file (its digest only); the key printed once."""
    from service.auth import KeyFileError, key_line, new_key, parse_key_file

    try:
        text = args.file.read_text() if args.file.exists() else ""
        existing = parse_key_file(text, str(args.file))
        if any(e.principal.name == args.name for e in existing):
            raise KeyFileError(f"{args.file} has a key named {args.name!r} already")
        key = new_key()
        if text and not text.endswith("\n"):
            text += "\n"
        text += key_line(args.name, args.role, key)
        parse_key_file(text, str(args.file))  # what a server will read
    except (KeyFileError, OSError) as e:
        print(f"lstm-serve: {e}", file=sys.stderr)
        return 2
    # Written whole and renamed into place: a server re-reading it never sees half a line.
    # Digests only, but its mode is kept (a new file's is 0600, the umask's before; a file's
    # own mode became the umask's too; and a missing folder was a traceback: an outside run).
    partial = args.file.with_name(args.file.name + ".new")
    try:
        mode = args.file.stat().st_mode & 0o7777 if args.file.exists() else 0o600
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "w") as f:
            os.fchmod(f.fileno(), mode)  # O_CREAT's mode is masked by the umask
            f.write(text)
        partial.replace(args.file)
    except OSError as e:
        partial.unlink(missing_ok=True)
        print(f"lstm-serve: cannot write {args.file}: {e.strerror}", file=sys.stderr)
        return 2
    print(key)
    print(
        f"lstm-serve: key {args.name!r} ({args.role}) added to {args.file}; this is the only time "
        "it is shown. Revoke it by deleting its line.",
        file=sys.stderr,
    )
    return 0


def train(args: argparse.Namespace) -> int:
    from model.train import main as train_main

    return train_main(args.train_args)


def bench(args: argparse.Namespace) -> int:
    return subprocess.call(
        [sys.executable, str(ROOT / "bench" / "model_bench.py"), *args.bench_args]
    )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lstm-serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the service (bentoml serve, one worker)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on")
    s.add_argument("--port", type=int, default=3000, help="port to listen on")
    s.add_argument(
        "--model-dir",
        type=Path,
        help="checkpoint to import and serve when LSTM_MODEL_TAG is unset (default: "
        "LSTM_MODEL_DIR, else the shipped model)",
    )
    s.set_defaults(run=serve)

    t = sub.add_parser(
        "train", help="train a forecaster (python -m model.train; see its --help)", add_help=False
    )
    t.add_argument("train_args", nargs=argparse.REMAINDER)
    t.set_defaults(run=train)

    st = sub.add_parser(
        "stream",
        help="stream a long-format CSV through sessions, write the "
        "forecasts and anomaly scores as CSV",
    )
    st.add_argument("file", type=Path, help="CSV: a series id column, a time column, values")
    st.add_argument("--url", default="http://127.0.0.1:3000", help="the service's base URL")
    st.add_argument("--id-col", default="series_id", help="series id column")
    st.add_argument("--time-col", default="time", help="time column (numbers or ISO 8601)")
    st.add_argument("--value-cols", help="comma-separated value columns (default: all others)")
    st.add_argument("--chunk", type=int, default=32, help="timesteps per step request")
    st.add_argument("--out", type=Path, help="output CSV (default: standard output)")
    st.add_argument(
        "--keep",
        action="store_true",
        help="keep the sessions after streaming, each under its series id",
    )
    st.add_argument(
        "--api-key",
        default=os.environ.get("LSTM_API_KEY"),
        help="the key for a service with LSTM_API_KEYS (default: LSTM_API_KEY)",
    )
    st.add_argument("--timeout", type=float, default=30.0, help="seconds per request")
    st.add_argument("--quiet", action="store_true", help="no progress bar")
    st.set_defaults(run=stream)

    m = sub.add_parser(
        "models", help="the service's model versions: list, load, activate, unload (admin)"
    )
    m.add_argument("action", choices=["list", "load", "activate", "unload"])
    m.add_argument("tag", nargs="?", help="name:version in BentoML's model store (not for list)")
    m.add_argument("--url", default="http://127.0.0.1:3000", help="the service's base URL")
    m.add_argument(
        "--api-key",
        default=os.environ.get("LSTM_API_KEY"),
        help="an admin key, for a service with LSTM_API_KEYS (default: LSTM_API_KEY)",
    )
    m.set_defaults(run=models)

    k = sub.add_parser(
        "keys", help="add an API key to a key file (LSTM_API_KEYS); prints the key once"
    )
    k.add_argument("action", choices=["add"], help="add: a new key under NAME")
    k.add_argument("name", help="the key's name: its sessions' namespace, shown in logs")
    k.add_argument("--file", type=Path, required=True, help="the key file (created if absent)")
    k.add_argument("--role", choices=["user", "admin"], default="user")
    k.set_defaults(run=keys)

    b = sub.add_parser(
        "bench", help="bench/model_bench.py (pass its options after --)", add_help=False
    )
    b.add_argument("bench_args", nargs=argparse.REMAINDER)
    b.set_defaults(run=bench)
    return p


PASSTHROUGH = {"train": train, "bench": bench}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in PASSTHROUGH:  # their options belong to the tool they run
        rest = argv[1:]
        if rest[:1] == ["--"]:
            rest = rest[1:]
        key = "train_args" if argv[0] == "train" else "bench_args"
        return int(PASSTHROUGH[argv[0]](argparse.Namespace(**{key: rest})))
    args = parser().parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    raise SystemExit(main())
