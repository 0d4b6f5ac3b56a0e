// Progressive enhancement only: every page works without this file.
(function () {
  "use strict";
  // Ask before destructive actions.
  document.addEventListener("click", function (ev) {
    var el = ev.target.closest("[data-confirm]");
    if (el && !window.confirm(el.getAttribute("data-confirm"))) { ev.preventDefault(); }
  });
  // No double submits (a reply sent twice is a reply the customer gets twice).
  document.addEventListener("submit", function (ev) {
    var form = ev.target;
    if (form.dataset.sent) { ev.preventDefault(); return; }
    form.dataset.sent = "1";
    window.setTimeout(function () {
      form.querySelectorAll("button").forEach(function (b) { b.disabled = true; });
    }, 0);
  });
  // Queues refresh themselves while the page is visible.
  var table = document.querySelector("table.queue[data-refresh]");
  if (table && !new URLSearchParams(window.location.search).get("after")) {
    var seconds = parseInt(table.getAttribute("data-refresh"), 10) || 30;
    window.setInterval(function () {
      if (document.hidden) { return; }
      var url = new URL(window.location.href);
      url.searchParams.set("partial", "1");
      fetch(url.toString(), { credentials: "same-origin" })
        .then(function (r) { return r.ok ? r.text() : null; })
        .then(function (html) {
          if (html === null) { return; }
          var body = document.getElementById("rows");
          var tmp = document.createElement("tbody");
          tmp.innerHTML = html;     // server-rendered, autoescaped rows from our own origin
          body.replaceWith(tmp);
          tmp.id = "rows";
        })
        .catch(function () {});
    }, seconds * 1000);
  }
})();
