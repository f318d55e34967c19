#!/usr/bin/env bash
# Install ccus-touch on a device (Raspberry Pi OS / Debian) the way deploy/systemd/*.service
# expect it: the venv in /opt/ccus-touch/venv, the `ccus` user, /etc/ccus-touch (config, keys),
# /var/lib/ccus-touch (state), the units in /etc/systemd/system. docs/operations.md describes it.
#
#   sudo deploy/install.sh                 an agent (the base install: no extras)
#   sudo deploy/install.sh --sink          also the cloud sink: [sink] extra, ccus-sink user and unit
#   deploy/install.sh --root DIR           everything under DIR, the system untouched (CI, images):
#                                          users go into DIR/etc/passwd, owners are their ids there
#
# Options: --root DIR (or DESTDIR=DIR), --src DIR (the project to install; default: this
# checkout), --python PY (default: python3), --extras LIST (pip extras, comma-separated).
# Safe to run again: existing config files are kept, the venv is upgraded in place.
set -euo pipefail

say() { printf '[install] %s\n' "$*" >&2; }
die() { printf '[install] error: %s\n' "$*" >&2; exit 1; }

ROOT=${DESTDIR:-/}
SRC=$(cd "$(dirname "$0")/.." && pwd)
PY=python3
EXTRAS=""
SINK=0
while [ $# -gt 0 ]; do
    case "$1" in
        --root) ROOT=${2:?--root needs a folder}; shift 2 ;;
        --src) SRC=${2:?--src needs a folder}; shift 2 ;;
        --python) PY=${2:?--python needs an interpreter}; shift 2 ;;
        --extras) EXTRAS=${2:?--extras needs a list}; shift 2 ;;
        --sink) SINK=1; shift ;;
        -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done
[ -f "$SRC/pyproject.toml" ] || die "$SRC has no pyproject.toml: point --src at the ccus-touch checkout"
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null ||
    die "$PY is not Python 3.11 or newer (Raspberry Pi OS bookworm has 3.11: apt-get install python3-venv)"
mkdir -p "$ROOT"
ROOT=$(cd "$ROOT" && pwd)
[ "$ROOT" = / ] && P="" || P=$ROOT     # P prefixes every path; empty for the real system
[ "$SINK" -eq 1 ] && EXTRAS=${EXTRAS:+$EXTRAS,}sink
[ "$(id -u)" -eq 0 ] || [ -n "$P" ] || die "run it as root (sudo), or with --root DIR"

# -- users ------------------------------------------------------------------------------------
# Under --root the accounts go into DIR/etc/{passwd,group} (useradd --prefix), never the host's.
PREFIX_ARGS=()
if [ -n "$P" ]; then
    mkdir -p "$P/etc"
    for f in passwd group shadow gshadow; do [ -e "$P/etc/$f" ] || : >"$P/etc/$f"; done
    chmod 600 "$P/etc/shadow" "$P/etc/gshadow"
    PREFIX_ARGS=(--prefix "$P")
