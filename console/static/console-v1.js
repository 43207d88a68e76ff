// Operator console script, v1. Hand-written, no library, no build step.
// Pages work without it (server-rendered HTML, forms, links); it adds:
// live numbers and charts (short polling of small JSON documents, paused
// while the tab is hidden), following operations in flight, filter
// selects that apply at once, "/" to search, and the destroy guard.
// It only reads (GET): every change goes through a confirmation form.
(function () {
  "use strict";

  var SVGNS = "http://www.w3.org/2000/svg";

  function $(sel, root) { return (root || document).querySelector(sel); }
  function $all(sel, root) { return Array.prototype.slice.call((root || document).querySelectorAll(sel)); }

  function get(obj, path) {
    var parts = path.split(".");
    for (var i = 0; i < parts.length; i++) {
      if (obj === null || obj === undefined) { return undefined; }
      obj = obj[parts[i]];
    }
    return obj;
  }

  function shortDur(s) {
    if (s < 60) { return Math.round(s) + "s"; }
    if (s < 3600) { return Math.floor(s / 60) + "m"; }
    if (s < 172800) { var h = Math.floor(s / 3600); var m = Math.floor((s % 3600) / 60); return h + "h" + (m < 10 ? "0" : "") + m + "m"; }
    return Math.floor(s / 86400) + "d";
  }

  function format(el, v) {
    if (v === undefined || v === null) { return "—"; }
    switch (el.getAttribute("data-format")) {
      case "age": return shortDur(v);
      case "time": return new Date(v).toISOString().replace("T", " ").replace(/\.\d+Z$/, "Z");
    }
    if (typeof v === "number" && !Number.isInteger(v)) { v = Math.round(v * 100) / 100; }
    return String(v) + (el.getAttribute("data-unit") || "");
  }

  function el(tag, attrs, text) {
    var e = document.createElement(tag);
    if (attrs) { Object.keys(attrs).forEach(function (k) { e.setAttribute(k, attrs[k]); }); }
    if (text !== undefined) { e.textContent = text; }
    return e;
  }

  function svgEl(tag, attrs) {
    var e = document.createElementNS(SVGNS, tag);
    Object.keys(attrs || {}).forEach(function (k) { e.setAttribute(k, attrs[k]); });
    return e;
  }

  // poll calls url every `every` ms (or what fn returns), only while the
  // page is visible; fn gets the decoded JSON. A 401 ends it and says so.
  function poll(url, every, fn) {
    var timer = null, stopped = false;
    function schedule(ms) { if (!stopped) { timer = setTimeout(tick, ms); } }
    function tick() {
      timer = null;
      if (document.hidden) { return; }
      fetch(url, { credentials: "same-origin", headers: { "Accept": "application/json" } })
        .then(function (r) {
          if (r.status === 401) { stopped = true; sessionEnded(); return null; }
          if (!r.ok) { throw new Error("HTTP " + r.status); }
          return r.json();
        })
        .then(function (data) {
          if (data === null) { return; }
          setStale(false);
          var next = fn(data);
          schedule(typeof next === "number" ? next : every);
        })
        .catch(function () { setStale(true); schedule(every * 2); });
    }
    document.addEventListener("visibilitychange", function () {
      if (!document.hidden && timer === null && !stopped) { tick(); }
    });
    schedule(every);
  }

  function setStale(stale) {
    var b = document.body;
    if (stale) { b.setAttribute("data-stale", "1"); } else { b.removeAttribute("data-stale"); }
  }

  function sessionEnded() {
    if ($("#session-ended")) { return; }
    var p = el("p", { id: "session-ended", "class": "error", role: "alert" }, "Your session has ended. ");
    var a = el("a", { href: "/console/login?next=" + encodeURIComponent(location.pathname + location.search) }, "Log in again");
    p.appendChild(a);
    $("main").insertBefore(p, $("main").firstChild);
  }

  // ---- charts: inline SVG, no library ----

  function bars(svg, values) {
    while (svg.firstChild) { svg.removeChild(svg.firstChild); }
    var w = 300, h = 80, n = values.length, max = 1, total = 0;
    values.forEach(function (v) { max = Math.max(max, v); total += v; });
    var bw = w / n;
    svg.appendChild(svgEl("line", { "class": "base", x1: 0, y1: h - 0.5, x2: w, y2: h - 0.5 }));
    values.forEach(function (v, i) {
      if (v <= 0) { return; }
      var bh = Math.max(2, (h - 12) * v / max);
      var r = svgEl("rect", { x: (i * bw + 0.5).toFixed(1), y: (h - bh).toFixed(1), width: Math.max(1, bw - 1).toFixed(1), height: bh.toFixed(1) });
      var t = svgEl("title", {});
      t.textContent = v + " in minute " + (i - n + 1);
      r.appendChild(t);
      svg.appendChild(r);
    });
    var label = svgEl("text", { x: 2, y: 10 });
    label.textContent = "max " + max + "/min · " + total + " in the hour";
    svg.appendChild(label);
    var base = svg.getAttribute("data-label") || svg.getAttribute("aria-label");
    if (!svg.getAttribute("data-label")) { svg.setAttribute("data-label", base); }
    svg.setAttribute("aria-label", base + ": " + total + " in all, at most " + max + " in a minute");
  }

  function line(svg, series) {
    while (svg.firstChild) { svg.removeChild(svg.firstChild); }
    var w = 300, h = 80, max = 1, min = Infinity, pts = 0;
    series.forEach(function (s) {
      s.forEach(function (v) { if (v !== null) { max = Math.max(max, v); min = Math.min(min, v); pts++; } });
    });
    svg.appendChild(svgEl("line", { "class": "base", x1: 0, y1: h - 0.5, x2: w, y2: h - 0.5 }));
    series.forEach(function (s, k) {
      var coords = [];
      s.forEach(function (v, i) {
        if (v === null) { return; }
        var x = s.length === 1 ? w : (w * i / (s.length - 1));
        coords.push(x.toFixed(1) + "," + (h - 2 - (h - 14) * v / max).toFixed(1));
      });
      if (coords.length === 1) { coords.unshift("0," + coords[0].split(",")[1]); }
      if (coords.length) {
        svg.appendChild(svgEl("polyline", { points: coords.join(" "), "class": k ? "second" : "first" }));
      }
    });
    var label = svgEl("text", { x: 2, y: 10 });
    var last = series[0].length ? series[0][series[0].length - 1] : null;
    label.textContent = pts ? ("now " + (last === null ? "—" : last) + " · max " + Math.round(max * 100) / 100) : "collecting…";
    svg.appendChild(label);
  }

  // ---- overview ----

  function liveOverview(root) {
    var url = root.getAttribute("data-live-url");
    var tracks = {};
    var maxPoints = 200;
    function update(d) {
      $all("[data-live]").forEach(function (e) { e.textContent = format(e, get(d, e.getAttribute("data-live"))); });
      $all("svg[data-chart]").forEach(function (svg) {
        var v = get(d, svg.getAttribute("data-chart"));
        if (Array.isArray(v)) { bars(svg, v); }
      });
      $all("svg[data-track]").forEach(function (svg) {
        var keys = [svg.getAttribute("data-track"), svg.getAttribute("data-track2")].filter(Boolean);
        var series = keys.map(function (k) {
          var s = tracks[k] || (tracks[k] = []);
          var v = get(d, k);
          s.push(typeof v === "number" ? v : null);
          if (s.length > maxPoints) { s.shift(); }
          return s;
        });
        line(svg, series);
      });
      var ports = $("[data-live-list=ports]");
      if (ports && Array.isArray(d.ports)) {
        while (ports.firstChild) { ports.removeChild(ports.firstChild); }
        if (!d.ports.length) { ports.appendChild(el("li", { "class": "empty" }, "No engine holds a port.")); }
        d.ports.forEach(function (p) {
          var li = el("li"), lab = el("label");
          lab.appendChild(document.createTextNode(p.node + " "));
          var m = el("meter", { min: 0, max: p.size, value: p.used }, String(p.used));
          lab.appendChild(m);
          lab.appendChild(document.createTextNode(" " + p.used + " of " + p.size + " (" + Math.round(100 * p.used / Math.max(1, p.size)) + " %)"));
          li.appendChild(lab);
          ports.appendChild(li);
        });
      }
    }
    // Draw at once from a first read, then every 3 s.
    fetch(url, { credentials: "same-origin" }).then(function (r) { return r.ok ? r.json() : null; })
      .then(function (d) { if (d) { update(d); } }).catch(function () { setStale(true); });
    poll(url, 3000, update);
  }

  // ---- one engine and operations in flight ----

  function stateBadge(state) { return el("span", { "class": "state state-" + state }, state); }
  function opBadge(status) { return el("span", { "class": "op op-" + status }, status); }

  function followEngine(root) {
    var url = root.getAttribute("data-engine-url");
    poll(url, 5000, function (d) {
      var st = $("[data-engine-state]");
      if (st) {
        while (st.firstChild) { st.removeChild(st.firstChild); }
        st.appendChild(d.gone ? el("span", { "class": "state state-destroying" }, "gone") : stateBadge(d.status));
      }
      var err = $("[data-engine-error]");
      if (err) { err.textContent = d.last_error || "—"; err.className = d.last_error ? "bad" : ""; }
      var tbody = $("[data-engine-ops]");
      var inFlight = false;
      if (tbody) {
        while (tbody.firstChild) { tbody.removeChild(tbody.firstChild); }
        d.operations.forEach(function (o) {
          if (!o.done) { inFlight = true; }
          var tr = el("tr");
          var td = el("td"); td.appendChild(el("a", { href: "/console/operations/" + o.operation_id }, o.kind)); tr.appendChild(td);
          td = el("td"); td.appendChild(opBadge(o.status)); tr.appendChild(td);
          tr.appendChild(el("td", null, o.actor));
          tr.appendChild(el("td", { title: o.created_at }, shortDur((Date.now() - Date.parse(o.created_at)) / 1000) + " ago"));
          tr.appendChild(el("td", null, o.elapsed_s + " s"));
          tr.appendChild(el("td", { "class": o.error_code ? "bad" : "" }, o.error_code ? (o.error_code + " " + (o.error_message || "")) : ""));
          tbody.appendChild(tr);
        });
        if (!d.operations.length) { tbody.appendChild(el("tr", null)).appendChild(el("td", { colspan: 6, "class": "empty" }, "None.")); }
      }
      return inFlight ? 1500 : 5000;
    });
  }

  function followOperation(root) {
    var url = root.getAttribute("data-op-url");
    var done = false;
    poll(url, 1000, function (o) {
      var st = $("[data-op-status]", root);
      while (st.firstChild) { st.removeChild(st.firstChild); }
      st.appendChild(opBadge(o.status));
      $("[data-op-elapsed]", root).textContent = o.elapsed_s;
      $("[data-op-error]", root).textContent = o.error_code ? (o.error_code + ": " + (o.error_message || "")) : "";
      var p = $("[data-op-progress]", root);
      p.max = Math.max(o.expected_s, o.elapsed_s);
      p.value = o.done ? p.max : o.elapsed_s;
      if (o.done) {
        done = true;
        root.setAttribute("data-op-done", o.status);
        if ($("[data-engine-url]") && !$("[data-op-refresh]", root)) {
          var p = el("p", { "data-op-refresh": "1" });
          p.appendChild(el("a", { href: location.pathname }, "Reload for the new timeline and backup rows"));
          root.appendChild(p);
        }
        return 3600 * 1000; // finished: nothing more to follow
      }
      return 1000;
    });
    return function () { return done; };
  }

  // ---- forms ----

  function enhanceForms() {
    $all("[data-autosubmit]").forEach(function (input) {
      input.addEventListener("change", function () {
        if (input.form && input.form.requestSubmit) { input.form.requestSubmit(); }
      });
    });
    $all("input[data-must-equal]").forEach(function (input) {
      var button = input.form && input.form.querySelector("button[type=submit]");
      if (!button) { return; }
      function check() { button.disabled = input.value.trim() !== input.getAttribute("data-must-equal"); }
      input.addEventListener("input", check);
      check();
    });
    var hot = $("[data-hotkey='/']");
    if (hot) {
      document.addEventListener("keydown", function (e) {
        var t = e.target && e.target.tagName;
        if (e.key === "/" && t !== "INPUT" && t !== "SELECT" && t !== "TEXTAREA" && !e.ctrlKey && !e.metaKey && !e.altKey) {
          e.preventDefault();
          hot.focus();
          hot.select();
        }
      });
    }
  }

  function start() {
    enhanceForms();
    var live = $("[data-live-url]");
    if (live) { liveOverview(live); }
    var eng = $("[data-engine-url]");
    if (eng) { followEngine(eng); }
    $all("[data-op-url]").forEach(followOperation);
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", start);
  } else {
    start();
  }
})();
