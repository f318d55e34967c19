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
