#!/usr/bin/env bash
# Install the Debian packages the test suite needs (CI and developer machines).
# Idempotent: only packages that are not installed yet are passed to apt-get.
# Must run as root (or with sudo available).
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
)

missing=()
for pkg in "${PACKAGES[@]}"; do
    # dpkg-query prints "install ok installed" only for fully installed packages.
    if [[ "$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)" != "install ok installed" ]]; then
        missing+=("$pkg")
    fi
done

if ((${#missing[@]} == 0)); then
    echo "install-system: all system packages present: ${PACKAGES[*]}"
    exit 0
fi

SUDO=()
if ((EUID != 0)); then
    SUDO=(sudo)
fi

echo "install-system: installing: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update -qq
"${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
echo "install-system: done"