fi
in_db() { if [ -n "$P" ]; then grep -q "^$2:" "$P/etc/$1"; else getent "$1" "$2" >/dev/null; fi; }
id_of() { # id_of passwd|group NAME -> numeric id (from the tree under --root)
    if [ "$2" = root ]; then echo 0
    elif [ -n "$P" ]; then awk -F: -v n="$2" '$1 == n { print $3 }' "$P/etc/$1"
    else getent "$1" "$2" | cut -d: -f3; fi
}
add_group() { in_db group "$1" || groupadd "${PREFIX_ARGS[@]}" --system "$1"; }
add_user() { # add_user NAME HOME [SUPPLEMENTARY,GROUPS]
    add_group "$1"
    if ! in_db passwd "$1"; then
        say "creating system user $1"
        useradd "${PREFIX_ARGS[@]}" --system --gid "$1" --home-dir "$2" --no-create-home \
            --shell /usr/sbin/nologin --comment "ccus-touch" "$1"
    fi
    if [ -n "${3:-}" ]; then
        local g
        for g in ${3//,/ }; do add_group "$g"; done
        usermod "${PREFIX_ARGS[@]}" -a -G "$3" "$1"
    fi
}
# plugdev: USB readers (nfcpy); dialout: the controller board's serial port
add_user ccus /var/lib/ccus-touch plugdev,dialout
[ "$SINK" -eq 1 ] && add_user ccus-sink /var/lib/ccus-sink

own() { # own USER GROUP MODE PATH...
    local u=$1 g=$2 m=$3
    shift 3
    chown "$(id_of passwd "$u")":"$(id_of group "$g")" "$@"
    chmod "$m" "$@"
}

# -- folders ------------------------------------------------------------------------------------
install -d -m 0755 "$P/opt/ccus-touch" "$P/etc/systemd/system" "$P/usr/share/doc/ccus-touch"
install -d "$P/etc/ccus-touch" "$P/etc/ccus-touch/keys" "$P/var/lib/ccus-touch"
own root ccus 0750 "$P/etc/ccus-touch"          # the agent reads its config, never writes it
own root ccus 0750 "$P/etc/ccus-touch/keys"     # trusted operator public keys (*.pub)
own ccus ccus 0750 "$P/var/lib/ccus-touch"      # outbox, applied config, ID lists
if [ ! -e "$P/etc/ccus-touch/agent.toml" ]; then
    install -m 0640 "$SRC/deploy/etc/ccus-touch/agent.toml" "$P/etc/ccus-touch/agent.toml"
    own root ccus 0640 "$P/etc/ccus-touch/agent.toml"
    say "wrote the example /etc/ccus-touch/agent.toml: put the one from \`ccus ops site add\` there"
fi
install -m 0644 "$SRC/deploy/etc/ccus-touch/keys/README" "$P/etc/ccus-touch/keys/README"
if [ "$SINK" -eq 1 ]; then
    install -d "$P/var/lib/ccus-sink"
    own ccus-sink ccus-sink 0750 "$P/var/lib/ccus-sink"
    if [ ! -e "$P/etc/ccus-touch/sink.env" ]; then
        install -m 0640 "$SRC/deploy/etc/ccus-touch/sink.env" "$P/etc/ccus-touch/sink.env"
        own root ccus-sink 0640 "$P/etc/ccus-touch/sink.env"
    fi
fi
install -m 0644 "$SRC"/docs/*.md "$P/usr/share/doc/ccus-touch/"   # the units' Documentation=

# -- the venv -----------------------------------------------------------------------------------
VENV=$P/opt/ccus-touch/venv
if [ ! -x "$VENV/bin/python" ]; then
    say "creating $VENV"
    "$PY" -m venv "$VENV" || die "'$PY -m venv' failed: apt-get install python3-venv"
fi
TARGET=$SRC
[ -n "$EXTRAS" ] && TARGET="$SRC[$EXTRAS]"
say "installing ccus-touch${EXTRAS:+[$EXTRAS]} into $VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade "$TARGET" ||
    die "pip install failed (above); on a Pi without a wheel for a package, apt-get install python3-dev gcc"
"$VENV/bin/ccus" --version >/dev/null || die "$VENV/bin/ccus does not run"

# -- the units ----------------------------------------------------------------------------------
install -m 0644 "$SRC/deploy/systemd/ccus-agent.service" "$P/etc/systemd/system/"
[ "$SINK" -eq 1 ] && install -m 0644 "$SRC/deploy/systemd/ccus-sink.service" "$P/etc/systemd/system/"
if [ -z "$P" ] && command -v systemctl >/dev/null 2>&1; then
    systemctl daemon-reload
    say "check it, then start it:  ccus agent --check --config /etc/ccus-touch/agent.toml"
    say "                          systemctl enable --now ccus-agent"
fi
say "done: $(${VENV}/bin/ccus --version)"
