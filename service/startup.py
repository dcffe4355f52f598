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
import gc
import ipaddress
import logging
import os
import shutil
import signal
import socket
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import NoReturn

import bentoml

from model import Checkpoint, CheckpointError
from model.checkpoint import AnyForecaster
from model.graphed import GraphedLSTM, GraphUnavailable
from model.native import NativeLSTM, NativeUnavailable, StackEngine, build_engine
from service.auth import ApiKeys, KeyFileError
from service.settings import refuse_settings

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


log = logging.getLogger("lstm_sessions")


def server_identity() -> str:
    """Who is serving, as another server's refusal names it: the pid to stop (under bentoml
    serve its arbiter's: a worker killed alone is restarted) and the host."""
    if bentoml.server_context.worker_index is not None:
        return f"pid {os.getppid()}, worker {os.getpid()}, on {socket.gethostname()}"
    return f"pid {os.getpid()}, on {socket.gethostname()}"


def refuse_to_start(message: str) -> NoReturn:
    """Stop the whole server with ``message``: under bentoml serve, the worker stops its arbiter
    and exits, and the arbiter exits non-zero; in process, it raises."""
    log.critical(message)
    if bentoml.server_context.worker_index is not None:
        refuse_in_worker()
    raise RuntimeError(message)


def enforce_single_worker(service_name: str) -> None:
    """The session store lives in this process: a second worker would see none of its sessions.

    BentoML starts workers from one arbiter process and restarts a worker that fails, so raising
    alone would leave worker 1 serving beside a crash loop. A worker that finds the invariant
    broken stops the arbiter, so the whole server refuses to run.
    """
    from bentoml._internal.configuration.containers import BentoMLContainer

    try:
        workers = BentoMLContainer.config.services[service_name].workers.get()
    except (KeyError, AttributeError):
        workers = 1
    index = bentoml.server_context.worker_index
    if workers == 1 and (index is None or index == 1):
        return
    refuse_to_start(
        f"LSTMSessions keeps sessions in process memory and must run with exactly one "
        f"worker (configured: {workers}, this is worker {index}); scale with replicas"
    )


def load_model(tag: str | None, model_dir: Path, device: str) -> Checkpoint:
    """The model to serve (``tag``, else the checkpoint in ``model_dir`` imported into the
    store), or a start-up failure that says what to do."""
    from bentoml.exceptions import NotFound

    from service.model_registry import import_checkpoint, load_from_store, model_store

    if tag is None:
        try:
            tag = import_checkpoint(model_dir)
        except (CheckpointError, OSError) as e:
            refuse_to_start(
                f"cannot import the model in {model_dir} ({e}); set "
                f"LSTM_MODEL_DIR to a checkpoint directory, or run `make train`"
            )
    try:
        return load_from_store(tag, device=device)
    except NotFound:
        refuse_to_start(
            f"no model {tag!r} in the model store {model_store()} (BENTOML_HOME); import a "
            f"checkpoint there with `python -m service.model_registry import DIR` (it prints "
            f"the tag), or unset LSTM_MODEL_TAG to serve the shipped model"
        )
    except CheckpointError as e:
        refuse_to_start(f"the stored model {tag!r} is unusable: {e}")


def model_engine(
    name: str, model: AnyForecaster, cache: Path | None = None, max_batch: int | None = None
) -> StackEngine:
    """The engine the batcher runs the stack with (``LSTM_MODEL_ENGINE``), built and checked
    against the eager stack before the service is ready: on ``auto``, native on a CPU and graphed
    on a GPU (its one-timestep programs captured up to ``max_batch`` rows). An engine asked for
    by name and unable to run stops the start; ``auto`` then serves eager and says why."""
    started = time.perf_counter()
    on_cpu = model.input_mean.device.type == "cpu"
    wanted = name if name != "auto" else "native" if on_cpu else "graphed"
    try:
        engine = build_engine(wanted, model.lstm, cache, max_batch=max_batch)
    except (NativeUnavailable, GraphUnavailable) as e:
        if name != "auto":
            refuse_to_start(f"LSTM_MODEL_ENGINE={name}: {e}; set LSTM_MODEL_ENGINE=auto or eager")
        log.warning("model engine: eager, the %s engine cannot run here: %s", wanted, e)
        return model.lstm
    if isinstance(engine, NativeLSTM):
        kind = "native"
    elif isinstance(engine, GraphedLSTM):
        fused = "fused" if engine.fused else "eager"
        kind = f"graphed ({len(engine.programs)} programs, pointwise {fused})"
    else:
        kind = "eager"
    log.info(
        "model engine: %s (LSTM_MODEL_ENGINE=%s), ready in %.2f s",
        kind,
        name,
        time.perf_counter() - started,
    )
    return engine


def tune_gc() -> None:
    """Keep the cyclic garbage collector off the hot path.

    torch and BentoML leave a few hundred thousand objects behind at start-up, and every
    collection walked them: freezing them (they live as long as the process) and collecting the
    youngest generation every 10,000 allocations instead of 700 took step_many from ~10k to ~21k
    items/s in process on 2 cores. Garbage without cycles is freed by reference counting as ever.
    """
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(10_000, middle, old)


def warn_if_redis_is_down(url: str) -> None:
    import redis

    from service.redis_state import cluster_nodes

    try:
        nodes = cluster_nodes(url)
        if nodes is None:
            redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1).ping()
        else:  # a cluster is up enough to start on if one of its nodes answers
            host, port = nodes[0]
            redis.Redis(host=host, port=port, socket_connect_timeout=1, socket_timeout=1).ping()
    except (redis.RedisError, OSError, ValueError) as e:
        log.warning(
            "Redis at %s does not answer (%s): steps answer 503 store_unavailable and "
            "/readyz 503 until it does; check that Redis runs and LSTM_REDIS_URL",
            url,
            e,
        )


def load_api_keys(path: Path | None) -> ApiKeys | None:
    """LSTM_API_KEYS's keys, or SystemExit naming the variable (as a bad setting does)."""
    if path is None:
        return None
    try:
        return ApiKeys(path)
    except KeyFileError as e:
        refuse_settings(f"invalid service settings:\n  {e}")


def serving_host(argv: list[str]) -> str:
    """The address ``bentoml serve`` was told to listen on (BentoML's default: every one)."""
    for i, arg in enumerate(argv):
        if arg == "--host" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--host="):
            return arg.split("=", 1)[1]
    return "0.0.0.0"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def warn_if_open(host: str, keys: ApiKeys | None) -> None:
    if keys is None and not is_loopback(host):
        log.warning(
            "listening on %s with no API keys: anyone who can reach the port can step, read, "
            "export or delete any session by its id; set LSTM_API_KEYS (README: Security)",
            host,
        )


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lstm-sessions")
    except PackageNotFoundError:
        return "0+unknown"
