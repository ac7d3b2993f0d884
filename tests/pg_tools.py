"""A real, throwaway PostgreSQL for the tests: Debian's ``initdb`` / ``pg_ctl`` on a free loopback port.

:class:`PostgresServer` makes a fresh cluster in a private temporary directory
(trust authentication, superuser ``scoreq``, UTF8), starts it on
``127.0.0.1:port`` with its Unix socket in that directory (never
``/var/run/postgresql``; Debian's own cluster and service are not used),
creates a database and gives its URL.  :meth:`~PostgresServer.stop` and
:meth:`~PostgresServer.start` again serve the same data on the same port (a
database outage); :meth:`~PostgresServer.close` (the context manager's exit)
always stops the server and removes the directory.

Typical use, with the ``postgres`` fixture imported into the test module::

    from tests.pg_tools import postgres  # noqa: F401  (the PostgreSQL fixture)

    def test_calls_are_stored(postgres):  # noqa: F811  (ruff: the argument shadows the import)
        run_monitor("--store", postgres.url)
        with postgres.connect() as conn:
            ...

or without the fixture: ``with postgres_server(tmp_path) as pg: ...``.

The binaries come from Debian's ``postgresql`` package (``.ci/install-system.sh``)
and live in ``/usr/lib/postgresql/<version>/bin``, not on PATH; the client is
psycopg 3 (the ``test`` extra).  Without either the test is skipped, except on
CI (``CI`` set), where it fails.  initdb and postgres refuse to run as root: as
root (CI) they run as the ``postgres`` system user the Debian package creates,
in a directory under ``/tmp`` owned by that user.
"""

from __future__ import annotations

import atexit
import glob
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import unavailable
from tests.redis_tools import free_port

__all__ = ["PostgresServer", "postgres", "postgres_bindir", "postgres_server", "require_postgres"]

USER = "scoreq"
DBNAME = "scoreq_test"
SYSTEM_USER = "postgres"  # the account Debian's package creates; the server runs as it when the tests run as root
_HINT = "apt-get install postgresql, see .ci/install-system.sh"


def _version_key(path: str) -> tuple[int, ...]:
    # /usr/lib/postgresql/<version>/bin/initdb -> (version parts): the newest installed version wins
    return tuple(int(n) for n in re.findall(r"\d+", Path(path).parent.parent.name)) or (0,)


