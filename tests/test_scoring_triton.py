"""Scoring on a real Triton Inference Server (PyTriton's, on loopback): equal scores, outages, merged batches."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
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
from scoreq_live.sources import FileSource, open_inputs
from tests.helpers import EXAMPLES, ROOT, speech_16k
from tests.triton_tools import TritonServer

NR = BUNDLED_DIR / "distillmos.onnx"
EMB = BUNDLED_DIR / "distillmos-embedding.onnx"
MODELS = {
    "distillmos": (NR, "audio", "mos"),
    # Its streaming split, as 'models triton-repo' serves it beside it: monitors keep the feature caches.
    "distillmos-cnn": (BUNDLED_DIR / "distillmos-cnn.onnx", "audio+peak", "features"),
    "distillmos-head": (BUNDLED_DIR / "distillmos-head.onnx", "features", "mos"),
    # The same model without its split beside it.
    "plain": (NR, "audio", "mos"),
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


async def run_files(loaded) -> list:
    """Every event of a ``--fast`` run of two real speech files through ``loaded``'s scorer."""
    files = [f"a={EXAMPLES / 'clean.wav'}", f"b={EXAMPLES / 'lyra3.wav'}"]
    bus = EventBus()
    sub = bus.subscribe()
    engine = Engine(loaded.scorer, open_inputs(files, fast=True),
                    EngineConfig(stream=loaded.stream, max_batch=4, fast=True), bus)
    await engine.run()
    return [ev async for ev in sub]


async def test_engine_scores_files_through_triton_as_it_does_locally(server):
    opts = ScoringOptions(hop_s=2.0, device="cpu", max_batch=4)
    remote = load_scorer(replace(opts, backend=server.url("distillmos"), backend_timeout_s=60.0), fast=True)
    local = load_scorer(opts)
    results = [await run_files(loaded) for loaded in (remote, local)]
    got, want = ({(e.stream, e.window): e.mos for e in evs if isinstance(e, ScoreEvent)} for evs in results)
    assert got.keys() == want.keys() and len(got) > 10
    assert all(v is not None for v in got.values())
    assert max(abs(got[k] - want[k]) for k in got) < 1e-5  # type: ignore[operator]
    status = [e for e in results[0] if isinstance(e, BackendStatus)]
    assert [(s.state, s.backend, s.stream) for s in status] == [("up", server.url("distillmos"), "")]


async def test_incremental_scoring_runs_the_split_on_the_server_and_equals_the_full_model(server, caplog):
    """Feature caches on the monitor, CNN blocks and heads on Triton: the full model's scores, and the server
    runs the full model only for what the local path runs it for (a stream's short last window)."""
    opts = ScoringOptions(device="cpu", max_batch=4)
    remote = load_scorer(replace(opts, backend=server.url("distillmos"), backend_timeout_s=60.0), fast=True)
    full = load_scorer(replace(opts, incremental=False), fast=True)
    assert isinstance(remote.scorer, RemoteScorer) and remote.scorer.incremental is not None
    before = {m: executed(server, m) for m in ("distillmos", "distillmos-cnn", "distillmos-head")}
    results = [await run_files(loaded) for loaded in (remote, full)]
    got, want = ({(e.stream, e.window): e.mos for e in evs if isinstance(e, ScoreEvent)} for evs in results)
    assert got.keys() == want.keys() and len(got) > 30
    assert all(v is not None for v in got.values())
    diff = max(abs(got[k] - want[k]) for k in got)  # type: ignore[operator]
    counts = remote.scorer.incremental_counts
    print(f"\nthrough Triton: {counts}, max |incremental - full| = {diff:.2e}")
    assert diff < 1e-4
    assert counts["incremental"] > counts["windows"] // 2
    ran = {m: executed(server, m) - n for m, n in before.items()}
    assert ran["distillmos-head"] == counts["incremental"] + counts["recomputed"]
    assert ran["distillmos"] == counts["fallback"] <= 2  # the two streams' tails at most
    assert ran["distillmos-cnn"] >= 2 * counts["incremental"]  # a new block and a front edge each
    # The blocking path (`score`, references) runs the same plan.
    caches = [remote.scorer.new_state()]
    x = speech_16k(EXAMPLES / "lyra3.wav")
    w = [x[k * 16000:k * 16000 + 122_880] for k in range(4)]
    one = [remote.scorer.score_named([w[k]], caches, [k * 16000])[0, 0] for k in range(4)]
    assert np.abs(np.array(one) - full.scorer.score(w)).max() < 1e-4
    assert caches[0].start == 3 * 16000
    # A server without the split beside the model: said once, every window in full there.
    with caplog.at_level("WARNING"):
        plain = load_scorer(replace(opts, backend=server.url("plain"), backend_timeout_s=60.0), fast=True)
    assert plain.scorer.incremental is None
    assert "no ready model 'plain-cnn'" in caplog.text and "every window is scored in full" in caplog.text
    for loaded in (remote, plain):
        await loaded.scorer.aclose()  # type: ignore[attr-defined]


