"""Ed25519 helpers: key files, sealed envelopes, and refusal reasons for bad input."""

import os
import stat

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.signing import (
    SignatureError,
    generate_key,
    key_id,
    load_private_key,
    load_public_key,
    open_sealed,
    public_hex,
    seal,
    write_keypair,
)

KEY = generate_key()
OTHER = generate_key()


def test_keygen_writes_private_key_0600_and_never_overwrites(tmp_path):
    path = tmp_path / "operator.key"
    pub = write_keypair(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert load_private_key(path).public_key() == pub
    assert load_public_key(tmp_path / "operator.key.pub") == pub
    assert (tmp_path / "operator.key.pub").read_text().strip() == public_hex(pub)
    before = path.read_bytes()
    with pytest.raises(FileExistsError):
        write_keypair(path)
    assert path.read_bytes() == before


def test_raw_public_keys_ending_in_whitespace_bytes_load_whole():
    for _ in range(5000):  # ~1 key in 40 has a raw form starting or ending in b" \t\n\r\v\f"
        pub = generate_key().public_key()
        raw = bytes.fromhex(public_hex(pub))
        if raw != raw.strip():
            break
    else:
        pytest.fail("no key with whitespace bytes at its ends in 5000 tries")
    assert load_public_key(raw) == pub


def test_public_key_forms_agree():
    pub = KEY.public_key()
    raw = bytes.fromhex(public_hex(pub))
    assert key_id(load_public_key(raw)) == key_id(load_public_key(public_hex(pub))) == key_id(pub)
    with pytest.raises(ValueError):
        load_public_key(b"short")


def test_seal_round_trip():
    doc = {"name": "main", "version": 7, "blob": b"\x00\x01"}
    assert open_sealed([OTHER.public_key(), KEY.public_key()], "p", seal(KEY, "p", doc)) == doc


@pytest.mark.parametrize("mutate, reason", [
    (lambda env: {**env, "kid": key_id(OTHER.public_key())}, "bad_signature"),
    (lambda env: {**env, "body": env["body"][:-1] + b"\x00"}, "bad_signature"),
    (lambda env: {**env, "sig": bytes(64)}, "bad_signature"),
    (lambda env: {**env, "kid": "0" * 16}, "unknown_key"),
    (lambda env: {**env, "v": 2}, "malformed"),
    (lambda env: [env], "malformed"),
])
def test_tampered_envelopes_are_refused_with_a_reason(mutate, reason):
    env = cbor2.loads(seal(KEY, "p", {"a": 1}))
    bad = cbor2.dumps(mutate(env))
    with pytest.raises(SignatureError) as exc:
        open_sealed([KEY.public_key(), OTHER.public_key()], "p", bad)
    assert exc.value.reason == reason


def test_signature_is_bound_to_its_purpose():
    with pytest.raises(SignatureError) as exc:
        open_sealed([KEY.public_key()], "config", seal(KEY, "idlist-manifest", {"a": 1}))
    assert exc.value.reason == "bad_signature"


def test_untrusted_signer_is_refused():
    with pytest.raises(SignatureError) as exc:
        open_sealed([KEY.public_key()], "p", seal(OTHER, "p", {"a": 1}))
    assert exc.value.reason == "unknown_key"


@settings(deadline=None)  # the machine is shared: time is not the property
@given(st.binary(max_size=300))
def test_arbitrary_bytes_raise_only_signature_error(data):
    with pytest.raises(SignatureError) as exc:
        open_sealed([KEY.public_key()], "p", data)
    assert exc.value.reason in {"malformed", "unknown_key", "bad_signature"}


@settings(deadline=None)  # the machine is shared: time is not the property
@given(st.integers(min_value=0, max_value=200), st.integers(min_value=1, max_value=255))
def test_any_single_byte_change_breaks_the_envelope(pos, xor):
    sealed = bytearray(seal(KEY, "p", {"name": "main", "version": 3, "h": bytes(32)}))
    pos %= len(sealed)
    sealed[pos] ^= xor
    try:
        doc = open_sealed([KEY.public_key()], "p", bytes(sealed))
    except SignatureError:
        return
    # CBOR can re-encode equal content differently only in the envelope, never the body.
    assert doc == {"name": "main", "version": 3, "h": bytes(32)}
