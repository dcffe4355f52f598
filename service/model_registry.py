"""The bridge between checkpoints (model/) and BentoML's model store, where the service looks.

    python -m service.model_registry import models/acsf1-forecaster   # idempotent; prints the tag
    python -m service.model_registry show acsf1-forecaster:latest
    python -m service.model_registry store                            # where the store is

One model store for every entry point (``make``, ``lstm-serve``, ``python -m ...``, the
``bentoml serve`` they start): ``$BENTOML_HOME`` when set, else ``bentoml_home/`` in the checkout
this code runs from. BentoML reads ``BENTOML_HOME`` the first time it touches its store, so this
module sets the default before importing bentoml, and every entry point imports this module
(the service does, and so does the server it runs in).

A checkpoint is stored under the tag ``<name>:<version>``, its version being the first 12 hex
digits of its weights' SHA-256, so importing the same weights twice is a no-op and different
weights can never hide behind one tag. The files are copied as they are: no pickle is involved.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[1]


def default_store() -> Path:
    """The project's model store: ``$BENTOML_HOME`` if set, else the checkout's ``bentoml_home``.

    Installed outside a checkout (no pyproject.toml beside the package), it is BentoML's own
    default, ``~/bentoml``: site-packages is no place for models.
    """
    if os.environ.get("BENTOML_HOME"):
        return Path(os.environ["BENTOML_HOME"]).expanduser()
    if (CHECKOUT / "pyproject.toml").is_file():
        return CHECKOUT / "bentoml_home"
    return Path("~/bentoml").expanduser()


def use_project_store() -> Path:
    """Point BentoML (and every process started from here) at ``default_store()``."""
    os.environ["BENTOML_HOME"] = str(default_store())
    return Path(os.environ["BENTOML_HOME"])


use_project_store()  # before bentoml is imported: it reads BENTOML_HOME once

import bentoml  # noqa: E402
from bentoml.exceptions import NotFound  # noqa: E402

from model.checkpoint import (  # noqa: E402
    CARD_FILE,
    WEIGHTS_FILE,
    Checkpoint,
    CheckpointError,
    load_checkpoint,
    read_card,
)


def model_store() -> Path:
    """The store BentoML uses in this process (what it resolved, not what the env says now)."""
    from bentoml._internal.configuration.containers import BentoMLContainer

    return Path(BentoMLContainer.bentoml_home.get())


def import_checkpoint(directory: str | Path) -> str:
    """Put a checkpoint into the model store (verifying it first); return its tag."""
    directory = Path(directory)
    load_checkpoint(directory)  # refuse corrupted or mismatched files before storing them
    card = read_card(directory)
    tag = f"{card['name']}:{card['version']}"
    try:
        bentoml.models.get(tag)
        return tag
    except NotFound:
        pass
    metadata = {
        "format": card["format"],
        "weights_sha256": card["weights_sha256"],
        "features": card["config"]["feature_names"],
    }
    with bentoml.models.create(
        tag, labels={"kind": "lstm-forecaster"}, metadata=metadata
    ) as stored:
        for name in (WEIGHTS_FILE, CARD_FILE):
            shutil.copyfile(directory / name, Path(stored.path) / name)
    return tag


def load_from_store(tag: str, *, device: str = "cpu") -> Checkpoint:
    """Load the checkpoint stored under ``tag`` (``name:version`` or ``name:latest``)."""
    return load_checkpoint(bentoml.models.get(tag).path, device=device)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m service.model_registry")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("import", help="import a checkpoint directory").add_argument("directory")
    sub.add_parser("show", help="print a stored model's card").add_argument("tag")
    sub.add_parser("store", help="print where the model store is")
    args = p.parse_args(argv)
    try:
        return run(args)
    except NotFound:  # BentoML's own text suggests `bentoml models pull`, which is not it
        print(
            f"{p.prog}: no model {args.tag!r} in the model store {model_store()} "
            f"(BENTOML_HOME); `{p.prog} import DIR` puts one there",
            file=sys.stderr,
        )
        return 2
    except (CheckpointError, OSError) as e:
        print(f"{p.prog}: {e} (model store: {model_store()})", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    if args.command == "import":
        tag = import_checkpoint(args.directory)
        print(tag)  # alone on stdout, for TAG=$(python -m service.model_registry import DIR)
        print(
            f"stored in the model store {model_store()} (BENTOML_HOME); serve it with "
            f"LSTM_MODEL_TAG={tag} make serve",
            file=sys.stderr,
        )
    elif args.command == "store":
        print(model_store())
    else:
        print((Path(bentoml.models.get(args.tag).path) / CARD_FILE).read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
