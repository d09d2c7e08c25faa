// Live refresh: re-fetch the server-rendered fragment of the element marked data-refresh.
(function () {
  "use strict";
  var el = document.querySelector("[data-refresh]");
  if (!el) { return; }
  var url = el.getAttribute("data-refresh");
  var every = parseInt(el.getAttribute("data-every") || "3000", 10);
  function tick() {
    if (document.hidden) { return; }
    fetch(url, { credentials: "same-origin", headers: { "Accept": "text/html" } })
      .then(function (r) { return r.ok ? r.text() : null; })
      .then(function (text) {
        if (text !== null) {
          el.innerHTML = text;
          el.setAttribute("data-updated", String(Date.now()));
        }
      })
      .catch(function () { /* keep the last view; try again next tick */ });
  }
  setInterval(tick, every);
})();
