"""Scoring on a real Triton Inference Server (PyTriton's, on loopback): equal scores, outages, merged batches."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from dataclasses import replace

import numpy as np
import pytest

from scoreq_live.bus import EventBus
from scoreq_live.core.events import BackendStatus, ScoreEvent, StreamEnded
from scoreq_live.engine import Engine, EngineConfig
from scoreq_live.scoring.catalogue import BUNDLED_DIR, resolve_model
from scoreq_live.scoring.load import ScoringOptions, load_scorer
from scoreq_live.scoring.scorer import BackendUnavailable, RemoteScorer, Scorer
from scoreq_live.scoring.spec import ModelError
from scoreq_live.scoring.triton import TritonModel
from scoreq_live.sources import open_inputs
from tests.helpers import EXAMPLES, ROOT, speech_16k
from tests.triton_tools import TritonServer

NR = BUNDLED_DIR / "distillmos.onnx"
EMB = BUNDLED_DIR / "distillmos-embedding.onnx"
MODELS = {
    "distillmos": (NR, "audio", "mos"),
    "distillmos-embedding": (EMB, "audio", "embedding"),
    # The embedding model under a MOS model's name: what a mislabelled deployment looks like.
    "mislabelled": (EMB, "audio", "embedding"),
}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # A 100 ms queue delay: the answers to one monitor's requests and its next requests take a few milliseconds,
    # so the batcher waits long enough for both monitors' requests to meet (test_two_monitors_...).
    s = TritonServer(MODELS, tmp_path_factory.mktemp("triton"), delay_us=100_000)
    s.start()
    yield s
    s.stop()


def windows(n: int = 6) -> list[np.ndarray]:
    """Real speech windows of the fixed input length, and one shorter (zero-padded like a stream's last)."""
    x = speech_16k(EXAMPLES / "clean.wav")
    hop = 16000
    out = [x[k * hop:k * hop + 122_880] for k in range(n - 1)]
    return [*out, x[:50_000]]


@pytest.mark.parametrize("scheme", ["triton", "triton+http"])
async def test_scores_through_triton_equal_local_scores(server, bundled_nr, scheme):
    remote = RemoteScorer(TritonModel(resolve_model("distillmos"), server.url("distillmos", scheme), timeout_s=60))
    local = Scorer(bundled_nr)
    w = windows()
    want = local.score(w)
    got = await remote.score_async(w)
    assert np.abs(got - want).max() < 1e-5
    assert np.abs(remote.score(w) - want).max() < 1e-5  # the blocking path (references, `score`)
    # Requests in flight together on one channel, answered in order.
    many = await asyncio.gather(*(remote.score_async(w[i:i + 2]) for i in range(0, len(w), 2)))
    assert np.abs(np.concatenate(many) - want).max() < 1e-5
    await remote.aclose()


def test_contract_is_checked_against_the_server_metadata(server):
    with pytest.raises(ModelError, match=r"model 'mislabelled' on Triton at 127\.0\.0\.1:\d+: no output named 'mos' "
                                         r"\(has \['embedding'\]\)"):
        TritonModel(resolve_model("distillmos"), server.url("mislabelled"))
    with pytest.raises(ModelError, match="has no ready model 'absent'"):
        TritonModel(resolve_model("distillmos"), server.url("absent"))
    # An embedding model as a MOS model's contract: the same message a local file gets.
    spec = resolve_model("distillmos")
    with pytest.raises(ModelError, match=r"a 'mos' model must output \[batch, 1\], 'embedding' is \[batch, \d+\]"):
        TritonModel(replace(spec, output_name=None), server.url("mislabelled"))


def test_an_unreachable_server_is_backend_unavailable():
    from tests.triton_tools import free_port

    with pytest.raises(BackendUnavailable, match="cannot reach Triton at 127.0.0.1"):
        TritonModel(resolve_model("distillmos"), f"triton://127.0.0.1:{free_port()}/distillmos")


async def test_reference_mode_embeds_on_triton_and_measures_distances_locally(server):
    clean, test = str(EXAMPLES / "clean.wav"), str(EXAMPLES / "lyra3.wav")
    opts = ScoringOptions(mode="ref", references=(clean,), hop_s=4.0, device="cpu", max_batch=4)
    remote = load_scorer(replace(opts, backend=server.url("distillmos-embedding"), backend_timeout_s=60.0))
    local = load_scorer(opts)
    assert remote.scorer.reference is not None and local.scorer.reference is not None
    assert np.abs(remote.scorer.reference.embeddings - local.scorer.reference.embeddings).max() < 1e-5
    w = [speech_16k(test)[k * 16000:k * 16000 + 122_880] for k in range(0, 16, 4)]
    got = await remote.scorer.score_async(w)
    assert np.abs(got - local.scorer.score(w)).max() < 1e-5
    assert got.min() > 0  # a degraded recording is some distance from the clean one
    await remote.model.aclose()  # type: ignore[union-attr]


async def test_engine_scores_files_through_triton_as_it_does_locally(server):
    opts = ScoringOptions(hop_s=2.0, device="cpu", max_batch=4)
    remote = load_scorer(replace(opts, backend=server.url("distillmos"), backend_timeout_s=60.0), fast=True)
    local = load_scorer(opts)
    files = [f"a={EXAMPLES / 'clean.wav'}", f"b={EXAMPLES / 'lyra3.wav'}"]
    results = []
    for loaded in (remote, local):
        bus = EventBus()
        sub = bus.subscribe()
        engine = Engine(loaded.scorer, open_inputs(files, fast=True),
                        EngineConfig(stream=loaded.stream, max_batch=4, fast=True), bus)
        await engine.run()
        results.append([ev async for ev in sub])
    got, want = ({(e.stream, e.window): e.mos for e in evs if isinstance(e, ScoreEvent)} for evs in results)
    assert got.keys() == want.keys() and len(got) > 10
    assert all(v is not None for v in got.values())
    assert max(abs(got[k] - want[k]) for k in got) < 1e-5  # type: ignore[operator]
    status = [e for e in results[0] if isinstance(e, BackendStatus)]
    assert [(s.state, s.backend, s.stream) for s in status] == [("up", server.url("distillmos"), "")]


def test_two_monitors_share_the_server_and_get_merged_batches(server, tmp_path):
    """Each monitor sends requests of one window, at most 4 in flight: an execution of more than 4 merged both.

    Three streams each, so that each monitor keeps requests in flight for longer than the other takes to start.
    """
    before = server.batch_sizes("distillmos")
    procs, outs = [], []
    for name in ("m1", "m2"):
        out = tmp_path / f"{name}.jsonl"
        outs.append(out)
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "scoreq_live", "monitor",
             *[a for k in range(3) for a in ("-i", f"{name}-{k}={EXAMPLES / 'clean.wav'}")], "--fast",
             "--no-tui", "--no-ws", "-q", "--hop", "0.5", "--max-batch", "1", "--backend", server.url("distillmos"),
             "--jsonl", str(out)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    try:
        for p in procs:
            assert p.wait(timeout=240) == 0, p.stdout.read().decode() if p.stdout else ""
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    after = server.batch_sizes("distillmos")
    new = {b: after.get(b, 0) - before.get(b, 0) for b in after if after.get(b, 0) > before.get(b, 0)}
    print("Triton executions by batch size (windows of both monitors):", dict(sorted(new.items())))
    assert max(new) > 4, new
    scores = []
    for out in outs:
        evs = [json.loads(line) for line in out.read_text().splitlines()]
        scores.append({(e["stream"][-1], e["window"]): e["mos"] for e in evs if e["type"] == "score"})
        assert all(v is not None for v in scores[-1].values()) and len(scores[-1]) > 90
    assert scores[0] == scores[1]  # the same file scored in merged batches gets the same scores


@pytest.fixture
def restartable(tmp_path_factory):
    s = TritonServer({"distillmos": MODELS["distillmos"]}, tmp_path_factory.mktemp("tr"))  # short: see TritonServer
    s.start()
    yield s
    s.stop()


async def test_a_lost_server_skips_windows_then_scoring_resumes_after_restart(restartable):
    """Two monitors live (in real time) on one server, one with a local fallback; the server is stopped and
    restarted mid-stream: skipped windows say backend_unavailable (or are scored locally), the backend status
    events say down/fallback then up, and no stream ends early."""
    url = restartable.url("distillmos")
    base = dict(window_s=4.0, hop_s=1.0, device="cpu", max_batch=4, backend=url, backend_timeout_s=3.0)
    plain = load_scorer(ScoringOptions(**base))  # type: ignore[arg-type]
    with_fallback = load_scorer(ScoringOptions(**base, backend_fallback="local"))  # type: ignore[arg-type]
    assert with_fallback.fallback is not None
    runs = []
    for loaded in (plain, with_fallback):
        bus = EventBus()
        engine = Engine(loaded.scorer, open_inputs([f"s={EXAMPLES / 'clean.wav'}"], fast=False),
                        EngineConfig(stream=loaded.stream, max_batch=4), bus, fallback=loaded.fallback)
        runs.append((engine, bus.subscribe()))
    tasks = [asyncio.create_task(e.run()) for e, _ in runs]
    loop = asyncio.get_running_loop()
    t0 = time.monotonic()
    while runs[0][0].windows_run < 2 and time.monotonic() - t0 < 30:  # scored through Triton first
        await asyncio.sleep(0.1)
    await loop.run_in_executor(None, restartable.stop)
    down_at = time.monotonic()
    await asyncio.sleep(2.0)
    await loop.run_in_executor(None, restartable.start)
    up_at = time.monotonic()
    await asyncio.wait_for(asyncio.gather(*tasks), 60)
    assert time.monotonic() - up_at > 3, "the file should still be playing when the server is back"
    for (_, sub), fallback in zip(runs, (False, True)):
        evs = [ev async for ev in sub]
        states = [e.state for e in evs if isinstance(e, BackendStatus)]
        assert states == ["up", "fallback" if fallback else "down", "up"], states
        lost = next(e for e in evs if isinstance(e, BackendStatus) and e.state != "up")
        assert "127.0.0.1" in lost.error and lost.backend == url
        scores = [e for e in evs if isinstance(e, ScoreEvent)]
        reasons = [e.reason for e in scores]
        if fallback:
            assert "backend_unavailable" not in reasons  # scored locally meanwhile
        else:
            assert reasons.count("backend_unavailable") >= 2, reasons
            first_skip = reasons.index("backend_unavailable")
            last_skip = len(reasons) - 1 - reasons[::-1].index("backend_unavailable")
            assert any(e.mos is not None for e in scores[:first_skip])
            assert any(e.mos is not None for e in scores[last_skip + 1:]), "scores should resume after restart"
            assert all(e.mos is not None or e.reason in ("backend_unavailable", "overloaded", "no_speech", "silent")
                       for e in scores)
        ended = [e for e in evs if isinstance(e, StreamEnded)]
        assert [(e.stream, e.reason) for e in ended] == [("s", "eof")]
        assert ended[0].t > 27.0  # the whole file, through the outage
    print(f"outage: server stopped {down_at - t0:.1f}s in, back {up_at - down_at:.1f}s later")


def test_the_command_line_refuses_a_model_that_does_not_fit_the_contract(server, capsys):
    from scoreq_live.cli import main

    rc = main(["monitor", "-i", str(EXAMPLES / "clean.wav"), "--fast", "--no-tui", "--no-ws", "-q",
               "--backend", server.url("mislabelled")])
    assert rc == 2
    assert "model 'mislabelled' on Triton at 127.0.0.1" in capsys.readouterr().err
