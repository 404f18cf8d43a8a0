// The overview refreshes itself every 10 s while visible: the page is fetched again and its
// main content swapped in (the same HTML the server renders with JavaScript off).
(function () {
  "use strict";
  var REFRESH_MS = 10000;
  function refresh() {
    if (document.hidden) return;
    fetch(location.href, { credentials: "same-origin", headers: { "Accept": "text/html" } })
      .then(function (answer) { return answer.ok ? answer.text() : null; })
      .then(function (html) {
        if (!html) return;
        var fresh = new DOMParser().parseFromString(html, "text/html").getElementById("main");
        var main = document.getElementById("main");
        if (fresh && main && !main.contains(document.activeElement)) main.innerHTML = fresh.innerHTML;
      })
      .catch(function () { /* offline for a moment: the next tick tries again */ });
  }
  setInterval(refresh, REFRESH_MS);
})();
