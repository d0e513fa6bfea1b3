// The search tree as the page draws it: which nodes to show out of thousands, where each goes,
// and its colour. Pure functions over plain objects; app.js owns the DOM.
"use strict";

const CascowTree = (() => {
  const MAX_VISIBLE = 600; // an SVG of more nodes stops being readable (and quick) anyway
  const ANCESTORS_SHOWN = 6; // above a branch's node or a search hit; the rest are elided
  const MAX_HITS = 200;
  const NEIGHBOURS = 24; // children and siblings shown around a branch's node

  // Children by parent id, each list in commit order; roots are nodes without a known parent.
  function index(nodes) {
    const children = new Map();
    const roots = [];
    for (const node of nodes.values()) {
      if (node.parent !== null && nodes.has(node.parent)) {
        if (!children.has(node.parent)) children.set(node.parent, []);
        children.get(node.parent).push(node.id);
      } else {
        roots.push(node.id);
      }
    }
    const byTime = (a, b) => nodes.get(a).created_ns - nodes.get(b).created_ns || (a < b ? -1 : 1);
    for (const list of children.values()) list.sort(byTime);
    roots.sort(byTime);
    return { children, roots };
  }

  // A label value as a number, as the daemon reads one (names.LABEL_NUMBER_RE: no hex, no
  // blanks, no "Infinity"), else NaN: the page's search and colours agree with `find`.
  const NUMBER = /^[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?$/;
  function labelNumber(text) {
    return NUMBER.test(text) ? Number(text) : NaN;
  }

  // A search: words that must all match. `key=value` (exact), `key>n`, `key<n`, `has:key`,
  // anything else a substring of the id or of a label value.
  function matcher(query) {
    const words = query.trim().split(/\s+/).filter((w) => w.length > 0);
    if (words.length === 0) return null;
    const tests = words.map((word) => {
      let m = /^has:(.+)$/.exec(word);
      if (m) return (n) => Object.prototype.hasOwnProperty.call(n.labels, m[1]);
      m = /^([^=<>]+)(=|<|>)(.*)$/.exec(word);
      if (m) {
        const [, key, op, want] = m;
        return (n) => {
          if (!Object.prototype.hasOwnProperty.call(n.labels, key)) return false;
          const have = n.labels[key];
          if (op === "=") return have === want;
          const a = labelNumber(have), b = labelNumber(want);
          if (Number.isNaN(a) || Number.isNaN(b)) return false;
          return op === "<" ? a < b : a > b;
        };
      }
      const needle = word.toLowerCase();
      return (n) => n.id.toLowerCase().includes(needle) ||
        Object.values(n.labels).some((v) => v.toLowerCase().includes(needle));
    });
    return (n) => tests.every((t) => t(n));
  }

  function addWithAncestors(nodes, id, visible, limit) {
    let cur = id, steps = 0;
    while (cur !== null && nodes.has(cur) && visible.size < MAX_VISIBLE) {
      if (steps <= limit) visible.add(cur);
      const parent = nodes.get(cur).parent;
      if (parent === null || !nodes.has(parent)) { visible.add(cur); break; } // the root always
      cur = parent;
      steps += 1;
    }
  }

  // Which nodes to draw. "focus": each live branch's node and the selected one with a few
  // ancestors, the search hits, the children of the nodes the person opened, and some children
  // and siblings of each branch's node. "all": every node but the subtrees the person closed.
  function visibleSet(nodes, tree, opts) {
    const visible = new Set();
    const hits = [];
    if (opts.match) {
      for (const n of nodes.values()) {
        if (opts.match(n)) { hits.push(n.id); if (hits.length >= MAX_HITS) break; }
      }
    }
    if (opts.mode === "all") {
      const stack = [...tree.roots].reverse();
      while (stack.length && visible.size < MAX_VISIBLE) {
        const id = stack.pop();
        visible.add(id);
        if (!opts.toggled.has(id)) {
          const kids = tree.children.get(id) || [];
          for (let i = kids.length - 1; i >= 0; i--) stack.push(kids[i]);
        }
      }
      for (const id of hits) addWithAncestors(nodes, id, visible, ANCESTORS_SHOWN);
      return { visible, hits, truncated: stack.length > 0 };
    }
    // In order of importance, so that the cap drops the least useful nodes.
    for (const id of tree.roots.slice(0, 20)) visible.add(id);
    const centres = opts.branchNodes.filter((id) => nodes.has(id));
    if (opts.selected && nodes.has(opts.selected)) centres.push(opts.selected);
    for (const id of centres) addWithAncestors(nodes, id, visible, ANCESTORS_SHOWN);
    for (const id of hits) addWithAncestors(nodes, id, visible, ANCESTORS_SHOWN);
    const addSome = (ids, count) => {
      for (const id of ids.slice(0, count)) if (visible.size < MAX_VISIBLE) visible.add(id);
    };
    for (const id of opts.toggled) {
      if (visible.has(id)) addSome(tree.children.get(id) || [], MAX_VISIBLE);
    }
    for (const id of centres) {
      const parent = nodes.get(id).parent;
      addSome(tree.children.get(id) || [], NEIGHBOURS);
      addSome((parent !== null && tree.children.get(parent)) || [], NEIGHBOURS);
    }
    return { visible, hits, truncated: visible.size >= MAX_VISIBLE };
  }

  // The nearest shown ancestor of a shown node, and how many nodes lie hidden in between.
  function shownParent(nodes, id, visible) {
    let cur = nodes.get(id).parent, skipped = 0;
    while (cur !== null && nodes.has(cur)) {
      if (visible.has(cur)) return { parent: cur, skipped };
      cur = nodes.get(cur).parent;
      skipped += 1;
    }
    return { parent: null, skipped: 0 };
  }

  // Left to right: depth is the column, each leaf its own row, a parent centred on its children.
  function layout(nodes, tree, visible) {
    const kids = new Map();
    const roots = [];
    const links = new Map();
    for (const id of visible) {
      const link = shownParent(nodes, id, visible);
      links.set(id, link);
      if (link.parent === null) roots.push(id);
      else {
        if (!kids.has(link.parent)) kids.set(link.parent, []);
        kids.get(link.parent).push(id);
      }
    }
    const byTime = (a, b) => nodes.get(a).created_ns - nodes.get(b).created_ns || (a < b ? -1 : 1);
    roots.sort(byTime);
    for (const list of kids.values()) list.sort(byTime);
    const place = new Map();
    let row = 0, maxDepth = 0;
    const visit = (id, depth) => {
      maxDepth = Math.max(maxDepth, depth);
      const mine = kids.get(id) || [];
      let y;
      if (mine.length === 0) y = row++;
      else {
        const ys = mine.map((k) => visit(k, depth + 1));
        y = (ys[0] + ys[ys.length - 1]) / 2;
      }
      const all = tree.children.get(id) || [];
      const hidden = all.filter((k) => !visible.has(k)).length;
      place.set(id, { depth, row: y, hidden, skipped: links.get(id).skipped, parent: links.get(id).parent });
      return y;
    };
    // At most MAX_VISIBLE nodes are shown, so the recursion stays shallow.
    for (const id of roots) visit(id, 0);
    return { place, rows: row, maxDepth };
  }

  // A stable hue for a text (a label value, an operation's name).
  function hueOf(text) {
    let h = 0;
    for (let i = 0; i < text.length; i++) h = (h * 31 + text.charCodeAt(i)) >>> 0;
    return h % 360;
  }

  // Colour by a label: a blue-to-orange scale when every value of that label is a number,
  // else a hue per distinct value; grey when the node has no such label.
  function colourScale(nodes, key) {
    const none = "#8a94a0";
    if (!key) return { colour: () => "#7fb3e6", legend: null };
    const values = [];
    for (const n of nodes.values()) {
      if (Object.prototype.hasOwnProperty.call(n.labels, key)) values.push(n.labels[key]);
    }
    const numbers = values.map(labelNumber);
    if (values.length && numbers.every(Number.isFinite)) {
      const lo = Math.min(...numbers), hi = Math.max(...numbers);
      const hue = (v) => 220 - 200 * (hi > lo ? (v - lo) / (hi - lo) : 0.5);
      return {
        colour: (n) => Object.prototype.hasOwnProperty.call(n.labels, key)
          ? `hsl(${hue(labelNumber(n.labels[key])).toFixed(0)} 70% 55%)` : none,
        legend: { kind: "number", lo, hi, from: `hsl(220 70% 55%)`, to: `hsl(20 70% 55%)` },
      };
    }
    return {
      colour: (n) => Object.prototype.hasOwnProperty.call(n.labels, key)
        ? `hsl(${hueOf(n.labels[key])} 60% 55%)` : none,
      legend: { kind: "category" },
    };
  }

  return { MAX_VISIBLE, index, matcher, visibleSet, layout, colourScale, hueOf, labelNumber };
})();
