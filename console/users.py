"""The console's accounts: a TOML file of users, their role, scope and argon2 password hash.

Rules: a name is 1-64 of [A-Za-z0-9._@-]; roles are operator, site_manager, contractor and
training; a site manager needs a site, a contractor a site and a contractor (事業者ID), a
training center a center (its site ID); the file is written atomically with mode 0600.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from console import ConsoleError

ROLES = ("operator", "site_manager", "contractor", "training")
SCOPE_KINDS = ("site", "contractor", "center")
NAME = re.compile(r"^[A-Za-z0-9._@-]{1,64}$")
ID14 = re.compile(r"^[0-9]{14}$")
# what a role needs in its scope (at least one of each)
NEEDS = {"operator": (), "site_manager": ("site",), "contractor": ("site", "contractor"),
         "training": ("center",)}


@dataclass(frozen=True)
class User:
    name: str
    role: str
    password_hash: str
    sites: tuple[str, ...] = ()
    contractors: tuple[str, ...] = ()
    centers: tuple[str, ...] = ()
    extra: dict[str, str] = field(default_factory=dict, compare=False)


def parse_scope(items: list[str]) -> dict[str, tuple[str, ...]]:
    """['site:13100000000001', 'contractor:2000...'] -> {'site': (...), ...}; raises ConsoleError."""
    out: dict[str, list[str]] = {k: [] for k in SCOPE_KINDS}
    for item in items:
        for part in filter(None, (p.strip() for p in item.split(","))):
            kind, _, value = part.partition(":")
            if kind not in SCOPE_KINDS or not ID14.match(value):
                raise ConsoleError(f"scope {part!r}: use site:ID, contractor:ID or center:ID "
                                   "with a 14-digit ID")
            if value not in out[kind]:
                out[kind].append(value)
    return {k: tuple(v) for k, v in out.items()}


def check(user: User) -> User:
    if not NAME.match(user.name):
        raise ConsoleError(f"user name {user.name!r}: 1-64 of letters, digits and . _ @ -")
    if user.role not in ROLES:
        raise ConsoleError(f"user {user.name}: role {user.role!r} is not one of {', '.join(ROLES)}")
    have = {"site": user.sites, "contractor": user.contractors, "center": user.centers}
    for kind in NEEDS[user.role]:
        if not have[kind]:
            raise ConsoleError(f"user {user.name}: a {user.role} needs --scope {kind}:ID")
    return user


def load(path: str | Path) -> dict[str, User]:
    """All users by name; a missing or malformed file is a ConsoleError naming it."""
    p = Path(path)
    try:
        doc = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConsoleError(f"{p}: no users file; create one with `ccus console user add`") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConsoleError(f"{p}: cannot read the users file: {exc}") from None
    users: dict[str, User] = {}
    for name, entry in (doc.get("users") or {}).items():
        if not isinstance(entry, dict):
            raise ConsoleError(f"{p}: [users.{name}] is not a table")
        try:
            u = User(name, str(entry["role"]), str(entry["password_hash"]),
                     tuple(map(str, entry.get("sites", []))),
                     tuple(map(str, entry.get("contractors", []))),
                     tuple(map(str, entry.get("centers", []))))
        except (KeyError, TypeError) as exc:
            raise ConsoleError(f"{p}: [users.{name}] lacks {exc}") from None
        try:
            users[name] = check(u)
        except ConsoleError as exc:
            raise ConsoleError(f"{p}: {exc}") from None
    return users


def _q(s: str) -> str:
    # a JSON string is a TOML basic string for what check() lets through (no control chars)
    return json.dumps(s, ensure_ascii=False)


def dumps(users: dict[str, User]) -> str:
    lines = ["# ccus console users (ccus console user add); passwords are argon2id hashes", ""]
    for name in sorted(users):
        u = users[name]
        lines += [f"[users.{_q(name)}]", f"role = {_q(u.role)}",
                  f"password_hash = {_q(u.password_hash)}"]
        for key, vals in (("sites", u.sites), ("contractors", u.contractors),
                          ("centers", u.centers)):
            if vals:
                lines.append(f"{key} = [{', '.join(map(_q, vals))}]")
        lines.append("")
    return "\n".join(lines)


def save(path: str | Path, users: dict[str, User]) -> None:
    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(dumps(users))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, p)


def add(path: str | Path, user: User) -> bool:
    """Add or replace a user; True when it replaced one."""
    p = Path(path)
    users = load(p) if p.exists() else {}
    replaced = user.name in users
    users[user.name] = check(user)
    save(p, users)
    return replaced