def postgres_bindir() -> Path | None:
    """Folder with initdb, pg_ctl and postgres (the newest installed version), or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=_version_key)
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("initdb")  # other distributions (and source builds) put them on PATH
    if on_path and shutil.which("pg_ctl"):
        return Path(on_path).resolve().parent
    return None


def require_postgres() -> Path:
    """The PostgreSQL bin folder; skips the calling test without the server or psycopg (fails on CI)."""
    bindir = postgres_bindir()
    if bindir is None or not all((bindir / exe).exists() for exe in ("initdb", "pg_ctl", "postgres")):
        unavailable(f"PostgreSQL server binaries (initdb, pg_ctl) not found ({_HINT})")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        unavailable("psycopg is not installed (pip install 'psycopg[binary]>=3.1', the `test` extra)")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(SYSTEM_USER)
        except KeyError:
            unavailable(f"running as root but there is no {SYSTEM_USER!r} system user to run PostgreSQL as ({_HINT})")
    assert bindir is not None
    return bindir


class PostgresServer:
    """One throwaway PostgreSQL cluster on 127.0.0.1:``port``; :meth:`stop` and :meth:`start` again for an outage.

    Attributes:
        bindir:  the PostgreSQL bin folder used (``/usr/lib/postgresql/<version>/bin``).
        port:    the TCP port (chosen free at construction unless given); the same across restarts.
        host:    ``"127.0.0.1"``.
        user:    the superuser (``"scoreq"``), trust authentication, no password.
        dbname:  the database the URL names (``"scoreq_test"``), created on the first start.
        root:    the private directory: ``data/`` (the cluster), ``postgres.log``, and the Unix socket.
        datadir: ``root / "data"``.
        log:     the server log (``root / "postgres.log"``); copied to ``workdir`` on :meth:`close`.
        url, dsn: ``postgresql://scoreq@127.0.0.1:PORT/scoreq_test`` (the same string).
    """

    host = "127.0.0.1"

    def __init__(self, workdir: Path | None = None, port: int | None = None, *, user: str = USER,
                 dbname: str = DBNAME, timeout: float = 60.0) -> None:
        self.bindir = require_postgres()
        self.workdir = workdir
        self.port = port or free_port()
        self.user = user
        self.dbname = dbname
        self.timeout = timeout
        self.as_root = os.geteuid() == 0
        self.root = Path(tempfile.mkdtemp(prefix="scoreq-pg-", dir=self._base(workdir)))
        self.datadir = self.root / "data"
        self.log = self.root / "postgres.log"
        self._initialised = False
        self._closed = False
        if self.as_root:
            pw = pwd.getpwnam(SYSTEM_USER)
            self._uid, self._gid = pw.pw_uid, pw.pw_gid
            os.chown(self.root, self._uid, self._gid)
        os.chmod(self.root, 0o700)
        atexit.register(self.close)  # a safety net; close() also unregisters it

    def _base(self, workdir: Path | None) -> str:
        # The postgres user must be able to reach the directory (pytest's /tmp/pytest-of-root is 0700), and the
        # socket path (ROOT/.s.PGSQL.PORT) must stay under the ~107-byte limit of Unix socket addresses.
        if workdir is not None and os.geteuid() != 0 and len(str(workdir)) <= 60:
            workdir.mkdir(parents=True, exist_ok=True)
            return str(workdir)
        base = tempfile.gettempdir()
        if len(base) > 60 or (os.geteuid() == 0 and os.stat(base).st_mode & 0o001 == 0):
            base = "/tmp"
        return base

    # -- addresses ---------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"postgresql://{self.user}@{self.host}:{self.port}/{self.dbname}"

    @property
    def dsn(self) -> str:
        return self.url

    def url_for(self, dbname: str) -> str:
        """The URL of another database on this server (e.g. ``"postgres"``)."""
        return f"postgresql://{self.user}@{self.host}:{self.port}/{dbname}"

    def connect(self, dbname: str | None = None, **kwargs: Any) -> Any:
        """A new ``psycopg.Connection`` to ``dbname`` (default: :attr:`dbname`); the caller closes it."""
        import psycopg

        kwargs.setdefault("connect_timeout", 5)
        return psycopg.connect(self.url_for(dbname or self.dbname), **kwargs)

    def accepts(self, dbname: str = "postgres") -> bool:
        """True when a connection over TCP succeeds and runs ``select 1``."""
        import psycopg

        try:
            with psycopg.connect(self.url_for(dbname), connect_timeout=2) as conn:
                conn.execute("select 1").fetchone()
            return True
        except psycopg.Error:
            return False

    # -- lifecycle ---------------------------------------------------------------------------

    def _run(self, *args: str, timeout: float | None = None, check: bool = True) -> subprocess.CompletedProcess:
        """A PostgreSQL tool, as the ``postgres`` system user when the tests run as root."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}  # no PGHOST/PGPORT/... from outside
        env.update(HOME=str(self.root), LC_ALL="C", LANG="C")
        kw: dict[str, Any] = {}
        if self.as_root:  # setreuid/setregid in the child: real and effective ids both postgres, as it requires
            kw.update(user=self._uid, group=self._gid, extra_groups=[])
        proc = subprocess.run([str(self.bindir / args[0]), *args[1:]], cwd=self.root, env=env,
                              stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=timeout or self.timeout + 30, check=False, **kw)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{args[0]} exited with {proc.returncode}:\n{proc.stdout}{proc.stderr}"
                               f"{self._log_tail()}")
        return proc

    def _log_tail(self, chars: int = 3000) -> str:
        try:
            return "\n--- postgres.log ---\n" + self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def _initdb(self) -> None:
        self._run("initdb", "-D", str(self.datadir), "-U", self.user, "-A", "trust", "-E", "UTF8",
                  "--locale=C", "--no-sync")  # --no-sync: initdb only; the running server keeps fsync on
        with open(self.datadir / "postgresql.conf", "a") as f:
            f.write("\n# scoreq-live tests (tests/pg_tools.py)\n"
                    f"listen_addresses = '{self.host}'\n"
                    f"port = {self.port}\n"
                    f"unix_socket_directories = '{self.root}'\n"
                    "max_connections = 50\n"
                    "log_line_prefix = '%m [%p] '\n")

    def start(self) -> PostgresServer:
        """Start the server (``initdb`` and the database first, on the first start); returns once it answers."""
        if self._closed:
            raise RuntimeError("this PostgresServer has been closed")
        first = not self._initialised
        if first:
            self._initdb()
            self._initialised = True
        self._run("pg_ctl", "-D", str(self.datadir), "-l", str(self.log), "-w", "-t", str(int(self.timeout)), "start")
        deadline = time.monotonic() + self.timeout
        while not self.accepts():
            if time.monotonic() > deadline:
                raise RuntimeError(f"PostgreSQL on port {self.port} did not accept connections within "
                                   f"{self.timeout:.0f} s{self._log_tail()}")
            time.sleep(0.1)
        if first:
            with self.connect("postgres", autocommit=True) as conn:
                conn.execute(f'create database "{self.dbname}"')
        return self

    def stop(self, mode: str = "fast") -> None:
        """Shut the server down and wait until it is gone (``fast``: sessions are ended, a clean checkpoint).

        ``mode="immediate"`` is a crash instead: no checkpoint, recovery on the next :meth:`start`.
        """
        if self.running():
            self._run("pg_ctl", "-D", str(self.datadir), "-m", mode, "-w", "-t", str(int(self.timeout)), "stop")

    def kill(self) -> None:
        """The database vanishes as in a crash (``pg_ctl stop -m immediate``); :meth:`start` recovers it."""
        self.stop("immediate")

    def running(self) -> bool:
        """Whether a postmaster runs on the data directory (``pg_ctl status``)."""
        if not self._initialised or not self.datadir.exists():
            return False
        return self._run("pg_ctl", "-D", str(self.datadir), "status", check=False, timeout=30).returncode == 0

    def close(self) -> None:
        """Stop the server however it goes (fast, immediate, then SIGKILL) and remove the directory.  Idempotent."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        try:
            for mode in ("fast", "immediate"):
                try:
                    self.stop(mode)
                except (RuntimeError, subprocess.TimeoutExpired, OSError):
                    continue
                if not self.running():
                    break
            else:
                if self.running():
                    self._kill_postmaster()
        finally:
            if self.workdir is not None and self.log.exists():
                try:
                    self.workdir.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(self.log, self.workdir / "postgres.log")  # kept for a failed test's report
                except OSError:
                    pass
            shutil.rmtree(self.root, ignore_errors=True)

    def _kill_postmaster(self) -> None:
        # Last resort: the pid from postmaster.pid, if such a process is still there.
        try:
            pid = int((self.datadir / "postmaster.pid").read_text().split()[0])
            os.kill(pid, signal.SIGKILL)
        except (OSError, ValueError, IndexError):
            return
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except OSError:
                return
            time.sleep(0.05)

    def __enter__(self) -> PostgresServer:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextmanager
def postgres_server(tmp_path: Path | None = None, port: int | None = None, **kwargs: Any) -> Iterator[PostgresServer]:
    """A started :class:`PostgresServer`; stopped and removed on exit, also when the body raises.

    Skips the calling test without PostgreSQL or psycopg (fails on CI).  ``tmp_path`` (pytest's) receives a
    copy of the server log on exit; the cluster itself lives in a private directory of its own.
    """
    server = PostgresServer(tmp_path, port, **kwargs)
    try:
        yield server.start()
    finally:
        server.close()


@pytest.fixture
def postgres(tmp_path):
    """A running :class:`PostgresServer` with an empty database; skips without PostgreSQL (fails on CI).

    Import it into a test module: ``from tests.pg_tools import postgres  # noqa: F401``.
    """
    with postgres_server(tmp_path) as server:
        yield server
