"""Shared fixtures: the real speech data, the bundled model, tiny contract models."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny_models import build  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
MUSHRA = DATA / "mushra" / "audio"
SCOREQ_PAIR = DATA / "scoreq"
EXAMPLES = ROOT / "examples"


def pytest_collection_modifyitems(config, items):
    if not DATA.is_dir():
        skip = pytest.mark.skip(reason=f"speech data not found beside the project ({DATA})")
        for item in items:
            if "data" in item.fixturenames:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def data() -> Path:
    return DATA


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


def speech_16k(path: Path) -> np.ndarray:
    from scoreq_live.audio import load_audio

    return load_audio(path)


def joined(paths, gap_s: float = 0.3) -> np.ndarray:
    """Several short files joined into one long stream with short pauses."""
    gap = np.zeros(int(gap_s * 16000), np.float32)
    parts = []
    for p in paths:
        parts += [speech_16k(p), gap]
    return np.concatenate(parts)


@pytest.fixture(scope="session")
def scoreq_shaped() -> Path:
    """Folder with the SCOREQ-shaped models (``scoreq_shaped_{nr,ref}.onnx``), built on demand and cached."""
    import scoreq_shaped as shaped

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