def test_score_command_runs_the_split_on_the_server(server, capsys):
    """``scoreq-live score --backend``: the blocking client carries out the same incremental plan."""
    from scoreq_live.cli import main

    files = [str(EXAMPLES / "clean.wav"), str(EXAMPLES / "lyra3.wav")]
    heads = executed(server, "distillmos-head")
    results = []
    for extra in (["--backend", server.url("distillmos")], ["--no-incremental"]):
        assert main(["score", *files, "--json", "-", "--no-progress", *extra]) == 0
        results.append(json.loads(capsys.readouterr().out))
    assert executed(server, "distillmos-head") - heads > 20  # the windows' heads ran there
    for remote, local in zip(*results):
        got, want = ([w["mos"] for w in r["windows"]] for r in (remote, local))
        assert len(got) == len(want) > 10
        assert np.abs(np.array(got) - np.array(want)).max() < 1e-4


def executed(server: TritonServer, model: str = "distillmos") -> int:
    """Windows the server has run for ``model`` so far (every execution's batch size, summed)."""
    return sum(size * count for size, count in server.batch_sizes(model).items())


def until(cond, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"{what}: not within {timeout:g} s"
        time.sleep(0.02)


def test_two_monitors_share_the_server_and_get_merged_batches(server, tmp_path):
    """Each monitor sends requests of one window, at most 4 in flight: an execution of more than 4 merged both.

    The two are made to overlap: the first is paused (SIGSTOP) as soon as the server has run a window of it,
    the second is started and the first goes on (SIGCONT) only once the server has run windows of the second,
    with most of both monitors' windows still to come.  However long a monitor takes to start on a busy
    machine, both then have requests in flight together for seconds (each monitor's ~160 windows take at least
    40 of the server's 100 ms batching rounds), where the batcher merges them.  A paused monitor's requests
    must not time out meanwhile: a deadline longer than any wait here.
    """
    before = server.batch_sizes("distillmos")
    procs: list[subprocess.Popen[bytes]] = []
    outs = []

    def start(name: str) -> subprocess.Popen[bytes]:
        out = tmp_path / f"{name}.jsonl"
        outs.append(out)
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "scoreq_live", "monitor",
             *[a for k in range(3) for a in ("-i", f"{name}-{k}={EXAMPLES / 'clean.wav'}")], "--fast",
             "--no-tui", "--no-ws", "-q", "--hop", "0.5", "--max-batch", "1", "--backend", server.url("distillmos"),
             "--no-incremental",  # every window is a run of the full model: the batches counted here
             "--backend-timeout", "600", "--jsonl", str(out)],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
        return procs[-1]

    def output(p: subprocess.Popen[bytes]) -> str:
        return p.stdout.read().decode() if p.stdout and p.poll() is not None else f"still running ({p.pid})"

    try:
        w0 = executed(server)
        m1 = start("m1")
        until(lambda: executed(server) > w0 or m1.poll() is not None, "the first monitor's first window")
        os.kill(m1.pid, signal.SIGSTOP)
        assert m1.poll() is None, output(m1)  # it had most of its windows still to send
        paused = executed(server)  # then at most its 4 requests in flight are still run
        m2 = start("m2")
        until(lambda: executed(server) > paused + 4 or m2.poll() is not None, "the second monitor's first window")
        assert m2.poll() is None, output(m2)
        os.kill(m1.pid, signal.SIGCONT)
        for p in procs:
            assert p.wait(timeout=240) == 0, output(p)
    finally:
        for p in procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGCONT)
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


class Held(FileSource):
    """A file played in real time that stops at the given positions until the test lets it go on.

    ``holds``: (seconds into the file, what to wait for there).  Its clock stops with it, so the audio after a
    hold is played in real time again (not in a catch-up burst).  ``at`` is set to each hold's position when
    the file reaches it.
    """

    def __init__(self, name: str, path, holds) -> None:
        super().__init__(name, path, fast=True)  # the pace is kept here, around the holds
        self.holds = list(holds)
        self.at: float | None = None

    async def frames(self):
        loop = asyncio.get_running_loop()
        t0, sent = loop.time(), 0
        holds = sorted(self.holds, key=lambda h: h[0])
        async for data in super().frames():
            while holds and sent >= holds[0][0] * self.rate:
                pos, wait = holds.pop(0)
                self.at = pos
                stopped = loop.time()
                await wait()
                t0 += loop.time() - stopped
            delay = t0 + (sent + data.shape[0]) / self.rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            sent += data.shape[0]
            yield data


