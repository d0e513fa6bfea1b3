// The monitor page: follows /api/stream, keeps the tree from /api/tree deltas, draws it, and
// resets a branch on a clicked node. Every id, name and label is written with textContent or
// as an attribute value, never parsed as HTML: agents choose them.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const COLUMN = 220; // px per tree level: room for an id and the labels line
const ROW = 40; // px per leaf: an id, a line of labels, the +n of hidden children
const $ = (id) => document.getElementById(id);

const state = {
  nodes: new Map(), // id -> {id, parent, created_ns, files, size, labels}
  tree: { children: new Map(), roots: [] },
  seq: 0,
  summary: null,
  selected: null,
  toggled: new Set(), // focus view: nodes opened; whole tree: nodes closed
  fetching: false,
  refetch: false,
  drawQueued: false,
  treeKey: "", // what the tree drawn last showed
};

function el(tag, attrs = {}, text = null) {
  const node = tag.startsWith("svg:") ? document.createElementNS(SVG, tag.slice(4)) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  if (text !== null) node.textContent = text;
  return node;
}

// At most `max` characters: whole code points, so an emoji is never cut into half a pair.
function shorten(text, max) {
  const chars = [...text];
  return chars.length > max ? chars.slice(0, max - 1).join("") + "…" : text;
}

// A caller's text set among others on one line: its direction marks (an RTL override) end
// with it (first-strong isolate ... pop directional isolate), not past it.
function isolated(text) {
  return "\u2068" + text + "\u2069";
}

// What an operation acted on: the branches it was given, or, for a verb given none (label,
// prune), the snapshot.
function eventSubject(e) {
  return e.names.length ? e.names.join(" ") : e.id || "";
}

function when(ns) {
  return new Date(ns / 1e6).toLocaleTimeString([], { hour12: false });
}

// -- data --------------------------------------------------------------------------------
async function fetchTree() {
  if (state.fetching) { state.refetch = true; return; }
  state.fetching = true;
  try {
    do {
      state.refetch = false;
      const response = await fetch(`/api/tree?since=${state.seq}`);
      if (!response.ok) throw new Error(`/api/tree: ${response.status}`);
      const delta = await response.json();
      if (delta.full) state.nodes = new Map();
      for (const node of delta.nodes) state.nodes.set(node.id, node);
      for (const id of delta.removed) state.nodes.delete(id);
      state.seq = delta.seq;
      state.tree = CascowTree.index(state.nodes);
      if (state.selected && !state.nodes.has(state.selected)) state.selected = null;
    } while (state.refetch || (state.summary && state.summary.tree_seq > state.seq));
  } finally {
    state.fetching = false;
  }
  draw();
}

function onState(summary) {
  state.summary = summary;
  if (summary.tree_seq !== state.seq) fetchTree().catch(showFetchError);
  draw();
}

function showFetchError(error) {
  $("connection").textContent = `error: ${error.message}`;
  $("connection").className = "badge bad";
}

function connect() {
  const source = new EventSource("/api/stream");
  source.addEventListener("state", (event) => {
    $("connection").textContent = "live";
    $("connection").className = "badge good";
    onState(JSON.parse(event.data));
  });
  source.onerror = () => {
    $("connection").textContent = "reconnecting…";
    $("connection").className = "badge bad";
  };
}

// -- drawing -----------------------------------------------------------------------------
function draw() {
  if (state.drawQueued) return;
  state.drawQueued = true;
  requestAnimationFrame(() => {
    state.drawQueued = false;
    if (!state.summary) return;
    drawHeader();
    drawColourChoices();
    drawTree();
    drawBranches();
    drawEvents();
    drawLatency();
    drawNodePanel();
  });
}

function drawHeader() {
  const s = state.summary;
  $("mount").textContent = s.mount;
  $("count-snapshots").textContent = String(s.snapshots);
  $("count-branches").textContent = String(s.branches.length);
  const list = $("problems");
  list.replaceChildren(...Object.entries(s.problems).map(([part, text]) => el("li", { "data-part": part }, text)));
}

function drawColourChoices() {
  const select = $("colour-by");
  const keys = state.summary.label_keys;
  const have = [...select.options].slice(1).map((o) => o.value);
  if (have.length === keys.length && have.every((k, i) => k === keys[i])) return;
  const chosen = select.value;
  select.replaceChildren(el("option", { value: "" }, "(none)"), ...keys.map((k) => el("option", { value: k }, k)));
  if (!chosen) {
    const preferred = ["reward", "value", "visits"].find((k) => keys.includes(k));
    select.value = preferred || "";
  } else {
    select.value = keys.includes(chosen) ? chosen : "";
  }
}

