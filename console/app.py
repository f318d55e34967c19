"""The console's web app (Starlette): login, the pages, their CSV downloads and the SSE streams.

Rules: every route but `/`, `/login` and `/static` needs a session; a page or download the
user's role or scope does not cover answers 403 (the same for a guessed site, contractor or
center); every form carries the session's CSRF token; store reads run in the thread pool on
one store per thread, opened through cloud_sink.store.open_store like `ccus report`.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from operator import methodcaller
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup, escape
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from cloud_sink import report_cli
from cloud_sink.report_cli import COLUMNS
from cloud_sink.reports import output, shape
from cloud_sink.store import Store, open_store
from cloud_sink.workday import JST, local_time, work_day
from console import auth, i18n, scope, views
from console.live import Bridge, drain
from console.users import User, load
from ops import fleet

HERE = Path(__file__).parent
SESSION_S = 8 * 3600
HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; "
                               "frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
}
FLEET_THROTTLE_S = 0.5   # at most two fleet redraws a second per browser
PING_S = 15.0
LIVE_BATCH = 200         # touches per live SSE event at most (what is queued already, no waiting)


@dataclass
class Config:
    store_url: str
    users_path: Path
    secret: str
    secure_cookies: bool = True
    now_ms: Callable[[], int] = field(default=lambda: int(time.time() * 1000))


class Users:
    """The users file, read again when it changes (so `ccus console user add` needs no restart)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._mtime = -1.0
        self._users: dict[str, User] = {}
        self.get("")

    def get(self, name: str) -> User | None:
        m = self.path.stat().st_mtime
        if m != self._mtime:
            self._users, self._mtime = load(self.path), m
        return self._users.get(name)


class Stores(threading.local):
    store: Store | None = None


def month_now(now_ms: int) -> str:
    return work_day(now_ms)[:7]


