"""The SCOREQ-shaped models (``models/build_scoreq_shaped.py``), built on demand and cached.

The two ~380 MB files are not in the repository.  They are built once per
version of the build script and kept in the user cache under
``scoreq-live/scoreq-shaped/<hash of the script>/``; a new version of the
script builds anew and removes older builds.  Building needs torch, which is
never a run-time dependency: this Python if it has torch (CI installs it),
else ``$SCOREQ_LIVE_EXPORT_PYTHON``, else the repository's ``.venv-export``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import platformdirs

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "models" / "build_scoreq_shaped.py"
FILES = {"nr": "scoreq_shaped_nr.onnx", "ref": "scoreq_shaped_ref.onnx"}


def cache_root() -> Path:
    return Path(platformdirs.user_cache_dir("scoreq-live")) / "scoreq-shaped"


def build_dir() -> Path:
    return cache_root() / hashlib.sha256(SCRIPT.read_bytes()).hexdigest()[:16]


def export_python() -> str | None:
    """A Python that can run the build script (has torch), or None."""
    if importlib.util.find_spec("torch") is not None:
        return sys.executable
    env = os.environ.get("SCOREQ_LIVE_EXPORT_PYTHON")
    if env:
        return env
    local = ROOT / ".venv-export" / "bin" / "python"
    return str(local) if local.exists() else None


def ensure() -> Path:
    """The folder holding both built models; builds them if needed.  Raises RuntimeError if it cannot."""
    out = build_dir()
    if all((out / f).is_file() for f in FILES.values()):
        return out
    python = export_python()
    if python is None:
        raise RuntimeError("the SCOREQ-shaped test models need torch to build: pip install torch==2.13.0 "
                           "(or set SCOREQ_LIVE_EXPORT_PYTHON to a Python that has it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    import fcntl

    with open(out.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two test runs at once build once
        if not all((out / f).is_file() for f in FILES.values()):
            tmp = out.with_name(out.name + f".tmp{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            res = subprocess.run([python, str(SCRIPT), "--out", str(tmp)], capture_output=True, text=True,
                                 timeout=900)
            if res.returncode != 0:
                shutil.rmtree(tmp, ignore_errors=True)
                raise RuntimeError(f"building the SCOREQ-shaped models failed:\n{res.stdout}\n{res.stderr}")
            shutil.rmtree(out, ignore_errors=True)
            os.replace(tmp, out)
        for old in out.parent.iterdir():  # builds of older versions of the script
            if old.is_dir() and old != out:
                shutil.rmtree(old, ignore_errors=True)
    return out
