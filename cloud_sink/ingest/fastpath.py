"""The writer's hot path (pure): a well-formed touch payload straight to its store row, no Touch.

Rules of this file:

- fast_row() accepts a strict subset of what protocol.touch.decode accepts and declines
  (None) anything it is not sure of; a declined payload takes the full path (cloud_sink.validate,
  then derive.rows.touch_row) for its exact Touch or dead letter.
- It only checks; the row itself is built by derive.rows.row_of, the one row builder the full
  path uses too, so the two paths cannot give different rows (tests/test_sink_fastpath.py checks
  both against random and mutated payloads).
"""

import io

import cbor2

from cloud_sink.derive.rows import Row, row_of
from cloud_sink.model import Policy
from protocol import topics
from protocol.reasons import Reason
from protocol.timequality import TimeQuality
from protocol.touch import (
    FACT_KEY,
    MAX_FACTS,
    MAX_PAYLOAD,
    MAX_SEQ,
    MAX_TS_MS,
    TECHNICIAN_ID,
    CardTech,
    Decision,
    Role,
    fact_text_ok,
)

_ROLES = frozenset(r.value for r in Role)
_TQS = frozenset(q.value for q in TimeQuality)
_CTS = frozenset(c.value for c in CardTech)
_DECS = frozenset(d.value for d in Decision)
_RSNS = frozenset(r.value for r in Reason)
_FACT_TYPES = (str, int, bool)
_MIN_FACT_INT = -(2**63)


def fast_row(topic: str, payload: bytes, received_ms: int, policy: Policy) -> Row | None:
    """The store row of a well-formed v1 touch on its device's topic, or None (full path)."""
    if len(payload) > MAX_PAYLOAD:
        return None
    where = topics.parse_device_topic(topic)
    if where is None or where[2] != "touch":
        return None
    fp = io.BytesIO(payload)
    try:
        m = cbor2.CBORDecoder(fp).decode()
    except Exception:  # noqa: BLE001 - the full path says which error
        return None
    if fp.tell() != len(payload) or type(m) is not dict:
        return None
    g = m.get
    v, dev, site, role, seq, ts = g("v"), g("dev"), g("site"), g("role"), g("seq"), g("ts")
    tq, card, ct, tid, dec, rsn = g("tq"), g("card"), g("ct"), g("tid"), g("dec"), g("rsn")
    lv, cv, x = g("lv"), g("cv"), g("x")
    if (type(v) is not int or v != 1 or dev != where[1] or site != where[0]
            or type(dev) is not str or type(site) is not str
            or type(role) is not str or role not in _ROLES
            or type(seq) is not int or not 1 <= seq <= MAX_SEQ
            or type(ts) is not int or not 0 <= ts <= MAX_TS_MS
            or type(tq) is not str or tq not in _TQS
            or type(card) is not bytes or len(card) > 32
            or type(ct) is not str or ct not in _CTS
            or type(dec) is not str or dec not in _DECS
            or type(rsn) is not str or rsn not in _RSNS
            or type(lv) is not int or not 0 <= lv <= MAX_SEQ
            or type(cv) is not int or not 0 <= cv <= MAX_SEQ
            or type(x) is not dict or len(x) > MAX_FACTS
            or (tid is not None and (type(tid) is not str or not TECHNICIAN_ID.match(tid)))):
        return None
    for k, fv in x.items():
        if type(k) is not str or not FACT_KEY.match(k) or type(fv) not in _FACT_TYPES:
            return None
        if type(fv) is str:
            if not fact_text_ok(fv):
                return None
        elif type(fv) is int and not _MIN_FACT_INT <= fv <= MAX_SEQ:
            return None
    if role == "gate" and x.get("dir") not in ("in", "out"):
        return None
    return row_of(dev, seq, site, role, ts, tq, card, ct, tid, dec, rsn, lv, cv, x,
                  received_ms, policy)
