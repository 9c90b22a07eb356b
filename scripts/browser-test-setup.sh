#!/usr/bin/env bash
# The headless browser for tests/serve_browser.rs (the `ftrun serve` web page): Debian's
# chromium and its chromedriver. Prints `CHROMIUM=<path>` and `CHROMEDRIVER=<path>`.
#
#   scripts/browser-test-setup.sh            find them; exit 3 when they are not installed
#   scripts/browser-test-setup.sh --install  install them with apt-get first if missing
#                                            (as root, or through passwordless sudo)
set -euo pipefail

find_browser() {
    CHROMIUM=$(command -v chromium || command -v chromium-browser || true)
    CHROMEDRIVER=$(command -v chromedriver || true)
    # Debian ships the driver outside PATH on some releases.
    if [[ -z "$CHROMEDRIVER" && -x /usr/lib/chromium/chromedriver ]]; then
        CHROMEDRIVER=/usr/lib/chromium/chromedriver
    fi
    [[ -n "$CHROMIUM" && -n "$CHROMEDRIVER" ]]
}

if ! find_browser; then
    if [[ "${1:-}" != "--install" ]]; then
        echo "chromium and chromedriver are not installed (run $0 --install, or" \
             "apt-get install chromium chromium-driver)" >&2
        exit 3
    fi
    if [[ $(id -u) -eq 0 ]]; then
        SUDO=()
    elif sudo -n true 2>/dev/null; then
        SUDO=(sudo -n)
    else
        echo "installing chromium needs root or passwordless sudo" >&2
        exit 1
    fi
    echo "installing chromium and chromium-driver with apt-get" >&2
    "${SUDO[@]}" apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -qq --no-install-recommends \
        chromium chromium-driver >&2
    find_browser || { echo "chromium was installed but is not on PATH" >&2; exit 1; }
fi
echo "CHROMIUM=$CHROMIUM"
echo "CHROMEDRIVER=$CHROMEDRIVER"
