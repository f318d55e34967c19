// The console's one script (CSP: no inline scripts). On a phone the work-history grid opens
// scrolled to its last worked day, with the technician column kept in view (sticky CSS).
document.addEventListener("DOMContentLoaded", function () {
  var grid = document.getElementById("grid");
  if (!grid) return;
  var cells = grid.querySelectorAll("td[data-date]");
  var box = grid.closest(".scroll");
  if (!cells.length || !box) return;
  var last = cells[0];
  cells.forEach(function (c) { if (c.dataset.date > last.dataset.date) last = c; });
  box.scrollLeft = Math.max(0, last.offsetLeft + last.offsetWidth - box.clientWidth + 8);
});

// The live page keeps the newest LIVE_ROWS rows: at 1,000 touches/s an untrimmed table grows
// by 60,000 rows a minute and the browser, not the server, falls behind.
// Past the newest LIVE_ROWS rows everything goes, text nodes included, from the end, each
// removal O(1). The server joins an event's rows with newlines, so the body holds a text node
// between rows: removing only the rows (deleteRow, removeChild of lastElementChild, a Range
// to the last row) left those behind, the body's child list grew by ~1,000 nodes a second at
// 1,000 touches/s, every row count and last-row lookup walked them, and the page fell behind
// after ~45 s (bench/bench_console_chromium.py --seconds 120 --profile: this handler was
// most of the renderer's time).
var LIVE_ROWS = 500;
document.addEventListener("htmx:afterSwap", function (e) {
  var body = e.target;
  if (!body || body.id !== "touches" || body.rows.length <= LIVE_ROWS) return;
  var last = body.rows[LIVE_ROWS - 1];
  while (last.nextSibling) body.removeChild(body.lastChild);
});
