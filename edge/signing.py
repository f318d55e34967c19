"""Ed25519 operator keys and signed envelopes: what ID lists (and later config) are sealed with.

An envelope is a CBOR map {"v": 1, "kid": key id, "sig": 64 bytes, "body": bytes}. The
signature covers a domain tag plus the body, so a signature made for one purpose (an ID-list
manifest) can never be replayed as another (a config). `open_sealed` raises `SignatureError`
with a short reason code; it never raises anything else for bad input.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import cbor2
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edge.atomic import write_atomic, write_new
from edge.errors import EdgeError

ENVELOPE_VERSION = 1
_DOMAIN = b"ccus-touch/v1/"


class SignatureError(EdgeError, ValueError):
    """A sealed payload was refused; `reason` is a short machine-readable code."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def key_id(public_key: Ed25519PublicKey) -> str:
    """Short stable name for a public key (16 hex chars of its SHA-256): lets keys rotate."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def public_hex(public_key: Ed25519PublicKey) -> str:
    return public_key.public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def generate_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def write_keypair(private_path: str | Path, public_path: str | Path | None = None, *,
                  key: Ed25519PrivateKey | None = None) -> Ed25519PublicKey:
    """`ccus ops keygen`: write a new private key (PEM, mode 0600, never overwritten) and its
    public key (raw hex, one line) to `public_path` (default: private_path + '.pub').

    The private key is never printed or logged; callers show only the public key / key id.
    """
    key = key or generate_key()
    private_path = Path(private_path)
    public_path = Path(public_path) if public_path else private_path.with_name(
        private_path.name + ".pub")
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    write_new(private_path, pem, 0o600)  # never clobbers an existing key
    write_atomic(public_path, public_hex(key.public_key()) + "\n", mode=0o644)
    return key.public_key()


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path}: not an Ed25519 private key")
    return key


def load_public_key(source: str | bytes | Path | Ed25519PublicKey) -> Ed25519PublicKey:
    """A public key from raw bytes, a hex string, a PEM, or a file holding either."""
    if isinstance(source, Ed25519PublicKey):
        return source
    if isinstance(source, Path) or (isinstance(source, str) and os.path.exists(source)):
        source = Path(source).read_bytes()
    if isinstance(source, str):
        source = source.encode()
    data = bytes(source)
    if len(data) != 32:  # raw keys are taken as they are: they may end in whitespace bytes
        data = data.strip()
    if data.startswith(b"-----BEGIN"):
        key = serialization.load_pem_public_key(data)
        if not isinstance(key, Ed25519PublicKey):
            raise ValueError("not an Ed25519 public key")
        return key
    if len(data) == 64:
        data = bytes.fromhex(data.decode("ascii"))
    if len(data) != 32:
        raise ValueError("an Ed25519 public key is 32 raw bytes or 64 hex chars")
    return Ed25519PublicKey.from_public_bytes(data)


def _signed_bytes(purpose: str, body: bytes) -> bytes:
    return _DOMAIN + purpose.encode("ascii") + b"\x00" + body


def seal(key: Ed25519PrivateKey, purpose: str, document: Mapping[str, Any]) -> bytes:
    """Sign a CBOR document for `purpose` and wrap it in an envelope."""
    body = cbor2.dumps(dict(document), canonical=True)
    return cbor2.dumps({
        "v": ENVELOPE_VERSION,
        "kid": key_id(key.public_key()),
        "sig": key.sign(_signed_bytes(purpose, body)),
        "body": body,
    }, canonical=True)


def open_sealed(keys: Iterable[Ed25519PublicKey], purpose: str, payload: bytes) -> dict[str, Any]:
    """Verify an envelope against the trusted keys and return its document.

    Reasons: malformed, unknown_key, bad_signature.
    """
    try:
        env = cbor2.loads(payload)
    except Exception as exc:  # cbor2 raises several types (and more on odd input)
        raise SignatureError("malformed", f"envelope is not CBOR ({type(exc).__name__})") from None
    if (not isinstance(env, dict) or env.get("v") != ENVELOPE_VERSION
            or not isinstance(env.get("kid"), str) or not isinstance(env.get("sig"), bytes)
            or not isinstance(env.get("body"), bytes)):
        raise SignatureError("malformed", "not a v1 signed envelope")
    trusted = {key_id(k): k for k in keys}
    key = trusted.get(env["kid"])
    if key is None:
        raise SignatureError("unknown_key", f"key {env['kid']!r} is not trusted")
    try:
        key.verify(env["sig"], _signed_bytes(purpose, env["body"]))
    except InvalidSignature:
        raise SignatureError("bad_signature", "signature does not verify") from None
    try:
        doc = cbor2.loads(env["body"])
    except Exception as exc:
        raise SignatureError("malformed", f"signed body is not CBOR ({type(exc).__name__})") \
            from None
    if not isinstance(doc, dict):
        raise SignatureError("malformed", "signed body is not a map")
    return doc
