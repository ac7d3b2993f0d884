"""The one bounded drop-oldest queue behind the bus, the feed's clients and the webhook."""

import asyncio

import pytest

from scoreq_live.queues import AsyncDropOldest, DropOldest


def test_a_full_queue_drops_its_oldest_item_and_counts_it():
    woken = []
    q: DropOldest[int] = DropOldest(3, on_put=lambda: woken.append(1))
    assert [q.put(i) for i in range(5)] == [False, False, False, True, True]
    assert q.dropped == 2 and len(q) == 3 and len(woken) == 5
    assert q.get_nowait() == 2
    assert q.take_all() == [3, 4] and len(q) == 0 and q.get_nowait() is None
    q.put(9)
    q.clear()
    assert len(q) == 0 and q.dropped == 2  # clearing is the consumer's choice, not a loss


def test_maxsize_must_hold_one_item():
    with pytest.raises(ValueError):
        DropOldest(0)


async def test_a_waiting_consumer_gets_items_in_order_then_none_once_closed():
    q: AsyncDropOldest[str] = AsyncDropOldest(2)
    got = []

    async def consume():
        while (item := await q.get()) is not None:
            got.append(item)

    task = asyncio.create_task(consume())
    await asyncio.sleep(0)
    q.put("a")
    await asyncio.sleep(0)
    for item in "bcd":  # the consumer is not scheduled in between: "b" is dropped for "d"
        q.put(item)
    q.close()
    await asyncio.wait_for(task, 1.0)
    assert got == ["a", "c", "d"] and q.dropped == 1
