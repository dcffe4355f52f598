"""The bridge between checkpoints (model/) and BentoML's model store, where the service looks.

    python -m service.model_registry import models/acsf1-forecaster   # idempotent
    python -m service.model_registry show acsf1-forecaster:latest

A checkpoint is stored under the tag ``<name>:<version>``, its version being the first 12 hex
digits of its weights' SHA-256, so importing the same weights twice is a no-op and different
weights can never hide behind one tag. The files are copied as they are: no pickle is involved.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import bentoml
from bentoml.exceptions import NotFound

from model.checkpoint import CARD_FILE, WEIGHTS_FILE, Checkpoint, load_checkpoint, read_card


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
    args = p.parse_args(argv)
    if args.command == "import":
        print(import_checkpoint(args.directory))
    else:
        print((Path(bentoml.models.get(args.tag).path) / CARD_FILE).read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
