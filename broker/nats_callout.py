"""The secure NATS tier's auth callout service: binds each connection's MQTT client id to its
certificate (NATS 2.10 and later; broker/callout_rule.py decides). One per node, started and
stopped with it by broker/nats.py: ``python -m broker.nats_callout --bundle B --servers URL``.

Rules of this file:

- NATS sends every connection but the callout user's on ``$SYS.REQ.USER.AUTH`` (in the bundle's
  ``callout.conf``: account AUTH, issuer the public key of ``callout.seed``) as a JWT signed by
  the server; the service answers on the request's reply subject with an authorization
  response JWT (subject the request's user nkey, audience the server's id) carrying a user JWT
  (the user's permissions, audience the account CCUS), both signed with the issuer's account
  nkey (nkeys). Refused: the response carries the reason instead, and one WARNING line says it.
- The services of all nodes share the queue group ``ccus-callout``: any one answers any node,
  so a node's loss does not stop the others' logins.
- It logs in natively over TLS with the bundle's callout certificate (pinned like the other
  client certificates) and the callout user's password (``callout.pass``, mode 0600).
- The users file (``callout.json``, from `ccus ops nats-auth`) is read again when it changes:
  a user removed there can no longer connect (its live connections stay until they reconnect).
- The server's signature on a request is not checked: only the nodes can publish on
  ``$SYS.REQ.USER.AUTH`` (the callout user's permissions are NATS's own for auth users).
- A fault it cannot go past (bundle files missing, no node reachable at start) ends it with
  one line and exit 1; NATS disconnects are retried (nats-py reconnects).
"""

import argparse
import asyncio
import base64
import hashlib
import json
import logging
import signal
import ssl
import sys
import time
from pathlib import Path
from typing import Any

from broker.callout_rule import CalloutRefused, decide

log = logging.getLogger("ccus.nats_callout")

SUBJECT = "$SYS.REQ.USER.AUTH"
QUEUE = "ccus-callout"
ACCOUNT, AUTH_ACCOUNT, USER = "CCUS", "AUTH", "callout"
# the bundle's files (ops/nats_auth.py writes them)
CONF, USERS, SEED, PASSWORD = "callout.conf", "callout.json", "callout.seed", "callout.pass"
CERT, KEY = "callout.crt", "callout.key"
HEADER = {"typ": "JWT", "alg": "ed25519-nkey"}


def _b64(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def _unb64(s: str) -> bytes:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def encode_jwt(claims: dict[str, Any], kp: Any, now: float | None = None) -> str:
    """A NATS JWT (alg ed25519-nkey) of `claims`, issued and signed by the nkey pair `kp`; its
    ``jti`` is the base32 SHA-512/256-style hash of the claims, as nats-io/jwt makes it."""
    body = {**claims, "iat": int(now if now is not None else time.time()),
            "iss": kp.public_key.decode(), "jti": ""}
    digest = hashlib.sha512(json.dumps(body, separators=(",", ":")).encode()).digest()[:32]
    body["jti"] = base64.b32encode(digest).decode().rstrip("=")
    head = _b64(json.dumps(HEADER, separators=(",", ":")).encode())
    payload = _b64(json.dumps(body, separators=(",", ":")).encode())
    return f"{head}.{payload}.{_b64(kp.sign(f'{head}.{payload}'.encode()))}"


def decode_claims(token: str) -> dict[str, Any]:
    """The claims of a JWT (not verified: see the rules above); ValueError if it is none."""
    parts = token.split(".")
    if len(parts) != 3:
        raise ValueError("not a JWT")
    claims = json.loads(_unb64(parts[1]))
    if not isinstance(claims, dict):
        raise ValueError("JWT claims are not an object")
    return claims


def answer(request_token: str, users: dict[str, Any], kp: Any) -> tuple[str, str]:
    """(response JWT, "" or why refused) for one authorization request."""
    req = decode_claims(request_token)
    nats = req.get("nats") or {}
    user_nkey, server = nats.get("user_nkey", ""), (nats.get("server_id") or {}).get("id", "")
    response: dict[str, Any] = {"type": "authorization_response", "version": 2}
    why = ""
    try:
        user, granted = decide(req, users)
        response["jwt"] = encode_jwt({"sub": user_nkey, "aud": users.get("account", ACCOUNT),
                                      "name": user, "nats": granted}, kp)
    except CalloutRefused as exc:
        why = str(exc)
        response["error"] = why
    return encode_jwt({"sub": user_nkey, "aud": server, "nats": response}, kp), why


class Users:
    """The users file, read again whenever its mtime changes."""

    def __init__(self, path: Path) -> None:
        self.path, self._mtime = path, -1.0
        self.data: dict[str, Any] = {}

    def get(self) -> dict[str, Any]:
        mtime = self.path.stat().st_mtime
        if mtime != self._mtime:
            self.data, self._mtime = json.loads(self.path.read_text()), mtime
        return self.data


async def serve(bundle: Path, servers: list[str], stop: asyncio.Event,
                ready: Path | None = None) -> None:
    import nats
    import nkeys  # type: ignore[import-untyped]

    kp = nkeys.from_seed(bundle.joinpath(SEED).read_bytes().strip())
    users = Users(bundle / USERS)
    users.get()
    ctx = ssl.create_default_context(cafile=str(bundle / "ca.crt"))
    ctx.load_cert_chain(str(bundle / CERT), str(bundle / KEY))

    async def handle(msg: Any) -> None:
        try:
            token, why = answer(msg.data.decode(), users.get(), kp)
        except (ValueError, KeyError, OSError) as exc:
            log.warning("nats-callout: a request it could not read: %s", exc)
            return
        if why:
            log.warning("nats-callout: refused: %s", why)

        await msg.respond(token.encode())

    async def on_error(exc: Exception) -> None:
        log.warning("nats-callout: NATS: %s", str(exc) or type(exc).__name__)

    nc = await nats.connect(servers=servers, user=USER,
                            password=bundle.joinpath(PASSWORD).read_text().strip(), tls=ctx,
                            name="ccus-callout", max_reconnect_attempts=-1,
                            reconnect_time_wait=0.5, connect_timeout=2, error_cb=on_error)
    await nc.subscribe(SUBJECT, queue=QUEUE, cb=handle)
    await nc.flush()
    log.info("nats-callout: answering %s on %s", SUBJECT, ", ".join(servers))
    if ready is not None:   # broker/nats.py waits for it before anyone may log in
        ready.touch()
    await stop.wait()
    await nc.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m broker.nats_callout",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", required=True, help="the folder of `ccus ops nats-auth`")
    ap.add_argument("--servers", required=True, help="nats://HOST:PORT[,...] (its own node first)")
    ap.add_argument("--ready-file", help="touch this file once subscribed")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    bundle = Path(args.bundle)
    missing = [f for f in (CONF, USERS, SEED, PASSWORD, CERT, KEY, "ca.crt")
               if not (bundle / f).exists()]
    if missing:
        print(f"nats-callout: {bundle}: no {', '.join(missing)}: run `ccus ops nats-auth` "
              "again (it needs the [cluster] extra: nkeys)", file=sys.stderr)
        return 1

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(bundle, [s.strip() for s in args.servers.split(",") if s.strip()], stop,
                    Path(args.ready_file) if args.ready_file else None)

    try:
        asyncio.run(run())
    except (OSError, ssl.SSLError) as exc:
        print(f"nats-callout: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - nats-py's connect errors: one line for systemd
        print(f"nats-callout: cannot serve: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
