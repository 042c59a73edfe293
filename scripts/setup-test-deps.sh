#!/usr/bin/env bash
# Installs what the test suite needs beyond a Rust toolchain and the model: a Python
# virtual environment under target/ with the end-to-end tests' packages, and Debian's
# headless Chromium, its WebDriver, iptables and miniupnpd with its client (for the WAN lab
# in tests/wan) (only as
# root; otherwise it says what to install and stops). Safe to run again: it installs
# only what is missing.
#
#   scripts/setup-test-deps.sh        # prints the virtual environment's python
set -euo pipefail
cd "$(dirname "$0")/.."

venv=target/e2e-venv
debs=()

missing_debs() {
    debs=()
    command -v chromium >/dev/null 2>&1 || debs+=(chromium)
    command -v chromedriver >/dev/null 2>&1 || debs+=(chromium-driver)
    command -v iptables >/dev/null 2>&1 || debs+=(iptables)
    command -v miniupnpd >/dev/null 2>&1 || debs+=(miniupnpd-nftables)
    command -v upnpc >/dev/null 2>&1 || debs+=(miniupnpc)
    command -v nft >/dev/null 2>&1 || debs+=(nftables)
}

apt_install() {
    if [ "$(id -u)" != 0 ]; then
        echo "error: the tests need these Debian packages: $*" >&2
        echo "       install them (as root: apt-get install $*) and run this again" >&2
        exit 1
    fi
    echo "installing Debian packages: $* ..." >&2
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >&2
}

command -v python3 >/dev/null 2>&1 || apt_install python3 python3-venv
missing_debs
if [ ${#debs[@]} -gt 0 ]; then
    apt_install "${debs[@]}"
fi

if [ ! -x "$venv/bin/python" ]; then
    echo "creating the Python environment $venv ..." >&2
    mkdir -p target
    if ! python3 -m venv "$venv" >&2; then
        # Debian's Python lacks ensurepip until python3-venv is installed.
        rm -rf "$venv"
        apt_install python3-venv
        python3 -m venv "$venv" >&2
    fi
fi
stamp="$venv/.requirements"
if ! cmp -s tests/e2e/requirements.txt "$stamp"; then
    echo "installing the end-to-end tests' Python packages into $venv ..." >&2
    "$venv/bin/python" -m pip install -q --disable-pip-version-check \
        -r tests/e2e/requirements.txt >&2
    cp tests/e2e/requirements.txt "$stamp"
fi
echo "$venv/bin/python"
