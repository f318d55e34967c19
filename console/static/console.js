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
var LIVE_ROWS = 500;
document.addEventListener("htmx:afterSwap", function (e) {
  var body = e.target;
  if (!body || body.id !== "touches") return;
  while (body.rows.length > LIVE_ROWS) body.deleteRow(-1);
});
