// The console's one script, a light touch: parts of a page marked
// data-refresh-s="N" are fetched again every N seconds (the same URL, the
// part found by its id) and swapped in place, without reloading the page.
"use strict";
(function () {
  function refresh(el, seconds) {
    window.setTimeout(function () {
      fetch(window.location.href, { credentials: "same-origin", headers: { "X-Console-Refresh": "1" } })
        .then(function (r) {
          if (r.redirected || !r.ok) { return null; }  // logged out or failing: stop, keep what is shown
          return r.text();
        })
        .then(function (html) {
          if (html === null) { return; }
          var doc = new DOMParser().parseFromString(html, "text/html");
          var fresh = doc.getElementById(el.id);
          if (fresh) { el.innerHTML = fresh.innerHTML; el.setAttribute("data-refreshed", String(Date.now())); }
          refresh(el, seconds);
        })
        .catch(function () { refresh(el, seconds * 2); });
    }, seconds * 1000);
  }
  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll("[data-refresh-s]").forEach(function (el) {
      var s = parseInt(el.getAttribute("data-refresh-s"), 10);
      if (el.id && s > 0) { refresh(el, s); }
    });
  });
})();
