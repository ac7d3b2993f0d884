#!/usr/bin/env bash
# Install the Debian packages the test suite needs (CI and developer machines).
# Idempotent: only packages that are not installed yet are passed to apt-get.
# Must run as root (or with sudo available). Also grants sipp the capability
# its pcap play needs (see below), so the tests run as an ordinary user.
set -euo pipefail

# ---------------------------------------------------------------------------
# Packages, grouped by the tests that need them. Add new groups below.
#
# Microphone path (tests/pulse.py, tests/test_pulse_fixture.py, `--input mic`):
#   pulseaudio         - private daemon with a null sink whose monitor is the
#                        capture device (there is no sound card on CI)
#   pulseaudio-utils   - pactl (readiness check) and paplay (feeds the WAV file)
#   libportaudio2      - the PortAudio library python-sounddevice loads
#   libasound2-plugins - ALSA "pulse" PCM plugin, i.e. the "pulse" device that
#                        PortAudio lists (pulseaudio depends on it anyway; kept
#                        explicit because it is what PortAudio actually uses)
#
# Browser panel (tests/browser.py, tests/test_panel_browser.py):
#   chromium           - the real browser Playwright drives, headless (never
#                        Playwright's own browser downloads)
#   fonts-dejavu-core  - a font for the page text in screenshots
#
# RTP input (tests/rtp_tools.py, tests/test_rtp_tools.py, `rtp://` / pcap inputs):
#   ffmpeg             - real RTP sender (PCMU/PCMA/G.722/Opus over `-f rtp`,
#                        paced with `-re`) and the offline codec round trip the
#                        scores are compared against
#   sip-tester         - sipp: a second, independent RTP sender (a SIP call on
#                        loopback whose UAC replays RTP from a pcap file)
#   libcap2-bin        - setcap: sipp's pcap play writes UDP headers through a
#                        raw socket, which needs CAP_NET_RAW; granted to the
#                        sipp binary below, so that a non-root user can run it
#
# One feed for many monitors (tests/redis_tools.py, `--publish`, `feed --subscribe`):
#   redis-server       - the broker the tests start on a loopback port of their
#                        own (Debian's service is not used)
#
# Call records in PostgreSQL (tests/pg_tools.py, `--store postgresql://...`):
#   postgresql         - initdb/pg_ctl for a throwaway cluster the tests start on
#                        a loopback port of their own (Debian's own cluster/service
#                        is not used); the binaries live in
#                        /usr/lib/postgresql/<version>/bin, not on PATH
#
# SIP-aware monitoring (tests/test_sip.py, `sniff:IFACE`, `--siprec`):
#   tcpdump            - writes the capture of a live sipp call that `score` must
#                        read as the live capture did (same streams, same names)
#   baresip            - a real SIP user agent (its aufile module plays a WAV) whose
#                        call the monitor finds on loopback
# ---------------------------------------------------------------------------
PACKAGES=(
    # microphone path
    pulseaudio
    pulseaudio-utils
    libportaudio2
    libasound2-plugins
    # browser panel
    chromium
    fonts-dejavu-core
    # RTP input
    ffmpeg
    sip-tester
    libcap2-bin
    # one feed for many monitors
    redis-server
    # call records in PostgreSQL
    postgresql
    # SIP-aware monitoring
    tcpdump
    baresip
)

missing=()
for pkg in "${PACKAGES[@]}"; do
    # dpkg-query prints "install ok installed" only for fully installed packages.
    if [[ "$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)" != "install ok installed" ]]; then
        missing+=("$pkg")
    fi
done

SUDO=()
if ((EUID != 0)); then
    SUDO=(sudo)
fi

if ((${#missing[@]} == 0)); then
    echo "install-system: all system packages present: ${PACKAGES[*]}"
else
    echo "install-system: installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    "${SUDO[@]}" apt-get update -qq
    "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# sipp's play_pcap_audio opens a raw socket: give the binary CAP_NET_RAW
# (permitted + effective) so that the RTP tests need not run as root.
# Checked on every run, not only after an install: an upgrade of sip-tester
# replaces the binary, and with it the capability.
PATH="$PATH:/usr/sbin:/sbin"  # getcap/setcap live in sbin, not on a user's PATH
sipp_bin="$(readlink -f "$(command -v sipp)")"
if [[ "$(getcap "$sipp_bin")" != *cap_net_raw* ]]; then
    echo "install-system: granting cap_net_raw to $sipp_bin"
    "${SUDO[@]}" setcap cap_net_raw+ep "$sipp_bin"
fi
echo "install-system: done"
