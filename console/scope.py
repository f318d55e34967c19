"""Who may see what (pure): a table of the pages each role opens, and the scope checks.

operator: everything, read-only. site_manager: their sites. contractor: their sites and their
own vending billing. training: their center (its site ID). Anything else is 403.
"""

from __future__ import annotations

from collections.abc import Iterable

from console.users import User

ALL = frozenset({"operator", "site_manager", "contractor", "training"})
# page -> roles that may open it at all; the object checks (site, contractor, center) come after
PAGES: dict[str, frozenset[str]] = {
    "fleet": ALL,
    "sites": ALL,
    "live": ALL,
    "onsite": frozenset({"operator", "site_manager", "contractor"}),
    "work_history": frozenset({"operator", "site_manager", "contractor"}),
    "days_worked": frozenset({"operator", "site_manager", "contractor"}),
    "technician": frozenset({"operator", "site_manager", "contractor"}),
    "training": frozenset({"operator", "training"}),
    "vending": frozenset({"operator", "contractor"}),
    "ops": frozenset({"operator"}),
}


def may_open(user: User, page: str) -> bool:
    return user.role in PAGES.get(page, frozenset())


def sites_of(user: User) -> tuple[str, ...] | None:
    """The sites a user sees; None means all (operator)."""
    if user.role == "operator":
        return None
    if user.role == "training":
        return user.centers
    return user.sites


def may_site(user: User, site: str) -> bool:
    s = sites_of(user)
    return s is None or site in s


def may_contractor(user: User, contractor: str) -> bool:
    return user.role == "operator" or (user.role == "contractor" and contractor in user.contractors)


def may_center(user: User, center: str) -> bool:
    return user.role == "operator" or (user.role == "training" and center in user.centers)


def visible_sites(user: User, known: Iterable[str]) -> list[str]:
    s = sites_of(user)
    return sorted(set(known) if s is None else set(s))
