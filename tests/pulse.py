"""A private PulseAudio daemon that gives tests a real capture device.

There is no sound card on CI, so the microphone path is tested through
PulseAudio: a null sink ``speech`` is created and its monitor is made the
default source. Whatever is played into the sink (``PulseServer.play``) comes
out of the capture device bit-exact and in real time, as long as the file's
rate and channel count match the sink's (otherwise PulseAudio resamples).

PortAudio (python-sounddevice) reaches the daemon through ALSA's ``pulse``
device (Debian ``libasound2-plugins``). It reads ``PULSE_SERVER`` when the
device is opened and enumerates devices when PortAudio initialises, i.e. at
``import sounddevice``. So either run the code under test in a subprocess with
``env=server.client_env()``, or call ``server.apply_env()`` *before* the first
``import sounddevice`` in this process.

Typical use (``tests/conftest.py`` makes the ``pulse_server`` fixture available)::

    def test_mic(pulse_server, tmp_path):
        app = subprocess.Popen([...], env=pulse_server.client_env())
        ...wait until the app's capture stream runs...
        pulse_server.play(wav).wait(timeout=20)

Start playback only once the capture stream is running: audio played into the
sink while nobody is recording is simply gone (the monitor keeps no history).

The daemon lives entirely in a temporary directory (own HOME, runtime dir,
socket, config and cookie), loads no system-wide configuration (``-n`` plus
``PULSE_CONFIG``) and never touches a user's own PulseAudio session.
"""

from __future__ import annotations

import ctypes.util
import glob
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from tests.helpers import stop_process

__all__ = ["PulseServer", "pulse_available", "pulse_server", "require_pulse"]

SINK = "speech"

# Binaries and libraries needed, with the Debian package that provides each.
_BINARIES = {"pulseaudio": "pulseaudio", "pactl": "pulseaudio-utils", "paplay": "pulseaudio-utils"}


def pulse_available() -> tuple[bool, str]:
    """Return ``(True, "")`` if a PulseServer can run and PortAudio can use it.

    Otherwise ``(False, reason)``, the reason naming the missing Debian
    package (install them with ``.ci/install-system.sh``).
    """
    for exe, pkg in _BINARIES.items():
        if shutil.which(exe) is None:
            return False, f"{exe} not found (Debian package {pkg}; see .ci/install-system.sh)"
    if ctypes.util.find_library("portaudio") is None:
        return False, "PortAudio library not found (Debian package libportaudio2; see .ci/install-system.sh)"
    if not glob.glob("/usr/lib/*/alsa-lib/libasound_module_pcm_pulse.so") and not glob.glob(
        "/usr/lib/alsa-lib/libasound_module_pcm_pulse.so"
    ):
        return False, "ALSA pulse plugin not found (Debian package libasound2-plugins; see .ci/install-system.sh)"
    return True, ""


