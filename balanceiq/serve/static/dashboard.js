/* BalanceIQ dashboard.
 *
 * Polls the controller's JSON API and renders every panel from it: nothing shown here is
 * made up, and anything the API does not know (null, missing) is shown as "—". Each panel
 * gets data-updated="<ms timestamp>" after it renders from a successful fetch; a failed
 * fetch leaves the panel's last good data, marks it data-stale="true" and names the URL
 * in #error-banner, and polling goes on.
 *
 * API text is only ever put into the page with textContent, never as HTML.
 */
(function () {
  "use strict";

  const REFRESH_MS = 2000;
  const FETCH_TIMEOUT_MS = 5000;
  const DASH = "\u2014";
  const COMPONENTS = ["controller", "policy", "xds", "envoy", "prometheus"];
  const MAX_DECISIONS = 20;

  // The cluster shown (?cluster= in the page's URL); null: the API's default (the first).
  let cluster = new URLSearchParams(window.location.search).get("cluster") || null;

  function forCluster(path) {
    if (!cluster) return path;
    return path + (path.includes("?") ? "&" : "?") + "cluster=" + encodeURIComponent(cluster);
  }

  // Each source feeds these panels (ids of the cards); `scoped` sources are per cluster.
  const SOURCES = [
    { key: "status", url: "/api/status", scoped: true, panels: ["status"], render: renderStatus },
    {
      key: "weights",
      url: "/api/weights",
      scoped: true,
      panels: ["weights", "weight-history", "load", "endpoints"],
      render: renderWeights,
    },
    {
      key: "training",
      url: "/api/metrics/training",
      panels: ["training", "loss-history"],
      render: renderTraining,
    },
    {
      key: "timeline",
      url: "/api/timeline?limit=180",
      scoped: true,
      panels: ["timeline"],
      render: renderTimeline,
    },
    {
      key: "decisions",
      url: "/api/decisions?limit=" + MAX_DECISIONS,
      scoped: true,
      panels: ["decisions"],
      render: renderDecisions,
    },
  ];

  const PALETTE = [
    "#2ecc71", "#3498db", "#f39c12", "#e74c3c", "#9b59b6",
    "#1abc9c", "#f1c40f", "#e84393", "#95a5a6", "#00cec9",
  ];
  const GREEN = "#2ecc71";
  const ORANGE = "#f39c12";
  const RED = "#e74c3c";

  // ---------------------------------------------------------------- helpers

  const $ = (id) => document.getElementById(id);

  function isNum(v) {
    return typeof v === "number" && Number.isFinite(v);
  }
  function fixed(v, digits) {
    return isNum(v) ? v.toFixed(digits) : DASH;
  }
  function percent(v, digits) {
    return isNum(v) ? (v * 100).toFixed(digits) : DASH;
  }
  const INT_FMT = new Intl.NumberFormat("en-US", { maximumFractionDigits: 0 });
  function integer(v) {
    return isNum(v) ? INT_FMT.format(v) : DASH;
  }
  function text(v) {
    return v === null || v === undefined || v === "" ? DASH : String(v);
  }
  function clock(ts) {
    if (!isNum(ts)) return DASH;
    return new Date(ts * 1000).toLocaleTimeString("en-GB", { hour12: false });
  }
  function yesNo(v) {
    return v === true ? "yes" : v === false ? "no" : DASH;
  }
  function stateClass(state) {
    return state === "up" || state === "degraded" || state === "down" ? state : "unknown";
  }

  /** el("td", {className: "num", text: "1.0", dataset: {field: "p95_ms"}}, [children]) */
  function el(tag, opts, children) {
    const node = document.createElement(tag);
    const o = opts || {};
    if (o.className) node.className = o.className;
    if (o.text !== undefined) node.textContent = o.text;
    if (o.title) node.title = o.title;
    if (o.dataset) for (const k of Object.keys(o.dataset)) node.dataset[k] = o.dataset[k];
    if (o.attrs) for (const k of Object.keys(o.attrs)) node.setAttribute(k, o.attrs[k]);
    if (o.style) for (const k of Object.keys(o.style)) node.style[k] = o.style[k];
    for (const c of children || []) if (c) node.appendChild(c);
    return node;
  }

  function setText(id, value) {
    const node = $(id);
    if (node) node.textContent = value;
  }

  function fill(list, items, emptyText) {
    list.replaceChildren(...(items.length ? items : [el("li", { className: "muted", text: emptyText })]));
  }

  // A stable colour per endpoint, in the order endpoints are first seen.
  const colours = new Map();
  function colourFor(address) {
    if (!colours.has(address)) colours.set(address, PALETTE[colours.size % PALETTE.length]);
    return colours.get(address);
  }

  let lastStamp = 0;
  function nextStamp() {
    // Strictly increasing, so every successful render changes data-updated.
    lastStamp = Math.max(Date.now(), lastStamp + 1);
    return String(lastStamp);
  }

  function overrideText(o) {
    if (!o) return DASH;
    let s = text(o.action) + " " + text(o.address);
    if (isNum(o.weight)) s += " (weight " + integer(o.weight) + ")";
    s += isNum(o.expires_at) ? " until " + clock(o.expires_at) : " (no expiry)";
    if (o.reason) s += " \u2014 " + o.reason;
    return s;
  }

  // ---------------------------------------------------------------- charts

  const charts = {};
  let chartJsMissing = false;

  function chartLib() {
    if (typeof window.Chart === "function") return window.Chart;
    chartJsMissing = true;
    return null;
  }

  function baseOptions(extra) {
    return Object.assign(
      {
        responsive: true,
        maintainAspectRatio: false,
        animation: false,
        plugins: { legend: { labels: { color: "#e6e6e6", boxWidth: 12 } } },
      },
      extra || {}
    );
  }

  function axis(title, extra) {
    return Object.assign(
      {
        ticks: { color: "#b8bec8" },
        grid: { color: "rgba(255,255,255,0.08)" },
        title: { display: !!title, text: title || "", color: "#b8bec8" },
      },
      extra || {}
    );
  }

  /** Create the chart on first use, then update it in place (no flicker, no leaks). */
  function chart(key, canvasId, config) {
    const Chart = chartLib();
    if (!Chart) return null;
    let c = charts[key];
    if (!c) {
      Chart.defaults.color = "#e6e6e6";
      Chart.defaults.borderColor = "rgba(255,255,255,0.08)";
      c = charts[key] = new Chart($(canvasId), config);
      return c;
    }
    c.data.labels = config.data.labels;
    // Keep dataset objects when the shape is unchanged so Chart.js keeps its state.
    const ds = config.data.datasets;
    if (c.data.datasets.length === ds.length) {
      ds.forEach((d, i) => Object.assign(c.data.datasets[i], d));
    } else {
      c.data.datasets = ds;
    }
    c.update("none");
    return c;
  }

  // ---------------------------------------------------------------- status

  function ensureTile(name) {
    let tile = document.querySelector('.tile[data-component="' + CSS.escape(name) + '"]');
    if (tile) return tile;
    tile = el("div", { className: "tile", dataset: { component: name, testid: "status-" + name } }, [
      el("div", { className: "tile-name", text: name }),
      el("div", { className: "tile-state state-unknown", text: DASH, dataset: { field: "state" } }),
      el("div", { className: "tile-reason", text: DASH, dataset: { field: "reason" } }),
    ]);
    $("status-tiles").appendChild(tile);
    return tile;
  }

  function renderStatus(s) {
    const comps = s && typeof s.components === "object" && s.components ? s.components : {};
    const names = COMPONENTS.concat(Object.keys(comps).filter((n) => !COMPONENTS.includes(n)));
    for (const name of names) {
      const c = comps[name] || {};
      const tile = ensureTile(name);
      const cls = stateClass(c.state);
      tile.dataset.state = cls;
      const st = tile.querySelector('[data-field="state"]');
      st.textContent = text(c.state);
      st.className = "tile-state state-" + cls;
      tile.querySelector('[data-field="reason"]').textContent = text(c.reason);
    }

    renderClusterSelect(Array.isArray(s.clusters) ? s.clusters : [], s.cluster);

    const overall = $("overall-state");
    overall.textContent = text(s.overall);
    overall.className = "state-pill state-" + stateClass(s.overall);
    setText("hdr-asof", clock(s.timestamp));

    const mode = $("status-mode");
    const shadow = s.control_mode === "shadow";
    mode.textContent = shadow ? "shadow · " + text(s.mode) : text(s.mode);
    mode.className = "mode-pill" + (shadow ? " mode-shadow" : s.mode ? " mode-" + s.mode : "");
    setText("status-mode-reason", shadow ? "shadow mode: decisions are recorded with their estimated effect, nothing is pushed. " + text(s.mode_reason) : text(s.mode_reason));

    const g = s.guardrails || {};
    setText("guard-min-share", isNum(g.min_share) ? percent(g.min_share, 1) + "%" : DASH);
    setText("guard-max-shift", isNum(g.max_shift) ? percent(g.max_shift, 1) + "%" : DASH);
    const notes = Array.isArray(g.last_notes) ? g.last_notes : [];
    fill($("guard-notes"), notes.map((n) => el("li", { text: String(n) })), "no guardrail notes");
    const ovs = Array.isArray(g.overrides) ? g.overrides : [];
    fill(
      $("guard-overrides"),
      ovs.map((o) => el("li", { text: overrideText(o), dataset: { address: text(o.address) } })),
      "none active"
    );
  }

  // A selector once the deployment steers more than one cluster; each option names the
  // cluster's state, so a cluster in trouble shows without switching to it.
  function renderClusterSelect(list, shown) {
    const select = $("cluster-select");
    const names = list.map((c) => String(c.cluster));
    select.hidden = names.length < 2;
    $("hdr-cluster").hidden = names.length >= 2;
    if (names.length < 2) return;
    const current = Array.from(select.options).map((o) => o.value + "|" + o.textContent);
    const wanted = list.map((c) => String(c.cluster) + "|" + String(c.cluster) + " (" + text(c.state) + ")");
    if (current.join("\n") !== wanted.join("\n")) {
      select.replaceChildren(
        ...list.map((c) => el("option", { text: String(c.cluster) + " (" + text(c.state) + ")", attrs: { value: String(c.cluster) } }))
      );
    }
    if (shown && select.value !== shown && document.activeElement !== select) select.value = shown;
  }

  function chooseCluster(name) {
    cluster = name || null;
    const params = new URLSearchParams(window.location.search);
    if (cluster) params.set("cluster", cluster);
    else params.delete("cluster");
    const q = params.toString();
    window.history.replaceState(null, "", window.location.pathname + (q ? "?" + q : ""));
    for (const id of ["weights", "weight-history", "load", "endpoints", "timeline", "decisions", "status"]) delete $(id).dataset.updated;
    refresh();
  }

  // ---------------------------------------------------------------- weights, load, endpoints

  function badgesFor(ep) {
    const o = ep.override || null;
    const out = [];
    const tip = o ? overrideText(o) : "";
    if (o && o.action === "pin") out.push(el("span", { className: "badge badge-pinned", text: "pinned", title: tip }));
    if ((o && o.action === "drain") || ep.health === "DRAINING") {
      out.push(el("span", { className: "badge badge-drained", text: "drained", title: tip || "Envoy health: DRAINING" }));
    }
    if (o && o.action === "set") out.push(el("span", { className: "badge badge-override", text: "override", title: tip }));
    return out;
  }

  function renderWeights(w) {
    const eps = Array.isArray(w.endpoints) ? w.endpoints : [];
    eps.forEach((ep) => colourFor(ep.address));

    setText("hdr-cluster", text(w.cluster));
    setText("hdr-version", text(w.version));
    const mode = $("hdr-mode");
    mode.textContent = text(w.mode);
    mode.className = "mode-pill" + (w.mode ? " mode-" + w.mode : "");

    // Weight list
    fill(
      $("weights-list"),
      eps.map((ep) =>
        el("li", { className: "weight-row", dataset: { address: ep.address, testid: "weight-row" } }, [
          el("span", { className: "swatch", style: { background: colourFor(ep.address) } }),
          el("span", {}, [
            el("span", { className: "weight-addr", text: text(ep.address) }),
            el("span", { className: "weight-cloud", text: text(ep.cloud) }),
            ...badgesFor(ep),
          ]),
          el("span", { className: "weight-value", text: integer(ep.weight), dataset: { testid: "weight-value" } }),
          el("span", {
            className: "weight-share",
            text: isNum(ep.share) ? percent(ep.share, 1) + "%" : DASH,
            dataset: { testid: "weight-share" },
          }),
        ])
      ),
      "no endpoints"
    );

    chart("weights", "weights-chart", {
      type: "bar",
      data: {
        labels: eps.map((ep) => ep.address),
        datasets: [
          {
            label: "weight",
            data: eps.map((ep) => (isNum(ep.weight) ? ep.weight : null)),
            backgroundColor: eps.map((ep) => colourFor(ep.address)),
          },
        ],
      },
      options: baseOptions({
        plugins: { legend: { display: false } },
        scales: { x: axis(""), y: axis("weight", { beginAtZero: true }) },
      }),
    });

    // Weight history
    const history = (Array.isArray(w.history) ? w.history.slice() : []).filter((h) => h && h.weights);
    history.sort((a, b) => (a.timestamp || 0) - (b.timestamp || 0));
    const addrs = eps.map((ep) => ep.address);
    for (const h of history) for (const a of Object.keys(h.weights)) if (!addrs.includes(a)) addrs.push(a);
    chart("history", "weight-history-chart", {
      type: "line",
      data: {
        labels: history.map((h) => clock(h.timestamp)),
        datasets: addrs.map((a) => ({
          label: a,
          data: history.map((h) => (isNum(h.weights[a]) ? h.weights[a] : null)),
          borderColor: colourFor(a),
          backgroundColor: colourFor(a),
          pointRadius: 0,
          borderWidth: 2,
          tension: 0.2,
        })),
      },
      options: baseOptions({
        scales: { x: axis("", { ticks: { color: "#b8bec8", maxTicksLimit: 8 } }), y: axis("weight", { beginAtZero: true }) },
      }),
    });

    // Load distribution
    const total = $("total-requests");
    total.textContent = integer(w.total_requests);
    total.dataset.value = isNum(w.total_requests) ? String(w.total_requests) : "";
    chart("load", "load-chart", {
      type: "pie",
      data: {
        labels: eps.map((ep) => ep.address),
        datasets: [
          {
            label: "rps",
            data: eps.map((ep) => (isNum(ep.rps) ? ep.rps : 0)),
            backgroundColor: eps.map((ep) => colourFor(ep.address)),
            borderColor: "#17181c",
          },
        ],
      },
      options: baseOptions({ plugins: { legend: { position: "right", labels: { color: "#e6e6e6", boxWidth: 12 } } } }),
    });

    // Endpoints table
    const tbody = $("endpoints-table").tBodies[0];
    const rows = eps.map((ep) => {
      let health = ep.healthy === true ? "healthy" : ep.healthy === false ? "unhealthy" : DASH;
      let cls = ep.healthy === true ? "ok" : ep.healthy === false ? "bad" : "muted";
      if (ep.health === "DRAINING") {
        health = health === DASH ? "draining" : health + " \u00b7 draining";
        if (cls !== "bad") cls = "warn";
      }
      return el("tr", { dataset: { address: ep.address } }, [
        el("td", { className: "mono", text: text(ep.address), dataset: { field: "address" } }),
        el("td", { text: text(ep.cloud), dataset: { field: "cloud" } }),
        el("td", { text: text(ep.region), dataset: { field: "region" } }),
        el("td", { className: "num", text: fixed(ep.p95_ms, 1), dataset: { field: "p95_ms" } }),
        el("td", { className: "num", text: percent(ep.error_rate, 2), dataset: { field: "error_rate" } }),
        el("td", { className: "num", text: fixed(ep.rps, 1), dataset: { field: "rps" } }),
        el("td", { className: "num", text: fixed(ep.cost_per_million, 2), dataset: { field: "cost_per_million" } }),
        el("td", { className: cls, text: health, dataset: { field: "health" } }),
      ]);
    });
    tbody.replaceChildren(
      ...(rows.length ? rows : [el("tr", {}, [el("td", { className: "muted", text: "no endpoints", attrs: { colspan: "8" } })])])
    );
  }

  // ---------------------------------------------------------------- training

  function renderTraining(t) {
    setText("train-iterations", integer(t.training_iterations));
    setText("train-reward", fixed(t.current_reward, 3));
    setText("train-buffer", integer(t.buffer_size));
    setText("train-accuracy", isNum(t.model_accuracy) ? percent(t.model_accuracy, 1) + "%" : DASH);
    setText("train-last-update", text(t.last_update));

    const rewards = (Array.isArray(t.recent_rewards) ? t.recent_rewards : []).map((v) => (isNum(v) ? v : null));
    const losses = (Array.isArray(t.recent_losses) ? t.recent_losses : []).map((v) => (isNum(v) ? v : null));
    const n = Math.max(rewards.length, losses.length);
    const labels = Array.from({ length: n }, (_, i) => String(i + 1));
    chart("training", "training-chart", {
      type: "line",
      data: {
        labels: labels,
        datasets: [
          { label: "reward", data: rewards, borderColor: GREEN, backgroundColor: GREEN, yAxisID: "y", pointRadius: 2, tension: 0.2 },
          { label: "loss", data: losses, borderColor: ORANGE, backgroundColor: ORANGE, yAxisID: "y1", pointRadius: 2, tension: 0.2 },
        ],
      },
      options: baseOptions({
        scales: {
          x: axis("recent iteration"),
          y: axis("reward", { position: "left" }),
          y1: axis("loss", { position: "right", grid: { drawOnChartArea: false } }),
        },
      }),
    });
    chart("loss", "loss-chart", {
      type: "bar",
      data: {
        labels: losses.map((_, i) => String(i + 1)),
        datasets: [{ label: "loss", data: losses, backgroundColor: RED }],
      },
      options: baseOptions({
        plugins: { legend: { display: false } },
        scales: { x: axis("recent iteration"), y: axis("loss", { beginAtZero: true }) },
      }),
    });

    const runs = Array.isArray(t.runs) ? t.runs : [];
    fill(
      $("train-runs"),
      runs.map((r) => {
        const cls = r.state === "done" ? "ok" : r.state === "failed" ? "bad" : "warn";
        let s = "run " + text(r.id) + ": " + text(r.state) + ", iteration " + text(r.iteration) + "/" + text(r.iterations);
        s += ", reward " + fixed(r.reward, 3);
        if (r.message) s += " \u2014 " + r.message;
        return el("li", { className: cls, text: s, dataset: { run: text(r.id) } });
      }),
      "no training runs"
    );
  }

  // ---------------------------------------------------------------- latency and cost

  function renderTimeline(t) {
    const points = (Array.isArray(t.points) ? t.points : []).filter((p) => p && isNum(p.t));
    const saving = $("saving-vs-equal");
    saving.textContent = isNum(t.saving_vs_equal) ? percent(t.saving_vs_equal, 1) + "%" : DASH;
    saving.dataset.value = isNum(t.saving_vs_equal) ? String(t.saving_vs_equal) : "";
    const last = points.length ? points[points.length - 1] : null;
    setText("cost-now", last && isNum(last.cost_per_million) ? "$" + fixed(last.cost_per_million, 3) + " / M requests" : DASH);
    setText("p99-note", t.fleet_p99_reason ? "fleet p99: " + text(t.fleet_p99_reason) : "");
    const clouds = [];
    for (const p of points) for (const c of Object.keys(p.p95_ms_by_cloud || {})) if (!clouds.includes(c)) clouds.push(c);
    // Prometheus's p99 samples, each on the decision nearest in time.
    const p99 = (Array.isArray(t.fleet_p99_ms) ? t.fleet_p99_ms : []).filter((x) => x && isNum(x.t) && isNum(x.ms));
    const nearest = (ts) => {
      let best = null;
      for (const x of p99) if (best === null || Math.abs(x.t - ts) < Math.abs(best.t - ts)) best = x;
      return best && Math.abs(best.t - ts) < 30 ? best.ms : null;
    };
    const events = (Array.isArray(t.events) ? t.events : []).filter((e) => e && isNum(e.t));
    const eventAt = points.map((p, i) => {
      const next = i + 1 < points.length ? points[i + 1].t : Infinity;
      return events.filter((e) => e.t >= p.t && e.t < next);
    });
    const datasets = clouds.map((c) => ({
      label: "p95 " + c,
      data: points.map((p) => (p.p95_ms_by_cloud && isNum(p.p95_ms_by_cloud[c]) ? p.p95_ms_by_cloud[c] : null)),
      borderColor: colourFor(c), backgroundColor: colourFor(c), pointRadius: 0, borderWidth: 2, tension: 0.2, yAxisID: "y",
    }));
    datasets.push({
      label: "fleet p99 (Envoy)", data: points.map((p) => nearest(p.t)), borderColor: RED, backgroundColor: RED,
      borderDash: [6, 4], pointRadius: 0, borderWidth: 2, tension: 0.2, yAxisID: "y",
    });
    datasets.push({
      label: "$ / M requests", data: points.map((p) => (isNum(p.cost_per_million) ? p.cost_per_million : null)),
      borderColor: "#ecf0f1", backgroundColor: "#ecf0f1", pointRadius: 0, borderWidth: 2, tension: 0.2, yAxisID: "cost",
    });
    datasets.push({
      label: "$ / M at equal weights", data: points.map((p) => (isNum(p.equal_cost_per_million) ? p.equal_cost_per_million : null)),
      borderColor: "#95a5a6", backgroundColor: "#95a5a6", borderDash: [2, 3], pointRadius: 0, borderWidth: 1, yAxisID: "cost",
    });
    // Decisions and events as markers on the cost line, described in the tooltip.
    datasets.push({
      label: "events", type: "line", showLine: false, pointRadius: 5, pointStyle: "triangle", borderColor: ORANGE, backgroundColor: ORANGE,
      data: points.map((p, i) => (eventAt[i].length && isNum(p.cost_per_million) ? p.cost_per_million : null)), yAxisID: "cost",
    });
    chart("timeline", "timeline-chart", {
      type: "line",
      data: { labels: points.map((p) => clock(p.t)), datasets },
      options: baseOptions({
        plugins: {
          tooltip: {
            callbacks: {
              afterBody: (items) => {
                const i = items.length ? items[0].dataIndex : -1;
                return i >= 0 && eventAt[i] ? eventAt[i].map((e) => e.text) : [];
              },
            },
          },
        },
        scales: {
          x: axis("", { ticks: { color: "#b8bec8", maxTicksLimit: 8 } }),
          y: axis("latency (ms)", { beginAtZero: true, position: "left" }),
          cost: axis("$ / M requests", { beginAtZero: true, position: "right", grid: { drawOnChartArea: false } }),
        },
      }),
    });
  }

  // ---------------------------------------------------------------- decisions

  function renderDecisions(d) {
    const list = (Array.isArray(d.decisions) ? d.decisions.slice() : []).filter((x) => x && typeof x === "object");
    list.sort((a, b) => (isNum(b.seq) && isNum(a.seq) ? b.seq - a.seq : (b.timestamp || 0) - (a.timestamp || 0)));
    const rows = list.slice(0, MAX_DECISIONS).map((x) => {
      const critical = Array.isArray(x.critical) ? (x.critical.length ? x.critical.join(", ") : "none") : DASH;
      const notes = Array.isArray(x.notes) ? x.notes.map(String) : [];
      const fx = x.effect && typeof x.effect === "object" ? x.effect : null;
      if (fx && fx.current && fx.proposed) {
        // What it would have done, in the operator's units: $ per million and the busiest endpoint.
        notes.push("would change $/M " + fixed(fx.current.cost_per_million, 3) + " → " + fixed(fx.proposed.cost_per_million, 3) +
          ", busiest " + percent(fx.current.max_utilisation, 0) + "% → " + percent(fx.proposed.max_utilisation, 0) + "%");
      }
      const notesCell = el("td", { dataset: { field: "notes" }, title: "telemetry: " + text(x.source) + ", xDS version " + text(x.version) }, [
        document.createTextNode(notes.length ? notes.join("; ") : x.error ? "" : DASH),
        x.error ? el("span", { className: "bad", text: (notes.length ? " " : "") + "error: " + x.error }) : null,
      ]);
      const pushCls = x.shadow ? "" : x.pushed === false || x.acked === false ? "bad" : x.pushed === true && x.acked === true ? "ok" : "";
      return el("tr", { dataset: { seq: isNum(x.seq) ? String(x.seq) : "" } }, [
        el("td", { className: "mono", text: clock(x.timestamp), dataset: { field: "time" } }),
        el("td", {}, [el("span", { className: "mode-pill" + (x.shadow ? " mode-shadow" : x.mode ? " mode-" + x.mode : ""), text: (x.shadow ? "shadow · " : "") + text(x.mode) })]),
        el("td", { className: "mono small", text: critical, dataset: { field: "critical" } }),
        el("td", { className: "num", text: fixed(x.reward, 3), dataset: { field: "reward" } }),
        el("td", { className: "num", text: percent(x.moved, 1), dataset: { field: "moved" } }),
        el("td", { className: pushCls, text: yesNo(x.pushed) + " / " + yesNo(x.acked), dataset: { field: "push" } }),
        el("td", { className: "num", text: fixed(x.push_ms, 1), dataset: { field: "push_ms" } }),
        notesCell,
      ]);
    });
    $("decisions-table").tBodies[0].replaceChildren(
      ...(rows.length ? rows : [el("tr", {}, [el("td", { className: "muted", text: "no decisions yet", attrs: { colspan: "8" } })])])
    );
  }

  // ---------------------------------------------------------------- fetching and errors

  const errors = new Map(); // url -> message

  function renderErrors() {
    const banner = $("error-banner");
    const items = [];
    for (const [url, msg] of errors) items.push(el("li", { text: "GET " + url + " \u2014 " + msg, dataset: { url: url } }));
    if (chartJsMissing) items.push(el("li", { text: "Chart.js did not load (/static/vendor/chart.umd.min.js): charts are off" }));
    $("error-list").replaceChildren(...items);
    banner.hidden = items.length === 0;
  }

  async function getJSON(url) {
    const ctrl = new AbortController();
    const timer = setTimeout(() => ctrl.abort(), FETCH_TIMEOUT_MS);
    try {
      const r = await fetch(url, { cache: "no-store", headers: { Accept: "application/json" }, signal: ctrl.signal });
      if (!r.ok) throw new Error("HTTP " + r.status + (r.statusText ? " " + r.statusText : ""));
      return await r.json();
    } catch (e) {
      if (e && e.name === "AbortError") throw new Error("timed out after " + FETCH_TIMEOUT_MS / 1000 + " s");
      throw e;
    } finally {
      clearTimeout(timer);
    }
  }

  async function refreshSource(src) {
    const url = src.scoped ? forCluster(src.url) : src.url;
    const asked = cluster;
    try {
      const data = await getJSON(url);
      if (!data || typeof data !== "object") throw new Error("response is not a JSON object");
      if (asked !== cluster) return; // the selection changed meanwhile: the next round renders it
      src.render(data);
      const stamp = nextStamp();
      for (const id of src.panels) {
        const card = $(id);
        card.dataset.updated = stamp;
        card.dataset.stale = "false";
      }
      for (const key of errors.keys()) if (key.split("?")[0] === src.url.split("?")[0]) errors.delete(key);
    } catch (e) {
      errors.set(url, (e && e.message) || String(e));
      for (const id of src.panels) $(id).dataset.stale = "true";
    }
  }

  async function refreshOnce() {
    await Promise.all(SOURCES.map(refreshSource));
    setText("last-refresh", new Date().toLocaleTimeString("en-GB", { hour12: false }));
    renderErrors();
  }

  let running = false;
  let again = false;
  let timer = null;

  function schedule() {
    clearTimeout(timer);
    timer = null;
    if ($("auto-refresh").checked) timer = setTimeout(refresh, REFRESH_MS);
  }

  async function refresh() {
    if (running) {
      again = true; // run once more right after the current round
      return;
    }
    running = true;
    $("refresh-now").setAttribute("aria-busy", "true");
    try {
      do {
        again = false;
        await refreshOnce();
      } while (again);
    } finally {
      running = false;
      $("refresh-now").removeAttribute("aria-busy");
      schedule();
    }
  }

  function start() {
    $("refresh-now").addEventListener("click", () => {
      clearTimeout(timer);
      refresh();
    });
    $("auto-refresh").addEventListener("change", schedule);
    $("cluster-select").addEventListener("change", (e) => chooseCluster(e.target.value));
    refresh();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