function branchesAt() {
  const at = new Map();
  for (const b of state.summary.branches) {
    if (b.parent === null) continue;
    if (!at.has(b.parent)) at.set(b.parent, []);
    at.get(b.parent).push(b.name);
  }
  return at;
}

// Label keys written on the nodes: the colour's key first, then the usual MCTS ones.
function shownKeys() {
  const keys = state.summary.label_keys;
  const colour = $("colour-by").value;
  const out = colour ? [colour] : [];
  for (const k of ["reward", "visits", "value", "action", ...keys]) {
    if (out.length >= 3) break;
    if (keys.includes(k) && !out.includes(k)) out.push(k);
  }
  return out;
}

function drawTree() {
  const svg = $("tree");
  const at = branchesAt();
  const mode = $("view-mode").value;
  // Redraw only when what the tree shows changed: a node replaced under the pointer loses the
  // click, and 10,000 nodes take a while to sift.
  const key = JSON.stringify([state.seq, state.summary.branches, mode, $("search").value,
    $("colour-by").value, state.selected, [...state.toggled]]);
  if (key === state.treeKey) return;
  state.treeKey = key;
  const match = CascowTree.matcher($("search").value);
  const { visible, hits, truncated } = CascowTree.visibleSet(state.nodes, state.tree, {
    mode, match, toggled: state.toggled, branchNodes: [...at.keys()], selected: state.selected,
  });
  const { place, rows, maxDepth } = CascowTree.layout(state.nodes, state.tree, visible);
  const scale = CascowTree.colourScale(state.nodes, $("colour-by").value);
  const keys = shownKeys();
  const hitSet = new Set(hits);
  const x = (p) => 20 + p.depth * COLUMN;
  const y = (p) => 36 + p.row * ROW;

  const edges = el("svg:g", { class: "edges" });
  const dots = el("svg:g", { class: "nodes" });
  for (const [id, p] of place) {
    if (p.parent !== null) {
      const q = place.get(p.parent);
      const path = el("svg:path", {
        d: `M${x(q)},${y(q)} C${x(q) + COLUMN / 2},${y(q)} ${x(p) - COLUMN / 2},${y(p)} ${x(p)},${y(p)}`,
        class: p.skipped ? "edge elided" : "edge",
      });
      edges.append(path);
      if (p.skipped) {
        edges.append(el("svg:text", { x: (x(p) + x(q)) / 2, y: (y(p) + y(q)) / 2 - 4, class: "elided-count" }, `⋯ ${p.skipped}`));
      }
    }
    const node = state.nodes.get(id);
    const g = el("svg:g", {
      class: "node" + (id === state.selected ? " selected" : "") + (hitSet.has(id) ? " hit" : "") + (at.has(id) ? " live" : ""),
      transform: `translate(${x(p)},${y(p)})`,
      "data-id": id,
    });
    g.append(el("svg:circle", { r: at.has(id) ? 8 : 6, fill: scale.colour(node) }));
    g.append(el("svg:text", { x: 11, y: -14, class: "node-id" }, shorten(id, 24)));
    const labelText = keys.filter((k) => Object.prototype.hasOwnProperty.call(node.labels, k))
      .map((k) => `${k}=${isolated(shorten(node.labels[k], 16))}`).join(" ");
    if (labelText) g.append(el("svg:text", { x: 11, y: -3, class: "node-labels" }, shorten(labelText, 30)));
    g.addEventListener("click", () => select(id));
    dots.append(g);
    if (at.has(id)) {
      const names = at.get(id);
      const tag = names.slice(0, 3).join(", ") + (names.length > 3 ? ` +${names.length - 3}` : "");
      dots.append(el("svg:text", { x: x(p) - 11, y: y(p) - 6, class: "branch-tag", "text-anchor": "end" }, shorten(tag, 40)));
    }
    const kids = state.tree.children.get(id) || [];
    if (kids.length) {
      const open = mode === "all" ? !state.toggled.has(id) : p.hidden === 0;
      const toggle = el("svg:text", {
        x: x(p) + 11, y: y(p) + 13, class: "toggle", "data-toggle": id,
      }, open ? "−" : `+${p.hidden}`);
      toggle.addEventListener("click", (event) => { event.stopPropagation(); toggleNode(id); });
      dots.append(toggle);
    }
  }
  svg.setAttribute("width", String(60 + (maxDepth + 1) * COLUMN + 180));
  svg.setAttribute("height", String(40 + Math.max(rows, 1) * ROW));
  svg.replaceChildren(edges, dots);

  const note = [`${visible.size} of ${state.nodes.size} nodes shown`];
  if (match) note.push(`${hits.length}${hits.length >= 200 ? "+" : ""} match`);
  if (truncated) note.push(`capped at ${CascowTree.MAX_VISIBLE}: search or focus to see others`);
  $("tree-note").textContent = note.join(" · ");
  drawLegend(scale.legend);
}

