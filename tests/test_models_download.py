"""Downloading SCOREQ's models: a real HTTP server on 127.0.0.1 stands in for Zenodo.

The files served are real ONNX models with SCOREQ's contract (small ones,
built with the onnx helper API), so the checks after the download (checksum,
contract, a real run) are the real ones.  Nothing leaves the machine.
"""

import hashlib
import json
import socket
import subprocess
import sys

import pytest

from scoreq_live.scoring import store
from scoreq_live.scoring.catalogue import (
    ENV_OFFLINE,
    import_model,
    is_available,
    known_models,
    pull_model,
    resolve_model,
)
from scoreq_live.scoring.download import part_path
from scoreq_live.scoring.spec import ModelError
from tests.helpers import SCOREQ_PAIR
from tests.tiny_models import build
from tests.zenodo import FakeZenodo

NR, REF = "adapt_nr_telephone.onnx", "fixed_nmr_telephone.onnx"


@pytest.fixture(scope="module")
def scoreq_like(tmp_path_factory):
    """Small real ONNX files with SCOREQ's contract: audio_input -> mos_output [B,1] / [B,768] L2-normalised."""
    d = tmp_path_factory.mktemp("published")
    return {NR: build(d / NR, kind="mos").read_bytes(),
            REF: build(d / REF, kind="embedding", dim=768, output_name="mos_output").read_bytes()}


@pytest.fixture
def zenodo(scoreq_like, model_store):
    with FakeZenodo() as z:
        for key, data in scoreq_like.items():
            z.add(key, data)
        yield z


def installed_file(name: str):
    spec = known_models()[name]
    return spec.file if is_available(spec) else None


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port  # nothing listens there now: connections are refused


