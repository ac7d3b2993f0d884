from scoreq_live.core.windowing import WindowScheduler


def spans(ws):
    return [(w.index, w.start, w.end) for w in ws]


def test_windows_follow_the_hop_grid_however_audio_is_chunked():
    a, b = WindowScheduler(4, 1), WindowScheduler(4, 1)
    got_a = spans(a.due(10))
    got_b = []
    for total in range(1, 11):
        got_b += spans(b.due(total))
    assert got_a == got_b == [(i, i, i + 4) for i in range(7)]


def test_tail_is_the_next_grid_window_cut_at_the_end():
    s = WindowScheduler(64000, 16000)
    s.due(90000)  # windows end at 64000, 80000
    tail = s.finish(90000)
    assert (tail.start, tail.end) == (32000, 90000)
    assert s.finish(90000) is None
    assert s.due(200000) == []


def test_stream_shorter_than_a_window_is_one_window():
    s = WindowScheduler(64000, 16000)
    assert s.due(30000) == []
    tail = s.finish(30000)
    assert (tail.index, tail.start, tail.end) == (0, 0, 30000)


def test_stream_exactly_one_window_long_has_no_tail():
    s = WindowScheduler(64000, 16000)
    assert spans(s.due(64000)) == [(0, 0, 64000)]
    assert s.finish(64000) is None


def test_tiny_tail_below_the_minimum_is_dropped():
    s = WindowScheduler(100, 50)
    s.due(160)
    assert s.finish(160, min_samples=200) is None
