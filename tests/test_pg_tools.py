"""The throwaway PostgreSQL of tests/pg_tools.py: it serves, a stop cuts it off, a start serves the same data."""

from __future__ import annotations

import pytest

from tests.pg_tools import (
    PostgresServer,
    postgres,  # noqa: F401  (the PostgreSQL fixture)
    postgres_server,
)


def test_the_server_answers_on_loopback_with_its_own_database(postgres):  # noqa: F811
    assert postgres.url == f"postgresql://scoreq@127.0.0.1:{postgres.port}/scoreq_test" == postgres.dsn
    with postgres.connect() as conn:
        assert conn.execute("select 1").fetchone() == (1,)
        assert conn.execute("select current_database(), current_user").fetchone() == ("scoreq_test", "scoreq")
        assert conn.execute("show server_encoding").fetchone() == ("UTF8",)
        assert conn.execute("show listen_addresses").fetchone() == ("127.0.0.1",)
        assert conn.execute("show unix_socket_directories").fetchone() == (str(postgres.root),)


def test_a_stopped_server_refuses_and_a_restarted_one_serves_the_same_data(postgres):  # noqa: F811
    import psycopg

    with postgres.connect() as conn:
        conn.execute("create table calls (id int primary key, mos real)")
        conn.execute("insert into calls values (1, 4.2), (2, 3.1)")
    held = postgres.connect()  # a session open across the outage is ended by the fast shutdown

    postgres.stop()
    assert not postgres.running()
    with pytest.raises(psycopg.OperationalError):
        postgres.connect(connect_timeout=2)
    with pytest.raises(psycopg.OperationalError):
        held.execute("select 1")
    held.close()

    port = postgres.port
    postgres.start()
    assert postgres.port == port and postgres.running()
    with postgres.connect() as conn:
        assert conn.execute("select id, mos from calls order by id").fetchall() == [(1, pytest.approx(4.2)),
                                                                                    (2, pytest.approx(3.1))]


def test_the_context_manager_removes_everything_even_when_the_body_fails(tmp_path):
    with pytest.raises(RuntimeError, match="the test failed"):
        with postgres_server(tmp_path) as pg:
            root, port = pg.root, pg.port
            assert pg.accepts()
            raise RuntimeError("the test failed")
    assert not root.exists()
    assert (tmp_path / "postgres.log").exists()  # the log is kept for the report
    server = PostgresServer(tmp_path, port)  # nothing listens on the port any more
    try:
        assert not server.accepts()
    finally:
        server.close()
