// ccproxy dashboard: reads /ui/api/* (same origin, session cookie) and draws with the vendored Chart.js.
// Every value from the API goes into the page as text (textContent), never as HTML.
"use strict";
(function () {
  const $ = (sel) => document.querySelector(sel);
  const $$ = (sel) => Array.from(document.querySelectorAll(sel));
  const MAX_SINCE = 366 * 86400;
  const COLORS = { blue: "#2f6fed", red: "#d92d20", green: "#12a150", orange: "#f79009", purple: "#7a5af8", grey: "#98a2b3" };

  const store = {
    get(k, d) { try { const v = localStorage.getItem("ccproxy." + k); return v === null ? d : v; } catch (e) { return d; } },
    set(k, v) { try { localStorage.setItem("ccproxy." + k, String(v)); } catch (e) { /* private mode */ } },
  };

  const state = {
    since: clampSince(parseInt(store.get("since", "86400"), 10)),
    custom: store.get("custom", "") === "1",
    by: store.get("by", "key"),
    tag: store.get("tag", ""),
    refresh: parseInt(store.get("refresh", "30"), 10),
    tab: "overview",
    timer: null,
    charts: {},
    loading: false,
  };

  // ---------------------------------------------------------------- formatting

  const intFmt = new Intl.NumberFormat("en-US");
  const oneFmt = new Intl.NumberFormat("en-US", { minimumFractionDigits: 1, maximumFractionDigits: 1 });
  const num = (v) => (v === null || v === undefined ? "–" : intFmt.format(v));
  const twoFmt = new Intl.NumberFormat("en-US", { minimumFractionDigits: 2, maximumFractionDigits: 2 });
  const ms = (v) => (v === null || v === undefined ? "–" : v >= 1000 ? twoFmt.format(v / 1000) + " s" : oneFmt.format(v) + " ms");
  const pad = (n) => String(n).padStart(2, "0");
  const usd = (v) => (v === null || v === undefined ? "–" : "$" + (v >= 100 ? twoFmt.format(v) : v.toPrecision(3)));
  const TAG_NAME = /^[A-Za-z0-9_.-]{1,64}$/;
  const byParam = () => (state.by === "tag" ? "tag:" + state.tag : state.by);

  function clampSince(s) {
    return Number.isFinite(s) && s >= 1 && s <= MAX_SINCE ? s : 86400;
  }

  function fmtTime(ts, withDate) {
    const d = new Date(ts * 1000);
    const hm = pad(d.getHours()) + ":" + pad(d.getMinutes());
    return withDate ? pad(d.getMonth() + 1) + "-" + pad(d.getDate()) + " " + hm : hm;
  }

  function fmtStamp(ts) {
    const d = new Date(ts * 1000);
    return d.getFullYear() + "-" + pad(d.getMonth() + 1) + "-" + pad(d.getDate()) + " " +
      pad(d.getHours()) + ":" + pad(d.getMinutes()) + ":" + pad(d.getSeconds());
  }

  function fmtDuration(s) {
    if (s % 86400 === 0 && s > 86400) return s / 86400 + " d";
    if (s % 3600 === 0) return s / 3600 + " h";
    if (s % 60 === 0) return s / 60 + " min";
    return s + " s";
  }

  function fmtUptime(s) {
    s = Math.floor(s);
    const d = Math.floor(s / 86400), h = Math.floor((s % 86400) / 3600), m = Math.floor((s % 3600) / 60);
    if (d) return d + "d " + h + "h";
    if (h) return h + "h " + m + "m";
    return m + "m " + (s % 60) + "s";
  }

  // "30m", "12h", "3d", "2w", "90s" or a bare number of seconds -> seconds, or null
  function parseDuration(text) {
    const m = /^\s*(\d+(?:\.\d+)?)\s*(s|sec|m|min|h|d|w)?\s*$/i.exec(text || "");
    if (!m) return null;
    const unit = { s: 1, sec: 1, m: 60, min: 60, h: 3600, d: 86400, w: 604800 }[(m[2] || "s").toLowerCase()];
    const s = Math.round(parseFloat(m[1]) * unit);
    return s >= 60 && s <= MAX_SINCE ? s : null;
  }

  // ---------------------------------------------------------------- DOM helpers

  function el(tag, opts, children) {
    const e = document.createElement(tag);
    if (opts) {
      if (opts.text !== undefined) e.textContent = opts.text;
      if (opts.cls) e.className = opts.cls;
      if (opts.title) e.title = opts.title;
    }
    for (const c of children || []) e.appendChild(c);
    return e;
  }

  function td(text, cls, title) { return el("td", { text: text, cls: cls, title: title }); }

  function fillTable(id, rows, cols, makeRow) {
    const body = $("#" + id + " tbody");
    body.replaceChildren();
    if (!rows.length) {
      const cell = el("td", { text: "nothing in this range", cls: "empty" });
      cell.colSpan = cols;
      body.appendChild(el("tr", null, [cell]));
      return;
    }
    for (const r of rows) body.appendChild(makeRow(r));
  }

  function badge(text, kind) { return el("span", { text: text, cls: "badge " + (kind || "") }); }

  function statusBadge(status, errorKind) {
    const kind = status >= 500 ? "bad" : status >= 400 ? "warn" : errorKind ? "warn" : "ok";
    return badge(String(status), kind);
  }

  // ---------------------------------------------------------------- API

  class ApiError extends Error {}

  async function api(path) {
    const resp = await fetch(path, { headers: { accept: "application/json" }, credentials: "same-origin", cache: "no-store" });
    if (resp.status === 401 || resp.status === 403) {
      window.location.assign("/ui");  // the session ended: back to the login form
      throw new ApiError("signed out");
    }
    let body = null;
    try { body = await resp.json(); } catch (e) { /* not JSON */ }
    if (!resp.ok) {
      const msg = body && body.error && body.error.message ? body.error.message : "HTTP " + resp.status;
      throw new ApiError(path.split("?")[0] + ": " + msg);
    }
    return body;
  }

  function showError(err) {
    const box = $("#error");
    if (err) { box.textContent = String(err.message || err); box.hidden = false; } else { box.hidden = true; }
  }

  // ---------------------------------------------------------------- charts

  Chart.defaults.font.family = getComputedStyle(document.documentElement).fontFamily;
  Chart.defaults.font.size = 12;
  Chart.defaults.color = "#667085";
  Chart.defaults.borderColor = "#eef1f5";
  Chart.defaults.animation = false;

  function upsertChart(id, config) {
    const existing = state.charts[id];
    if (existing && existing.config.type === config.type) {
      existing.data.labels = config.data.labels;
      existing.data.datasets.forEach((ds, i) => { ds.data = config.data.datasets[i].data; });
      existing.update("none");
      return existing;
    }
    if (existing) existing.destroy();
    const chart = new Chart(document.getElementById(id), config);
    state.charts[id] = chart;
    return chart;
  }

  const baseOptions = (stacked) => ({
    responsive: true,
    maintainAspectRatio: false,
    interaction: { mode: "index", intersect: false },
    plugins: { legend: { position: "bottom", labels: { boxWidth: 12, boxHeight: 12 } } },
    scales: {
      x: { stacked: stacked, ticks: { maxRotation: 0, autoSkip: true, autoSkipPadding: 12 }, grid: { display: false } },
      y: { stacked: stacked, beginAtZero: true, ticks: { precision: 0 } },
    },
  });

  function drawSeries(series) {
    const withDate = state.since > 86400;
    const labels = series.points.map((p) => fmtTime(p.t, withDate));
    upsertChart("chart-requests", {
      type: "bar",
      data: {
        labels: labels,
        datasets: [
          { label: "Succeeded", data: series.points.map((p) => p.requests - p.errors), backgroundColor: COLORS.blue },
          { label: "Errors", data: series.points.map((p) => p.errors), backgroundColor: COLORS.red },
        ],
      },
      options: baseOptions(true),
    });
    upsertChart("chart-tokens", {
      type: "line",
      data: {
        labels: labels,
        datasets: [
          { label: "Input tokens", data: series.points.map((p) => p.input_tokens), borderColor: COLORS.purple,
            backgroundColor: "rgba(122,90,248,0.12)", fill: true, pointRadius: 0, cubicInterpolationMode: "monotone" },
          { label: "Output tokens", data: series.points.map((p) => p.output_tokens), borderColor: COLORS.green,
            backgroundColor: "rgba(18,161,80,0.12)", fill: true, pointRadius: 0, cubicInterpolationMode: "monotone" },
        ],
      },
      options: baseOptions(false),
    });
  }

  function drawLatency(rows) {
    const named = rows.filter((r) => r.alias !== null);
    const opts = baseOptions(false);
    opts.scales.y.ticks = { callback: (v) => intFmt.format(v) + " ms" };
    opts.plugins.tooltip = { callbacks: { label: (c) => c.dataset.label + ": " + ms(c.raw) } };
    upsertChart("chart-latency", {
      type: "bar",
      data: {
        labels: named.map((r) => r.alias),
        datasets: [
          { label: "p50 latency", data: named.map((r) => r.p50_ms), backgroundColor: COLORS.blue },
          { label: "p95 latency", data: named.map((r) => r.p95_ms), backgroundColor: COLORS.orange },
          { label: "TTFB p50", data: named.map((r) => r.ttfb_p50_ms), backgroundColor: COLORS.grey },
        ],
      },
      options: opts,
    });
  }

  // ---------------------------------------------------------------- views

  function drawTotals(t) {
    $("#t-requests").textContent = num(t.requests);
    $("#t-errors").textContent = num(t.errors);
    $("#t-error-rate").textContent = t.requests ? oneFmt.format((100 * t.errors) / t.requests) + "% of requests" : "";
    $("#t-input").textContent = num(t.input_tokens);
    $("#t-output").textContent = num(t.output_tokens);
    $("#t-p50").textContent = ms(t.p50_ms);
    $("#t-p95").textContent = ms(t.p95_ms);
    $("#t-ttfb").textContent = ms(t.ttfb_p50_ms);
    $("#t-cost").textContent = usd(t.cost_usd);
    $("#t-cost-per").textContent = t.cost_usd !== null && t.requests ? usd(t.cost_usd / t.requests) + " per request" : "";
    $("#t-range").textContent = "last " + fmtDuration(state.since);
  }

  function drawBreakdown(by, rows) {
    $("#breakdown-group").textContent = by.startsWith("tag:") ? "Tag " + by.slice(4) : { key: "Key", alias: "Alias",
      provider: "Provider", status: "Status", day: "Day (UTC)", session: "Session", user: "User" }[by];
    fillTable("breakdown", rows, 10, (r) => {
      const g = r[by];
      return el("tr", null, [
        td(g === null ? "(none)" : String(g)), td(num(r.requests), "num"), td(num(r.errors), "num"),
        td(num(r.input_tokens), "num"), td(num(r.output_tokens), "num"), td(usd(r.cost_usd), "num"), td(ms(r.p50_ms), "num"),
        td(ms(r.p95_ms), "num"), td(ms(r.ttfb_p50_ms), "num"),
        td(r.tokens_per_second === null ? "–" : oneFmt.format(r.tokens_per_second), "num"),
      ]);
    });
  }

  async function loadOverview() {
    const s = state.since;
    const tasks = [api("/ui/api/usage?by=alias&since=" + s), api("/ui/api/timeseries?since=" + s)];
    const by = byParam();
    if (by !== "alias") tasks.push(api("/ui/api/usage?by=" + encodeURIComponent(by) + "&since=" + s));
    const [alias, series, other] = await Promise.all(tasks);
    drawTotals(alias.totals);
    drawSeries(series);
    drawLatency(alias.rows);
    drawBreakdown(by, by === "alias" ? alias.rows : other.rows);
  }

  async function loadLive() {
    const live = await api("/ui/api/live");
    const g = live.gateway;
    $("#g-inflight").textContent = num(g.in_flight);
    $("#g-max").textContent = "limit " + num(g.max_concurrent) + (g.draining ? " · draining" : "");
    $("#g-up").textContent = live.providers.filter((p) => p.reachable).length + " / " + live.providers.length;
    $("#g-queue").textContent = num(g.usage_queue);
    $("#g-uptime").textContent = fmtUptime(g.uptime_seconds);
    $("#g-version").textContent = "ccproxy " + g.version;
    fillTable("providers", live.providers, 5, (p) => el("tr", null, [
      td(p.name), td(p.type), el("td", null, [p.reachable ? badge("yes", "ok") : badge("no", "bad")]),
      td(num(p.models), "num"), td(p.error || ""),
    ]));
    fillTable("deployments", live.deployments, 9, (d) => el("tr", null, [
      td(d.provider), td(d.model), td(d.aliases.join(", ")),
      el("td", null, [badge(d.state, d.state === "ready" ? "ok" : d.state === "cooldown" ? "warn" : "bad")]),
      td(d.cooldown_seconds_left > 0 ? oneFmt.format(d.cooldown_seconds_left) + " s" : "–", "num"),
      td(num(d.in_flight), "num"), td(num(d.sessions), "num"), td(num(d.requests), "num"), td(num(d.errors), "num"),
    ]));
    $("#keys-measured").textContent = live.keys_measured_by === "limiter"
      ? "exact, from this replica's limiter" : "last 60 s, from the usage store";
    fillTable("keys", live.keys, 6, (k) => {
      const of = (used, limit) => (limit ? num(used) + " / " + num(limit) : num(used));
      const pct = Math.min(100, Math.round(k.utilisation * 100));
      const bar = el("span");
      bar.style.width = pct + "%";
      const meter = el("span", { cls: "meter" + (k.utilisation >= 1 ? " bad" : k.near_limit ? " warn" : "") }, [bar]);
      const use = el("td", null, [meter, document.createTextNode(pct + "%")]);
      if (k.near_limit) { use.appendChild(document.createTextNode(" ")); use.appendChild(badge("near limit", "warn")); }
      return el("tr", null, [
        td(k.name), td(k.source), td(of(k.requests_last_minute, k.rpm), "num"), td(of(k.tokens_last_minute, k.tpm), "num"),
        td(k.in_flight === null ? "–" : of(k.in_flight, k.max_concurrent), "num"), use,
      ]);
    });
  }

  async function loadRequests() {
    const data = await api("/ui/api/requests?limit=100");
    fillTable("requests", data.rows, 12, (r) => {
      const status = el("td", null, [statusBadge(r.status, r.error_kind)]);
      if (r.error_kind) status.appendChild(el("span", { text: " " + r.error_kind, cls: "muted small" }));
      return el("tr", null, [
        td(fmtStamp(r.ts), null, r.request_id), td(r.key_name), td(r.alias || "–"), td(r.rule || "–"),
        td(r.provider || "–"), td(r.upstream_model || "–"), status,
        td(num(r.input_tokens), "num"), td(num(r.output_tokens), "num"), td(ms(r.latency_ms), "num"),
        td(ms(r.ttfb_ms), "num"), td(r.stream ? "yes" : "no"),
      ]);
    });
  }

  const loaders = { overview: loadOverview, live: loadLive, requests: loadRequests };

  async function refresh() {
    if (state.loading) return;
    state.loading = true;
    document.body.classList.add("loading");
    try {
      await loaders[state.tab]();
      showError(null);
      $("#updated").textContent = "updated " + fmtStamp(Date.now() / 1000).slice(11);
    } catch (err) {
      if (!(err instanceof ApiError && err.message === "signed out")) showError(err);
    } finally {
      state.loading = false;
      document.body.classList.remove("loading");
      document.body.dataset.loaded = state.tab;
    }
  }

  // ---------------------------------------------------------------- controls

  function markRange() {
    const preset = !state.custom && [3600, 86400, 604800].includes(state.since);
    $$("#range button").forEach((b) => {
      const r = b.dataset.range;
      b.classList.toggle("active", r === "custom" ? !preset : preset && Number(r) === state.since);
    });
    $("#custom-form").hidden = preset;
    if (!preset) $("#custom-input").value = fmtDuration(state.since).replace(" ", "").replace("min", "m");
  }

  function setSince(s, custom) {
    state.since = s;
    state.custom = custom;
    store.set("since", s);
    store.set("custom", custom ? "1" : "0");
    markRange();
    refresh();
  }

  $$("#range button").forEach((b) => b.addEventListener("click", () => {
    if (b.dataset.range === "custom") {
      state.custom = true;
      $$("#range button").forEach((x) => x.classList.toggle("active", x === b));
      $("#custom-form").hidden = false;
      $("#custom-input").focus();
    } else {
      setSince(Number(b.dataset.range), false);
    }
  }));

  $("#custom-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const s = parseDuration($("#custom-input").value);
    if (s === null) {
      $("#custom-error").textContent = "use e.g. 30m, 12h, 3d or 2w (1 min to 366 d)";
      return;
    }
    $("#custom-error").textContent = "";
    setSince(s, true);
  });

  $$("#by button").forEach((b) => b.addEventListener("click", () => {
    $("#tag-form").hidden = b.dataset.by !== "tag";
    if (b.dataset.by === "tag" && !TAG_NAME.test(state.tag)) { $("#tag-input").focus(); return; }
    state.by = b.dataset.by;
    store.set("by", state.by);
    $$("#by button").forEach((x) => x.classList.toggle("active", x === b));
    refresh();
  }));
  $("#tag-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const name = $("#tag-input").value.trim();
    if (!TAG_NAME.test(name)) return;
    state.tag = name;
    state.by = "tag";
    store.set("tag", name);
    store.set("by", "tag");
    $$("#by button").forEach((x) => x.classList.toggle("active", x.dataset.by === "tag"));
    refresh();
  });

  function schedule() {
    if (state.timer) clearInterval(state.timer);
    state.timer = state.refresh > 0 ? setInterval(() => { if (!document.hidden) refresh(); }, state.refresh * 1000) : null;
  }

  const refreshSelect = $("#refresh");
  if (![0, 10, 30, 60].includes(state.refresh)) state.refresh = 30;
  refreshSelect.value = String(state.refresh);
  refreshSelect.addEventListener("change", () => {
    state.refresh = parseInt(refreshSelect.value, 10);
    store.set("refresh", state.refresh);
    schedule();
  });
  $("#refresh-now").addEventListener("click", () => refresh());

  function showTab() {
    const tab = (window.location.hash || "#overview").slice(1);
    state.tab = loaders[tab] ? tab : "overview";
    $$(".view").forEach((v) => { v.hidden = v.id !== "tab-" + state.tab; });
    $$(".tab").forEach((a) => a.classList.toggle("active", a.dataset.tab === state.tab));
    // the time range applies to the overview only
    $("#range").hidden = state.tab !== "overview";
    $("#custom-form").hidden = state.tab !== "overview" || (!state.custom && [3600, 86400, 604800].includes(state.since));
    refresh();
  }

  window.addEventListener("hashchange", showTab);
  if (!["key", "alias", "provider", "status", "day", "session", "user", "tag"].includes(state.by)) state.by = "key";
  if (state.by === "tag" && !TAG_NAME.test(state.tag)) state.by = "key";
  $("#tag-input").value = state.tag;
  $("#tag-form").hidden = state.by !== "tag";
  $$("#by button").forEach((x) => x.classList.toggle("active", x.dataset.by === state.by));
  markRange();
  schedule();
  showTab();
})();
