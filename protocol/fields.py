"""Field checks both ends of the wire apply: ids, fact keys and fact text. Pure.

CCUS ids (技能者ID, 事業者ID, 現場ID) are 14 ASCII digits; no public check-digit rule is known, so
nothing more is checked. A device id is the operator's name for a device (the certificate CN).
"""

import re

DEVICE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}\Z")
SITE_ID = re.compile(r"[0-9]{14}\Z")        # 現場ID: 14 ASCII digits
TECHNICIAN_ID = re.compile(r"[0-9]{14}\Z")  # 技能者ID: 14 ASCII digits
BUSINESS_ID = re.compile(r"[0-9]{14}\Z")    # 事業者ID (a contractor): 14 ASCII digits
FACT_KEY = re.compile(r"[a-z][a-z0-9_]{0,31}\Z")
MAX_FACT_TEXT = 64


def fact_text_ok(s: str) -> bool:
    """A fact's text: at most 64 characters and no NUL, which no fact needs and which a
    PostgreSQL text column refuses (the sink's store would refuse the whole batch); and valid
    Unicode (a lone surrogate has no UTF-8, so the touch could not be encoded at all)."""
    if len(s) > MAX_FACT_TEXT or "\x00" in s:
        return False
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