class PulseServer:
    """A private ``pulseaudio`` daemon with a null sink whose monitor is the default source.

    Use as a context manager (or call ``start()`` / ``stop()``)::

        with PulseServer(rate=16000, channels=1) as srv:
            subprocess.run([...], env=srv.client_env())

    Attributes:
        rate, channels: format of the ``speech`` sink and hence of the capture device.
        sink:   name of the null sink (``"speech"``); the capture source is ``sink + ".monitor"``.
        env:    the variables a client needs (``PULSE_SERVER`` and friends), to merge into a
                subprocess environment; ``client_env()`` does that merge for you.
        tmpdir: the daemon's private directory (removed on stop).
        log:    path of the daemon's log file (its stderr), kept until stop() for diagnostics.
    """

    def __init__(self, rate: int = 16000, channels: int = 1, *, sink: str = SINK, start_timeout: float = 10.0):
        self.rate = int(rate)
        self.channels = int(channels)
        self.sink = sink
        self.start_timeout = start_timeout
        self.tmpdir: Path | None = None
        self.log: Path | None = None
        self.env: dict[str, str] = {}
        self._proc: subprocess.Popen | None = None
        self._players: list[subprocess.Popen] = []
        self._saved_environ: dict[str, str | None] | None = None

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> PulseServer:
        """Start the daemon and wait until the sink and default source exist."""
        ok, reason = pulse_available()
        if not ok:
            raise RuntimeError(reason)
        # Unix socket paths are limited to ~107 bytes, so fall back to /tmp if TMPDIR is deep.
        tmp = tempfile.mkdtemp(prefix="scoreq-pulse-")
        if len(tmp) > 80:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp = tempfile.mkdtemp(prefix="scoreq-pulse-", dir="/tmp")
        self.tmpdir = d = Path(tmp)
        try:
            self._start(d)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, d: Path) -> None:
        for sub in ("home", "run", "config", "state"):
            (d / sub).mkdir(mode=0o700)
        socket = d / "run" / "native"
        pa_file = d / "server.pa"
        pa_file.write_text(
            # Only what we need: no hardware detection, no restore/suspend modules
            # (they could change volumes or suspend the sink and break bit-exactness).
            # norewinds=1: with rewinds, the first ~1 ms of a newly started paplay stream
            # was lost (captured as zeros) because the monitor had already delivered
            # silence for the stretch the sink rewound into.
            f"load-module module-native-protocol-unix auth-anonymous=1 socket={socket}\n"
            f"load-module module-null-sink sink_name={self.sink} format=s16le rate={self.rate} "
            f"channels={self.channels} norewinds=1 sink_properties=device.description={self.sink}\n"
            f"set-default-sink {self.sink}\n"
            f"set-default-source {self.sink}.monitor\n"
        )
        # Own daemon.conf so /etc/pulse/daemon.conf is not read.
        daemon_conf = d / "daemon.conf"
        daemon_conf.write_text(
            f"default-sample-format = s16le\ndefault-sample-rate = {self.rate}\n"
            f"default-sample-channels = {self.channels}\navoid-resampling = yes\nflat-volumes = no\n"
        )
        # Clients must never autospawn a daemon of their own (e.g. with the user's config).
        client_conf = d / "client.conf"
        client_conf.write_text("autospawn = no\n")

        self.env = {
            "PULSE_SERVER": f"unix:{socket}",
            "PULSE_CLIENTCONFIG": str(client_conf),
            # libpulse would otherwise create ~/.config/pulse/cookie in the real HOME.
            "PULSE_COOKIE": str(d / "cookie"),
        }
        daemon_env = {k: v for k, v in os.environ.items() if not k.startswith(("PULSE_", "DBUS_", "XDG_"))}
        daemon_env.pop("DISPLAY", None)
        daemon_env.update(
            HOME=str(d / "home"),
            XDG_RUNTIME_DIR=str(d / "run"),
            XDG_CONFIG_HOME=str(d / "config"),
            XDG_STATE_HOME=str(d / "state"),
            PULSE_RUNTIME_PATH=str(d / "run"),
            PULSE_STATE_PATH=str(d / "state"),
            PULSE_CONFIG=str(daemon_conf),
            PULSE_CLIENTCONFIG=str(client_conf),
            PULSE_COOKIE=str(d / "cookie"),
        )
        self.log = d / "pulseaudio.log"
        with open(self.log, "wb") as log:
            self._proc = subprocess.Popen(
                [
                    "pulseaudio", "-n", "-F", str(pa_file),
                    "--daemonize=no", "--exit-idle-time=-1", "--system=no",
                    "--use-pid-file=no",  # private runtime dir anyway; avoids stale-pid trouble
                    "--realtime=no", "--high-priority=no",  # no rtkit / D-Bus on CI
                    "--log-target=stderr", "--log-level=notice",
                ],
                env=daemon_env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C in the terminal goes to pytest, we stop it ourselves
            )
        self._wait_ready()

    def _wait_ready(self) -> None:
        # The .pa script runs top to bottom, so once the default source is ours, all is loaded.
        want = f"Default Source: {self.sink}.monitor"
        deadline = time.monotonic() + self.start_timeout
        last = ""
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"pulseaudio exited with code {self._proc.returncode}:\n{self._log_tail()}")
            try:
                r = subprocess.run(
                    ["pactl", "info"], env=self.client_env(), capture_output=True, text=True, timeout=5
                )
                last = r.stdout + r.stderr
                if r.returncode == 0 and want in r.stdout:
                    return
            except subprocess.TimeoutExpired:
                last = "pactl info timed out"
            time.sleep(0.05)
        raise RuntimeError(
            f"pulseaudio not ready after {self.start_timeout:.0f} s; last pactl output:\n{last}\n"
            f"daemon log:\n{self._log_tail()}"
        )

    def stop(self) -> None:
        """Stop players and the daemon (SIGTERM, then SIGKILL), restore os.environ, remove tmpdir.

        Safe to call more than once; bounded to a few seconds.
        """
        for p in self._players:
            stop_process(p, grace=1.0)
        self._players.clear()
        if self._proc is not None:
            stop_process(self._proc, grace=3.0)
            self._proc = None
        if self._saved_environ is not None:
            for k, v in self._saved_environ.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            self._saved_environ = None
        if self.tmpdir is not None:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            self.tmpdir = None

    def __enter__(self) -> PulseServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- for clients -------------------------------------------------------

    def client_env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """Return ``base`` (default: ``os.environ``) with ``self.env`` applied, for ``subprocess``."""
        merged = dict(os.environ if base is None else base)
        merged.update(self.env)
        return merged

    def apply_env(self) -> None:
        """Put ``self.env`` into ``os.environ`` (restored by ``stop()``).

        Only helps PortAudio if it is initialised afterwards, i.e. call this before the
        first ``import sounddevice`` in the process.
        """
        if self._saved_environ is None:
            self._saved_environ = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)

    def play(self, path: str | os.PathLike, **popen_kwargs) -> subprocess.Popen:
        """Start ``paplay -d <sink> path`` and return the Popen (not waited for).

        Playback runs in real time. The file is delivered bit-exact when its rate and
        channel count equal the sink's. Any player still running is killed by ``stop()``.
        """
        if self._proc is None:
            raise RuntimeError("PulseServer is not running")
        popen_kwargs.setdefault("stdin", subprocess.DEVNULL)
        p = subprocess.Popen(["paplay", "-d", self.sink, str(path)], env=self.client_env(), **popen_kwargs)
        self._players.append(p)
        return p

    def _log_tail(self, n: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except (OSError, AttributeError):
            return "(no log)"


def require_pulse() -> None:
    """Skip the calling test if PulseAudio/PortAudio are missing; fail instead on CI.

    CI installs them (``.ci/install-system.sh``), so there a skip would hide a broken
    install step.
    """
    import pytest

    ok, reason = pulse_available()
    if not ok:
        if os.environ.get("CI"):
            pytest.fail(f"CI is set but {reason}")
        pytest.skip(reason)


try:
    import pytest as _pytest
except ImportError:  # pragma: no cover - the helper class also works without pytest
    pass
else:

    @_pytest.fixture
    def pulse_server():
        """A running ``PulseServer(rate=16000, channels=1)``; skips if PulseAudio is missing (fails on CI).

        Imported into ``tests/conftest.py``, so every test module can request it.
        """
        require_pulse()
        with PulseServer() as srv:
            yield srv
