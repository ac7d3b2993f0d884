"""The command line's Triton parts without a server: ``models triton-repo``, ``--backend`` errors, a fallback start."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from scoreq_live.cli import main
from scoreq_live.scoring.triton import BackendError, parse_backend
from tests.helpers import EXAMPLES
from tests.triton_tools import free_port


def read_config(path) -> model_config_pb2.ModelConfig:
    """Parse config.pbtxt as Triton does (its own protobuf schema, text format)."""
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def test_triton_repo_writes_a_repository_triton_can_parse(tmp_path, capsys):
    root = tmp_path / "repo"
    assert main(["models", "triton-repo", str(root), "distillmos", "distillmos-embedding", "--gpus", "2",
                 "--instances", "3"]) == 0
    assert "docker run --gpus all" in capsys.readouterr().err
    cfg = read_config(root / "distillmos" / "config.pbtxt")
    assert (cfg.name, cfg.platform, cfg.max_batch_size) == ("distillmos", "onnxruntime_onnx", 32)
    assert [(i.name, i.data_type, list(i.dims)) for i in cfg.input] == [("audio", model_config_pb2.TYPE_FP32,
                                                                        [122_880])]
    assert [(o.name, list(o.dims)) for o in cfg.output] == [("mos", [1])]
    assert list(cfg.dynamic_batching.preferred_batch_size) == [4, 8, 16]
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 2000
    [group] = cfg.instance_group
    assert (group.count, group.kind, list(group.gpus)) == (3, model_config_pb2.ModelInstanceGroup.KIND_GPU, [0, 1])
    emb = read_config(root / "distillmos-embedding" / "config.pbtxt")
    assert [(o.name, list(o.dims)) for o in emb.output][0][0] == "embedding"
    assert list(emb.output[0].dims)[0] > 1
    # The model file is the catalogue's, under Triton's layout, and runs.
    sess = ort.InferenceSession(str(root / "distillmos" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert sess.run(None, {"audio": np.zeros((1, 122_880), np.float32)})[0].shape == (1, 1)
    # Distill-MOS's streaming split beside it, for monitors that cache features: CNN blocks of any length
    # (with the window's peak) and heads over 384 frames.
    cnn, head = (read_config(root / f"distillmos-{g}" / "config.pbtxt") for g in ("cnn", "head"))
    assert [(i.name, list(i.dims)) for i in cnn.input] == [("audio", [-1]), ("peak", [1])]
    assert [(o.name, list(o.dims)) for o in cnn.output] == [("features", [-1, 1024])]
    assert [(i.name, list(i.dims)) for i in head.input] == [("features", [384, 1024])]
    assert [(o.name, list(o.dims)) for o in head.output] == [("mos", [1])]
    assert (cnn.max_batch_size, head.instance_group[0].count) == (32, 3)
    assert not (root / "distillmos-embedding-cnn").exists()  # only models with a split get one
    x = np.random.default_rng(0).standard_normal((1, 122_880)).astype(np.float32) * 0.1
    feats = ort.InferenceSession(str(root / "distillmos-cnn" / "1" / "model.onnx"),
                                 providers=["CPUExecutionProvider"]).run(None, {"audio": x, "peak": np.abs(x).max(
                                     1, keepdims=True)})[0]
    mos = ort.InferenceSession(str(root / "distillmos-head" / "1" / "model.onnx"),
                               providers=["CPUExecutionProvider"]).run(None, {"features": feats})[0]
    assert abs(float(mos[0, 0]) - float(sess.run(None, {"audio": x})[0][0, 0])) < 1e-4  # head(cnn(x)) is the model


def test_triton_repo_takes_the_batcher_from_a_bench_report_and_writes_fp16(tmp_path):
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"model": "distillmos", "device": "cuda", "provider": "CUDAExecutionProvider",
                                 "batch_sizes": [1, 2, 4, 8, 16, 32],
                                 "batch_ms_per_window": {"1": 6.0, "2": 3.4, "4": 2.0, "8": 1.3, "16": 1.0,
                                                         "32": 0.9}}))
    root = tmp_path / "repo"
    assert main(["models", "triton-repo", str(root), "distillmos", "--bench", str(bench), "--fp16", "--gpus", "0"]) == 0
    cfg = read_config(root / "distillmos" / "config.pbtxt")
    assert list(cfg.dynamic_batching.preferred_batch_size) == [2, 4, 8, 16, 32]
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 3000  # half a one-window run
    assert cfg.max_batch_size == 64
    assert cfg.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
    half = read_config(root / "distillmos-fp16" / "config.pbtxt")
    assert half.name == "distillmos-fp16" and half.input[0].data_type == model_config_pb2.TYPE_FP32
    sess = ort.InferenceSession(str(root / "distillmos-fp16" / "1" / "model.onnx"),
                                providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].type == "tensor(float)"  # float32 in and out: clients need not change


def test_triton_repo_refuses_unknown_models_and_bad_reports(tmp_path, capsys):
    assert main(["models", "triton-repo", str(tmp_path / "r"), "nope"]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    assert main(["models", "triton-repo", str(tmp_path / "r"), "distillmos", "--bench", str(bad)]) == 2
    assert "not a 'scoreq-live bench --json' report" in capsys.readouterr().err


@pytest.mark.parametrize("url, message", [
    ("http://h:8001/m", "expected triton://HOST:8001/MODEL"),
    ("triton://h:8001/", "give the model's name on the server"),
    ("triton://h:port/m", "the port is not a number"),
    ("triton://h/m/v1", "a model version is a number"),
])
def test_backend_urls_are_checked(url, message):
    with pytest.raises(BackendError, match=message):
        parse_backend(url)


def test_backend_url_defaults():
    u = parse_backend("triton://gpu-1/distillmos")
    assert (u.protocol, u.address, u.model, str(u)) == ("grpc", "gpu-1:8001", "distillmos",
                                                        "triton://gpu-1:8001/distillmos")
    h = parse_backend("triton+http://[::1]/m/2")
    assert (h.protocol, h.address, h.version) == ("http", "[::1]:8000", "2")


def test_an_unreachable_backend_at_start_is_an_error_that_names_the_fallback(capsys):
    rc = main(["monitor", "-i", str(EXAMPLES / "clean.wav"), "--fast", "--no-tui", "--no-ws", "-q",
               "--backend", f"triton://127.0.0.1:{free_port()}/distillmos"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "cannot reach Triton at 127.0.0.1" in err and "--backend-fallback local" in err


def test_with_a_fallback_an_unreachable_backend_scores_locally(tmp_path):
    out = tmp_path / "events.jsonl"
    url = f"triton://127.0.0.1:{free_port()}/distillmos"
    assert main(["monitor", "-i", f"clean={EXAMPLES / 'clean.wav'}", "--fast", "--no-tui", "--no-ws", "-q",
                 "--hop", "4", "--backend", url, "--backend-fallback", "local", "--jsonl", str(out)]) == 0
    events = [json.loads(line) for line in out.read_text().splitlines()]
    assert events[0]["type"] == "backend" and events[0]["state"] == "fallback" and events[0]["stream"] == ""
    assert events[0]["backend"] == url and "unreachable at start" in events[0]["error"]
    scores = [e for e in events if e["type"] == "score"]
    assert len(scores) >= 5 and all(e["mos"] is not None for e in scores)


def backend_events():
    from scoreq_live.core.events import BackendStatus, ScoreEvent

    url = "triton://gpu-1:8001/distillmos"
    return [BackendStatus(stream="", ts=100.0, state="up", backend=url, since=100.0),
            BackendStatus(stream="", ts=110.0, state="down", backend=url, error="no answer within 2s", since=110.0),
            ScoreEvent(stream="a", ts=111.0, window=3, reason="backend_unavailable", model="distillmos")]


def test_the_terminal_panel_shows_the_backend_state_on_a_line_of_its_own():
    from rich.console import Console

    from scoreq_live.sinks.terminal import PanelState, TerminalSink

    sink = TerminalSink(Console(record=True, width=200), title="t")
    for ev in backend_events():
        sink.state.update(ev)
    assert set(sink.state.rows) == {"a"}  # the backend is not a stream
    sink.console.print(sink.renderable())
    text = sink.console.export_text()
    assert "backend triton://gpu-1:8001/distillmos: DOWN for" in text and "no answer within 2s" in text
    assert "windows skipped (backend_unavailable)" in text
    up = PanelState()
    up.update(backend_events()[0])
    assert up.backend is not None and up.backend.state == "up"


def test_metrics_say_whether_the_backend_answers_and_count_its_skips():
    from scoreq_live.sinks.metrics import MetricsSink

    m = MetricsSink("distillmos", "nr")
    evs = backend_events()
    m.update(evs[0])
    assert 'scoreq_live_backend_up{backend="triton://gpu-1:8001/distillmos"} 1.0' in m.render()[0].decode()
    for ev in evs[1:]:
        m.update(ev)
    text = m.render()[0].decode()
    assert 'scoreq_live_backend_up{backend="triton://gpu-1:8001/distillmos"} 0.0' in text
    assert "scoreq_live_backend_unavailable_windows_total 1.0" in text


def test_a_new_feed_client_is_told_the_backend_state_after_hello():
    from scoreq_live.sinks.feed import FeedHub, FeedInfo

    hub = FeedHub(FeedInfo(model="distillmos", mode="nr", window_s=7.68, hop_s=1.0))
    for ev in backend_events()[:2]:
        hub.publish(ev, 0.0)
    client = hub.connect(None, 0.0)
    msgs = [json.loads(f) for f in client.take(0.0)]
    assert [m["type"] for m in msgs] == ["hello", "backend", "history_end"]
    assert msgs[1]["state"] == "down" and msgs[1]["error"] == "no answer within 2s"
    assert "" not in hub.streams
