"""A server's start and stop as one unit under ``bentoml serve``.

``bentoml serve`` is an arbiter process (the CLI, which imports the service module) that starts
the worker (which imports it again). Left to itself it wipes one Prometheus directory per
BentoML home at every start, so a second server from the same checkout, even one that failed,
erased the first one's metrics; and a worker that refused to start left the arbiter exiting 0
after a long traceback. Here each arbiter gets a directory of its own under the BentoML home
(``lstm_servers/<host>-<arbiter pid>/``: the metrics of its workers, and a note when a worker
refused to start), so the arbiter exits non-zero after a refusal and its metrics are its own.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import logging
import os
import shutil
import signal
import socket
import sys
from pathlib import Path
from types import TracebackType
from typing import NoReturn

import bentoml

RUNS_DIR = "lstm_servers"
REFUSED = "refused"  # written by a worker that refused to start; read by its arbiter at exit
EXIT_REFUSED = 2


def in_arbiter() -> bool:
    """This process is ``bentoml serve``'s arbiter (not a worker, a test or a plain import)."""
    return bentoml.server_context.worker_index is None and sys.argv[1:2] == ["serve"]


def _runs_root() -> Path:
    from bentoml._internal.configuration.containers import BentoMLContainer

    return Path(BentoMLContainer.bentoml_home.get()) / RUNS_DIR


def _run_name(pid: int) -> str:
    # The host name too: containers sharing a BentoML home each have their own pid 1.
    return f"{socket.gethostname()}-{pid}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def prepare_arbiter() -> None:
    """Give this server its own metrics directory, and make a refused start exit non-zero.

    Runs before bentoml's serve() creates (and wipes) the workers' Prometheus directory: the CLI
    imports the service first.
    """
    from bentoml._internal.configuration.containers import BentoMLContainer

    root = _runs_root()
    if root.is_dir():  # servers of this host killed with -9 left theirs behind
        prefix = _run_name(0)[:-1]
        for run in root.iterdir():
            pid = run.name.removeprefix(prefix)
            if run.name.startswith(prefix) and pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(run, ignore_errors=True)
    own = root / _run_name(os.getpid())
    shutil.rmtree(own, ignore_errors=True)  # a dead process's of the same pid: its note too
    BentoMLContainer.prometheus_multiproc_dir.set(str(own / "metrics"))
    atexit.register(_finish, own)
    sys.excepthook = _explain_start_error


def _finish(own: Path) -> None:
    refused = (own / REFUSED).exists()
    shutil.rmtree(own, ignore_errors=True)
    if refused:
        # Handlers registered before this one (logging's among them) are skipped by _exit.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_REFUSED)


def _explain_start_error(
    kind: type[BaseException], error: BaseException, tb: TracebackType | None
) -> None:
    """A port already listened on, in two lines instead of circus's traceback."""
    if isinstance(error, OSError) and error.errno == errno.EADDRINUSE:
        print(
            f"lstm-sessions: cannot listen on the port ({error.strerror}): another server holds "
            f"it; stop it, or pick another port: `make serve PORT=3001`, "
            f"`lstm-serve serve --port 3001` or `bentoml serve ... --port 3001`",
            file=sys.stderr,
        )
        return
    sys.__excepthook__(kind, error, tb)


def refuse_in_worker() -> NoReturn:
    """End a worker that cannot serve: note it for the arbiter, stop the arbiter, exit.

    A worker that only raised would be restarted by the arbiter again and again, and BentoML
    would log the exception as a traceback each time; the message has been logged already.
    """
    run = Path(os.environ.get("PROMETHEUS_MULTIPROC_DIR", "")).parent
    if run.name == _run_name(os.getppid()) and run.parent.name == RUNS_DIR:
        with contextlib.suppress(OSError):
            (run / REFUSED).touch()
    os.kill(os.getppid(), signal.SIGTERM)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(EXIT_REFUSED)
