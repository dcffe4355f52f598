"""Checkpoints go into BentoML's model store under a tag derived from their weights."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from model import CheckpointError, ForecasterConfig, LSTMForecaster, save_checkpoint
from service.model_registry import import_checkpoint, load_from_store


def test_import_and_load_by_tag(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = LSTMForecaster(ForecasterConfig(("a",), hidden_size=4, num_layers=1)).eval()
    ckpt = save_checkpoint(model, tmp_path / "c", name="tiny-registry")
    tag = import_checkpoint(tmp_path / "c")
    assert tag == f"tiny-registry:{ckpt.version}"
    assert import_checkpoint(tmp_path / "c") == tag  # idempotent
    loaded = load_from_store("tiny-registry:latest")
    x = torch.randn(1, 5, 1)
    with torch.no_grad():
        assert torch.equal(loaded.model(x).mean, model(x).mean)


def test_corrupted_checkpoint_never_enters_the_store(tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = LSTMForecaster(ForecasterConfig(("a",), hidden_size=4, num_layers=1))
    save_checkpoint(model, tmp_path / "c", name="tiny-corrupt")
    shutil.copyfile(tmp_path / "c" / "card.json", tmp_path / "card.bak")
    weights = tmp_path / "c" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(CheckpointError):
        import_checkpoint(tmp_path / "c")
    import bentoml

    assert not [m for m in bentoml.models.list() if m.tag.name == "tiny-corrupt"]


def test_the_cli_names_the_store_and_refuses_without_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from service.model_registry import main, model_store

    torch.manual_seed(2)
    model = LSTMForecaster(ForecasterConfig(("a",), hidden_size=4, num_layers=1))
    ckpt = save_checkpoint(model, tmp_path / "c", name="tiny-cli")
    assert main(["import", str(tmp_path / "c")]) == 0
    out, err = capsys.readouterr()
    assert out == f"tiny-cli:{ckpt.version}\n"  # the tag alone on stdout, for $(...)
    assert f"model store {model_store()}" in err
    assert main(["store"]) == 0 and capsys.readouterr().out == f"{model_store()}\n"
    assert main(["show", "tiny-cli:000000000000"]) == 2
    err = capsys.readouterr().err
    assert f"no model 'tiny-cli:000000000000' in the model store {model_store()}" in err
    assert main(["import", str(tmp_path / "nothing")]) == 2
    assert "no card.json" in capsys.readouterr().err