def build_app(cfg: Config, bridge: Bridge) -> Starlette:
    users = Users(cfg.users_path)
    limiter = auth.RateLimiter()                          # per user name
    ip_limiter = auth.RateLimiter(limit=auth.IP_LIMIT)    # per client address: a guesser's many names
    local = Stores()
    opened: list[Store] = []
    env = Environment(loader=FileSystemLoader(HERE / "templates"),
                      autoescape=select_autoescape(["html"]), trim_blocks=True, lstrip_blocks=True)
    env.globals.update(fmt_date=i18n.fmt_date, fmt_month=i18n.fmt_month,
                       fmt_day=i18n.fmt_day_short, reason_words=i18n.reason)

    def store() -> Store:
        if local.store is None:
            local.store = open_store(cfg.store_url, create=False)   # the console only reads
            opened.append(local.store)
        return local.store

    async def read(fn: Callable[[Store], Any]) -> Any:
        return await run_in_threadpool(lambda: fn(store()))

    def lang_of(req: Request) -> str:
        q = req.query_params.get("lang")
        if q in i18n.LANGS:
            req.session["lang"] = q
        return str(req.session.get("lang", "ja"))

    def render(req: Request, template: str, status: int = 200, **ctx: Any) -> HTMLResponse:
        lang = lang_of(req)
        if "csrf" not in req.session:
            req.session["csrf"] = auth.new_token()
        other = "en" if lang == "ja" else "ja"
        toggle = req.url.path + "?" + urlencode({**req.query_params, "lang": other})
        user = ctx.pop("user", None)
        html = env.get_template(template).render(
            t=lambda k: i18n.t(k, lang), lang=lang, toggle=toggle, other=other, user=user,
            csrf=req.session["csrf"], path=req.url.path, may=lambda p: user is not None
            and scope.may_open(user, p), **ctx)
        return HTMLResponse(html, status, headers=HEADERS)

    def current(req: Request) -> User | None:
        name = req.session.get("user")
        if not name or req.session.get("exp", 0) < time.time():
            return None
        return users.get(str(name))

    def forbidden(req: Request, user: User) -> HTMLResponse:
        return render(req, "error.html", 403, user=user, message=i18n.t("forbidden", lang_of(req)))

    Handler = Callable[[Request, User], Awaitable[Response]]

    def page(name: str) -> Callable[[Handler], Callable[[Request], Awaitable[Response]]]:
        def wrap(fn: Handler) -> Callable[[Request], Awaitable[Response]]:
            async def endpoint(req: Request) -> Response:
                user = current(req)
                if user is None:
                    return RedirectResponse("/", 303)
                if not scope.may_open(user, name):
                    return forbidden(req, user)
                site = req.path_params.get("site")
                if site is not None and not scope.may_site(user, site):
                    return forbidden(req, user)
                try:
                    return await fn(req, user)
                except PermissionError:
                    return forbidden(req, user)
                except ValueError as exc:   # a bad month or day in the query
                    return render(req, "error.html", 400, user=user, message=str(exc))
            return endpoint
        return wrap

    def param_month(req: Request) -> str:
        m = req.query_params.get("month") or month_now(cfg.now_ms())
        dt.date.fromisoformat(f"{m}-01")   # ValueError for anything but YYYY-MM
        if len(m) != 7:
            raise ValueError(f"month {m!r}: use YYYY-MM")
        return m

    def csv_response(text: str, filename: str) -> Response:
        # a BOM so Excel shows the Japanese headers; the same bytes `ccus report --bom` writes
        return Response("\ufeff" + text, media_type="text/csv; charset=utf-8", headers={
            **HEADERS, "Content-Disposition": f'attachment; filename="{filename}"'})

    # -- login -----------------------------------------------------------------------------
    async def login_page(req: Request) -> Response:
        if current(req) is not None:
            return RedirectResponse("/fleet", 303)
        return render(req, "login.html", error=None)

    async def login(req: Request) -> Response:
        form = await req.form()
        lang = lang_of(req)
        if not auth.token_ok(req.session.get("csrf"), str(form.get("csrf", ""))):
            return render(req, "login.html", 403, error=i18n.t("forbidden", lang))
        name, password = str(form.get("user", ""))[:64], str(form.get("password", ""))
        ip = req.client.host if req.client else "?"
        now = time.monotonic()
        pairs = ((limiter, f"user:{name}"), (ip_limiter, f"ip:{ip}"))
        if any(lim.locked(k, now) for lim, k in pairs):
            wait = max(lim.retry_after(k, now) for lim, k in pairs)
            return render(req, "login.html", 429, error=i18n.t("locked", lang).format(s=int(wait) + 1))
        user = users.get(name)
        ok = await run_in_threadpool(auth.verify_password,
                                     user.password_hash if user else None, password)
        if not ok or user is None:
            for lim, k in pairs:
                lim.fail(k, now)
            return render(req, "login.html", 401, error=i18n.t("bad_login", lang))
        limiter.clear(pairs[0][1])
        req.session.clear()   # a new session (and CSRF token) at login: no fixation
        req.session.update({"user": user.name, "exp": time.time() + SESSION_S, "lang": lang,
                            "csrf": auth.new_token()})
        return RedirectResponse("/fleet" if user.role == "operator" else "/sites", 303)

    async def logout(req: Request) -> Response:
        form = await req.form()
        if not auth.token_ok(req.session.get("csrf"), str(form.get("csrf", ""))):
            return Response("CSRF token missing or wrong", 403, headers=HEADERS)
        req.session.clear()
        return RedirectResponse("/", 303)

    # -- fleet -----------------------------------------------------------------------------
    def fleet_rows(user: User) -> list[fleet.Row]:
        rows = fleet.fleet(bridge.snapshot(), cfg.now_ms())
        mine = scope.sites_of(user)
        return rows if mine is None else [r for r in rows if r.site in mine]

    def fleet_ctx(user: User, lang: str) -> dict[str, Any]:
        now = cfg.now_ms()
        rows = fleet_rows(user)
        return {"rows": rows, "problems": sum(bool(r.problems) for r in rows),
                "rows_html": Markup(views.fleet_rows_html(rows, now, lang))}

    @page("fleet")
    async def fleet_page(req: Request, user: User) -> Response:
        return render(req, "fleet.html", user=user, **fleet_ctx(user, lang_of(req)))

    @page("fleet")
    async def fleet_events(req: Request, user: User) -> Response:
        lang = lang_of(req)
        tmpl = env.get_template("_fleet_table.html")

        async def stream(lst: Any) -> AsyncIterator[str]:
            while True:
                try:
                    await asyncio.wait_for(lst.queue.get(), PING_S)
                except TimeoutError:
                    yield ": ping\n\n"
                    continue
                await asyncio.sleep(FLEET_THROTTLE_S)
                while not lst.queue.empty():
                    lst.queue.get_nowait()
                html = tmpl.render(t=lambda k: i18n.t(k, lang), lang=lang, **fleet_ctx(user, lang))
                yield sse("fleet", html)
        return sse_response(stream, None)

    def sse_response(stream: Callable[[Any], AsyncIterator[str]], site: str | None) -> Response:
        lst = bridge.listen(site)

        async def body() -> AsyncIterator[str]:
            try:
                yield ": connected\n\n"
                async for chunk in stream(lst):
                    yield chunk
            finally:
                bridge.unlisten(lst)
        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={**HEADERS, "Cache-Control": "no-store",
                                          "X-Accel-Buffering": "no"})

    # -- sites, live, on site --------------------------------------------------------------
    async def known_sites() -> list[str]:
        devs = await read(lambda s: s.devices())
        return sorted({d.site for d in devs} | {r.site for r in fleet.fleet(bridge.snapshot(), 0)})

    @page("sites")
    async def sites_page(req: Request, user: User) -> Response:
        sites = scope.visible_sites(user, await known_sites())
        return render(req, "sites.html", user=user, sites=sites, month=month_now(cfg.now_ms()))

    @page("live")
    async def live_page(req: Request, user: User) -> Response:
        return render(req, "live.html", user=user, site=req.path_params["site"],
                      denials=req.query_params.get("denials") == "1")

    @page("live")
    async def live_events(req: Request, user: User) -> Response:
        site = req.path_params["site"]
        lang = lang_of(req)
        denials = req.query_params.get("denials") == "1"
        tmpl = env.get_template("_touch_row.html")

        async def stream(lst: Any) -> AsyncIterator[str]:
            shown_dropped = 0
            while True:
                try:
                    first = await asyncio.wait_for(lst.queue.get(), PING_S)
                except TimeoutError:
                    yield ": ping\n\n"
                    continue
                batch = [t for _kind, t in drain(lst.queue, first, LIVE_BATCH)
                         if not denials or t.decision.value == "deny"]
                out = ""
                if batch:
                    # newest first: the page prepends each event (hx-swap="afterbegin")
                    out = sse("touch", "\n".join(
                        tmpl.render(t=lambda k: i18n.t(k, lang), lang=lang,
                                    reason_words=i18n.reason, passage_words=i18n.passage,
                                    r=views.touch_row(t)) for t in reversed(batch)))
                if lst.dropped != shown_dropped:
                    shown_dropped = lst.dropped
                    out += sse("dropped", escape(i18n.t("dropped", lang).format(n=shown_dropped)))
                if out:
                    yield out
        return sse_response(stream, site)

    @page("onsite")
    async def onsite_page(req: Request, user: User) -> Response:
        site = req.path_params["site"]
        day = req.query_params.get("day") or work_day(cfg.now_ms())
        dt.date.fromisoformat(day)
        # the last passage per technician-day, by the touches' own time (SqlStore.on_site)
        people = views.on_site(await read(lambda s: s.on_site(site, day)))
        # names and employers from the registry `ccus sink employers import` fills, if any
        known = {t.tid: t for t in await read(lambda s: s.technicians())}
        for p in people:
            t = known.get(p["technician"])
            p["name"], p["employer"] = (t.name, t.employer) if t else ("", "")
        return render(req, "onsite.html", user=user, site=site, day=day, people=people,
                      now=dt.datetime.now(JST).strftime("%H:%M"))

    # -- work history ----------------------------------------------------------------------
    async def wh_grid(req: Request) -> views.Grid:
        site, month = req.path_params["site"], param_month(req)
        days = await read(lambda s: s.work_history(site, month))
        return views.grid(site, month, days)

    @page("work_history")
    async def wh_page(req: Request, user: User) -> Response:
        g = await wh_grid(req)
        rows_html = Markup(views.grid_rows_html(g, lang_of(req)))
        return render(req, "work_history.html", user=user, g=g, site=g.site, month=g.month,
                      rows_html=rows_html)

    @page("work_history")
    async def wh_csv(req: Request, user: User) -> Response:
        g = await wh_grid(req)
        return csv_response(g.csv(), f"work-history-{g.site}-{g.month}.csv")

    @page("technician")
    async def technician_page(req: Request, user: User) -> Response:
        """One technician's month across the sites the user sees."""
        tid, month = req.path_params["tid"], param_month(req)
        if not (len(tid) == 14 and tid.isdigit()):
            raise ValueError(f"technician {tid!r}: a 14-digit technician ID")
        days = await read(lambda s: s.work_history(None, month))
        mine = scope.sites_of(user)
        rows = [r for r in shape.work_history([d for d in days if d.tid == tid])
                if mine is None or r["site"] in mine]
        rows.sort(key=lambda r: (r["work_day"], r["site"]))
        return render(req, "technician.html", user=user, tid=tid, month=month, rows=rows,
                      columns=COLUMNS["work-history"])

    # -- reports ---------------------------------------------------------------------------
    def check_site(user: User, site: str | None) -> None:
        if site and not scope.may_site(user, site):
            raise PermissionError(site)

    async def days_rows(req: Request, user: User) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        month, site = param_month(req), req.query_params.get("site") or None
        check_site(user, site)
        rows = shape.days_worked(await read(lambda s: s.days_worked(site, month)))
        mine = scope.sites_of(user)
        if mine is not None:
            rows = [r for r in rows if r["site"] in mine]
        return rows, {"month": month, "site": site or ""}

    def my_centers(user: User, center: str | None) -> list[str | None]:
        if center and not scope.may_center(user, center):
            raise PermissionError(center)
        if center or user.role == "operator":
            return [center]
        return list(user.centers)

    async def training_rows(req: Request, user: User) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        month, center = req.query_params.get("month") or None, req.query_params.get("center") or None
        if month:
            param_month(req)
        rows: list[dict[str, Any]] = []
        for c in my_centers(user, center):   # the `ccus report training-monthly` rows per center
            rows += await read(partial(report_cli.training_monthly_rows, site=c, first=month, last=month))
        return rows, {"month": month or "", "center": center or ""}

    async def course_rows(req: Request, user: User) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        center = req.query_params.get("center") or None
        rows: list[dict[str, Any]] = []
        for c in my_centers(user, center):
            rows += await read(partial(report_cli.training_course_rows, site=c))
        return rows, {"center": center or ""}

    async def vending_rows(req: Request, user: User) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        month = req.query_params.get("month") or None
        if month:
            param_month(req)
        contractor = req.query_params.get("contractor") or None
        if contractor and not scope.may_contractor(user, contractor):
            raise PermissionError(contractor)
        wanted = [contractor] if contractor or user.role == "operator" else list(user.contractors)
        ledger = []
        for c in wanted:
            ledger += await read(methodcaller("vending_ledger", month, c))
        machines = req.query_params.get("machines") == "1"
        rows = shape.vending_machines(ledger) if machines else shape.vending_billing(ledger)
        return rows, {"month": month or "", "contractor": contractor or "",
                      "machines": "1" if machines else ""}

    REPORTS: dict[str, tuple[str, Callable[..., Awaitable[Any]], str, list[str], str]] = {
        # name: (page, rows, report columns key, chart series, chart label column)
        "days-worked": ("days_worked", days_rows, "days-worked", ["days"], "technician"),
        "training": ("training", training_rows, "training-monthly", ["persons", "touches"], "month"),
        "training-courses": ("training", course_rows, "training-courses",
                             ["enrolled", "persons"], "course"),
        "vending": ("vending", vending_rows, "vending",
                    ["dispensed", "failed", "indeterminate"], "contractor"),
    }

    def report_routes() -> list[Route]:
        out = []
        for name, (pg, rows_of, cols, series, label) in REPORTS.items():
            def make(name: str = name, pg: str = pg, rows_of: Any = rows_of, cols: str = cols,
                     series: list[str] = series, label: str = label) -> tuple[Any, Any]:
                @page(pg)
                async def html(req: Request, user: User) -> Response:
                    rows, filters = await rows_of(req, user)
                    columns = COLUMNS["vending-machines" if filters.get("machines") else cols]
                    labels = [str(r[label]) for r in rows]
                    chart = views.bars(labels, [[float(r[s] or 0) for r in rows] for s in series],
                                       stacked=name == "vending")
                    q = urlencode({k: v for k, v in filters.items() if v})
                    return render(req, "report.html", user=user, name=name, page_key=pg,
                                  title_key=pg if name != "training-courses" else "training_courses",
                                  rows=rows, columns=columns, chart=chart, series=series,
                                  filters=filters, csv_url=f"/{name}.csv" + (f"?{q}" if q else ""))

                @page(pg)
                async def csv(req: Request, user: User) -> Response:
                    rows, filters = await rows_of(req, user)
                    columns = COLUMNS["vending-machines" if filters.get("machines") else cols]
                    return csv_response(output.to_csv(rows, columns), f"{name}.csv")
                return html, csv
            page_fn, csv_fn = make()
            out += [Route(f"/{name}", page_fn), Route(f"/{name}.csv", csv_fn)]
        return out

    # -- operations ------------------------------------------------------------------------
    @page("ops")
    async def ops_page(req: Request, user: User) -> Response:
        def gather(s: Store) -> dict[str, Any]:
            gaps = s.gaps() if hasattr(s, "gaps") else []
            return {"dead": s.dead_letters(50), "flagged": s.flagged(50), "gaps": gaps,
                    "counts": s.counts()}
        data = await read(gather)
        lists = [views.manifest_row(t, p) for t, p in sorted(bridge.manifest_snapshot().items())]
        configs, acks = bridge.config_snapshot()
        devices = [(r.site, r.dev) for r in fleet.fleet(bridge.snapshot(), cfg.now_ms())]
        pushes = views.config_rows(configs, acks, devices)
        return render(req, "ops.html", user=user, lists=lists, local_time=local_time,
                      pushes=pushes, **data)

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        yield
        for s in opened:
            # a store opened by another thread; closing at exit is best effort
            with contextlib.suppress(Exception):
                s.close()

    routes = [
        Route("/", login_page), Route("/login", login, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/fleet", fleet_page), Route("/fleet/events", fleet_events),
        Route("/sites", sites_page),
        Route("/sites/{site}/live", live_page), Route("/sites/{site}/live/events", live_events),
        Route("/sites/{site}/onsite", onsite_page),
        Route("/sites/{site}/work-history", wh_page),
        Route("/sites/{site}/work-history.csv", wh_csv),
        Route("/technicians/{tid}", technician_page),
        *report_routes(),
        Route("/ops", ops_page),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    return Starlette(routes=routes, lifespan=lifespan, middleware=[
        Middleware(SessionMiddleware, secret_key=cfg.secret, session_cookie="ccus_console",
                   max_age=SESSION_S, same_site="strict", https_only=cfg.secure_cookies)])


def sse(event: str, html: str) -> str:
    data = "\n".join(f"data: {line}" for line in html.strip().splitlines() or [""])
    return f"event: {event}\n{data}\n\n"
