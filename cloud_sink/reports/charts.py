"""PNG charts for the reports (matplotlib, Agg backend): attendance heat map, course bars, vending
bars, days worked, training per month. Bars carry their counts; count axes are integers.

Japanese labels need a CJK font (Debian's fonts-ipafont-gothic, which ./dev.sh installs, or
fonts-noto-cjk); without one, charts label by ID so no glyph turns into a box.
"""

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import font_manager  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

_CJK = ("Noto Sans CJK JP", "Noto Sans JP", "IPAexGothic", "IPAGothic", "TakaoGothic",
        "VL Gothic")


# file names of those fonts, for one installed after matplotlib cached its font list
_CJK_FILES = ("ipag", "ipaexg", "notosanscjk", "notosansjp", "takaogothic", "vl-gothic")


def _cjk_font() -> str | None:
    names = {f.name for f in font_manager.fontManager.ttflist}
    found = next((n for n in _CJK if n in names), None)
    if found is None:
        for path in font_manager.findSystemFonts():
            if Path(path).name.lower().startswith(_CJK_FILES):
                font_manager.fontManager.addfont(path)
        names = {f.name for f in font_manager.fontManager.ttflist}
        found = next((n for n in _CJK if n in names), None)
    return found


def _label(text: str, fallback: str, cjk: bool) -> str:
    return text if text and (cjk or text.isascii()) else fallback


def _use_cjk() -> bool:
    font = _cjk_font()
    if font:
        plt.rcParams["font.family"] = [font, "DejaVu Sans"]
    return bool(font)


def attendance_heatmap(names: list[str], techs: list[str], dates: list[str],
                       cells: list[list[float | None]], missing: list[tuple[int, int]],
                       title: str, path: str | Path) -> Path:
    """Technicians down (by name where known), days of the month across; colour = hours on site
    of a day with entry and exit (a 0-hour day is coloured, not missing), hatched = entry or
    exit missing, blank = not worked."""
    import numpy as np

    cjk = _use_cjk()
    labels = [f"{_label(n, '', cjk)} {t[-4:]}".strip() if _label(n, "", cjk) else t
              for n, t in zip(names, techs, strict=True)]
    title = title if cjk or title.isascii() else title.encode("ascii", "replace").decode()
    data = np.full((max(1, len(techs)), len(dates)), np.nan)
    for i, row in enumerate(cells):
        for j, v in enumerate(row):
            if v is not None:
                data[i, j] = v
    height = 1.6 + 0.28 * max(1, len(techs))
    fig, ax = plt.subplots(figsize=(max(8.0, 0.32 * len(dates) + 3.2), height), dpi=110)
    cmap = ListedColormap(plt.get_cmap("YlGnBu")(np.linspace(0.15, 0.95, 12))).with_extremes(
        bad="#f4f4f4")
    im = ax.imshow(data, aspect="auto", cmap=cmap, vmin=0, vmax=12, interpolation="nearest")
    for i, j in missing:
        ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, facecolor="#fdd49e",
                                   edgecolor="#d7301f", hatch="///", linewidth=0.6))
    for i, row in enumerate(cells):
        for j, v in enumerate(row):
            if v is not None and v < 0.05:   # worked, entry and exit both there, no time between
                ax.text(j, i, "0h", ha="center", va="center", fontsize=7, color="#333333")
    ax.set_xticks(range(len(dates)), [d[-2:] for d in dates], fontsize=8)
    ax.set_yticks(range(len(techs)), labels, fontsize=8)
    ax.set_xlabel(f"day of {dates[0][:7]}" if dates else "day")
    ax.set_title(title, fontsize=11, loc="left")
    ax.set_xticks([x - 0.5 for x in range(1, len(dates))], minor=True)
    ax.set_yticks([y - 0.5 for y in range(1, len(techs))], minor=True)
    ax.grid(which="minor", color="white", linewidth=0.8)
    ax.tick_params(which="minor", length=0)
    bar = fig.colorbar(im, ax=ax, pad=0.01, fraction=0.03)
    bar.set_label("hours on site")
    if missing:
        ax.text(1.0, -0.9 / max(1, len(techs)) - 0.12, "hatched: entry or exit missing",
                transform=ax.transAxes, ha="right", va="top", fontsize=8, color="#d7301f")
    fig.tight_layout()
    return _save(fig, path)


