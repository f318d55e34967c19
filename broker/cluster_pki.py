"""Where `ccus cluster up --secure BUNDLE --pki PKI` finds the certificate of each process it
starts beside the nodes (the site bridge, the sinks, the agents), and what is missing.

Rules of this file:

- Pure: paths in, paths and problems out; nothing is issued here. The PKI layout is
  ops/provision.py's (``sites/{site}/bridge/bridge.*``, ``sinks/{name}/sink.*``,
  ``sites/{site}/devices/{dev}/device.*``); the CA is the bundle's ``ca.crt``.
- Every problem is one line naming the command that mends it. An identity whose certificate
  exists but that the bundle's ``auth.conf`` does not name (issued after the last
  `ccus ops nats-auth`) is a problem too: the nodes would refuse it at the handshake.
"""

import re
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Tls:
    """The TLS files of one client: the CA, its certificate and key."""

    ca: Path
    cert: Path
    key: Path


def users_of(auth_conf: str) -> set[str]:
    """The user names of a bundle's auth.conf (ops/nats_auth.py writes one JSON object a line)."""
    return set(re.findall(r'"user": "([^"]+)"', auth_conf))


def _one(pki: Path, bundle: Path, auth: set[str], folder: Path, stem: str, user: str,
         make: str) -> tuple[Tls | None, list[str]]:
    cert, key = folder / f"{stem}.crt", folder / f"{stem}.key"
    if not (cert.exists() and key.exists()):
        return None, [f"no {cert}: make it with `{make}`, then `ccus ops nats-auth --pki {pki} "
                      f"--out {bundle}`"]
    if user not in auth:
        return None, [f"{bundle}/auth.conf does not know {user} yet: run `ccus ops nats-auth "
                      f"--pki {pki} --out {bundle}` again"]
    return Tls(bundle / "ca.crt", cert, key), []


def secure_files(pki: Path, bundle: Path, *, site: str | None, sinks: int, devices: list[str],
                 agents_site: str) -> tuple[dict[str, Tls], list[str]]:
    """{"bridge" | "sink-N" | DEVICE: Tls} for what `cluster up` will start (`devices`: the
    agents straight on the nodes; those behind the site broker connect to it in plain), and
    the problems."""
    try:
        auth = users_of((bundle / "auth.conf").read_text())
    except OSError:
        return {}, [f"no {bundle}/auth.conf: make it with `ccus ops nats-auth --pki {pki} "
                    f"--out {bundle}`"]
    files: dict[str, Tls] = {}
    problems: list[str] = []
    # (name, folder, file stem, its NATS user as ops/nats_auth.py names it, the command)
    wanted: list[tuple[str, Path, str, str, str]] = []
    if site:
        wanted.append(("bridge", pki / "sites" / site / "bridge", "bridge",
                       f"CN=bridge:{site},OU=bridge", f"ccus ops site add --pki {pki} --site {site}"))
    for i in range(1, sinks + 1):
        wanted.append((f"sink-{i}", pki / "sinks" / f"sink-{i}", "sink", f"CN=sink:sink-{i},OU=sink",
                       f"ccus ops identity --pki {pki} --kind sink --name sink-{i}"))
    for dev in devices:
        wanted.append((dev, pki / "sites" / agents_site / "devices" / dev, "device",
                       f"urn:ccus:{agents_site}:{dev}",
                       f"ccus ops site add --pki {pki} --site {agents_site} "
                       + " ".join(f"--device {d}" for d in devices)))
    for name, folder, stem, user, make in wanted:
        tls, why = _one(pki, bundle, auth, folder, stem, user, make)
        if tls is not None:
            files[name] = tls
        problems += [w for w in why if w not in problems]
    return files, problems
