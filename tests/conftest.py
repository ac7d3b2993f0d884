"""Shared fixtures: the real speech data, the bundled model, tiny contract models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import require_data
from tests.pulse import pulse_server  # noqa: F401  (the PulseAudio fixture, for every test module)
from tests.tiny_models import build


@pytest.fixture(scope="session")
def data() -> Path:
    """The speech data folder; tests that read it request this (skips locally without it, fails on CI)."""
    return require_data()


@pytest.fixture(scope="session")
def tiny_nr(tmp_path_factory) -> Path:
    return build(tmp_path_factory.mktemp("models") / "tiny_nr.onnx", kind="mos")


@pytest.fixture(scope="session")
def tiny_ref(tmp_path_factory) -> Path:
    return build(tmp_path_factory.mktemp("models") / "tiny_ref.onnx", kind="embedding",
                 output_name="embedding")


@pytest.fixture(scope="session")
def bundled_nr():
    """The shipped Distill-MOS session, loaded once for the whole run."""
    from scoreq_live.scoring.catalogue import resolve_model
    from scoreq_live.scoring.session import OnnxModel

    return OnnxModel(resolve_model("distillmos"), device="cpu")


@pytest.fixture(scope="session")
def bundled_embedding():
    from scoreq_live.scoring.catalogue import resolve_model
    from scoreq_live.scoring.session import OnnxModel

    return OnnxModel(resolve_model("distillmos-embedding"), device="cpu")


@pytest.fixture(scope="session")
def scoreq_shaped() -> Path:
    """Folder with the SCOREQ-shaped models (``scoreq_shaped_{nr,ref}.onnx``), built on demand and cached."""
    from tests import scoreq_shaped as shaped

    try:
        return shaped.ensure()
    except RuntimeError as e:
        if os.environ.get("CI"):  # CI installs torch: a skip there would hide a broken install step
            pytest.fail(str(e))
        pytest.skip(str(e))


@pytest.fixture
def model_store(tmp_path, monkeypatch) -> Path:
    """A private model folder and reference folder for one test (never the user's own)."""
    monkeypatch.setenv("SCOREQ_LIVE_MODELS_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("SCOREQ_LIVE_REFERENCES_DIR", str(tmp_path / "references"))
    for var in ("SCOREQ_LIVE_MIRROR", "SCOREQ_LIVE_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path


@pytest.fixture
def panel(tmp_path):
    """A panel folder with the files the server may send and the ones it must not (dotfile, escaping link)."""
    root = tmp_path / "panel"
    (root / "vendor").mkdir(parents=True)
    (root / "index.html").write_text("<!doctype html><title>panel</title>")
    (root / "panel.js").write_text("console.log('hi')")
    (root / "panel.css").write_text("body{}")
    (root / "vendor" / "lib.min.js").write_text("var x")
    (root / ".secret").write_text("no")
    (tmp_path / "outside.txt").write_text("no")
    (root / "link.txt").symlink_to(tmp_path / "outside.txt")
    (root / "inside.js").symlink_to(root / "panel.js")
    return root
