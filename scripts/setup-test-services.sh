#!/usr/bin/env bash
# Services and programs the test suite needs beyond the private Mosquitto it starts itself
# (pcscd + vpcd, chromium, nats-server) and a PostgreSQL
# server on 127.0.0.1:5432 with a test role that may create databases (each test module makes
# its own database and drops it). Installs and starts what is missing; idempotent.
set -euo pipefail

say() { printf '\033[1m[services]\033[0m %s\n' "$*" >&2; }
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

PG_ROLE=ccus_test
PG_PASS=ccus_test   # a throwaway role for local tests on loopback only; not a secret

# PC/SC: pcscd and the virtual reader (vsmartcard-vpcd) that the PC/SC tests talk through
if ! [ -x /usr/sbin/pcscd ] || ! dpkg -s vsmartcard-vpcd >/dev/null 2>&1; then
    say "installing Debian's pcscd and vsmartcard-vpcd (the PC/SC tests' virtual reader)"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        pcscd vsmartcard-vpcd >/dev/null
fi

# vpcd listens on its fixed port 35963, inside Linux's ephemeral range (32768-60999): a test's
# free port (bind to 0) or outgoing connection that draws it makes pcscd fail with "Address
# already in use" (seen once in a full run). Reserve it: the kernel then never hands it out.
VPCD_PORT=35963
RESERVED=/proc/sys/net/ipv4/ip_local_reserved_ports
if [ -r "$RESERVED" ] && ! tr ',' '\n' < "$RESERVED" | grep -qx "$VPCD_PORT"; then
    cur=$(cat "$RESERVED")
    if as_root sysctl -qw net.ipv4.ip_local_reserved_ports="${cur:+$cur,}$VPCD_PORT" 2>/dev/null; then
        say "reserved port $VPCD_PORT (vpcd) from the ephemeral range"
    else
        say "could not reserve port $VPCD_PORT for vpcd (the PC/SC tests may meet it taken)"
    fi
fi

# the console's browser tests drive Debian's chromium through Playwright (Playwright's own
# browser download is never used: `playwright install` needs a network this CI lacks)
if ! [ -x /usr/bin/chromium ]; then
    say "installing Debian's chromium (the console's browser tests)"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        chromium >/dev/null
fi

# the cluster tier's tests start private NATS nodes (JetStream, MQTT) from Debian's nats-server
if ! [ -x /usr/sbin/nats-server ] && ! command -v nats-server >/dev/null 2>&1; then
    say "installing Debian's nats-server (the cluster tier's tests)"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        nats-server >/dev/null
fi

if ! command -v pg_ctlcluster >/dev/null 2>&1; then
    say "installing Debian's postgresql (the tests' production store backend)"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        postgresql >/dev/null
fi

# the store tier's HA tests (broker/pgha.py: monitor, primary, hot standby) run pg_autoctl
if ! command -v pg_autoctl >/dev/null 2>&1; then
    say "installing Debian's postgresql-15-auto-failover (the store tier's failover tests)"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        postgresql-15-auto-failover >/dev/null
fi

if ! pg_isready -q -h 127.0.0.1 -p 5432; then
    version=$(ls /etc/postgresql | sort -V | tail -n 1)
    say "starting PostgreSQL $version"
    as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start ||
        as_root pg_ctlcluster "$version" main start
    for _ in $(seq 50); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 0.2; done
fi

# The role: through loopback when it trusts us (this project's CI machines), else as the
# postgres system user over the local socket (a fresh Debian install).
sql="DO \$\$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$PG_ROLE') THEN
    CREATE ROLE $PG_ROLE LOGIN CREATEDB PASSWORD '$PG_PASS';
  END IF;
END \$\$;"
if ! PGPASSWORD=$PG_PASS psql -qtA -h 127.0.0.1 -U $PG_ROLE -d postgres -c 'select 1' >/dev/null 2>&1; then
    if psql -qtA -h 127.0.0.1 -U postgres -d postgres -w -c "$sql" >/dev/null 2>&1; then :
    else as_root su postgres -c "psql -qtA -d postgres -c \"$sql\"" >/dev/null
    fi
fi
PGPASSWORD=$PG_PASS psql -qtA -h 127.0.0.1 -U $PG_ROLE -d postgres -c 'select 1' >/dev/null ||
    { echo "PostgreSQL test role $PG_ROLE cannot log in on 127.0.0.1:5432" >&2; exit 1; }
