// Small polls that keep pages live without a build step: every 2 s, pause while the tab is hidden.
(function () {
  "use strict";
  var PERIOD_MS = 2000;

  function every(fn) {
    fn();
    setInterval(function () { if (!document.hidden) fn(); }, PERIOD_MS);
  }

  function getJSON(url) {
    return fetch(url, { headers: { Accept: "application/json" } }).then(function (r) {
      if (!r.ok) throw new Error(r.status);
      return r.json();
    });
  }

  // As the server's `money` filter writes a cost (webapp/ui.py).
  function money(amount) {
    return amount < 1 ? amount.toFixed(4) : amount.toLocaleString("en-US", { minimumFractionDigits: 2, maximumFractionDigits: 2 });
  }

  // Endpoint list: update status badges, queue positions and ready counts in place.
  var list = document.querySelector("[data-poll-endpoints]");
  if (list) {
    every(function () {
      getJSON(list.dataset.pollEndpoints).then(function (data) {
        data.endpoints.forEach(function (e) {
          var badge = document.querySelector('[data-status-for="' + e.name + '"]');
          if (badge) { badge.textContent = e.status; badge.className = "badge status-" + e.status; }
          var queue = document.querySelector('[data-queue-for="' + e.name + '"]');
          if (queue) queue.textContent = e.status === "queued" && e.queue_position ? "#" + e.queue_position + " in GPU queue" : "";
          var count = document.querySelector('[data-instances-for="' + e.name + '"]');
          if (count) count.textContent = e.instances.filter(function (i) { return i.status === "ready"; }).length + " ready";
          var cost = document.querySelector('td[data-cost-for="' + e.name + '"]');
          if (cost) cost.textContent = money(e.usage.cost_this_month) + " " + e.usage.currency;
        });
      }).catch(function () {});
    });
  }

  // Detail page: the status/instances/events panel is re-rendered by the server.
  var panel = document.getElementById("panel");
  if (panel && panel.dataset.panelUrl) {
    setInterval(function () {
      if (document.hidden) return;
      fetch(panel.dataset.panelUrl).then(function (r) { return r.ok ? r.text() : null; })
        .then(function (html) { if (html !== null) panel.innerHTML = html; }).catch(function () {});
    }, PERIOD_MS);
  }

  // Logs, newest first.
  var logs = document.getElementById("logs");
  if (logs && logs.dataset.logsUrl) {
    every(function () {
      getJSON(logs.dataset.logsUrl).then(function (data) {
        var text = data.lines.map(function (l) { return "[" + l.instance_id + "] " + l.line; }).join("\n");
        logs.textContent = text || "No log lines yet.";
      }).catch(function () {});
    });
  }
})();