def cli(*args, env=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "scoreq_live", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_pull_verifies_and_installs_with_progress(zenodo, scoreq_like):
    seen = []
    spec = pull_model("scoreq-natural-nr", mirror=zenodo.base, progress=lambda d, t: seen.append((d, t)))
    path = installed_file("scoreq-natural-nr")
    assert path == spec.file and path.name == NR and path.read_bytes() == scoreq_like[NR]
    m = store.read_manifest(path)
    assert m["md5"] == hashlib.md5(scoreq_like[NR]).hexdigest()
    assert m["sha256"] == hashlib.sha256(scoreq_like[NR]).hexdigest()
    assert m["licence"] == "cc-by-4.0" and m["how"] == "pull"
    assert f"{zenodo.base}/api/records/15739280" in m["checksum_checked_against"]
    assert seen[-1] == (len(scoreq_like[NR]),) * 2 and [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert not part_path(path).exists()
    # Installed: a second pull does not touch the network.
    n = len(zenodo.requests)
    pull_model("scoreq-natural-nr", mirror=zenodo.base)
    assert len(zenodo.requests) == n


def test_interrupted_transfer_resumes_in_the_same_pull(zenodo, scoreq_like):
    size = len(scoreq_like[REF])
    cut = size * 2 // 5
    zenodo.faults[REF] = {"cut_at": cut, "cut_times": 1}
    pull_model("scoreq-natural-ref", mirror=zenodo.base)
    assert zenodo.file_requests(REF) == [None, f"bytes={cut}-"]
    assert installed_file("scoreq-natural-ref").read_bytes() == scoreq_like[REF]


def test_interrupted_transfer_resumes_in_the_next_pull(zenodo, scoreq_like):
    size = len(scoreq_like[REF])
    cut = size // 3
    zenodo.faults[REF] = {"cut_at": cut, "cut_times": 1}
    with pytest.raises(ModelError, match=rf"interrupted at {cut} of {size} bytes.*run the same command again"):
        pull_model("scoreq-natural-ref", mirror=zenodo.base, retries=0)
    dest = known_models()["scoreq-natural-ref"].file
    assert installed_file("scoreq-natural-ref") is None and not dest.exists()
    assert part_path(dest).stat().st_size == cut  # kept for resuming, never under the final name
    pull_model("scoreq-natural-ref", mirror=zenodo.base, retries=0)
    assert zenodo.file_requests(REF) == [None, f"bytes={cut}-"]
    assert dest.read_bytes() == scoreq_like[REF] and not part_path(dest).exists()


def test_server_that_ignores_ranges_still_gives_the_right_file(zenodo, scoreq_like):
    zenodo.faults[NR] = {"cut_at": 1000, "cut_times": 1, "ignore_range": True}
    pull_model("scoreq-natural-nr", mirror=zenodo.base)
    assert len(zenodo.file_requests(NR)) == 2
    assert installed_file("scoreq-natural-nr").read_bytes() == scoreq_like[NR]


def test_wrong_checksum_is_refused_and_deleted(zenodo):
    zenodo.published[NR] = {"checksum": "md5:" + "0" * 32}
    with pytest.raises(ModelError, match=r"checksum mismatch .* publishes 0{32}.*deleted") as e:
        pull_model("scoreq-natural-nr", mirror=zenodo.base)
    assert "models import scoreq-natural-nr" in str(e.value)
    dest = known_models()["scoreq-natural-nr"].file
    assert not dest.exists() and not part_path(dest).exists() and installed_file("scoreq-natural-nr") is None


def test_truncated_file_on_the_server_is_refused(zenodo, scoreq_like):
    size = len(scoreq_like[NR])
    zenodo.faults[NR] = {"truncate_to": size - 100}
    with pytest.raises(ModelError, match=rf"no bytes after {size - 100} of the {size}.*truncated"):
        pull_model("scoreq-natural-nr", mirror=zenodo.base, retries=1)
    dest = known_models()["scoreq-natural-nr"].file
    assert not dest.exists() and installed_file("scoreq-natural-nr") is None


def test_http_errors(zenodo):
    zenodo.faults[NR] = {"status": 404, "status_times": 5}
    with pytest.raises(ModelError, match="HTTP 404"):
        pull_model("scoreq-natural-nr", mirror=zenodo.base)
    assert len(zenodo.file_requests(NR)) == 1  # a 404 is not retried
    zenodo.faults[NR] = {"status": 503, "status_times": 1}  # a passing server hiccup is
    pull_model("scoreq-natural-nr", mirror=zenodo.base)
    assert installed_file("scoreq-natural-nr") is not None
    zenodo.record_status = 500
    with pytest.raises(ModelError, match=r"cannot read http://127\.0\.0\.1:\d+/api/records/15739280: HTTP 500"):
        pull_model("scoreq-natural-ref", mirror=zenodo.base)


def test_file_that_breaks_the_contract_is_refused(zenodo, tmp_path):
    # Right checksum, valid ONNX, but 16-d embeddings where SCOREQ's ref model gives 768.
    zenodo.add(REF, build(tmp_path / "small.onnx", kind="embedding", dim=16, output_name="mos_output").read_bytes())
    with pytest.raises(ModelError, match=r"not a valid scoreq-natural-ref model.*\[batch, 16\].*\[batch, 768\]"):
        pull_model("scoreq-natural-ref", mirror=zenodo.base)
    dest = known_models()["scoreq-natural-ref"].file
    assert not dest.exists() and not part_path(dest).exists()


def test_mirror_serving_a_verbatim_copy_of_zenodos_json(zenodo, scoreq_like, monkeypatch):
    zenodo.zenodo_links = True  # links name https://zenodo.org/...; the same paths are fetched from the mirror
    monkeypatch.setenv("SCOREQ_LIVE_MIRROR", zenodo.base)
    pull_model("scoreq-natural-nr")
    assert zenodo.file_requests(NR) == [None]
    assert installed_file("scoreq-natural-nr").read_bytes() == scoreq_like[NR]


def test_a_leftover_part_of_another_version_is_not_spliced(zenodo, scoreq_like):
    dest = known_models()["scoreq-natural-nr"].file
    dest.parent.mkdir(parents=True)
    part_path(dest).write_bytes(b"x" * 500)
    part_path(dest).with_name(part_path(dest).name + ".json").write_text(
        json.dumps({"url": "elsewhere", "size": 1, "checksum": "md5:0"}))
    pull_model("scoreq-natural-nr", mirror=zenodo.base)
    assert zenodo.file_requests(NR) == [None] and dest.read_bytes() == scoreq_like[NR]


def test_no_network_gives_one_message_with_url_and_import_command(model_store, monkeypatch):
    monkeypatch.setenv("SCOREQ_LIVE_MIRROR", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(ModelError) as e:
        resolve_model("scoreq-natural-nr")
    msg = str(e.value)
    assert "Connection refused" in msg
    assert "https://zenodo.org/records/15739280/files/adapt_nr_telephone.onnx" in msg
    assert "scoreq-live models import scoreq-natural-nr adapt_nr_telephone.onnx" in msg
    monkeypatch.setenv(ENV_OFFLINE, "1")
    with pytest.raises(ModelError, match="downloads are switched off.*models import scoreq-natural-nr"):
        resolve_model("scoreq-natural-nr")


def test_import_verifies_like_a_download(zenodo, scoreq_like, tmp_path, monkeypatch):
    f = tmp_path / NR
    f.write_bytes(scoreq_like[NR])
    wrong = tmp_path / "other.onnx"
    wrong.write_bytes(scoreq_like[REF])
    with pytest.raises(ModelError, match="the record lists"):
        import_model("scoreq-natural-nr", wrong, mirror=zenodo.base)
    import_model("scoreq-natural-nr", f, mirror=zenodo.base)
    m = store.read_manifest(installed_file("scoreq-natural-nr"))
    assert m["how"] == "import" and "published by" in m["checksum_checked_against"]
    assert zenodo.file_requests(NR) == []  # the checksum came from the record; the file from disk

    # Offline: the published md5 must be given, and must match.
    offline = f"http://127.0.0.1:{free_port()}"
    g = tmp_path / REF
    g.write_bytes(scoreq_like[REF])
    with pytest.raises(ModelError, match=r"published checksum could not be read.*--md5 HEX.*records/15739280"):
        import_model("scoreq-natural-ref", g, mirror=offline)
    with pytest.raises(ModelError, match="does not match"):
        import_model("scoreq-natural-ref", g, md5="0" * 32, mirror=offline)
    import_model("scoreq-natural-ref", g, md5=hashlib.md5(scoreq_like[REF]).hexdigest(), mirror=offline)
    assert installed_file("scoreq-natural-ref").read_bytes() == scoreq_like[REF]
    # Not a model at all, whatever its checksum: refused by the contract check.
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    with pytest.raises(ModelError, match="not a valid scoreq-synthetic-nr model"):
        import_model("scoreq-synthetic-nr", junk, md5=hashlib.md5(b"not a model").hexdigest(), mirror=offline)


def test_cli_pull_list_and_first_use(data, zenodo, model_store, tmp_path):
    import os

    env = {**os.environ, "SCOREQ_LIVE_MIRROR": zenodo.base}
    # --model NAME pulls on first use, then scores.
    out = cli("score", SCOREQ_PAIR / "ref.wav", "--model", "scoreq-natural-nr", "--json", "-", env=env)
    assert out.returncode == 0, out.stderr
    (r,) = json.loads(out.stdout)
    assert r["mos"] is not None and [w["t_end"] for w in r["windows"]] == [4.0, 5.0, 5.4]
    out = cli("models", "pull", "scoreq-natural-ref", env=env)
    assert out.returncode == 0 and "checksum and model contract verified" in out.stderr, out.stderr
    out = cli("models", "list", "--json", env=env)
    rows = {r["name"]: r for r in map(json.loads, out.stdout.splitlines())}
    assert rows["scoreq-natural-nr"]["installed"] and rows["scoreq-natural-ref"]["installed"]
    assert rows["scoreq-natural-ref"]["path"].endswith(REF) and rows["scoreq-natural-ref"]["kind"] == "embedding"
    assert not rows["scoreq-synthetic-nr"]["installed"] and rows["scoreq-synthetic-nr"]["size_is_estimate"]
    assert rows["distillmos"]["bundled"] and rows["scoreq-natural-nr"]["domain"] == "natural"
    # Offline, one clear line.
    out = cli("score", SCOREQ_PAIR / "ref.wav", "--model", "scoreq-synthetic-nr",
              env={**env, "SCOREQ_LIVE_MIRROR": f"http://127.0.0.1:{free_port()}"})
    assert out.returncode == 2
    assert "scoreq-live models import scoreq-synthetic-nr adapt_nr_synthetic.onnx" in out.stderr
    assert "https://zenodo.org/records/15739280/files/adapt_nr_synthetic.onnx" in out.stderr
