"""The install: exactly one onnxruntime, chosen by platform, and a CPU machine told why in one line."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]


def _onnxruntime_distributions() -> list[str]:
    """Installed distributions that put files into the ``onnxruntime`` package folder."""
    out = []
    for dist in importlib.metadata.distributions():
        files = dist.files or []
        if any(f.parts[:2] == ("onnxruntime", "__init__.py") for f in files):
            out.append(f"{dist.metadata['Name']} {dist.version}")
    return out


def test_exactly_one_onnxruntime_distribution_is_installed():
    # onnxruntime and onnxruntime-gpu unpack into the same folder: two of them mix two versions' binaries,
    # and uninstalling either breaks the other.
    found = _onnxruntime_distributions()
    assert len(found) == 1, found


@pytest.mark.parametrize("platform, machine, expected", [
    ("linux", "x86_64", "onnxruntime-gpu"),
    ("win32", "AMD64", "onnxruntime-gpu"),
    ("linux", "aarch64", "onnxruntime"),
    ("darwin", "arm64", "onnxruntime"),
    ("darwin", "x86_64", "onnxruntime"),
    ("win32", "ARM64", "onnxruntime"),
])
def test_the_dependencies_choose_one_onnxruntime_per_platform(platform, machine, expected):
    from packaging.requirements import Requirement

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    env = {"sys_platform": platform, "platform_machine": machine, "python_version": "3.11",
           "platform_system": {"linux": "Linux", "win32": "Windows", "darwin": "Darwin"}[platform]}
    chosen = [r.name for r in map(Requirement, deps)
              if r.name.startswith("onnxruntime") and (r.marker is None or r.marker.evaluate(env))]
    assert chosen == [expected]


def test_a_machine_without_a_usable_gpu_says_why_in_one_line_and_nothing_else():
    code = ("from scoreq_live.scoring.catalogue import resolve_model\n"
            "from scoreq_live.scoring.session import OnnxModel\n"
            "m = OnnxModel(resolve_model('distillmos'), device='auto')\n"
            "print(m.device, '|', m.cpu_reason)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    device, _, reason = r.stdout.strip().partition(" | ")
    if device == "cuda":
        pytest.skip("this machine has a usable GPU")
    assert device == "cpu" and reason not in ("", "None"), r.stdout
    # No onnxruntime log lines, no "Failed to load libcublas..." from the CUDA libraries' preload.
    assert r.stderr.strip() == "", r.stderr
    assert r.stdout.count("\n") == 1, r.stdout
