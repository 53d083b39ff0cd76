// The endpoint page's charts, drawn with the vendored uPlot (static/vendor/uplot) from the same
// data as the tables below them (webapp/charts.py). Without JavaScript the tables are the charts.
(function () {
  "use strict";
  var holder = document.getElementById("charts");
  var source = document.getElementById("metrics-data");
  if (!holder || !source || typeof uPlot === "undefined") return;
  var REFRESH_MS = 15000;
  var COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#ca8a04", "#db2777"];
  var charts = [];
  window.standbyCharts = charts; // for the browser test and the curious

  function width() { return Math.max(280, Math.min(holder.clientWidth || 600, 900) / (holder.clientWidth > 640 ? 2 : 1) - 16); }

  // Vertical marks at each cold start (an instance became ready), on the instances chart.
  function coldStartMarks(data) {
    return {
      hooks: {
        draw: [function (u) {
          var ctx = u.ctx;
          ctx.save();
          ctx.strokeStyle = "#ea580c";
          ctx.setLineDash([4, 3]);
          ctx.lineWidth = 1.5 * devicePixelRatio;
          data.cold_starts.forEach(function (c) {
            var x = u.valToPos(c.at, "x", true);
            if (x < u.bbox.left || x > u.bbox.left + u.bbox.width) return;
            ctx.beginPath();
            ctx.moveTo(x, u.bbox.top);
            ctx.lineTo(x, u.bbox.top + u.bbox.height);
            ctx.stroke();
          });
          ctx.restore();
        }]
      }
    };
  }

  function chart(title, unit, names, series, data, extra) {
    var box = document.createElement("figure");
    box.className = "chart";
    var caption = document.createElement("figcaption");
    caption.textContent = title;
    box.appendChild(caption);
    holder.appendChild(box);
    var opts = {
      width: width(), height: 180,
      scales: { x: { time: true } },
      axes: [{}, { label: unit, size: 56 }],
      series: [{}].concat(names.map(function (name, i) {
        return { label: name, stroke: COLORS[i % COLORS.length], width: 1.5, spanGaps: false,
                 points: { show: true, size: 4 } };
      })),
      plugins: extra ? [extra] : []
    };
    var u = new uPlot(opts, [data.t].concat(series), box);
    charts.push({ title: title, u: u, names: names });
  }

  function usageChart(title, metric, data) {
    var ids = Object.keys(data.usage).sort().filter(function (id) {
      return data.usage[id][metric].some(function (v) { return v !== null; });
    });
    if (!ids.length) return;
    chart(title, "%", ids, ids.map(function (id) { return data.usage[id][metric]; }), data);
  }

  function draw(data) {
    charts.forEach(function (c) { c.u.destroy(); });
    charts.length = 0;
    holder.innerHTML = "";
    chart("Requests per second", "req/s", ["requests/s"], [data.requests_per_second], data);
    chart("Latency", "ms", ["p50", "p95", "p99"], [data.latency_ms.p50, data.latency_ms.p95, data.latency_ms.p99], data);
    chart("Error rate (5xx)", "%", ["errors"], [data.error_rate_percent], data);
    chart("Instances (dashed: cold starts)", "instances", ["instances"], [data.instances], data, coldStartMarks(data));
    usageChart("CPU per instance", "cpu", data);
    usageChart("Memory per instance", "memory", data);
    usageChart("GPU per instance", "gpu", data);
    usageChart("GPU memory per instance", "gpu_memory", data);
    holder.dataset.drawn = String(charts.length);
  }

  draw(JSON.parse(source.textContent));
  // The tables stay one click away; the charts say the same.
  var tables = document.querySelector("details.metrics-tables");
  if (tables) tables.open = false;

  var url = holder.dataset.metricsUrl;
  if (url) {
    setInterval(function () {
      if (document.hidden) return;
      fetch(url, { headers: { Accept: "application/json" } })
        .then(function (r) { return r.ok ? r.json() : null; })
        .then(function (data) { if (data) draw(data); })
        .catch(function () {});
    }, REFRESH_MS);
  }
})();
