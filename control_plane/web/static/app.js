// Confirmation before every operator action, the traffic bar, and the charts (data from /api/timeseries).
"use strict";

document.querySelectorAll("form[data-confirm]").forEach((form) => {
  form.addEventListener("submit", (event) => {
    if (!window.confirm(form.dataset.confirm)) event.preventDefault();
  });
});

document.querySelectorAll(".split .seg[data-weight]").forEach((seg) => {
  seg.style.width = seg.dataset.weight + "%";
});

const ROLE_COLORS = { baseline: "#2563eb", canary: "#ea7317", control: "#6b7280" };
const REFRESH_MS = 30000;
const charts = {};

function hhmm(t) {
  const d = new Date(t * 1000);
  return d.toISOString().slice(11, 16);
}

function render(points) {
  const times = [...new Set(points.map((p) => p.t))].sort((a, b) => a - b);
  const roles = [...new Set(points.map((p) => p.role))].sort();
  const index = new Map(points.map((p) => [p.t + "|" + p.role, p]));
  document.querySelectorAll("#charts canvas").forEach((canvas) => {
    const field = canvas.dataset.field;
    const datasets = roles.map((role) => ({
      label: role,
      data: times.map((t) => {
        const p = index.get(t + "|" + role);
        return p ? p[field] : null;
      }),
      borderColor: ROLE_COLORS[role] || "#111827",
      backgroundColor: ROLE_COLORS[role] || "#111827",
      borderWidth: 2,
      pointRadius: 0,
      spanGaps: true,
      tension: 0.2,
    }));
    const labels = times.map(hhmm);
    if (charts[field]) {
      charts[field].data = { labels, datasets };
      charts[field].update("none");
      return;
    }
    charts[field] = new Chart(canvas, {
      type: "line",
      data: { labels, datasets },
      options: {
        animation: false,
        maintainAspectRatio: false,
        interaction: { mode: "index", intersect: false },
        plugins: { legend: { position: "bottom", labels: { boxWidth: 12 } } },
        scales: { x: { ticks: { maxTicksLimit: 8 } }, y: { beginAtZero: true } },
      },
    });
  });
}

async function refresh() {
  const box = document.getElementById("charts");
  if (!box || typeof Chart === "undefined") return;
  try {
    const resp = await fetch(box.dataset.url, { headers: { Accept: "application/json" } });
    if (!resp.ok) throw new Error("HTTP " + resp.status);
    render((await resp.json()).points);
    box.dataset.loaded = "true";
  } catch (err) {
    box.dataset.loaded = "error";
    console.warn("charts not refreshed:", err);
  }
}

refresh();
setInterval(refresh, REFRESH_MS);