def course_bars(rows: list[dict[str, Any]], title: str, path: str | Path) -> Path:
    """Per course: persons who touched against enrolled, counted, and the card ownership rate."""
    font = _use_cjk()
    labels = [r["course"] if r["course"] == "other courses" else
              _label(f"{r['course']} {r['name']}".strip(), r["course"], font) for r in rows]
    labels = [lb if len(lb) <= 28 else lb[:27] + "…" for lb in labels]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(rows) + 3), 4.4), dpi=110)
    x = range(len(rows))
    enrolled = [r["enrolled"] or 0 for r in rows]
    persons = [r["persons"] for r in rows]
    b1 = ax.bar([i - 0.2 for i in x], enrolled, width=0.4, label="enrolled", color="#c6dbef")
    b2 = ax.bar([i + 0.2 for i in x], persons, width=0.4, label="touched (unique persons)",
                color="#2171b5")
    ax.bar_label(b1, fontsize=8, padding=2)
    ax.bar_label(b2, fontsize=8, padding=2)
    top = max([*enrolled, *persons], default=0)
    for i, r in enumerate(rows):
        rate = r["card_ownership_rate_pct"]
        if rate is not None:
            ax.annotate(f"{rate:.1f}%", (i, max(enrolled[i], persons[i])),
                        textcoords="offset points", xytext=(0, 14), ha="center", fontsize=9,
                        color="#08306b")
    ax.set_xticks(list(x), labels, rotation=20 if len(rows) > 4 else 0, ha="right" if len(rows) > 4
                  else "center", fontsize=9)
    ax.set_ylabel("persons")
    ax.set_ylim(0, top * 1.25 + 1)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(f"{title}\n(% above the bars: card ownership rate)", fontsize=10, loc="left")
    return _finish(fig, ax, path)


def vending_bars(rows: list[dict[str, Any]], title: str, path: str | Path) -> Path:
    """Per contractor and month: stacked dispensed / failed / indeterminate."""
    labels = [f"{r['contractor']}\n{r['month']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(rows) + 2), 4.2), dpi=110)
    bottom = [0] * len(rows)
    for key, colour in (("dispensed", "#238b45"), ("failed", "#cb181d"),
                        ("indeterminate", "#fd8d3c")):
        vals = [r[key] for r in rows]
        bars = ax.bar(range(len(rows)), vals, bottom=bottom, label=key, color=colour)
        ax.bar_label(bars, labels=[str(v) if v else "" for v in vals], label_type="center",
                     fontsize=8, color="white")
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    for i, total in enumerate(bottom):
        ax.annotate(str(total), (i, total), textcoords="offset points", xytext=(0, 3),
                    ha="center", fontsize=9)
    ax.set_xticks(range(len(rows)), labels, fontsize=8)
    ax.set_ylabel("vends")
    ax.set_ylim(0, max(bottom, default=0) * 1.12 + 1)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title, fontsize=11, loc="left")
    return _finish(fig, ax, path)


def days_bars(rows: list[tuple[str, str, str, int]], names: dict[str, str], title: str,
              path: str | Path, site_names: dict[str, str] | None = None) -> Path:
    """Days worked per technician (by name where known), one stacked segment per site."""
    cjk = _use_cjk()
    techs = sorted({t for _, _, t, _ in rows})
    sites = sorted({s for s, _, _, _ in rows})
    days = {(s, t): n for s, _, t, n in rows}
    labels = [f"{_label(names.get(t, ''), '', cjk)} {t[-4:]}".strip()
              if _label(names.get(t, ""), "", cjk) else t for t in techs]
    fig, ax = plt.subplots(figsize=(8.0, 1.4 + 0.32 * max(1, len(techs))), dpi=110)
    left = [0] * len(techs)
    colours = plt.get_cmap("tab10")
    for k, site in enumerate(sites):
        vals = [days.get((site, t), 0) for t in techs]
        name = _label((site_names or {}).get(site, ""), "", cjk)
        bars = ax.barh(range(len(techs)), vals, left=left, color=colours(k % 10),
                       label=f"{site} {name}".strip())
        ax.bar_label(bars, labels=[str(v) if v else "" for v in vals], label_type="center",
                     fontsize=8, color="white")
        left = [a + v for a, v in zip(left, vals, strict=True)]
    ax.set_yticks(range(len(techs)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("days worked")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title, fontsize=11, loc="left")
    ax.legend(frameon=False, fontsize=8, title="site", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    return _save(fig, path)


def training_bars(rows: list[dict[str, Any]], title: str, path: str | Path) -> Path:
    """Per center and month (total rows left out): persons and touches side by side, counted."""
    months = [r for r in rows if r["month"] != "total"]
    centers = sorted({r["center"] for r in months})
    labels = [r["month"] if len(centers) == 1 else f"{r['center']}\n{r['month']}" for r in months]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(months) + 2.5), 4.2), dpi=110)
    x = range(len(months))
    for off, key, colour in ((-0.2, "persons", "#2171b5"), (0.2, "touches", "#9ecae1")):
        bars = ax.bar([i + off for i in x], [r[key] for r in months], width=0.4, label=key,
                      color=colour)
        ax.bar_label(bars, fontsize=8, padding=2)
    ax.set_xticks(list(x), labels, fontsize=8)
    ax.set_ylabel("count")
    ax.set_ylim(0, max([r["touches"] for r in months], default=0) * 1.15 + 1)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title, fontsize=11, loc="left")
    return _finish(fig, ax, path)


def _finish(fig: Any, ax: Any, path: str | Path) -> Path:
    """The house style of every bar chart: the legend outside the axes (it never covers a
    bar), no top/right frame, then saved."""
    ax.legend(frameon=False, fontsize=9, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig: Any, path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p)
    plt.close(fig)
    return p
