import numpy as np
import pytest

from scoreq_live.core.ringbuffer import RingBuffer


def test_reads_back_across_the_wrap():
    rb = RingBuffer(10)
    x = np.arange(25, dtype=np.float32)
    for chunk in np.array_split(x, 7):
        rb.write(chunk)
    assert rb.total == 25 and rb.oldest == 15
    np.testing.assert_array_equal(rb.read(15, 25), x[15:25])
    np.testing.assert_array_equal(rb.read(18, 22), x[18:22])


def test_refuses_samples_already_overwritten_or_not_yet_written():
    rb = RingBuffer(8)
    rb.write(np.ones(12, np.float32))
    with pytest.raises(IndexError):
        rb.read(3, 8)
    with pytest.raises(IndexError):
        rb.read(10, 13)


def test_a_write_larger_than_the_ring_keeps_the_newest_samples():
    rb = RingBuffer(4)
    rb.write(np.arange(10, dtype=np.float32))
    assert rb.total == 10
    np.testing.assert_array_equal(rb.read(6, 10), [6, 7, 8, 9])


def test_read_returns_a_copy():
    rb = RingBuffer(4)
    rb.write(np.arange(4, dtype=np.float32))
    a = rb.read(0, 4)
    rb.write(np.zeros(2, np.float32))
    assert a.tolist() == [0, 1, 2, 3]


def test_views_are_the_samples_without_a_copy_across_the_wrap():
    ring = RingBuffer(10)
    ring.write(np.arange(14, dtype=np.float32))  # holds 4..13, wrapped
    parts = ring.views(5, 12)
    assert len(parts) == 2 and all(p.base is not None for p in parts)  # views of the ring, not copies
    np.testing.assert_array_equal(np.concatenate(parts), np.arange(5, 12, dtype=np.float32))
    (one,) = ring.views(4, 6)
    np.testing.assert_array_equal(one, [4, 5])
    with pytest.raises(IndexError):
        ring.views(3, 6)