function drawLegend(legend) {
  const box = $("legend");
  const key = $("colour-by").value;
  if (!legend || !key) { box.textContent = ""; return; }
  if (legend.kind === "number") {
    const bar = el("span", { class: "scale" });
    box.replaceChildren(`${key}: ${legend.lo} `, bar, ` ${legend.hi}`);
  } else {
    box.textContent = `${key}: one colour per value; grey: no such label`;
  }
}

function toggleNode(id) {
  if (state.toggled.has(id)) state.toggled.delete(id);
  else state.toggled.add(id);
  draw();
}

function select(id) {
  state.selected = id;
  $("rollback-result").textContent = "";
  draw();
}

function drawBranches() {
  const rows = state.summary.branches.map((b) => {
    const tr = el("tr");
    tr.append(el("td", {}, b.name));
    const td = el("td");
    if (b.parent === null) td.append(el("span", { class: "muted" }, "(empty snapshot)"));
    else {
      const link = el("a", { href: "#", class: "node-link" }, b.parent);
      link.addEventListener("click", (event) => { event.preventDefault(); select(b.parent); });
      td.append(link);
    }
    tr.append(td);
    return tr;
  });
  $("branches").tBodies[0].replaceChildren(...rows);
}

// An operation of a caller outside root and the admin group (any user may write ctl, and is
// refused every change) names its uid: its row says whose it was, and it draws no bar.
function isOutsiders(e) {
  return e.uid !== null && e.uid !== undefined;
}

function drawEvents() {
  const rows = [...state.summary.events].reverse().map((e) => {
    const classes = [e.result === "ok" ? "" : "failed", isOutsiders(e) ? "outsider" : ""];
    const tr = el("tr", { class: classes.join(" ").trim() });
    const op = el("td", {}, e.op);
    if (isOutsiders(e)) {
      op.append(el("span", { class: "uid", title: "a caller outside root and the admin group" },
        `uid ${String(e.uid)}`));
    }
    tr.append(el("td", {}, when(e.time_ns)), op, el("td", {}, shorten(eventSubject(e), 40)),
      el("td", {}, e.result), el("td", { class: "num" }, e.latency_ms.toFixed(1)));
    return tr;
  });
  $("events").tBodies[0].replaceChildren(...rows);
  drawOutsiders(state.summary.outsiders);
}

// How many operations of other users this page's monitor read, and how many the daemon let go
// from its short ring of them before any read (a flood between two polls).
function drawOutsiders(outsiders) {
  const line = $("outsiders");
  if (!outsiders || outsiders.seen === 0) {
    line.hidden = true;
    return;
  }
  let text = `${outsiders.seen.toLocaleString("en")} operation(s) of users outside root and the admin group read (rows with a uid)`;
  if (outsiders.dropped > 0) {
    text += `; the daemon has let ${outsiders.dropped.toLocaleString("en")} of theirs go from its short ring, so not all were seen`;
  }
  line.textContent = text;
  line.hidden = false;
}

// The daemon's own operations get colours far apart; any other a hue from its name.
const OP_COLOURS = {
  commit: "#f2c14e", branch: "#7fb3e6", discard: "#8a94a0", prune: "#b07cc6", reset: "#e76f51",
  label: "#5cb85c", import: "#4fc1c9", rebase: "#d98bb4", gc: "#c9a36b",
};

function opColour(op) {
  return Object.prototype.hasOwnProperty.call(OP_COLOURS, op) ? OP_COLOURS[op]
    : `hsl(${CascowTree.hueOf(op)} 60% 55%)`;
}

