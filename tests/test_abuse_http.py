"""The HTTP sites under abuse: slow and idle connections, malformed requests, running out of open files.

Real servers on 127.0.0.1 (in-process sites with short timeouts, and the monitor as a user runs it, with a
small open-file limit), real sockets that misbehave on purpose; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import resource
import socket
import time
import urllib.request
from collections.abc import AsyncIterator

import aiohttp
import pytest

from scoreq_live.http.limits import ACCEPT_ERROR, AcceptErrors, raise_open_files
from scoreq_live.http.policy import Listen
from scoreq_live.http.routes import MetricsRoutes, PanelRoutes
from scoreq_live.http.site import HttpSite
from scoreq_live.ingest.http import IngestRoutes
from scoreq_live.ingest.whip import WhipIngest
from scoreq_live.sinks.policy import PANEL_DIR
from tests.helpers import ScoreqProcess

LOCAL = Listen("127.0.0.1", 0)


@contextlib.asynccontextmanager
async def site(**timeouts: float) -> AsyncIterator[int]:
    """A site with the panel, ``/metrics`` and WHIP on a free port (its port), with the given timeouts."""
    s = HttpSite(LOCAL, **timeouts).add(PanelRoutes(PANEL_DIR), MetricsRoutes(lambda: (b"up 1\n", "text/plain")),
                                        IngestRoutes(WhipIngest()))
    await s.start()
    assert s.address is not None
    try:
        yield s.address.port
    finally:
        await s.close()


async def until_closed(reader: asyncio.StreamReader, limit: float) -> tuple[float, bytes]:
    """Read until the server closes the connection: (when, relative to the call; what it sent)."""
    t0 = time.monotonic()
    got = b""
    with contextlib.suppress(ConnectionError):
        while chunk := await asyncio.wait_for(reader.read(65536), limit):
            got += chunk
    return time.monotonic() - t0, got


async def test_slow_and_idle_connections_are_closed_and_others_are_served_meanwhile():
    idle = 2.0
    async with site(idle_timeout_s=idle, body_timeout_s=idle) as port:
        head = b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: " + b"s" * 200 + b"\r\n\r\n"

        async def slowloris() -> tuple[float, bytes]:
            """A request head a byte every 0.2 s (it would take 48 s); when the server closed, and what it said."""
            reader, writer = await asyncio.open_connection("127.0.0.1", port)

            async def dribble() -> None:
                with contextlib.suppress(ConnectionError):
                    for b in head:
                        writer.write(bytes([b]))
                        await asyncio.sleep(0.2)

            sender = asyncio.create_task(dribble())
            try:
                return await until_closed(reader, 10)
            finally:
                sender.cancel()
                writer.close()

        slow = [asyncio.create_task(slowloris()) for _ in range(100)]
        await asyncio.sleep(0.3)
        # Meanwhile, another client is served at once.
        async with aiohttp.ClientSession() as http:
            t0 = time.monotonic()
            async with http.get(f"http://127.0.0.1:{port}/metrics") as r:
                assert r.status == 200 and await r.text() == "up 1\n"
            # Served while every slow connection is still open: they hold nothing up (no timing needed).
            assert not any(t.done() for t in slow), f"served only after {time.monotonic() - t0:.2f} s"

        # A connection that sends nothing, and one that stays open after its answer (keep-alive).
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        silent = asyncio.create_task(until_closed(reader, 10))
        reader2, writer2 = await asyncio.open_connection("127.0.0.1", port)
        writer2.write(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        answer = await asyncio.wait_for(reader2.readuntil(b"up 1\n"), 5)
        assert answer.startswith(b"HTTP/1.1 200") and b"keep-alive" not in answer.lower()
        kept = await until_closed(reader2, 10)
        closed_after = sorted(t for t, _ in await asyncio.gather(*slow))
        quiet = await silent
        writer.close()
        writer2.close()
    print(f"100 slow heads closed after {closed_after[0]:.2f}..{closed_after[-1]:.2f} s; silent after "
          f"{quiet[0]:.2f} s; idle after its answer {kept[0]:.2f} s (timeout {idle} s)")
    # Closed by the timeout (not before it; a busy machine may be late by a few seconds, never by the 48 s the
    # slow heads would take to finish).
    assert idle - 0.1 < closed_after[0] and closed_after[-1] < idle + 5.0
    assert idle - 0.1 < quiet[0] < idle + 5.0 and quiet[1] == b""
    assert idle - 0.1 < kept[0] < idle + 5.0 and kept[1] == b""


async def test_a_request_body_sent_slowly_is_refused_with_408():
    async with site(body_timeout_s=1.0) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /whip HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/sdp\r\n"
                     b"Content-Length: 2000\r\n\r\nv=0\r\n")

        async def dribble() -> None:
            with contextlib.suppress(ConnectionError):
                for _ in range(100):
                    writer.write(b"a")
                    await asyncio.sleep(0.2)

        sender = asyncio.create_task(dribble())
        try:
            t0 = time.monotonic()
            got = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            answered = time.monotonic() - t0
            took, rest = await until_closed(reader, 10)
        finally:
            sender.cancel()
            writer.close()
    assert got.startswith(b"HTTP/1.1 408") and b"did not arrive within 1 s" in rest, got + rest
    assert 0.9 < answered < 4.0, answered  # the body timeout (1 s), not the 20 s the dribble would take
    assert took < 2.0 + 3.0, took  # then the rest of the body is read (and dropped) for 2 s at most


@pytest.mark.parametrize(("request_bytes", "status"), [
    (b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.\xe9\r\n\r\n", 400),  # a Host that cannot be a host name
    (b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Note: caf\xe9\r\n\r\n", 200),  # any byte >= 0x80 is allowed
    (b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Note: \xe2\x82\xac\r\n\r\n", 200),
    (b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer \xe9\r\n\r\n", 200),  # no token set
    (b"OPTIONS /whip HTTP/1.1\r\nHost: 127.0.0.1\r\nOrigin: http://\xe9.example\r\n\r\n", 403),
    (b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nX-\xe9: a\r\n\r\n", 400),  # not a header name
    (b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Note: a\x01b\r\n\r\n", 400),  # a control character
    (b"GET /metr\xe9ics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 400),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400),  # TLS to a plain HTTP port
])
async def test_malformed_requests_get_a_4xx_and_no_traceback(request_bytes, status, caplog):
    caplog.set_level(logging.DEBUG)
    async with site() as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request_bytes)
        line = await asyncio.wait_for(reader.readline(), 5)
        writer.close()
        # The site still serves.
        async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/metrics") as r:
            assert r.status == 200
    assert re.match(rb"HTTP/1\.[01] (\d+)", line) and int(line.split()[1]) == status, line
    bad = [r for r in caplog.records if r.exc_info or r.levelno >= logging.WARNING]
    assert not bad, [(r.name, r.getMessage()) for r in bad]


def test_the_open_file_limit_is_raised_to_the_hard_limit():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= 512:
        pytest.skip(f"the hard open-file limit is {hard}: nothing to raise here")
    resource.setrlimit(resource.RLIMIT_NOFILE, (512, hard))
    try:
        files = raise_open_files()
        assert files is not None and files.before == 512 and files.limit > 512
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == files.limit
        assert 0 < files.connections < files.limit
        assert f"raised from 512 to {files.limit:,}" in files.describe()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_failed_accepts_are_said_once_per_interval_with_a_count(caplog):
    now = [0.0]
    passed_on: list[dict] = []
    handler = AcceptErrors(lambda loop, context: passed_on.append(context), interval_s=10.0, clock=lambda: now[0])
    emfile = {"message": ACCEPT_ERROR, "exception": OSError(24, "Too many open files")}
    loop = asyncio.new_event_loop()
    try:
        for i in range(3000):  # 128 a second for ~23 s, as Python 3.11 reports them
            now[0] = i / 128
            handler(loop, emfile)
        handler(loop, {"message": "something else"})
    finally:
        loop.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "scoreq_live.http.limits"]
    assert len(lines) == 3 and all("Too many open files" in line and "\n" not in line for line in lines), lines
    assert "1279 more since the last such line" in lines[1]
    assert not any(r.exc_info for r in caplog.records)
    assert passed_on == [{"message": "something else"}]  # anything else goes where it went before
    assert handler.failed == 3000


def test_a_monitor_out_of_open_files_logs_a_line_not_a_flood_and_recovers():
    """The monitor, as run, with 64 open files and no way to raise them; 110 connections that hang."""
    limit = 64

    def small_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    mon = ScoreqProcess("monitor", "--http", "127.0.0.1:0", "--no-ws", "--no-tui", "--device", "cpu",
                        "--max-batch", "1", preexec_fn=small_limit)
    conns: list[socket.socket] = []
    try:
        port = int(mon.wait_for(r"panel: http://127\.0\.0\.1:(\d+)/", 60)[1])
        mon.wait_for(r"connections: about", 10)
        said = re.search(r"connections: about (\d+) at once \((.*?)\)", " ".join(mon.output().split()))
        assert said and 0 < int(said[1]) < limit and said[2] == f"open-file limit {limit}, the hard limit", said
        url = f"http://127.0.0.1:{port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as r:
            assert r.status == 200
        for _ in range(limit + 46):  # more than it has files for: the rest wait in the listen backlog
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.sendall(b"GET /metrics HTTP/1.1\r\n")  # and never finish their heads
            conns.append(s)
        time.sleep(3.0)
        for s in conns:
            s.close()
        conns.clear()
        t0 = time.monotonic()
        with urllib.request.urlopen(url, timeout=10) as r:
            assert r.status == 200
        recovered = time.monotonic() - t0
        time.sleep(0.5)
    finally:
        for s in conns:
            s.close()
        mon.stop()
    out = "".join(mon.lines)
    accept_lines = [line for line in mon.lines if "cannot accept new connections" in line]
    print(f"{len(accept_lines)} accept-error lines, {len(out)} bytes of stderr; /metrics again after "
          f"{recovered:.2f} s")
    assert 1 <= len(accept_lines) <= 2, out[-3000:]
    assert "Too many open files" in accept_lines[0]
    assert ACCEPT_ERROR not in out and "Traceback" not in out, out[-3000:]
    assert recovered < 10.0  # serves again once descriptors are free (a quiet machine: about 1 s)