async def until_true(cond, what: str, timeout: float = 120.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        assert loop.time() < deadline, f"{what}: not within {timeout:g} s"
        await asyncio.sleep(0.05)


@pytest.fixture
def restartable(tmp_path_factory):
    s = TritonServer({"distillmos": MODELS["distillmos"]}, tmp_path_factory.mktemp("tr"))  # short: see TritonServer
    s.start()
    yield s
    s.stop()


async def test_a_lost_server_skips_windows_then_scoring_resumes_after_restart(restartable):
    """Two monitors live (in real time) on one server, one with a local fallback; the server is stopped and
    restarted mid-stream: skipped windows say backend_unavailable (or are scored locally), the backend status
    events say down/fallback then up, and no stream ends early.

    The outage is placed in the file by construction, however long the server takes to stop and start: each
    file stops at 8 s until the server is stopped, and at 14 s until it is back and the monitor has found it
    again; so the 6 s between are played while it is down, and the rest (14 s) once it is up."""
    url = restartable.url("distillmos")
    # A stopped server refuses connections at once; a deadline is only for a server that answers slowly, and a
    # busy machine's server may take seconds over a batch: a generous one, so that only the outage is lost.
    base = dict(window_s=4.0, hop_s=1.0, device="cpu", max_batch=4, backend=url, backend_timeout_s=30.0)
    plain = load_scorer(ScoringOptions(**base))  # type: ignore[arg-type]
    with_fallback = load_scorer(ScoringOptions(**base, backend_fallback="local"))  # type: ignore[arg-type]
    assert with_fallback.fallback is not None
    stopped, restarted = asyncio.Event(), asyncio.Event()
    runs, files = [], []
    for loaded in (plain, with_fallback):
        bus = EventBus()
        engines: list[Engine] = []

        async def back(engines=engines) -> None:
            await restarted.wait()
            await until_true(lambda: engines[0].runner.health.up, "the monitor finds the server again")  # type: ignore[attr-defined]

        src = Held("s", EXAMPLES / "clean.wav", [(8.0, stopped.wait), (14.0, back)])
        engine = Engine(loaded.scorer, [src], EngineConfig(stream=loaded.stream, max_batch=4), bus,
                        fallback=loaded.fallback)
        engines.append(engine)
        runs.append((engine, bus.subscribe()))
        files.append(src)
    tasks = [asyncio.create_task(e.run()) for e, _ in runs]
    loop = asyncio.get_running_loop()
    t0 = time.monotonic()
    await until_true(lambda: runs[0][0].windows_run >= 2, "windows scored through Triton first")
    await loop.run_in_executor(None, restartable.stop)
    down_at = time.monotonic()
    stopped.set()
    # Both files have played to 14 s with the server down, and both monitors have noticed.
    await until_true(lambda: all(f.at == 14.0 for f in files), "the files reach the end of the outage")
    await until_true(lambda: not any(e.runner.health.up for e, _ in runs), "the monitors notice")  # type: ignore[attr-defined]
    await loop.run_in_executor(None, restartable.start)
    up_at = time.monotonic()
    restarted.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 180)
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


async def test_a_server_that_comes_back_without_the_split_scores_in_full(restartable, caplog):
    """Started while the server is down (scoring locally, incrementally, meanwhile); the server that answers
    has Distill-MOS but not its streaming split: the monitor says so and goes on with every window in full
    there, instead of waiting for graphs that will never come.  The file stops at 10 s until that is done."""
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, restartable.stop)
    url = restartable.url("distillmos")
    loaded = load_scorer(ScoringOptions(device="cpu", max_batch=4, backend=url, backend_fallback="local",
                                        backend_timeout_s=30.0))
    assert loaded.scorer.incremental is not None  # not known yet: the server is down
    assert loaded.fallback is not None and loaded.fallback.incremental is not None
    engines: list[Engine] = []

    async def back() -> None:
        await loop.run_in_executor(None, restartable.start)
        await until_true(lambda: engines[0].runner.health.up, "the monitor finds the server")  # type: ignore[attr-defined]

    src = Held("s", EXAMPLES / "clean.wav", [(10.0, back)])
    bus = EventBus()
    sub = bus.subscribe()
    engines.append(Engine(loaded.scorer, [src], EngineConfig(stream=loaded.stream, max_batch=4), bus,
                          fallback=loaded.fallback))
    with caplog.at_level("WARNING"):
        await asyncio.wait_for(engines[0].run(), 300)
    evs = [ev async for ev in sub]
    assert [e.state for e in evs if isinstance(e, BackendStatus)] == ["fallback", "up"]
    assert "has no distillmos-cnn or distillmos-head: every window is scored in full there" in caplog.text
    assert loaded.scorer.incremental is None
    scores = {e.window: e.mos for e in evs if isinstance(e, ScoreEvent)}
    assert len(scores) > 15 and all(v is not None for v in scores.values())
    assert executed(restartable) >= 10  # the windows after the hold, on the server, in full
    x = speech_16k(EXAMPLES / "clean.wav")
    hop, n = 16000, 122_880
    want = Scorer(load_scorer(ScoringOptions(device="cpu", incremental=False)).model).score(  # type: ignore[arg-type]
        [x[k * hop:k * hop + n] for k in sorted(scores)])
    assert np.abs(np.array([scores[k] for k in sorted(scores)]) - want).max() < 1e-4


def test_the_command_line_refuses_a_model_that_does_not_fit_the_contract(server, capsys):
    from scoreq_live.cli import main

    rc = main(["monitor", "-i", str(EXAMPLES / "clean.wav"), "--fast", "--no-tui", "--no-ws", "-q",
               "--backend", server.url("mislabelled")])
    assert rc == 2
    assert "model 'mislabelled' on Triton at 127.0.0.1" in capsys.readouterr().err
