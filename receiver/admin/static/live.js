// The live debugger: events from /api/live (Server-Sent Events) as they are accepted, each
// expandable to its JSON, with its delivery outcomes added as they come.
(function () {
  "use strict";
  var MAX_SHOWN = 300;
  var list = document.getElementById("live-list");
  var status = document.getElementById("live-status");
  var form = document.getElementById("live-filters");
  var pause = document.getElementById("live-pause");
  var byEvent = {};
  var source = null;
  var paused = false;

  function text(tag, className, value) {
    var node = document.createElement(tag);
    if (className) node.className = className;
    node.textContent = value;
    return node;
  }

  function eventLink(message) {
    var link = text("a", "", message.message_id);
    link.href = "/events/" + encodeURIComponent(message.message_id) + "?source=" + encodeURIComponent(message.source);
    return link;
  }

  function accepted(message) {
    var item = document.createElement("li");
    item.dataset.type = message.type;
    var details = document.createElement("details");
    var summary = document.createElement("summary");
    summary.appendChild(text("span", "what", message.type + (message.event ? ": " + message.event : "")));
    summary.appendChild(text("span", "muted", (message.user_id || "no user") + " · " + message.source + " · " + message.received_at));
    var outcomes = text("span", "outcomes", "");
    summary.appendChild(outcomes);
    details.appendChild(summary);
    var body = document.createElement("div");
    body.className = "body";
    var id = document.createElement("p");
    id.appendChild(document.createTextNode("messageId "));
    id.appendChild(eventLink(message));
    body.appendChild(id);
    body.appendChild(text("pre", "json", JSON.stringify(message.payload, null, 2)));
    var history = document.createElement("ul");
    history.className = "history";
    body.appendChild(history);
    details.appendChild(body);
    item.appendChild(details);
    list.insertBefore(item, list.firstChild);
    byEvent[message.event_id] = { outcomes: outcomes, history: history, badges: {} };
    (message.destinations || []).forEach(function (name) { badge(message.event_id, name, "pending"); });
    while (list.children.length > MAX_SHOWN) {
      var last = list.lastChild;
      list.removeChild(last);
    }
  }

  function badge(eventId, destination, state) {
    var shown = byEvent[eventId];
    if (!shown) return;
    var node = shown.badges[destination];
    if (!node) {
      node = text("span", "", "");
      shown.badges[destination] = node;
      shown.outcomes.appendChild(node);
    }
    node.className = "badge badge-" + state;
    node.textContent = destination + ": " + state;
  }

  function outcome(kind, message) {
    badge(message.event_id, message.destination, kind);
    var shown = byEvent[message.event_id];
    if (!shown) return;
    var line = kind + " at " + message.destination + " (attempt " + message.attempts + ")" +
      (message.at ? " " + message.at : "") + (message.last_error && kind !== "delivered" ? ": " + message.last_error : "");
    shown.history.appendChild(text("li", "", line));
  }

  function connect() {
    if (source) source.close();
    var params = new URLSearchParams(new FormData(form));
    Array.from(params.keys()).forEach(function (key) { if (!params.get(key)) params.delete(key); });
    source = new EventSource("/api/live?" + params.toString());
    status.textContent = "Connecting…";
    source.onopen = function () { status.textContent = "Watching: new events appear at the top."; };
    source.onerror = function () { status.textContent = "Disconnected; reconnecting…"; };
    source.addEventListener("accepted", function (e) { if (!paused) accepted(JSON.parse(e.data)); });
    ["delivered", "retrying", "dead"].forEach(function (kind) {
      source.addEventListener(kind, function (e) { outcome(kind, JSON.parse(e.data)); });
    });
    source.addEventListener("skipped", function (e) {
      var message = JSON.parse(e.data);
      list.insertBefore(text("li", "skipped", message.message), list.firstChild);
    });
  }

  form.addEventListener("submit", function (e) { e.preventDefault(); connect(); });
  pause.addEventListener("click", function () {
    paused = !paused;
    pause.setAttribute("aria-pressed", String(paused));
    pause.textContent = paused ? "Resume" : "Pause";
  });
  document.getElementById("live-clear").addEventListener("click", function () {
    list.textContent = "";
    byEvent = {};
  });
  connect();
})();