function drawLatency() {
  const svg = $("latency");
  const events = state.summary.latency.filter((e) => !isOutsiders(e)); // root's and the admin group's
  const width = 360, height = 90;
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  if (events.length === 0) {
    svg.replaceChildren(el("svg:text", { x: 8, y: 20, class: "muted-text" }, "no operations yet"));
    $("latency-legend").textContent = "";
    return;
  }
  const max = Math.max(...events.map((e) => e.latency_ms), 1);
  const top = Math.log10(max + 1);
  const step = width / Math.max(events.length, 40);
  const bars = events.map((e, i) => {
    const h = Math.max(1, (Math.log10(e.latency_ms + 1) / top) * (height - 16));
    const bar = el("svg:rect", {
      x: (i * step).toFixed(1), y: (height - h).toFixed(1), width: Math.max(1, step - 1).toFixed(1), height: h.toFixed(1),
      fill: opColour(e.op), class: e.result === "ok" ? "" : "failed",
    });
    bar.append(el("svg:title", {}, `${e.op} ${eventSubject(e)}: ${e.latency_ms.toFixed(2)} ms (${e.result})`));
    return bar;
  });
  svg.replaceChildren(el("svg:text", { x: width - 4, y: 10, "text-anchor": "end", class: "muted-text" }, `max ${max.toFixed(1)} ms (log scale)`), ...bars);
  const ops = [...new Set(events.map((e) => e.op))].sort();
  $("latency-legend").replaceChildren(...ops.map((op) => {
    const item = el("span", { class: "op" }, op);
    item.style.setProperty("--op-colour", opColour(op));
    return item;
  }));
}

function drawNodePanel() {
  const panel = $("node-panel");
  const node = state.selected && state.nodes.get(state.selected);
  if (!node) { panel.hidden = true; return; }
  panel.hidden = false;
  $("node-id").textContent = node.id;
  const facts = [["parent", node.parent === null ? "(none)" : node.parent],
    ["created", new Date(node.created_ns / 1e6).toISOString()], ["files", String(node.files)],
    ["size", `${node.size} bytes`]];
  const branchesHere = state.summary.branches.filter((b) => b.parent === node.id).map((b) => b.name);
  if (branchesHere.length) facts.push(["branches here", branchesHere.join(", ")]);
  $("node-facts").replaceChildren(...facts.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));
  $("node-labels").tBodies[0].replaceChildren(...Object.entries(node.labels).sort().map(([k, v]) => {
    const tr = el("tr");
    tr.append(el("td", {}, k), el("td", {}, v));
    return tr;
  }));
  const select = $("rollback-branch");
  const names = state.summary.branches.map((b) => b.name);
  const have = [...select.options].map((o) => o.value);
  if (have.length !== names.length || have.some((n, i) => n !== names[i])) {
    const chosen = select.value;
    select.replaceChildren(...names.map((n) => el("option", { value: n }, n)));
    if (names.includes(chosen)) select.value = chosen;
  }
  const readOnly = state.summary.read_only;
  $("rollback").hidden = readOnly;
  $("rollback-button").disabled = names.length === 0;
  if (readOnly) $("rollback-result").textContent = "the monitor runs with --read-only";
}

// -- rollback ----------------------------------------------------------------------------
function askRollback() {
  const branch = $("rollback-branch").value;
  const id = state.selected;
  if (!branch || !id) return;
  $("confirm-text").textContent = `Reset branch “${branch}” to node “${id}”? Its uncommitted changes are dropped.`;
  const dialog = $("confirm");
  dialog.returnValue = "";
  dialog.onclose = () => { if (dialog.returnValue === "ok") rollback(branch, id); };
  dialog.showModal();
}

async function rollback(branch, id) {
  const out = $("rollback-result");
  out.className = "";
  out.textContent = `resetting ${branch} to ${id}…`;
  try {
    const response = await fetch("/api/reset", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ branch, id }),
    });
    const reply = await response.json();
    if (reply.ok) {
      out.className = "good";
      out.textContent = `branch ${branch} now sits on ${id} (ok ${reply.result})`;
    } else {
      out.className = "bad";
      out.textContent = `refused: ${reply.errno || response.status} ${reply.message}`;
    }
  } catch (error) {
    out.className = "bad";
    out.textContent = `failed: ${error.message}`;
  }
}

// -- start -------------------------------------------------------------------------------
function start() {
  $("search").addEventListener("input", draw);
  $("colour-by").addEventListener("change", draw);
  $("view-mode").addEventListener("change", () => { state.toggled.clear(); draw(); });
  $("rollback-button").addEventListener("click", askRollback);
  connect();
  if ("serviceWorker" in navigator) {
    navigator.serviceWorker.register("/sw.js").catch(() => { /* the page works without it */ });
  }
}

start();
