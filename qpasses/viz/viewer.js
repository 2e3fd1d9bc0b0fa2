// The qpasses graph viewer: lays out the selected pass's graph with Graphviz (WebAssembly, vendored
// Viz.js) and re-lays it out whenever a cluster is collapsed or expanded. The page's JSON holds DOT
// fragments made in Python (qpasses/viz/dot.py); this file only puts them together, as assemble_dot does,
// plus the collapsing, which needs a fresh layout and so has to happen here.
"use strict";

(function () {
  const data = JSON.parse(document.getElementById("qviz-data").textContent);
  const canvas = document.getElementById("canvas");
  const passSelect = document.getElementById("pass");
  const diffToggle = document.getElementById("show-diff");
  const search = document.getElementById("search");
  const searchCount = document.getElementById("search-count");
  const details = document.getElementById("details");
  const status = document.getElementById("status");
  const detailsHint = details.firstElementChild;
  const PROXY_PREFIX = "cluster:";

  const state = {
    index: data.initial,
    showDiff: data.show_diff,
    collapsed: new Set(),
    zoom: 1,
    hits: [],
    hit: -1,
    selected: null,
  };
  let viz = null;
  let renders = 0;

  function quote(text) {
    return '"' + text.replace(/\\/g, "\\\\").replace(/"/g, '\\"') + '"';
  }

  function spec() {
    return data.snapshots[state.index];
  }

  function diffShown() {
    return state.showDiff && spec().has_diff;
  }

  function clustersByPath(sp) {
    const byPath = new Map();
    for (const c of sp.clusters) byPath.set(c.path, c);
    return byPath;
  }

  // Big graphs open with their blocks (clusters two levels down, such as layer1.0) collapsed.
  function defaultCollapsed(sp) {
    const visible = sp.nodes.filter((n) => n.diff !== "removed").length;
    if (visible <= data.expand_limit) return new Set();
    return new Set(sp.clusters.filter((c) => c.depth >= 2).map((c) => c.path));
  }

  function collapsedOwner(path, byPath) {
    let owner = null;
    for (let p = path; p; p = byPath.get(p).parent) {
      if (state.collapsed.has(p)) owner = p;
    }
    return owner;
  }

  function nodeStatement(n, showDiff) {
    const diff = showDiff ? n.diff : null;
    const classes = n.classes + (diff ? " " + diff : "");
    return `${quote(n.name)} [${n.attrs} class=${quote(classes)} fillcolor="${n.fill}"` +
      (diff ? " " + data.diff_attrs[diff] : "") + "];";
  }

  function proxyStatement(cluster, members, showDiff) {
    const fills = new Set(members.map((n) => n.fill));
    const fill = fills.size === 1 ? [...fills][0] : data.proxy_mixed_fill;
    let diff = null;
    if (showDiff) {
      const marks = members.map((n) => n.diff);
      if (marks.every((m) => m === "added")) diff = "added";
      else if (marks.every((m) => m === "removed")) diff = "removed";
      else if (marks.some((m) => m)) diff = "changed";
    }
    return `${quote(PROXY_PREFIX + cluster.path)} [${cluster.proxy_attrs} class=${quote("qproxy" + (diff ? " " + diff : ""))}` +
      ` fillcolor="${fill}"` + (diff ? " " + data.diff_attrs[diff] : "") + "];";
  }

  function buildDot(sp) {
    const showDiff = diffShown();
    const byPath = clustersByPath(sp);
    const nodes = sp.nodes.filter((n) => showDiff || n.diff !== "removed");
    const ghosts = new Set(sp.nodes.filter((n) => n.diff === "removed").map((n) => n.name));
    const shownAs = new Map();
    const byCluster = new Map();
    const proxyMembers = new Map();
    for (const n of nodes) {
      const owner = collapsedOwner(n.cluster, byPath);
      if (owner) {
        shownAs.set(n.name, PROXY_PREFIX + owner);
        if (!proxyMembers.has(owner)) proxyMembers.set(owner, []);
        proxyMembers.get(owner).push(n);
      } else {
        shownAs.set(n.name, n.name);
        if (!byCluster.has(n.cluster)) byCluster.set(n.cluster, []);
        byCluster.get(n.cluster).push(n);
      }
    }
    const children = new Map();
    for (const c of sp.clusters) {
      if (!children.has(c.parent)) children.set(c.parent, []);
      children.get(c.parent).push(c);
    }
    const hasContent = (path) => (byCluster.get(path) || []).length > 0 || proxyMembers.has(path) ||
      (children.get(path) || []).some((c) => hasContent(c.path));

    const lines = ["digraph qpasses {", data.graph_head];
    const emit = (path, indent) => {
      for (const n of byCluster.get(path) || []) lines.push(indent + nodeStatement(n, showDiff));
      for (const c of children.get(path) || []) {
        if (proxyMembers.has(c.path)) {
          lines.push(indent + proxyStatement(c, proxyMembers.get(c.path), showDiff));
        } else if (hasContent(c.path)) {
          lines.push(`${indent}subgraph ${quote("cluster_" + c.path)} {`);
          lines.push(`${indent}  graph [${c.attrs}];`);
          emit(c.path, indent + "  ");
          lines.push(indent + "}");
        }
      }
    };
    emit("", "  ");

    // Edges between collapsed blocks are merged; an edge is a ghost only if all it stands for are.
    const edges = new Map();
    for (const [src, dst] of sp.edges) {
      if (!shownAs.has(src) || !shownAs.has(dst)) continue;
      const a = shownAs.get(src);
      const b = shownAs.get(dst);
      if (a === b) continue;
      const key = a + "\u0000" + b;
      const ghost = ghosts.has(src) || ghosts.has(dst);
      edges.set(key, edges.has(key) ? edges.get(key) && ghost : ghost);
    }
    for (const [key, ghost] of edges) {
      const [a, b] = key.split("\u0000");
      lines.push(`  ${quote(a)} -> ${quote(b)}` + (ghost ? ` [${data.ghost_edge_attrs}];` : ";"));
    }
    lines.push("}");
    return lines.join("\n");
  }

  function naturalSize(svg) {
    // Graphviz measures in points: 4/3 px each, so that 100% shows the labels at their font sizes.
    const box = svg.viewBox.baseVal;
    return { width: box.width * 4 / 3, height: box.height * 4 / 3 };
  }

  function applyZoom() {
    const svg = canvas.querySelector("svg");
    if (!svg) return;
    const size = naturalSize(svg);
    svg.style.width = size.width * state.zoom + "px";
    svg.style.height = size.height * state.zoom + "px";
    document.getElementById("zoom-level").textContent = Math.round(state.zoom * 100) + "%";
  }

  function showDetails(name) {
    const node = spec().nodes.find((n) => n.name === name);
    state.selected = name;
    details.replaceChildren();
    if (!node) return;
    const heading = document.createElement("h3");
    heading.textContent = node.name;
    details.appendChild(heading);
    const table = document.createElement("table");
    const rows = node.details.slice();
    if (diffShown() && node.diff) rows.unshift(["diff", node.diff]);
    for (const [key, value] of rows) {
      const tr = table.insertRow();
      const th = document.createElement("th");
      th.textContent = key;
      tr.appendChild(th);
      tr.insertCell().textContent = value;
    }
    details.appendChild(table);
    for (const g of canvas.querySelectorAll("g.qnode.selected")) g.classList.remove("selected");
    const g = document.getElementById("n-" + name);
    if (g) g.classList.add("selected");
  }

  function decorate(svg) {
    for (const g of svg.querySelectorAll("g.qcluster")) {
      const path = g.id.slice(2);
      g.addEventListener("click", () => {
        state.collapsed.add(path);
        render();
      });
      const title = g.querySelector("title");
      if (title) title.textContent = `${path}: click to collapse`;
    }
    for (const g of svg.querySelectorAll("g.qproxy")) {
      const path = g.id.slice(2);
      g.addEventListener("click", () => {
        state.collapsed.delete(path);
        render();
      });
      const title = g.querySelector("title");
      if (title) title.textContent = `${path}: click to expand`;
    }
    for (const g of svg.querySelectorAll("g.qnode")) {
      g.addEventListener("click", (event) => {
        event.stopPropagation();
        showDetails(g.id.slice(2));
      });
    }
  }

  function updateStatus() {
    const sp = spec();
    const shown = canvas.querySelectorAll("g.qnode").length;
    const total = sp.nodes.filter((n) => diffShown() || n.diff !== "removed").length;
    let text = `${total} nodes, ${sp.clusters.length} modules`;
    if (shown < total) text += ` · ${total - shown} inside collapsed modules`;
    if (diffShown()) {
      const c = sp.counts;
      text += ` · vs previous pass: +${c.added} −${c.removed} ~${c.changed}`;
    }
    status.textContent = text;
  }

  function render() {
    const started = performance.now();
    let svg;
    try {
      svg = viz.renderSVGElement(buildDot(spec()));
    } catch (err) {
      canvas.textContent = "Graphviz could not lay out this graph: " + err;
      throw err;
    }
    canvas.replaceChildren(svg);
    decorate(svg);
    applyZoom();
    markHits();
    updateStatus();
    if (state.selected) showDetails(state.selected);
    renders += 1;
    document.body.dataset.renders = String(renders);
    document.body.dataset.layoutMs = String(Math.round(performance.now() - started));
  }

  function selectPass(index) {
    state.index = index;
    state.collapsed = defaultCollapsed(spec());
    state.selected = null;
    details.replaceChildren(detailsHint);
    diffToggle.disabled = !spec().has_diff;
    findHits();
    render();
  }

  function findHits() {
    const query = search.value.trim().toLowerCase();
    state.hit = -1;
    state.hits = query
      ? spec().nodes.filter((n) => (diffShown() || n.diff !== "removed") && n.name.toLowerCase().includes(query))
        .map((n) => n.name)
      : [];
    searchCount.textContent = query ? `${state.hits.length} found` : "";
  }

  function markHits() {
    for (const g of canvas.querySelectorAll(".hit, .current")) g.classList.remove("hit", "current");
    const sp = spec();
    const byPath = clustersByPath(sp);
    for (const [i, name] of state.hits.entries()) {
      const node = sp.nodes.find((n) => n.name === name);
      const owner = collapsedOwner(node.cluster, byPath);
      const g = document.getElementById(owner ? "p-" + owner : "n-" + name);
      if (!g) continue;
      g.classList.add("hit");
      if (i === state.hit) g.classList.add("current");
    }
  }

  // Enter goes to the next match: expands the modules around it, then scrolls it to the middle.
  function nextHit() {
    if (!state.hits.length) return;
    state.hit = (state.hit + 1) % state.hits.length;
    const name = state.hits[state.hit];
    const sp = spec();
    const byPath = clustersByPath(sp);
    const node = sp.nodes.find((n) => n.name === name);
    let expanded = false;
    for (let p = node.cluster; p; p = byPath.get(p).parent) {
      expanded = state.collapsed.delete(p) || expanded;
    }
    if (expanded) render();
    else markHits();
    const g = document.getElementById("n-" + name);
    g.scrollIntoView({ block: "center", inline: "center" });
    searchCount.textContent = `${state.hit + 1} of ${state.hits.length}`;
    showDetails(name);
  }

  function setZoom(zoom) {
    state.zoom = Math.min(4, Math.max(0.05, zoom));
    applyZoom();
  }

  // The whole graph in the window, for an overview; never enlarged beyond 100%.
  function fit() {
    const svg = canvas.querySelector("svg");
    if (!svg) return;
    const size = naturalSize(svg);
    const view = canvas.parentElement;
    setZoom(Math.min(1, (view.clientWidth - 24) / size.width, (view.clientHeight - 24) / size.height));
  }

  function wire() {
    data.snapshots.forEach((sp, i) => {
      const option = document.createElement("option");
      option.value = String(i);
      option.textContent = `${i}: ${sp.label}`;
      passSelect.appendChild(option);
    });
    passSelect.value = String(state.index);
    passSelect.disabled = data.snapshots.length < 2;
    passSelect.addEventListener("change", () => selectPass(Number(passSelect.value)));
    diffToggle.checked = state.showDiff;
    diffToggle.addEventListener("change", () => {
      state.showDiff = diffToggle.checked;
      findHits();
      render();
    });
    search.addEventListener("input", () => {
      findHits();
      markHits();
    });
    search.addEventListener("keydown", (event) => {
      if (event.key === "Enter") nextHit();
    });
    document.addEventListener("keydown", (event) => {
      if (event.key === "/" && document.activeElement !== search) {
        event.preventDefault();
        search.focus();
      }
    });
    document.getElementById("expand-all").addEventListener("click", () => {
      state.collapsed.clear();
      render();
    });
    document.getElementById("collapse-all").addEventListener("click", () => {
      state.collapsed = new Set(spec().clusters.map((c) => c.path));
      render();
    });
    document.getElementById("zoom-in").addEventListener("click", () => setZoom(state.zoom * 1.25));
    document.getElementById("zoom-out").addEventListener("click", () => setZoom(state.zoom / 1.25));
    document.getElementById("zoom-fit").addEventListener("click", fit);
  }

  wire();
  Viz.instance().then((instance) => {
    viz = instance;
    selectPass(state.index);
    document.body.dataset.ready = "1";
  }).catch((err) => {
    canvas.textContent = "The Graphviz engine failed to start: " + err;
    console.error(err);
  });
})();
